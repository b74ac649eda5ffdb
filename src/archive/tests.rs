use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use chrono::TimeZone;

use super::*;

fn options(method: Method, large: bool) -> EntryOptions {
    EntryOptions {
        method,
        level: 1,
        modified: Utc.with_ymd_and_hms(2024, 5, 17, 13, 45, 30).unwrap(),
        large,
    }
}

fn write_archive(path: &Path, entries: &[(&str, Method, bool, Vec<u8>)]) -> Vec<EntrySummary> {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = ZipWriter::new(std::io::BufWriter::new(file));
    let mut summaries = Vec::new();
    for (name, method, large, data) in entries {
        let mut entry = zip.start_entry(name, options(*method, *large)).unwrap();
        for chunk in data.chunks(1000) {
            entry.write_all(chunk).unwrap();
        }
        summaries.push(entry.finish().unwrap());
    }
    zip.finish().unwrap().flush().unwrap();
    summaries
}

/// Lists names and sizes with Python's zipfile after `testzip()` checked every CRC.
fn python_listing(path: &Path) -> String {
    let script = "import sys, zipfile\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  bad = z.testzip()\n\
                  assert bad is None, bad\n\
                  print(len(z.infolist()))\n\
                  for i in z.infolist()[:5]: print(i.filename, i.file_size, i.compress_type)\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn sample_entries() -> Vec<(&'static str, Method, bool, Vec<u8>)> {
    let text: Vec<u8> = b"INSERT INTO t VALUES (1, 'x');\n".repeat(5000);
    let noise: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    vec![
        ("dump.sql", Method::Deflate, true, text),
        ("filestore/ab/abcdef", Method::Stored, false, noise),
        ("filestore/empty", Method::Deflate, false, Vec::new()),
        (
            "manifest.json",
            Method::Deflate,
            false,
            b"{\"a\": 1}".to_vec(),
        ),
    ]
}

#[test]
fn written_archive_reads_back_with_matching_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    let entries = sample_entries();
    write_archive(&path, &entries);

    let reader = ArchiveReader::open(&path).unwrap();
    assert_eq!(reader.entries().len(), entries.len());
    for (name, method, _, data) in &entries {
        let entry = reader.entry(name).unwrap();
        assert_eq!(entry.method, *method, "{name}");
        let mut contents = Vec::new();
        reader
            .open_entry(entry)
            .unwrap()
            .read_to_end(&mut contents)
            .unwrap();
        assert_eq!(&contents, data, "{name}");
    }
}

#[test]
fn written_archive_passes_python_zipfile_and_unzip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    write_archive(&path, &sample_entries());

    let listing = python_listing(&path);
    assert!(listing.starts_with("4\n"), "{listing}");
    assert!(listing.contains("dump.sql 155000 8"), "{listing}");
    assert!(listing.contains("filestore/ab/abcdef 70000 0"), "{listing}");

    let unzip = Command::new("unzip")
        .arg("-tq")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        unzip.status.success(),
        "{}",
        String::from_utf8_lossy(&unzip.stdout)
    );
}

#[test]
fn many_entries_use_zip64_end_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.zip");
    let file = std::fs::File::create(&path).unwrap();
    let mut zip = ZipWriter::new(std::io::BufWriter::new(file));
    for index in 0..70_000u32 {
        let mut entry = zip
            .start_entry(
                &format!("filestore/{index:05}"),
                options(Method::Stored, false),
            )
            .unwrap();
        entry.write_all(&index.to_le_bytes()).unwrap();
        entry.finish().unwrap();
    }
    zip.finish().unwrap().flush().unwrap();

    let reader = ArchiveReader::open(&path).unwrap();
    assert_eq!(reader.entries().len(), 70_000);
    let last = reader.entry("filestore/69999").unwrap();
    let mut contents = Vec::new();
    reader
        .open_entry(last)
        .unwrap()
        .read_to_end(&mut contents)
        .unwrap();
    assert_eq!(contents, 69_999u32.to_le_bytes());
    assert!(python_listing(&path).starts_with("70000\n"));
}

#[test]
fn corrupted_entry_fails_its_crc_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    let data = vec![7u8; 4096];
    write_archive(&path, &[("filestore/x", Method::Stored, false, data)]);
    let mut bytes = std::fs::read(&path).unwrap();
    let data_start = 30 + "filestore/x".len();
    bytes[data_start + 100] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();

    let reader = ArchiveReader::open(&path).unwrap();
    let entry = reader.entry("filestore/x").unwrap();
    let mut contents = Vec::new();
    let err = reader
        .open_entry(entry)
        .unwrap()
        .read_to_end(&mut contents)
        .unwrap_err();
    assert!(err.to_string().contains("filestore/x is corrupt"), "{err}");
}

#[test]
fn archive_written_by_python_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("py.zip");
    let script = "import sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
                  \x20   z.writestr('dump.sql', 'SELECT 1;\\n' * 1000)\n\
                  \x20   z.writestr('filestore/0a/0abc', b'\\x00\\x01' * 10)\n";
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());

    let reader = ArchiveReader::open(&path).unwrap();
    let entry = reader.entry("dump.sql").unwrap();
    let mut contents = String::new();
    reader
        .open_entry(entry)
        .unwrap()
        .read_to_string(&mut contents)
        .unwrap();
    assert_eq!(contents, "SELECT 1;\n".repeat(1000));
}

#[test]
fn non_zip_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.zip");
    std::fs::write(&path, b"plain text, not an archive").unwrap();
    let err = ArchiveReader::open(&path).err().unwrap();
    assert!(err.to_string().contains("not a zip archive"), "{err}");
}

#[test]
fn dos_time_encodes_fields_and_clamps_old_dates() {
    let time = Utc.with_ymd_and_hms(2024, 5, 17, 13, 45, 30).unwrap();
    assert_eq!(
        dos_date_time(time),
        ((44 << 9) | (5 << 5) | 17, (13 << 11) | (45 << 5) | 15)
    );
    let old = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap();
    assert_eq!(dos_date_time(old), ((1 << 5) | 1, 0));
}
