//! The backup pipeline: pg_dump's output and the filestore go into one zip, which is
//! hashed and cut into parts for the store as it is written.
//!
//! Three stages run at once with bounded channels between them, so memory stays the
//! same whatever the database size and nothing is staged on disk:
//!
//! 1. an async task reads pg_dump's stdout in chunks ([`read_dump`]);
//! 2. a blocking thread counts rows and writes the zip, with the dump deflated in
//!    blocks on worker threads ([`write_archive`], [`ParallelDeflate`]), and hashes the
//!    zip's bytes ([`PartSink`]);
//! 3. the store uploads the parts ([`crate::storage::ObjectStore::put_stream`]).
//!
//! When any stage stops, its channels close and the others stop too.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::dump_rows::RowCounter;
use super::process::Process;
use crate::archive::{EntryOptions, EntrySummary, Method, ParallelDeflate, ZipWriter, BLOCK_SIZE};
use crate::storage::{ObjectStore, UploadPart};

/// pg_dump output is passed on in chunks of about this size.
const DUMP_CHUNK: usize = 256 * 1024;
/// Filestore files are read in blocks of this size.
const FILE_BLOCK: usize = 256 * 1024;
/// Files whose first bytes look this random (bits of entropy per byte) are already
/// compressed (images, PDFs, office files) and are stored as they are: deflating them
/// costs CPU time and saves nothing.
const STORE_ENTROPY: f64 = 7.5;
/// Bytes sampled to estimate a file's entropy.
const ENTROPY_SAMPLE: usize = 16 * 1024;
/// Entries whose size is known and below this stay in 32-bit zip fields; deflate can
/// grow incompressible data slightly, hence the margin below 4 GiB.
const LARGE_ENTRY: u64 = 0xF000_0000;

/// A piece of pg_dump's output, or how it ended.
#[derive(Debug)]
pub enum DumpChunk {
    Data(Bytes),
    End,
    Failed(String),
}

/// Progress counters the archive thread updates and the progress reporter reads.
#[derive(Debug, Default)]
pub struct Progress {
    pub dump_bytes: AtomicU64,
    pub files: AtomicU64,
    pub archive_bytes: AtomicU64,
    /// Set when the backup must stop; the archive thread checks it between blocks.
    pub stop: AtomicBool,
}

/// Result of the archive thread.
#[derive(Debug, Clone)]
pub struct ArchiveSummary {
    pub size_bytes: u64,
    pub sha256: String,
    pub manifest: Value,
}

/// Reads pg_dump's stdout into chunks until it ends, then reports its exit.
pub async fn read_dump(mut process: Process, tx: mpsc::Sender<DumpChunk>) {
    let mut stdout = process.stdout.take().expect("pg_dump stdout is piped");
    loop {
        let mut chunk = BytesMut::with_capacity(DUMP_CHUNK);
        let mut failed = None;
        while chunk.len() < DUMP_CHUNK {
            match stdout.read_buf(&mut chunk).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    failed = Some(format!("reading pg_dump output failed: {err}"));
                    break;
                }
            }
        }
        if let Some(message) = failed {
            process.kill().await;
            let _ = tx.send(DumpChunk::Failed(message)).await;
            return;
        }
        if chunk.is_empty() {
            break;
        }
        if tx.send(DumpChunk::Data(chunk.freeze())).await.is_err() {
            process.kill().await;
            return;
        }
    }
    let end = match process.wait().await {
        Ok(()) => DumpChunk::End,
        Err(err) => DumpChunk::Failed(err.to_string()),
    };
    let _ = tx.send(end).await;
}

/// Cuts the archive into the store's parts, hashing every byte, and sends the parts to
/// the upload.
pub struct PartSink {
    tx: mpsc::Sender<UploadPart>,
    store: Arc<dyn ObjectStore>,
    buffer: Vec<u8>,
    part_number: i32,
    sha256: Sha256,
    written: u64,
    progress: Arc<Progress>,
}

impl PartSink {
    pub fn new(
        tx: mpsc::Sender<UploadPart>,
        store: Arc<dyn ObjectStore>,
        progress: Arc<Progress>,
    ) -> PartSink {
        let capacity = store.part_size(1);
        PartSink {
            tx,
            store,
            buffer: Vec::with_capacity(capacity),
            part_number: 1,
            sha256: Sha256::new(),
            written: 0,
            progress,
        }
    }

    fn send_part(&mut self) -> io::Result<()> {
        self.part_number += 1;
        let next_capacity = self.store.part_size(self.part_number);
        let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(next_capacity));
        self.tx
            .blocking_send(UploadPart::Data(Bytes::from(part)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    /// Sends the last part and the end marker; returns the archive's size and SHA-256.
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        if !self.buffer.is_empty() {
            self.send_part()?;
        }
        self.tx
            .blocking_send(UploadPart::End)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))?;
        Ok((self.written, hex::encode(self.sha256.finalize())))
    }
}

impl Write for PartSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.progress.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("the backup was stopped"));
        }
        let room = self.store.part_size(self.part_number) - self.buffer.len();
        let accepted = room.min(buf.len());
        self.buffer.extend_from_slice(&buf[..accepted]);
        self.sha256.update(&buf[..accepted]);
        self.written += accepted as u64;
        self.progress
            .archive_bytes
            .store(self.written, Ordering::Relaxed);
        if self.buffer.len() == self.store.part_size(self.part_number) {
            self.send_part()?;
        }
        Ok(accepted)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Inputs of the archive besides the dump.
pub struct ArchiveInput {
    /// `<data_dir>/filestore/<db>`; `None` when the database has no filestore.
    pub filestore: Option<PathBuf>,
    pub compression_level: u32,
    /// Manifest fields known before the dump; the archive adds sizes, checksums and
    /// row counts.
    pub manifest: Value,
    pub progress: Arc<Progress>,
}

/// Writes the whole archive. Runs on a blocking thread.
pub fn write_archive(
    input: ArchiveInput,
    dump: mpsc::Receiver<DumpChunk>,
    sink: PartSink,
) -> anyhow::Result<ArchiveSummary> {
    let now = Utc::now();
    let mut zip = ZipWriter::new(sink);
    let (dump_summary, tables) = write_dump(&mut zip, dump, &input, now)?;

    let filestore = match &input.filestore {
        Some(root) => write_filestore(&mut zip, root, &input)?,
        None => json!({ "present": false, "files": 0, "bytes": 0 }),
    };

    let manifest_options = options(Method::Deflate, &input, now, false);
    let mut manifest = input.manifest;
    manifest["odooops"]["dump"] = json!({
        "size": dump_summary.size,
        "compressed_size": dump_summary.compressed_size,
        "crc32": format!("{:08x}", dump_summary.crc32),
    });
    manifest["odooops"]["filestore"] = filestore;
    manifest["odooops"]["tables"] = json!(tables);
    let text = serde_json::to_vec_pretty(&manifest).context("encoding manifest.json failed")?;
    let mut entry = zip.start_entry("manifest.json", manifest_options)?;
    entry.write_all(&text)?;
    entry.finish()?;

    let sink = zip
        .finish()
        .context("writing the zip central directory failed")?;
    let (size_bytes, sha256) = sink.finish().context("sending the last part failed")?;
    Ok(ArchiveSummary {
        size_bytes,
        sha256,
        manifest,
    })
}

fn options(
    method: Method,
    input: &ArchiveInput,
    modified: DateTime<Utc>,
    large: bool,
) -> EntryOptions {
    EntryOptions {
        method,
        level: input.compression_level,
        modified,
        large,
    }
}

fn write_dump(
    zip: &mut ZipWriter<PartSink>,
    mut dump: mpsc::Receiver<DumpChunk>,
    input: &ArchiveInput,
    now: DateTime<Utc>,
) -> anyhow::Result<(EntrySummary, std::collections::BTreeMap<String, u64>)> {
    let mut rows = RowCounter::new();
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    let entry = zip.start_raw_entry("dump.sql", options(Method::Deflate, input, now, true))?;
    let mut deflate = ParallelDeflate::new(entry, input.compression_level, deflate_threads());
    let mut block = BytesMut::with_capacity(BLOCK_SIZE);
    loop {
        match dump.blocking_recv() {
            Some(DumpChunk::Data(data)) => {
                rows.update(&data);
                crc.update(&data);
                size += data.len() as u64;
                input.progress.dump_bytes.store(size, Ordering::Relaxed);
                block.extend_from_slice(&data);
                if block.len() >= BLOCK_SIZE {
                    deflate
                        .push(block.split().freeze(), false)
                        .context("writing dump.sql into the archive failed")?;
                    block.reserve(BLOCK_SIZE);
                }
            }
            Some(DumpChunk::End) => break,
            Some(DumpChunk::Failed(message)) => bail!("{message}"),
            None => bail!("pg_dump's output ended without its exit status"),
        }
    }
    deflate
        .push(block.freeze(), true)
        .context("writing dump.sql into the archive failed")?;
    let entry = deflate
        .finish()
        .context("writing dump.sql into the archive failed")?;
    let summary = entry
        .finish(crc.finalize(), size)
        .context("finishing dump.sql failed")?;
    Ok((summary, rows.finish()))
}

/// Threads that deflate the dump: one per core, up to four. Compression is the most
/// expensive stage, and more threads than cores would only compete with pg_dump.
fn deflate_threads() -> usize {
    std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(1)
        .min(4)
}

/// Adds every regular file under `root` as `filestore/<relative path>`, in name order.
fn write_filestore(
    zip: &mut ZipWriter<PartSink>,
    root: &Path,
    input: &ArchiveInput,
) -> anyhow::Result<Value> {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut skipped = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {} failed", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {} failed", dir.display()))?;
        children.sort_by_key(|child| child.file_name());
        // Directories are pushed in reverse so that they pop in name order.
        for child in children.iter().rev() {
            let kind = child.file_type()?;
            let path = relative.join(child.file_name());
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                bytes += add_file(zip, root, &path, input)?;
                files += 1;
                input.progress.files.store(files, Ordering::Relaxed);
            } else {
                skipped.push(path.display().to_string());
            }
        }
    }
    Ok(json!({ "present": true, "files": files, "bytes": bytes, "skipped": skipped }))
}

fn add_file(
    zip: &mut ZipWriter<PartSink>,
    root: &Path,
    relative: &Path,
    input: &ArchiveInput,
) -> anyhow::Result<u64> {
    let path = root.join(relative);
    let name = relative
        .to_str()
        .ok_or_else(|| anyhow!("filestore file name {} is not UTF-8", path.display()))?;
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {} failed", path.display()))?;
    let metadata = file.metadata()?;
    let modified = metadata
        .modified()
        .map(DateTime::<Utc>::from)
        .unwrap_or_else(|_| Utc::now());

    let mut block = vec![0u8; FILE_BLOCK];
    let mut filled = read_full(&mut file, &mut block)
        .with_context(|| format!("reading {} failed", path.display()))?;
    let method = if entropy(&block[..filled.min(ENTROPY_SAMPLE)]) > STORE_ENTROPY {
        Method::Stored
    } else {
        Method::Deflate
    };
    let large = metadata.len() >= LARGE_ENTRY;
    let mut entry = zip.start_entry(
        &format!("filestore/{name}"),
        options(method, input, modified, large),
    )?;
    while filled > 0 {
        entry.write_all(&block[..filled])?;
        filled = read_full(&mut file, &mut block)
            .with_context(|| format!("reading {} failed", path.display()))?;
    }
    Ok(entry.finish()?.size)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

/// Shannon entropy of `sample` in bits per byte (0 for an empty sample).
fn entropy(sample: &[u8]) -> f64 {
    if sample.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &byte in sample {
        counts[usize::from(byte)] += 1;
    }
    let total = sample.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let p = f64::from(count) / total;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_separates_text_from_random_bytes() {
        let text = b"<odoo><record id=\"partner_1\" model=\"res.partner\"/></odoo>\n".repeat(300);
        let noise: Vec<u8> = (0..16_384u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        assert!(entropy(&text) < STORE_ENTROPY, "{}", entropy(&text));
        assert!(entropy(&noise) > STORE_ENTROPY, "{}", entropy(&noise));
        assert_eq!(entropy(&[]), 0.0);
    }
}
