//! Image references: the repository a project's images go to, and the tags derived from
//! a run's commit and git ref.
//!
//! The git ref is untrusted text from a webhook. It only ever becomes a tag through
//! [`ref_slug`], whose output always matches Docker's tag grammar
//! `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, whatever the branch is called.

use sha2::{Digest, Sha256};

use crate::config::{is_path_component, is_registry_host, RegistrySettings};

/// Longest tag Docker accepts.
pub const MAX_TAG_LEN: usize = 128;
/// Appended to the ref slug for the moving tag, as the OdooOps GitHub build job does.
pub const LATEST_SUFFIX: &str = "-latest";
/// Longest repository reference (host, port and path) a registry accepts.
const MAX_REPOSITORY_LEN: usize = 255;

/// Turns a git ref into the first part of a tag: `refs/heads/` or `refs/tags/` is dropped,
/// letters are lowercased, every run of other characters than `a-z 0-9 _ .` becomes one
/// `-`, and `-` and `.` are trimmed from both ends. A ref that leaves nothing becomes
/// `ref-<hash>`, and a slug too long for a tag is cut and ends in a hash of the whole ref,
/// so two different refs do not share a tag by accident.
pub fn ref_slug(git_ref: &str) -> String {
    let name = ["refs/heads/", "refs/tags/", "refs/"]
        .iter()
        .find_map(|prefix| git_ref.strip_prefix(prefix))
        .unwrap_or(git_ref);
    let mut slug = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.' {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_matches(|c| c == '-' || c == '.');
    let limit = MAX_TAG_LEN - LATEST_SUFFIX.len();
    if slug.is_empty() {
        return format!("ref-{}", short_hash(git_ref));
    }
    if slug.len() <= limit {
        return slug.to_string();
    }
    // The slug is ASCII, so any byte index is a character boundary.
    let hash = short_hash(git_ref);
    let kept = slug[..limit - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{kept}-{hash}")
}

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..4])
}

/// Whether `tag` matches Docker's tag grammar.
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(allowed)
}

/// Resolves a project's image name into a full repository reference on the configured
/// registry: `odoo` becomes `<registry>/odoo`, and a name that starts with a host must
/// name the configured registry's host, so credentials never go to another registry.
pub fn image_repository(image: &str, registry: &RegistrySettings) -> Result<String, String> {
    let image = image.trim();
    if image.contains('@')
        || image
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
    {
        return Err(format!(
            "image {image:?} must be a repository without a tag or digest"
        ));
    }
    let (first, rest) = image.split_once('/').unwrap_or(("", image));
    let has_host = first.contains('.') || first.contains(':') || first == "localhost";
    let repository = if has_host {
        if !is_registry_host(first) || first != registry.host {
            return Err(format!(
                "image {image:?} is on {first}, but this agent pushes to {}; \
                 name the image without a host or on that registry",
                registry.host
            ));
        }
        image.to_string()
    } else {
        format!("{}/{image}", registry.prefix())
    };
    let path = if has_host { rest } else { image };
    if path.is_empty() || !path.split('/').all(is_path_component) {
        return Err(format!(
            "image {image:?} is not a valid repository name: use lowercase letters, digits \
             and . _ - separated by /"
        ));
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "image repository {repository:?} is longer than 255 characters"
        ));
    }
    Ok(repository)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug_tag(git_ref: &str) -> String {
        format!("{}{LATEST_SUFFIX}", ref_slug(git_ref))
    }

    #[test]
    fn branch_names_become_readable_tags() {
        assert_eq!(ref_slug("main"), "main");
        assert_eq!(ref_slug("refs/heads/main"), "main");
        assert_eq!(ref_slug("feature/x"), "feature-x");
        assert_eq!(ref_slug("Release/17.0"), "release-17.0");
        assert_eq!(ref_slug("refs/tags/v1.2.3"), "v1.2.3");
    }

    #[test]
    fn hostile_refs_become_valid_tags() {
        let cases = [
            ("../../etc", "etc"),
            ("-rf", "rf"),
            ("$(reboot)", "reboot"),
            ("`id`;rm -rf /", "id-rm-rf"),
            ("a b\tc\nd", "a-b-c-d"),
            ("..", ""),
            ("", ""),
            ("ünïcødé/ブランチ", "n-c-d"),
            ("___", "___"),
        ];
        for (git_ref, expected) in cases {
            let slug = ref_slug(git_ref);
            if !expected.is_empty() {
                assert_eq!(slug, expected, "{git_ref:?}");
            }
            assert!(
                is_valid_tag(&slug_tag(git_ref)),
                "{git_ref:?} gave {slug:?}"
            );
        }
    }

    #[test]
    fn refs_without_usable_characters_get_distinct_hashes() {
        let a = ref_slug("..");
        let b = ref_slug("ブランチ");
        assert!(a.starts_with("ref-"), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn long_refs_are_cut_to_fit_and_stay_distinct() {
        let long_a = format!("feature/{}", "a".repeat(300));
        let long_b = format!("feature/{}b", "a".repeat(300));
        let tag_a = slug_tag(&long_a);
        let tag_b = slug_tag(&long_b);
        assert_eq!(tag_a.len(), MAX_TAG_LEN);
        assert!(is_valid_tag(&tag_a), "{tag_a}");
        assert_ne!(tag_a, tag_b);
    }

    #[test]
    fn tag_grammar_is_enforced() {
        assert!(is_valid_tag("main-latest"));
        assert!(is_valid_tag("_x"));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag(".x"));
        assert!(!is_valid_tag("a/b"));
        assert!(!is_valid_tag(&"a".repeat(129)));
    }

    fn registry(host: &str, namespace: &str) -> RegistrySettings {
        RegistrySettings {
            host: host.into(),
            namespace: namespace.into(),
            credentials: None,
        }
    }

    #[test]
    fn image_without_host_goes_to_the_registry() {
        let repo = image_repository("acme/odoo", &registry("127.0.0.1:5000", "")).unwrap();
        assert_eq!(repo, "127.0.0.1:5000/acme/odoo");
        let repo = image_repository("odoo", &registry("ghcr.io", "acme")).unwrap();
        assert_eq!(repo, "ghcr.io/acme/odoo");
    }

    #[test]
    fn image_on_the_configured_host_is_kept() {
        let repo = image_repository("ghcr.io/acme/odoo-ce", &registry("ghcr.io", "")).unwrap();
        assert_eq!(repo, "ghcr.io/acme/odoo-ce");
    }

    #[test]
    fn image_on_another_registry_is_rejected() {
        let err = image_repository("evil.example.com/x", &registry("ghcr.io", "")).unwrap_err();
        assert!(err.contains("ghcr.io"), "{err}");
    }

    #[test]
    fn malformed_images_are_rejected() {
        for image in ["Acme/Odoo", "odoo:17", "odoo@sha256:ab", "a//b", "", "a b"] {
            assert!(
                image_repository(image, &registry("ghcr.io", "")).is_err(),
                "{image:?}"
            );
        }
    }
}
