//! Build contexts: a directory streamed to the engine as a tar archive, without the paths
//! that its .dockerignore excludes.
//!
//! The archive is written on a blocking thread and handed over in chunks through a bounded
//! channel, so memory stays at a few chunks whatever the context's size, and the engine
//! starts reading before the walk ends.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ignore::{IgnoreError, IgnoreRules};

/// Size of the chunks sent to the engine.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks waiting for the engine; with [`CHUNK_BYTES`] this bounds the buffer to 2 MiB.
const CHANNEL_CHUNKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("reading .dockerignore in {dir} failed: {source}")]
    ReadIgnore { dir: PathBuf, source: io::Error },
    #[error(transparent)]
    Ignore(#[from] IgnoreError),
    #[error("Dockerfile {path:?} is not a file in the build context")]
    MissingDockerfile { path: String },
    #[error("archiving {path} failed: {source}")]
    Archive { path: PathBuf, source: io::Error },
    #[error("the engine stopped reading the build context")]
    Aborted,
}

/// What was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextSummary {
    pub entries: u64,
    pub bytes: u64,
    /// Paths left out because of .dockerignore (an excluded directory counts once).
    pub excluded: u64,
}

/// A build context being archived: the byte stream for the request body, and the task
/// that reports how the archiving ended.
pub struct ContextStream {
    pub body: mpsc::Receiver<Result<Bytes, io::Error>>,
    pub task: JoinHandle<Result<ContextSummary, ContextError>>,
}

impl ContextStream {
    /// Turns the receiving half into a stream for `bollard::body_try_stream`.
    pub fn into_parts(
        self,
    ) -> (
        impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
        JoinHandle<Result<ContextSummary, ContextError>>,
    ) {
        let stream = futures_util::stream::unfold(self.body, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (stream, self.task)
    }
}

/// Loads the rules of `dir`'s .dockerignore (none when the file is absent) and checks that
/// `dockerfile`, a path relative to `dir`, is a file that the rules leave in.
pub fn load_rules(dir: &Path, dockerfile: &str) -> Result<IgnoreRules, ContextError> {
    let mut rules = match fs::read_to_string(dir.join(".dockerignore")) {
        Ok(text) => IgnoreRules::parse(&text)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => IgnoreRules::default(),
        Err(source) => {
            return Err(ContextError::ReadIgnore {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    let is_file = fs::symlink_metadata(dir.join(dockerfile)).is_ok_and(|meta| meta.is_file());
    if !is_file {
        return Err(ContextError::MissingDockerfile {
            path: dockerfile.to_string(),
        });
    }
    rules.keep(dockerfile);
    rules.keep(".dockerignore");
    Ok(rules)
}

/// Starts archiving `dir` with `rules` on a blocking thread.
pub fn stream(dir: PathBuf, rules: IgnoreRules) -> ContextStream {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let task = tokio::task::spawn_blocking(move || {
        let sender = ChunkSender { tx: tx.clone() };
        let result = write_archive(&dir, &rules, BufWriter::with_capacity(CHUNK_BYTES, sender));
        if let Err(err) = &result {
            // Fail the request body too, so the engine does not build a truncated context.
            let _ = tx.blocking_send(Err(io::Error::other(err.to_string())));
        }
        result
    });
    ContextStream { body: rx, task }
}

/// Writes the archive of `dir` into `out`, for callers that want it in a file or buffer.
pub fn write_archive<W: Write>(
    dir: &Path,
    rules: &IgnoreRules,
    out: W,
) -> Result<ContextSummary, ContextError> {
    let mut archive = Archive {
        builder: tar::Builder::new(out),
        rules,
        root: dir,
        summary: ContextSummary::default(),
    };
    archive.walk(dir, "")?;
    let mut out = archive
        .builder
        .into_inner()
        .map_err(|err| archive_error(dir, err))?;
    out.flush().map_err(|err| archive_error(dir, err))?;
    Ok(archive.summary)
}

fn archive_error(path: &Path, source: io::Error) -> ContextError {
    if source.kind() == io::ErrorKind::BrokenPipe {
        return ContextError::Aborted;
    }
    ContextError::Archive {
        path: path.to_path_buf(),
        source,
    }
}

struct Archive<'a, W: Write> {
    builder: tar::Builder<W>,
    rules: &'a IgnoreRules,
    root: &'a Path,
    summary: ContextSummary,
}

impl<W: Write> Archive<'_, W> {
    /// Adds the entries of `dir` (whose path in the archive is `prefix`), sorted by name so
    /// that the same tree always gives the same archive.
    fn walk(&mut self, dir: &Path, prefix: &str) -> Result<(), ContextError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|err| archive_error(dir, err))?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let relative = format!("{prefix}{}", name.to_string_lossy());
            let meta = fs::symlink_metadata(&path).map_err(|err| archive_error(&path, err))?;
            if self.rules.excludes(&relative) {
                self.summary.excluded += 1;
                if meta.is_dir() && self.rules.may_include_inside(&relative) {
                    self.walk(&path, &format!("{relative}/"))?;
                }
                continue;
            }
            self.append(&path, &relative, &meta)?;
            if meta.is_dir() {
                self.walk(&path, &format!("{relative}/"))?;
            }
        }
        Ok(())
    }

    /// Appends one entry owned by root, as the Docker CLI sends contexts. Sockets, FIFOs
    /// and devices are skipped: a git checkout never contains them.
    fn append(
        &mut self,
        path: &Path,
        relative: &str,
        meta: &fs::Metadata,
    ) -> Result<(), ContextError> {
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_mtime(meta.mtime().max(0) as u64);
        header.set_uid(0);
        header.set_gid(0);
        let file_type = meta.file_type();
        let result = if file_type.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            self.builder
                .append_data(&mut header, format!("{relative}/"), io::empty())
        } else if file_type.is_symlink() {
            let target = fs::read_link(path).map_err(|err| archive_error(path, err))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            self.builder.append_link(&mut header, relative, target)
        } else if file_type.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = fs::File::open(path).map_err(|err| archive_error(path, err))?;
            self.summary.bytes += meta.len();
            self.builder
                .append_data(&mut header, relative, ExactReader::new(file, meta.len()))
        } else {
            return Ok(());
        };
        result.map_err(|err| archive_error(self.root.join(relative).as_path(), err))?;
        self.summary.entries += 1;
        Ok(())
    }
}

/// Reads exactly `len` bytes, failing if the file shrank after it was measured (a larger
/// file is cut at `len`), so the tar header never disagrees with the data.
struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
}

impl<R: Read> ExactReader<R> {
    fn new(inner: R, len: u64) -> Self {
        ExactReader {
            inner: inner.take(len),
            remaining: len,
        }
    }
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        if read == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was being archived",
            ));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// The write end of the channel: each write sends one chunk, waiting while the channel is
/// full. A closed channel (the request was dropped) is reported as a broken pipe.
struct ChunkSender {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
}

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, contents) in files {
            let full = dir.path().join(path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, contents).unwrap();
        }
        dir
    }

    fn entry_names(dir: &Path) -> Vec<String> {
        let rules = load_rules(dir, "Dockerfile").unwrap();
        let mut bytes = Vec::new();
        write_archive(dir, &rules, &mut bytes).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn archive_honours_dockerignore_and_exceptions() {
        let dir = tree(&[
            ("Dockerfile", "FROM scratch\n"),
            (
                ".dockerignore",
                ".git\nsecrets\ndocs\n!docs/keep.md\n*.log\n",
            ),
            (".git/HEAD", "ref"),
            ("secrets/key", "k"),
            ("docs/keep.md", "keep"),
            ("docs/drop.md", "drop"),
            ("app/main.py", "print()"),
            ("app/debug.log", "x"),
            ("debug.log", "x"),
        ]);
        let names = entry_names(dir.path());
        assert_eq!(
            names,
            [
                ".dockerignore",
                "Dockerfile",
                "app/",
                "app/debug.log",
                "app/main.py",
                "docs/keep.md"
            ]
        );
    }

    #[test]
    fn dockerfile_is_sent_even_when_ignored() {
        let dir = tree(&[
            ("Dockerfile", "FROM scratch\n"),
            (".dockerignore", "*\n"),
            ("a", ""),
        ]);
        assert_eq!(entry_names(dir.path()), [".dockerignore", "Dockerfile"]);
    }

    #[test]
    fn missing_dockerfile_is_reported() {
        let dir = tree(&[("README", "")]);
        let err = load_rules(dir.path(), "Dockerfile").err().unwrap();
        assert!(
            matches!(err, ContextError::MissingDockerfile { .. }),
            "{err}"
        );
    }

    #[test]
    fn symlinks_are_archived_as_links_and_modes_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tree(&[("Dockerfile", "FROM scratch\n"), ("run.sh", "#!/bin/sh\n")]);
        fs::set_permissions(dir.path().join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();

        let rules = load_rules(dir.path(), "Dockerfile").unwrap();
        let mut bytes = Vec::new();
        write_archive(dir.path(), &rules, &mut bytes).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.uid().unwrap(), 0);
            match entry.path().unwrap().to_str().unwrap() {
                "link" => {
                    assert_eq!(header.entry_type(), tar::EntryType::Symlink);
                    let target = header.link_name().unwrap().unwrap();
                    assert_eq!(target.to_str(), Some("/etc/passwd"));
                }
                "run.sh" => assert_eq!(header.mode().unwrap(), 0o755),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn stream_yields_the_same_archive_and_a_summary() {
        let dir = tree(&[("Dockerfile", "FROM scratch\n"), ("a/b", "12345")]);
        let rules = load_rules(dir.path(), "Dockerfile").unwrap();
        let mut context = stream(dir.path().to_path_buf(), rules);
        let mut bytes = Vec::new();
        while let Some(chunk) = context.body.recv().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        let summary = context.task.await.unwrap().unwrap();

        assert_eq!(summary.entries, 3);
        assert_eq!(summary.bytes, 18);
        let count = tar::Archive::new(&bytes[..]).entries().unwrap().count();
        assert_eq!(count, 3);
    }
}
