//! Zip reader for restores: finds entries through the central directory and streams
//! their contents, checking each entry's CRC-32 and size at its end.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::DeflateDecoder;

use super::*;

/// The end of central directory record is 22 bytes plus a comment of at most 65,535.
const MAX_END_SEARCH: u64 = 22 + 65_535;

/// An entry listed in the central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    pub name: String,
    pub method: Method,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    offset: u64,
}

/// A zip archive opened for reading. Each entry is read through a file handle of its
/// own, so entries can be read at the same time from several threads.
pub struct ArchiveReader {
    path: PathBuf,
    entries: Vec<ArchiveEntry>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Position, size and entry count of the central directory.
struct Directory {
    count: u64,
    size: u64,
    offset: u64,
}

impl ArchiveReader {
    /// Opens an archive and reads its central directory.
    pub fn open(path: &Path) -> io::Result<ArchiveReader> {
        let mut file = File::open(path)?;
        let directory = find_directory(&mut file)?;
        if directory.size > 1 << 32 {
            return Err(invalid(format!(
                "central directory of {} bytes is implausible",
                directory.size
            )));
        }
        file.seek(SeekFrom::Start(directory.offset))?;
        let mut raw = vec![0u8; directory.size as usize];
        file.read_exact(&mut raw)?;
        let entries = parse_directory(&raw, directory.count)?;
        Ok(ArchiveReader {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn entries(&self) -> &[ArchiveEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&ArchiveEntry> {
        self.entries.iter().find(|entry| entry.name == name)
    }

    /// Streams an entry's contents. The reader fails with `InvalidData` at the end of the
    /// entry when its CRC-32 or size differ from the central directory's.
    pub fn open_entry(&self, entry: &ArchiveEntry) -> io::Result<Box<dyn Read + Send>> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(entry.offset))?;
        let mut header = [0u8; 30];
        file.read_exact(&mut header)?;
        if u32_at(&header, 0) != LOCAL_HEADER_SIGNATURE {
            return Err(invalid(format!(
                "local header of {} is missing",
                entry.name
            )));
        }
        let skip = u64::from(u16_at(&header, 26)) + u64::from(u16_at(&header, 28));
        file.seek(SeekFrom::Current(skip as i64))?;
        let data = BufReader::with_capacity(256 * 1024, file).take(entry.compressed_size);
        let contents: Box<dyn Read + Send> = match entry.method {
            Method::Stored => Box::new(data),
            Method::Deflate => Box::new(DeflateDecoder::new(data)),
        };
        Ok(Box::new(Checked {
            inner: contents,
            crc: crc32fast::Hasher::new(),
            size: 0,
            entry: entry.clone(),
        }))
    }
}

fn find_directory(file: &mut File) -> io::Result<Directory> {
    let length = file.seek(SeekFrom::End(0))?;
    let tail_len = length.min(MAX_END_SEARCH);
    file.seek(SeekFrom::Start(length - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let signature = END_OF_CENTRAL_DIRECTORY_SIGNATURE.to_le_bytes();
    let position = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&at| tail[at..at + 4] == signature)
        .ok_or_else(|| invalid("not a zip archive: no end of central directory record"))?;
    let end = &tail[position..];
    let directory = Directory {
        count: u64::from(u16_at(end, 10)),
        size: u64::from(u32_at(end, 12)),
        offset: u64::from(u32_at(end, 16)),
    };
    let needs_zip64 =
        directory.count == MAX_U16 || directory.size == MAX_U32 || directory.offset == MAX_U32;
    if !needs_zip64 {
        return Ok(directory);
    }
    let end_offset = length - tail_len + position as u64;
    read_zip64_end(file, end_offset)
}

fn read_zip64_end(file: &mut File, end_offset: u64) -> io::Result<Directory> {
    let locator_offset = end_offset
        .checked_sub(20)
        .ok_or_else(|| invalid("ZIP64 end of central directory locator is missing"))?;
    file.seek(SeekFrom::Start(locator_offset))?;
    let mut locator = [0u8; 20];
    file.read_exact(&mut locator)?;
    if u32_at(&locator, 0) != ZIP64_LOCATOR_SIGNATURE {
        return Err(invalid("ZIP64 end of central directory locator is missing"));
    }
    file.seek(SeekFrom::Start(u64_at(&locator, 8)))?;
    let mut record = [0u8; 56];
    file.read_exact(&mut record)?;
    if u32_at(&record, 0) != ZIP64_END_SIGNATURE {
        return Err(invalid("ZIP64 end of central directory record is missing"));
    }
    Ok(Directory {
        count: u64_at(&record, 32),
        size: u64_at(&record, 40),
        offset: u64_at(&record, 48),
    })
}

fn parse_directory(raw: &[u8], count: u64) -> io::Result<Vec<ArchiveEntry>> {
    let mut entries = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut at = 0usize;
    for _ in 0..count {
        if raw.len() < at + 46 || u32_at(raw, at) != CENTRAL_HEADER_SIGNATURE {
            return Err(invalid(format!(
                "central directory entry {} is corrupt",
                entries.len()
            )));
        }
        let header = &raw[at..];
        let name_len = usize::from(u16_at(header, 28));
        let extra_len = usize::from(u16_at(header, 30));
        let comment_len = usize::from(u16_at(header, 32));
        let total = 46 + name_len + extra_len + comment_len;
        if header.len() < total {
            return Err(invalid("central directory is truncated"));
        }
        let name = String::from_utf8_lossy(&header[46..46 + name_len]).into_owned();
        let method_code = u16_at(header, 10);
        let method = Method::from_code(method_code).ok_or_else(|| {
            invalid(format!(
                "{name}: compression method {method_code} is not supported"
            ))
        })?;
        let mut entry = ArchiveEntry {
            name,
            method,
            crc32: u32_at(header, 16),
            compressed_size: u64::from(u32_at(header, 20)),
            size: u64::from(u32_at(header, 24)),
            offset: u64::from(u32_at(header, 42)),
        };
        apply_zip64_extra(
            &mut entry,
            &header[46 + name_len..46 + name_len + extra_len],
        )?;
        entries.push(entry);
        at += total;
    }
    Ok(entries)
}

/// Replaces 0xFFFFFFFF fields with the 64-bit values of the ZIP64 extra field, which
/// lists only the fields that overflowed, in the order size, compressed size, offset.
fn apply_zip64_extra(entry: &mut ArchiveEntry, mut extra: &[u8]) -> io::Result<()> {
    while extra.len() >= 4 {
        let id = u16_at(extra, 0);
        let len = usize::from(u16_at(extra, 2));
        let data = extra
            .get(4..4 + len)
            .ok_or_else(|| invalid(format!("{}: extra field is truncated", entry.name)))?;
        if id == ZIP64_EXTRA_ID {
            let mut values = data.chunks_exact(8).map(|chunk| u64_at(chunk, 0));
            for field in [
                &mut entry.size,
                &mut entry.compressed_size,
                &mut entry.offset,
            ] {
                if *field == MAX_U32 {
                    *field = values.next().ok_or_else(|| {
                        invalid(format!("{}: ZIP64 extra field is too short", entry.name))
                    })?;
                }
            }
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}

/// Checks the CRC-32 and size of an entry's contents as they are read.
struct Checked {
    inner: Box<dyn Read + Send>,
    crc: crc32fast::Hasher,
    size: u64,
    entry: ArchiveEntry,
}

impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        if read > 0 {
            self.crc.update(&buf[..read]);
            self.size += read as u64;
            return Ok(read);
        }
        if !buf.is_empty() {
            let crc = self.crc.clone().finalize();
            if self.size != self.entry.size || crc != self.entry.crc32 {
                return Err(invalid(format!(
                    "{} is corrupt: {} bytes with CRC-32 {crc:08x}, expected {} bytes with \
                     CRC-32 {:08x}",
                    self.entry.name, self.size, self.entry.size, self.entry.crc32
                )));
            }
        }
        Ok(0)
    }
}
