//! Splitting a byte stream that arrives in arbitrary chunks into text lines.

/// Longest line kept whole; a longer run of bytes without a newline is passed on in
/// pieces of this size, so a process that never prints a newline cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Collects chunks and yields complete lines without their `\n` or `\r\n`.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds a chunk and returns the lines it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(position) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..position]);
            lines.push(take_line(&mut self.pending));
            rest = &rest[position + 1..];
        }
        self.pending.extend_from_slice(rest);
        while self.pending.len() >= MAX_LINE_BYTES {
            let tail = self.pending.split_off(MAX_LINE_BYTES);
            lines.push(take_line(&mut self.pending));
            self.pending = tail;
        }
        lines
    }

    /// Returns the last line if the stream did not end with a newline.
    pub fn finish(mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| take_line(&mut self.pending))
    }
}

fn take_line(pending: &mut Vec<u8>) -> String {
    if pending.last() == Some(&b'\r') {
        pending.pop();
    }
    let line = String::from_utf8_lossy(pending).into_owned();
    pending.clear();
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut splitter = LineSplitter::default();
        assert!(splitter.push(b"hel").is_empty());
        assert_eq!(splitter.push(b"lo\nwor"), ["hello"]);
        assert_eq!(splitter.push(b"ld\r\n\n"), ["world", ""]);
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn last_line_without_newline_is_kept() {
        let mut splitter = LineSplitter::default();
        splitter.push(b"a\nb");
        assert_eq!(splitter.finish().as_deref(), Some("b"));
    }

    #[test]
    fn endless_line_is_cut_into_pieces() {
        let mut splitter = LineSplitter::default();
        let lines = splitter.push(&vec![b'x'; MAX_LINE_BYTES * 2 + 5]);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|line| line.len() == MAX_LINE_BYTES));
        assert_eq!(splitter.finish().map(|l| l.len()), Some(5));
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"a\xffb\n"), ["a\u{fffd}b"]);
    }
}
