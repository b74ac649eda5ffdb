//! Streaming zip writer: entries are written one after the other to any `Write`, and
//! nothing already written is revisited.

use std::io::{self, Write};

use chrono::{DateTime, Utc};
use flate2::write::DeflateEncoder;
use flate2::Compression;

use super::*;

/// Options of one entry: compression, time and size class.
#[derive(Debug, Clone)]
pub struct EntryOptions {
    pub method: Method,
    /// Deflate level 0 to 9; ignored for stored entries.
    pub level: u32,
    pub modified: DateTime<Utc>,
    /// Use ZIP64 sizes: required when the entry or its compressed form may reach 4 GiB.
    pub large: bool,
}

/// Central directory record of a written entry.
#[derive(Debug, Clone)]
struct CentralEntry {
    name: String,
    options: EntryOptions,
    offset: u64,
    summary: EntrySummary,
}

/// Sizes and checksum of a finished entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntrySummary {
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
}

/// Counts the bytes passed to the inner writer, which are the archive offsets.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A zip archive being written to `W`.
pub struct ZipWriter<W: Write> {
    out: Counting<W>,
    entries: Vec<CentralEntry>,
}

impl<W: Write> ZipWriter<W> {
    pub fn new(inner: W) -> ZipWriter<W> {
        ZipWriter {
            out: Counting { inner, written: 0 },
            entries: Vec::new(),
        }
    }

    /// Bytes of archive written so far.
    pub fn written(&self) -> u64 {
        self.out.written
    }

    /// Writes the local header of a new entry; write its contents to the returned
    /// writer, then call [`EntryWriter::finish`].
    pub fn start_entry(
        &mut self,
        name: &str,
        options: EntryOptions,
    ) -> io::Result<EntryWriter<'_, W>> {
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("zip entry name must be 1 to 65535 bytes long: {name:?}"),
            ));
        }
        let offset = self.out.written;
        write_local_header(&mut self.out, name, &options)?;
        let body = match options.method {
            Method::Stored => Body::Stored(&mut self.out),
            Method::Deflate => {
                let level = Compression::new(options.level.min(9));
                Body::Deflate(DeflateEncoder::new(&mut self.out, level))
            }
        };
        Ok(EntryWriter {
            body,
            entries: &mut self.entries,
            name: name.to_string(),
            options,
            offset,
            crc: crc32fast::Hasher::new(),
            size: 0,
        })
    }

    /// Writes the local header of an entry whose compressed data the caller produces,
    /// for example with [`super::ParallelDeflate`]. Write that data to the returned
    /// writer, then pass the uncompressed CRC-32 and size to [`RawEntryWriter::finish`].
    pub fn start_raw_entry(
        &mut self,
        name: &str,
        options: EntryOptions,
    ) -> io::Result<RawEntryWriter<'_, W>> {
        let offset = self.out.written;
        write_local_header(&mut self.out, name, &options)?;
        Ok(RawEntryWriter {
            out: &mut self.out,
            entries: &mut self.entries,
            name: name.to_string(),
            options,
            offset,
        })
    }

    /// Writes the central directory and end records, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let directory_offset = self.out.written;
        for entry in &self.entries {
            write_central_header(&mut self.out, entry)?;
        }
        let directory_size = self.out.written - directory_offset;
        write_end_records(
            &mut self.out,
            self.entries.len() as u64,
            directory_size,
            directory_offset,
        )?;
        self.out.flush()?;
        Ok(self.out.inner)
    }
}

enum Body<'a, W: Write> {
    Stored(&'a mut Counting<W>),
    Deflate(DeflateEncoder<&'a mut Counting<W>>),
}

/// The contents of one entry being written.
pub struct EntryWriter<'a, W: Write> {
    body: Body<'a, W>,
    entries: &'a mut Vec<CentralEntry>,
    name: String,
    options: EntryOptions,
    offset: u64,
    crc: crc32fast::Hasher,
    size: u64,
}

impl<W: Write> Write for EntryWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match &mut self.body {
            Body::Stored(out) => out.write(buf)?,
            Body::Deflate(encoder) => encoder.write(buf)?,
        };
        self.crc.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> EntryWriter<'_, W> {
    /// Ends the entry's data, writes its data descriptor and returns its summary.
    pub fn finish(self) -> io::Result<EntrySummary> {
        let out = match self.body {
            Body::Stored(out) => out,
            Body::Deflate(encoder) => encoder.finish()?,
        };
        let crc32 = self.crc.finalize();
        let finished = Finished {
            name: self.name,
            options: self.options,
            offset: self.offset,
        };
        finished.close(out, self.entries, crc32, self.size)
    }
}

/// An entry whose compressed data the caller writes as it is.
pub struct RawEntryWriter<'a, W: Write> {
    out: &'a mut Counting<W>,
    entries: &'a mut Vec<CentralEntry>,
    name: String,
    options: EntryOptions,
    offset: u64,
}

impl<W: Write> Write for RawEntryWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> RawEntryWriter<'_, W> {
    /// Ends the entry, given the CRC-32 and size of its uncompressed contents.
    pub fn finish(self, crc32: u32, size: u64) -> io::Result<EntrySummary> {
        let finished = Finished {
            name: self.name,
            options: self.options,
            offset: self.offset,
        };
        finished.close(self.out, self.entries, crc32, size)
    }
}

/// An entry whose data is written, waiting for its data descriptor.
struct Finished {
    name: String,
    options: EntryOptions,
    offset: u64,
}

impl Finished {
    fn close<W: Write>(
        self,
        out: &mut Counting<W>,
        entries: &mut Vec<CentralEntry>,
        crc32: u32,
        size: u64,
    ) -> io::Result<EntrySummary> {
        let data_start = self.offset + local_header_len(&self.name, &self.options);
        let summary = EntrySummary {
            crc32,
            compressed_size: out.written - data_start,
            size,
        };
        let too_large = summary.size >= MAX_U32 || summary.compressed_size >= MAX_U32;
        if too_large && !self.options.large {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "zip entry {} grew past 4 GiB but was not started as large",
                    self.name
                ),
            ));
        }
        write_data_descriptor(out, &summary, self.options.large)?;
        entries.push(CentralEntry {
            name: self.name,
            options: self.options,
            offset: self.offset,
            summary,
        });
        Ok(summary)
    }
}

fn flags(name: &str) -> u16 {
    if name.is_ascii() {
        FLAG_DATA_DESCRIPTOR
    } else {
        FLAG_DATA_DESCRIPTOR | FLAG_UTF8
    }
}

fn version_needed(options: &EntryOptions, zip64: bool) -> u16 {
    if zip64 || options.large {
        VERSION_ZIP64
    } else {
        VERSION_DEFLATE
    }
}

fn local_header_len(name: &str, options: &EntryOptions) -> u64 {
    30 + name.len() as u64 + if options.large { 20 } else { 0 }
}

/// Writes a local header whose CRC and sizes are zero: the data descriptor carries them.
/// A large entry gets 0xFFFFFFFF sizes and a ZIP64 extra field, which means that its
/// data descriptor contains 8-byte sizes.
fn write_local_header(out: &mut impl Write, name: &str, options: &EntryOptions) -> io::Result<()> {
    let (date, time) = dos_date_time(options.modified);
    let size_field: u32 = if options.large { u32::MAX } else { 0 };
    let extra_len: u16 = if options.large { 20 } else { 0 };
    let mut header = Vec::with_capacity(local_header_len(name, options) as usize);
    header.extend_from_slice(&LOCAL_HEADER_SIGNATURE.to_le_bytes());
    header.extend_from_slice(&version_needed(options, false).to_le_bytes());
    header.extend_from_slice(&flags(name).to_le_bytes());
    header.extend_from_slice(&options.method.code().to_le_bytes());
    header.extend_from_slice(&time.to_le_bytes());
    header.extend_from_slice(&date.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&size_field.to_le_bytes());
    header.extend_from_slice(&size_field.to_le_bytes());
    header.extend_from_slice(&(name.len() as u16).to_le_bytes());
    header.extend_from_slice(&extra_len.to_le_bytes());
    header.extend_from_slice(name.as_bytes());
    if options.large {
        header.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
        header.extend_from_slice(&16u16.to_le_bytes());
        header.extend_from_slice(&[0u8; 16]);
    }
    out.write_all(&header)
}

fn write_data_descriptor(
    out: &mut impl Write,
    summary: &EntrySummary,
    large: bool,
) -> io::Result<()> {
    let mut record = Vec::with_capacity(24);
    record.extend_from_slice(&DATA_DESCRIPTOR_SIGNATURE.to_le_bytes());
    record.extend_from_slice(&summary.crc32.to_le_bytes());
    if large {
        record.extend_from_slice(&summary.compressed_size.to_le_bytes());
        record.extend_from_slice(&summary.size.to_le_bytes());
    } else {
        record.extend_from_slice(&(summary.compressed_size as u32).to_le_bytes());
        record.extend_from_slice(&(summary.size as u32).to_le_bytes());
    }
    out.write_all(&record)
}

/// Writes a central directory header. Sizes and the offset that do not fit in 32 bits
/// are 0xFFFFFFFF, with their real values in a ZIP64 extra field in the order the format
/// fixes: size, compressed size, offset.
fn write_central_header(out: &mut impl Write, entry: &CentralEntry) -> io::Result<()> {
    let summary = &entry.summary;
    let sizes_zip64 = summary.size >= MAX_U32 || summary.compressed_size >= MAX_U32;
    let offset_zip64 = entry.offset >= MAX_U32;
    let mut extra = Vec::new();
    if sizes_zip64 {
        extra.extend_from_slice(&summary.size.to_le_bytes());
        extra.extend_from_slice(&summary.compressed_size.to_le_bytes());
    }
    if offset_zip64 {
        extra.extend_from_slice(&entry.offset.to_le_bytes());
    }
    let clamp = |value: u64, zip64: bool| if zip64 { u32::MAX } else { value as u32 };
    let (date, time) = dos_date_time(entry.options.modified);
    let zip64 = sizes_zip64 || offset_zip64;
    let extra_len = if extra.is_empty() { 0 } else { 4 + extra.len() };

    let mut header = Vec::with_capacity(46 + entry.name.len() + extra_len);
    header.extend_from_slice(&CENTRAL_HEADER_SIGNATURE.to_le_bytes());
    header.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
    header.extend_from_slice(&version_needed(&entry.options, zip64).to_le_bytes());
    header.extend_from_slice(&flags(&entry.name).to_le_bytes());
    header.extend_from_slice(&entry.options.method.code().to_le_bytes());
    header.extend_from_slice(&time.to_le_bytes());
    header.extend_from_slice(&date.to_le_bytes());
    header.extend_from_slice(&summary.crc32.to_le_bytes());
    header.extend_from_slice(&clamp(summary.compressed_size, sizes_zip64).to_le_bytes());
    header.extend_from_slice(&clamp(summary.size, sizes_zip64).to_le_bytes());
    header.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
    header.extend_from_slice(&(extra_len as u16).to_le_bytes());
    header.extend_from_slice(&[0u8; 6]); // comment length, disk number, internal attributes
    header.extend_from_slice(&EXTERNAL_ATTRIBUTES_FILE.to_le_bytes());
    header.extend_from_slice(&clamp(entry.offset, offset_zip64).to_le_bytes());
    header.extend_from_slice(entry.name.as_bytes());
    if !extra.is_empty() {
        header.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
        header.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        header.extend_from_slice(&extra);
    }
    out.write_all(&header)
}

fn write_end_records(
    out: &mut Counting<impl Write>,
    count: u64,
    size: u64,
    offset: u64,
) -> io::Result<()> {
    let zip64 = count >= MAX_U16 || size >= MAX_U32 || offset >= MAX_U32;
    let mut record = Vec::with_capacity(98);
    if zip64 {
        let zip64_end_offset = out.written;
        record.extend_from_slice(&ZIP64_END_SIGNATURE.to_le_bytes());
        record.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
        record.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
        record.extend_from_slice(&VERSION_ZIP64.to_le_bytes());
        record.extend_from_slice(&[0u8; 8]); // this disk, disk with the directory
        record.extend_from_slice(&count.to_le_bytes());
        record.extend_from_slice(&count.to_le_bytes());
        record.extend_from_slice(&size.to_le_bytes());
        record.extend_from_slice(&offset.to_le_bytes());

        record.extend_from_slice(&ZIP64_LOCATOR_SIGNATURE.to_le_bytes());
        record.extend_from_slice(&0u32.to_le_bytes());
        record.extend_from_slice(&zip64_end_offset.to_le_bytes());
        record.extend_from_slice(&1u32.to_le_bytes()); // total number of disks
    }
    let count16 = if zip64 { u16::MAX } else { count as u16 };
    let size32 = if zip64 { u32::MAX } else { size as u32 };
    let offset32 = if zip64 { u32::MAX } else { offset as u32 };
    record.extend_from_slice(&END_OF_CENTRAL_DIRECTORY_SIGNATURE.to_le_bytes());
    record.extend_from_slice(&[0u8; 4]); // this disk, disk with the directory
    record.extend_from_slice(&count16.to_le_bytes());
    record.extend_from_slice(&count16.to_le_bytes());
    record.extend_from_slice(&size32.to_le_bytes());
    record.extend_from_slice(&offset32.to_le_bytes());
    record.extend_from_slice(&0u16.to_le_bytes()); // comment length
    out.write_all(&record)
}
