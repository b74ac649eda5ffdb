//! Project sources: fetching one commit of a git repository into a run's workspace.
//!
//! git runs as a child process with an explicit argument vector, never through a shell.
//! The commit sha and the repository URL are checked before git runs. The sha must be 7
//! to 64 hex digits. The URL must use https, ssh, git or a local path (file://), which
//! git also enforces through GIT_ALLOW_PROTOCOL, so `ext::` and other transports that run
//! commands are rejected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Transports git may use, whatever its own configuration allows.
const ALLOWED_PROTOCOLS: &str = "file:https:ssh:git";
/// Most of git's stderr kept for an error message.
const MAX_STDERR_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid git sha {value:?}: {reason}")]
    InvalidSha { value: String, reason: &'static str },
    #[error("invalid repository URL {url}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("preparing workspace {path} failed: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running git failed (is git installed?): {0}")]
    Spawn(std::io::Error),
    #[error("git {command} failed with {status}: {stderr}")]
    Git {
        command: &'static str,
        status: String,
        stderr: String,
    },
    #[error("commit {sha} was not found in {url}")]
    CommitNotFound { sha: String, url: String },
    #[error("fetching {url} did not finish within {} s", timeout.as_secs())]
    TimedOut { url: String, timeout: Duration },
    #[error("fetching {url} was stopped because the run was cancelled")]
    Cancelled { url: String },
}

/// A commit id from a run: 7 to 64 hex digits, stored in lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSha(String);

impl GitSha {
    pub fn parse(value: &str) -> Result<GitSha, SourceError> {
        let invalid = |reason| SourceError::InvalidSha {
            value: value.chars().take(80).collect(),
            reason,
        };
        if !(7..=64).contains(&value.len()) {
            return Err(invalid("must be 7 to 64 characters long"));
        }
        if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("must contain only hex digits"));
        }
        Ok(GitSha(value.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks whether this is a whole object id (SHA-1 or SHA-256), which a server can be
    /// asked for directly, rather than an abbreviation.
    pub fn is_full(&self) -> bool {
        self.0.len() == 40 || self.0.len() == 64
    }
}

impl fmt::Display for GitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository URL that git may fetch from. Display shows it with any password replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    url: String,
    redacted: String,
}

impl RepoUrl {
    /// Accepts https://, ssh://, git:// and file:// URLs, scp-like `user@host:path`
    /// addresses and absolute local paths.
    pub fn parse(url: &str) -> Result<RepoUrl, SourceError> {
        let redacted = redact_userinfo(url);
        let invalid = |reason| SourceError::InvalidUrl {
            url: redacted.clone(),
            reason,
        };
        if url.trim() != url || url.is_empty() {
            return Err(invalid("must not be empty or start or end with whitespace"));
        }
        if url.starts_with('-') {
            return Err(invalid("must not start with '-'"));
        }
        if url.chars().any(char::is_control) {
            return Err(invalid("must not contain control characters"));
        }
        let lower = url.to_ascii_lowercase();
        let known = ["https://", "ssh://", "git://", "file://", "/"];
        let scp_like = !lower.contains("://") && !lower.contains("::") && is_scp_like(url);
        if !known.iter().any(|prefix| lower.starts_with(prefix)) && !scp_like {
            return Err(invalid(
                "expected an https://, ssh://, git:// or file:// URL, user@host:path, \
                 or an absolute path",
            ));
        }
        Ok(RepoUrl {
            url: url.to_string(),
            redacted,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// Tells whether the URL is a plain path on this machine. A file:// URL is not one: git
    /// fetches it through its transport.
    fn is_local_path(&self) -> bool {
        self.url.starts_with('/')
    }

    /// Replaces the URL's password, if it has one, in `text` such as git's stderr.
    fn scrub(&self, text: &str) -> String {
        let text = text.replace(&self.url, &self.redacted);
        match password_of(&self.url) {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text,
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoUrl({:?})", self.redacted)
    }
}

/// `user@host:path` or `host:path`, git's scp-like syntax: a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    match url.find(':') {
        Some(colon) => colon > 0 && !url[..colon].contains('/'),
        None => false,
    }
}

/// Returns the password in `scheme://user:password@host/...`, if any.
fn password_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, password)| password)
}

fn redact_userinfo(url: &str) -> String {
    match password_of(url) {
        Some(password) => url.replacen(&format!(":{password}@"), ":***@", 1),
        None => url.to_string(),
    }
}

/// A run's scratch directory, deleted when [`Workspace::remove`] is called or, failing
/// that, when the guard is dropped.
pub struct Workspace {
    path: PathBuf,
    removed: bool,
}

impl Workspace {
    /// Creates `parent/name` afresh, deleting what an earlier attempt of the run left.
    pub async fn create(parent: &Path, name: &str) -> Result<Workspace, SourceError> {
        let path = parent.join(name);
        let error = |source| SourceError::Workspace {
            path: path.clone(),
            source,
        };
        match tokio::fs::remove_dir_all(&path).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(error(err)),
            _ => {}
        }
        tokio::fs::create_dir_all(&path).await.map_err(error)?;
        Ok(Workspace {
            path,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the workspace and everything in it.
    pub async fn remove(mut self) -> Result<(), std::io::Error> {
        self.removed = true;
        match tokio::fs::remove_dir_all(&self.path).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(err) = std::fs::remove_dir_all(&self.path) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(path = %self.path.display(), error = %err,
                        "removing workspace failed");
                }
            }
        }
    }
}

/// Fetches commit `sha` of `url` into the new directory `dir` and checks it out. Returns
/// the full commit id. A whole sha is fetched alone (`--depth 1`). For an abbreviated
/// sha, or when the server does not serve a commit by id, every branch and tag is
/// fetched instead. A repository given as a local path is cloned with shared objects.
pub async fn fetch(
    url: &RepoUrl,
    sha: &GitSha,
    dir: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<String, SourceError> {
    let work = fetch_commit(url, sha, dir);
    tokio::select! {
        result = tokio::time::timeout(timeout, work) => result.unwrap_or_else(|_| {
            Err(SourceError::TimedOut { url: url.to_string(), timeout })
        }),
        _ = cancel.cancelled() => Err(SourceError::Cancelled { url: url.to_string() }),
    }
}

async fn fetch_commit(url: &RepoUrl, sha: &GitSha, dir: &Path) -> Result<String, SourceError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| SourceError::Workspace {
            path: dir.to_path_buf(),
            source,
        })?;
    if url.is_local_path() {
        clone_shared(url, dir).await?;
    } else {
        fetch_into(url, sha, dir).await?;
    }

    let full = resolve(dir, url, sha).await?;
    let checkout = [
        "-c",
        "advice.detachedHead=false",
        "checkout",
        "--quiet",
        "--detach",
        &full,
    ];
    git(dir, url, "checkout", &checkout).await?;
    Ok(full)
}

/// Creates a repository in `dir` and fetches `sha` (alone when it is a whole sha) from
/// `url` into it.
async fn fetch_into(url: &RepoUrl, sha: &GitSha, dir: &Path) -> Result<(), SourceError> {
    let format = if sha.as_str().len() == 64 {
        "sha256"
    } else {
        "sha1"
    };
    let object_format = format!("--object-format={format}");
    git(dir, url, "init", &["init", "--quiet", &object_format]).await?;

    let mut fetched = false;
    if sha.is_full() {
        let args = [
            "fetch",
            "--quiet",
            "--no-tags",
            "--depth",
            "1",
            "--",
            url.as_str(),
            sha.as_str(),
        ];
        match git(dir, url, "fetch", &args).await {
            Ok(_) => fetched = true,
            Err(err) => tracing::debug!(error = %err, "fetching the commit alone failed"),
        }
    }
    if !fetched {
        // NOTE: branches and tags only, so an abbreviated sha of a commit reachable only
        // from other refs (such as refs/pull/N/head) is not found. Submodules and Git LFS
        // objects are not fetched at all.
        let args = [
            "fetch",
            "--quiet",
            "--tags",
            "--",
            url.as_str(),
            "+refs/heads/*:refs/remotes/origin/*",
        ];
        git(dir, url, "fetch", &args).await?;
    }
    Ok(())
}

/// Clones the repository at a local path into `dir` without copying its objects. The
/// clone reads them from the source repository (git's alternates), so its cost does not
/// grow with the repository, where a fetch packs and copies every object of the commit.
///
/// Nothing reads the objects after the checkout, so a `git gc` in the source repository
/// can only disturb the checkout itself.
async fn clone_shared(url: &RepoUrl, dir: &Path) -> Result<(), SourceError> {
    let args = [
        "clone",
        "--quiet",
        "--shared",
        "--no-checkout",
        "--",
        url.as_str(),
        ".",
    ];
    git(dir, url, "clone", &args).await.map(drop)
}

/// Resolves `sha` to the full id of a commit in the repository at `dir`.
async fn resolve(dir: &Path, url: &RepoUrl, sha: &GitSha) -> Result<String, SourceError> {
    let spec = format!("{sha}^{{commit}}");
    let not_found = || SourceError::CommitNotFound {
        sha: sha.to_string(),
        url: url.to_string(),
    };
    let output = git(
        dir,
        url,
        "rev-parse",
        &["rev-parse", "--verify", "--quiet", &spec],
    )
    .await
    .map_err(|err| match err {
        SourceError::Git { stderr, .. } if !stderr.contains("ambiguous") => not_found(),
        other => other,
    })?;
    let full = output.trim().to_string();
    if !full.starts_with(sha.as_str()) {
        return Err(not_found());
    }
    Ok(full)
}

/// Runs git in `dir` and returns its stdout. Errors carry git's stderr with the URL's
/// password removed.
async fn git(
    dir: &Path,
    url: &RepoUrl,
    command: &'static str,
    args: &[&str],
) -> Result<String, SourceError> {
    let mut child = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(SourceError::Spawn)?;

    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut out = String::new();
    let (read_out, err_text, status) = tokio::join!(
        stdout.read_to_string(&mut out),
        read_limited(stderr),
        child.wait()
    );
    let status = status.map_err(SourceError::Spawn)?;
    read_out.map_err(SourceError::Spawn)?;
    if status.success() {
        return Ok(out);
    }
    Err(SourceError::Git {
        command,
        status: status.to_string(),
        stderr: url.scrub(err_text.trim()),
    })
}

async fn read_limited(mut stderr: tokio::process::ChildStderr) -> String {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(read) = stderr.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        // Reading goes on past the limit, so git does not block on a full pipe.
        let room = MAX_STDERR_BYTES.saturating_sub(bytes.len());
        bytes.extend_from_slice(&buffer[..read.min(room)]);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_accepts_hex_and_lowercases() {
        assert_eq!(GitSha::parse("ABCDEF1").unwrap().as_str(), "abcdef1");
        assert!(GitSha::parse(&"a".repeat(64)).is_ok());
        assert!(GitSha::parse(&"a".repeat(40)).unwrap().is_full());
        assert!(!GitSha::parse("abcdef1").unwrap().is_full());
    }

    #[test]
    fn sha_rejects_other_text() {
        for bad in [
            "abc",
            "",
            &"a".repeat(65),
            "--upload-pack=x",
            "HEAD~1aaaa",
            "abcdefg",
        ] {
            let err = GitSha::parse(bad).unwrap_err();
            assert!(matches!(err, SourceError::InvalidSha { .. }), "{bad:?}");
        }
    }

    #[test]
    fn url_forms_git_supports_are_accepted() {
        for url in [
            "https://github.com/acme/odoo.git",
            "ssh://git@github.com/acme/odoo.git",
            "git@github.com:acme/odoo.git",
            "file:///srv/git/odoo",
            "/srv/git/odoo",
        ] {
            assert!(RepoUrl::parse(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn url_options_and_command_transports_are_rejected() {
        for url in [
            "--upload-pack=touch /tmp/x",
            "-oProxyCommand=x",
            "ext::sh -c touch% /tmp/pwned",
            "fd::17",
            "http://example.com/repo",
            "relative/path",
            "",
            "https://host/repo\n--x",
        ] {
            let err = RepoUrl::parse(url).unwrap_err();
            assert!(matches!(err, SourceError::InvalidUrl { .. }), "{url:?}");
        }
    }

    #[test]
    fn url_password_is_redacted_everywhere() {
        let url = RepoUrl::parse("https://bot:s3cr3t@git.example.com/acme/odoo.git").unwrap();
        assert_eq!(
            url.to_string(),
            "https://bot:***@git.example.com/acme/odoo.git"
        );
        assert!(!format!("{url:?}").contains("s3cr3t"));
        let scrubbed = url.scrub("fatal: unable to access 'https://bot:s3cr3t@git.example.com/'");
        assert!(!scrubbed.contains("s3cr3t"), "{scrubbed}");
        let err = RepoUrl::parse("https://bot:s3cr3t@host/x\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
