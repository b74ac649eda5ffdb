//! The zip format of backups, written as a stream and read back for restores.
//!
//! A backup is one zip that Odoo's database manager can restore: `dump.sql` (plain
//! pg_dump output), `filestore/<path>` for every file of the filestore, and
//! `manifest.json`. The writer never seeks: each entry's local header announces a data
//! descriptor (general purpose flag bit 3) that follows the data with its CRC-32 and
//! sizes, so the archive can go straight into an upload. Entries whose size is unknown
//! in advance (the dump) use ZIP64 sizes from the start, as Python's zipfile does when
//! it streams, so they may exceed 4 GiB. The end records switch to ZIP64 when the
//! archive has more than 65,535 entries or passes 4 GiB.
//!
//! Format reference: PKWARE's APPNOTE.TXT, version 6.3.10.

mod parallel;
mod reader;
mod writer;

pub use parallel::{ParallelDeflate, BLOCK_SIZE};
pub use reader::{ArchiveEntry, ArchiveReader};
pub use writer::{EntryOptions, EntrySummary, EntryWriter, RawEntryWriter, ZipWriter};

use chrono::{DateTime, Datelike, Timelike, Utc};

const LOCAL_HEADER_SIGNATURE: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR_SIGNATURE: u32 = 0x0807_4b50;
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
const END_OF_CENTRAL_DIRECTORY_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_END_SIGNATURE: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// General purpose flag bit 3: CRC and sizes follow the data in a data descriptor.
const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
/// General purpose flag bit 11: the file name is UTF-8.
const FLAG_UTF8: u16 = 1 << 11;

const VERSION_DEFLATE: u16 = 20;
const VERSION_ZIP64: u16 = 45;
/// "Version made by": Unix (3) in the high byte, so readers honour the file modes in the
/// external attributes; spec version 4.5 in the low byte.
const VERSION_MADE_BY: u16 = (3 << 8) | VERSION_ZIP64;
/// Regular file, mode 0644, in the high 16 bits of the external attributes.
const EXTERNAL_ATTRIBUTES_FILE: u32 = 0o100_644 << 16;

/// Fields at or above these limits move to ZIP64 records.
const MAX_U32: u64 = 0xFFFF_FFFF;
const MAX_U16: u64 = 0xFFFF;

/// Compression method of an entry, as numbered in the zip format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Stored,
    Deflate,
}

impl Method {
    fn code(self) -> u16 {
        match self {
            Method::Stored => 0,
            Method::Deflate => 8,
        }
    }

    fn from_code(code: u16) -> Option<Method> {
        match code {
            0 => Some(Method::Stored),
            8 => Some(Method::Deflate),
            _ => None,
        }
    }
}

/// Converts a time to MS-DOS (date, time); times before 1980 become 1980-01-01.
fn dos_date_time(time: DateTime<Utc>) -> (u16, u16) {
    if time.year() < 1980 {
        return ((1 << 5) | 1, 0);
    }
    let year = (time.year() - 1980).min(127) as u16;
    let date = (year << 9) | ((time.month() as u16) << 5) | time.day() as u16;
    let clock =
        ((time.hour() as u16) << 11) | ((time.minute() as u16) << 5) | (time.second() as u16 / 2);
    (date, clock)
}

#[cfg(test)]
mod tests;
