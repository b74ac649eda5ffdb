//! Counts the rows of every table in a plain pg_dump as it streams past.
//!
//! A plain dump holds each table's data as `COPY schema.table (columns) FROM stdin;`
//! followed by one line per row and a line `\.`. COPY's text format escapes newlines
//! inside values, so counting lines counts rows. The counts describe exactly what the
//! dump contains, which is what a restore must reproduce, whatever was written to the
//! database while pg_dump ran.

use std::collections::BTreeMap;

/// Longest statement line kept while looking for a COPY header; table and column lists
/// of Odoo's widest tables stay far below it.
const MAX_HEADER_LINE: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct RowCounter {
    /// The start of the current line when it began in an earlier chunk.
    line: Vec<u8>,
    /// Whether the current line is longer than [`MAX_HEADER_LINE`] (and so no header).
    overflow: bool,
    copying: Option<(String, u64)>,
    counts: BTreeMap<String, u64>,
}

impl RowCounter {
    pub fn new() -> RowCounter {
        RowCounter::default()
    }

    /// Feeds the next chunk of the dump.
    pub fn update(&mut self, chunk: &[u8]) {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', chunk) {
            self.end_line(&chunk[start..end]);
            start = end + 1;
        }
        self.keep_partial(&chunk[start..]);
    }

    fn keep_partial(&mut self, rest: &[u8]) {
        if self.overflow || rest.is_empty() {
            return;
        }
        if self.line.len() + rest.len() > MAX_HEADER_LINE {
            self.overflow = true;
            self.line.clear();
            self.line.extend_from_slice(&rest[..rest.len().min(2)]);
            return;
        }
        self.line.extend_from_slice(rest);
    }

    fn end_line(&mut self, tail: &[u8]) {
        let joined;
        let line: &[u8] = if self.line.is_empty() {
            tail
        } else {
            self.keep_partial(tail);
            joined = std::mem::take(&mut self.line);
            &joined
        };
        let overflow = std::mem::take(&mut self.overflow);
        match &mut self.copying {
            Some((table, rows)) => {
                if line == b"\\." && !overflow {
                    let table = std::mem::take(table);
                    let rows = *rows;
                    *self.counts.entry(table).or_default() += rows;
                    self.copying = None;
                } else {
                    *rows += 1;
                }
            }
            None if !overflow => self.copying = parse_copy_header(line).map(|table| (table, 0)),
            None => {}
        }
    }

    /// Rows per table, by the name the dump uses (`public.res_partner`).
    pub fn finish(self) -> BTreeMap<String, u64> {
        self.counts
    }
}

/// Returns the table of a `COPY <table> (<columns>) FROM stdin;` line.
fn parse_copy_header(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("COPY ")?;
    if !rest.ends_with(" FROM stdin;") {
        return None;
    }
    let end = rest.find(" (").or_else(|| rest.find(" FROM stdin;"))?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "SET x = 1;\n\
        COPY public.res_partner (id, name) FROM stdin;\n\
        1\tAzure\n\
        2\tline\\nbreak\n\
        \\.\n\
        \n\
        COPY public.ir_attachment (id, store_fname) FROM stdin;\n\
        \\.\n\
        COPY public.\"Odd Name\" (id) FROM stdin;\n\
        7\n\
        \\.\n";

    #[test]
    fn rows_are_counted_per_table() {
        let mut counter = RowCounter::new();
        counter.update(DUMP.as_bytes());
        let counts = counter.finish();
        assert_eq!(counts.get("public.res_partner"), Some(&2));
        assert_eq!(counts.get("public.ir_attachment"), Some(&0));
        assert_eq!(counts.get("public.\"Odd Name\""), Some(&1));
        assert_eq!(counts.len(), 3);
    }

    #[test]
    fn counts_do_not_depend_on_chunk_boundaries() {
        for size in [1, 2, 3, 7, 64] {
            let mut counter = RowCounter::new();
            for chunk in DUMP.as_bytes().chunks(size) {
                counter.update(chunk);
            }
            let counts = counter.finish();
            assert_eq!(
                counts.get("public.res_partner"),
                Some(&2),
                "chunk size {size}"
            );
            assert_eq!(
                counts.get("public.\"Odd Name\""),
                Some(&1),
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn row_that_looks_like_a_header_inside_copy_is_a_row() {
        let dump = "COPY public.t (a) FROM stdin;\nCOPY public.u (b) FROM stdin;\n\\.\n";
        let mut counter = RowCounter::new();
        counter.update(dump.as_bytes());
        let counts = counter.finish();
        assert_eq!(counts.get("public.t"), Some(&1));
        assert_eq!(counts.get("public.u"), None);
    }
}
