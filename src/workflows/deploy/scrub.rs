//! Masking of the environment's `env` values in container output that the deploy copies
//! into events, run errors and the evidence, since an image may print its settings.

use crate::secret::Secret;

/// Text that replaces a value, as in the build log.
const MASK: &str = "***";

/// The values of the environment's `env` config, each replaced by `***` in output lines.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// Longest first, so that a value containing another one is masked whole.
    values: Vec<Secret>,
}

impl Scrubber {
    /// Creates a scrubber for `values`. Empty values are ignored.
    pub fn new(values: impl IntoIterator<Item = Secret>) -> Scrubber {
        let mut values: Vec<Secret> = values
            .into_iter()
            .filter(|value| !value.expose().is_empty())
            .collect();
        values.sort_by_key(|value| std::cmp::Reverse(value.expose().len()));
        values.dedup();
        Scrubber { values }
    }

    /// Returns `text` with every value replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for value in &self.values {
            if text.contains(value.expose()) {
                text = text.replace(value.expose(), MASK);
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber(values: &[&str]) -> Scrubber {
        Scrubber::new(values.iter().map(|value| Secret::new(*value)))
    }

    #[test]
    fn every_occurrence_is_masked() {
        let scrubber = scrubber(&["hunter2"]);
        let line = "connecting with password hunter2 (hunter2)";
        assert_eq!(scrubber.scrub(line), "connecting with password *** (***)");
    }

    #[test]
    fn longer_value_is_masked_whole() {
        let scrubber = scrubber(&["pass", "passphrase"]);
        assert_eq!(scrubber.scrub("key passphrase, pass"), "key ***, ***");
    }

    #[test]
    fn empty_values_mask_nothing() {
        let scrubber = scrubber(&[""]);
        assert_eq!(scrubber.scrub("nothing to hide"), "nothing to hide");
    }

    #[test]
    fn debug_output_hides_the_values() {
        let debug = format!("{:?}", scrubber(&["hunter2"]));
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
