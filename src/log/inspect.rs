//! Offline inspection of segment files for `qit-inspect`: a full scan of every batch (CRC,
//! record decoding, offset sequence) and a check of both indexes against the log.
//!
//! Works on a copy or a live directory alike; it never writes.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Serialize;

use super::index::{self, OffsetEntry, TimeEntry};
use super::record::{self, Decoded};
use super::segment::{self, SegmentPaths};
use super::{Compression, LogError, StoredRecord};

/// Something wrong, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// Byte position in it.
    pub position: u64,
    /// What is wrong.
    pub message: String,
}

/// One batch as found.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    /// Byte position in the `.log` file.
    pub position: u64,
    /// First offset slot.
    pub base_offset: u64,
    /// One past the last offset slot.
    pub next_offset: u64,
    /// Records present.
    pub records: u32,
    /// Bytes on disk.
    pub bytes: u32,
    /// Records section size before compression.
    pub raw_bytes: u32,
    /// `none` or `lz4`.
    pub compression: &'static str,
    /// First record timestamp (ms).
    pub first_timestamp_ms: i64,
    /// Largest record timestamp (ms).
    pub max_timestamp_ms: i64,
    /// Leader epoch.
    pub leader_epoch: u64,
}

/// One segment as found.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    /// The `.log` file.
    pub file: PathBuf,
    /// Base offset from the file name.
    pub base_offset: u64,
    /// File size.
    pub bytes: u64,
    /// Batches, in order.
    pub batches: Vec<BatchSummary>,
    /// Problems found in this segment and its indexes.
    pub problems: Vec<Problem>,
    /// Entries in the offset index.
    pub index_entries: usize,
    /// Entries in the time index.
    pub time_index_entries: usize,
    #[serde(skip)]
    records: Vec<StoredRecord>,
}

impl SegmentReport {
    /// Records in this segment.
    pub fn record_count(&self) -> u64 {
        self.batches.iter().map(|b| u64::from(b.records)).sum()
    }

    /// Decoded records (only when asked for by [`inspect`] with `with_records`).
    pub fn records(&self) -> &[StoredRecord] {
        &self.records
    }

    /// One past the last offset covered, if any batch.
    pub fn next_offset(&self) -> u64 {
        self.batches
            .last()
            .map_or(self.base_offset, |b| b.next_offset)
    }
}

/// The `.log` files at `path`: the file itself, or every segment of a partition directory.
pub fn segment_files(path: &Path) -> Result<Vec<PathBuf>, LogError> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| LogError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

fn base_of(file: &Path) -> Option<u64> {
    file.file_stem()?.to_str()?.parse().ok()
}

/// Scans every segment at `path`; `with_records` keeps decoded records for dumps.
pub fn inspect(path: &Path, with_records: bool) -> Result<Vec<SegmentReport>, LogError> {
    let mut reports = Vec::new();
    for file in segment_files(path)? {
        reports.push(inspect_segment(&file, with_records)?);
    }
    for pair in reports.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.problems.is_empty() && a.next_offset() != b.base_offset {
            let problem = Problem {
                file: b.file.clone(),
                position: 0,
                message: format!(
                    "offset gap: previous segment ends at {}, this one starts at {}",
                    a.next_offset(),
                    b.base_offset
                ),
            };
            if let Some(last) = reports.iter_mut().find(|r| r.file == problem.file) {
                last.problems.push(problem);
            }
            break;
        }
    }
    Ok(reports)
}

fn inspect_segment(file: &Path, with_records: bool) -> Result<SegmentReport, LogError> {
    let base_offset = base_of(file).unwrap_or(0);
    let bytes = segment::map_file(&crate::storage::Disk, file)?;
    let mut report = SegmentReport {
        file: file.to_path_buf(),
        base_offset,
        bytes: bytes.len() as u64,
        batches: Vec::new(),
        problems: Vec::new(),
        index_entries: 0,
        time_index_entries: 0,
        records: Vec::new(),
    };
    let problem = |position: u64, message: String| Problem {
        file: file.to_path_buf(),
        position,
        message,
    };
    let mut position = 0u64;
    let mut expected = base_offset;
    while (position as usize) < bytes.len() {
        let rest = bytes.slice(position as usize..);
        let header = match record::classify(&rest) {
            Decoded::Batch(header) => header,
            Decoded::Torn { available, needed } => {
                report.problems.push(problem(
                    position,
                    format!("torn tail: {available} of {needed} bytes of a batch"),
                ));
                break;
            }
            Decoded::Corrupt { reason } => {
                report
                    .problems
                    .push(problem(position, format!("corrupt batch: {reason}")));
                break;
            }
        };
        if header.base_offset != expected {
            report.problems.push(problem(
                position,
                format!(
                    "batch starts at offset {} but {} was expected",
                    header.base_offset, expected
                ),
            ));
        }
        let batch = rest.slice(..header.batch_len as usize);
        match record::decode_records(&header, &batch) {
            Ok(records) if with_records => report.records.extend(records),
            Ok(_) => {}
            Err(e) => report.problems.push(problem(position, e.to_string())),
        }
        report.batches.push(BatchSummary {
            position,
            base_offset: header.base_offset,
            next_offset: header.next_offset(),
            records: header.record_count,
            bytes: header.batch_len,
            raw_bytes: header.raw_size,
            compression: match header.compression {
                Compression::None => "none",
                Compression::Lz4 => "lz4",
            },
            first_timestamp_ms: header.first_timestamp_ms,
            max_timestamp_ms: header.max_timestamp_ms,
            leader_epoch: header.leader_epoch,
        });
        expected = header.next_offset();
        position += u64::from(header.batch_len);
    }
    check_indexes(&mut report)?;
    Ok(report)
}

fn read_index(path: &Path) -> Result<Option<Bytes>, LogError> {
    if !path.exists() {
        return Ok(None);
    }
    segment::map_file(&crate::storage::Disk, path).map(Some)
}

/// Every index entry must point at a batch start with the right offset, in order; every
/// time entry must carry the largest timestamp up to its batch.
fn check_indexes(report: &mut SegmentReport) -> Result<(), LogError> {
    let paths = SegmentPaths::new(
        report.file.parent().unwrap_or(Path::new(".")),
        report.base_offset,
    );
    let by_position: std::collections::HashMap<u64, &BatchSummary> =
        report.batches.iter().map(|b| (b.position, b)).collect();
    let mut problems = Vec::new();
    match read_index(&paths.index)? {
        None => problems.push(Problem {
            file: paths.index.clone(),
            position: 0,
            message: "missing offset index".into(),
        }),
        Some(bytes) => {
            report.index_entries = index::offset_entries(&bytes);
            let mut previous: Option<OffsetEntry> = None;
            for i in 0..report.index_entries {
                let Some(entry) = OffsetEntry::at(&bytes, i) else {
                    break;
                };
                let at = (i * index::OFFSET_ENTRY_LEN) as u64;
                let target = by_position.get(&u64::from(entry.position));
                let points_right = target.is_some_and(|b| {
                    b.base_offset == report.base_offset + u64::from(entry.relative_offset)
                });
                let ordered = previous.is_none_or(|p| {
                    p.relative_offset < entry.relative_offset && p.position < entry.position
                });
                if !points_right || !ordered {
                    problems.push(Problem {
                        file: paths.index.clone(),
                        position: at,
                        message: format!(
                            "index entry {i} (offset +{}, byte {}) does not match a batch",
                            entry.relative_offset, entry.position
                        ),
                    });
                    break;
                }
                previous = Some(entry);
            }
        }
    }
    if let Some(bytes) = read_index(&paths.time_index)? {
        report.time_index_entries = index::time_entries(&bytes);
        let mut max_so_far = i64::MIN;
        let mut batches = report.batches.iter().peekable();
        for i in 0..report.time_index_entries {
            let Some(entry) = TimeEntry::at(&bytes, i) else {
                break;
            };
            let target = report.base_offset + u64::from(entry.relative_offset);
            let mut found = false;
            while let Some(batch) = batches.next_if(|b| b.base_offset <= target) {
                if batch.records > 0 {
                    max_so_far = max_so_far.max(batch.max_timestamp_ms);
                }
                if batch.base_offset == target {
                    found = true;
                    break;
                }
            }
            if !found || entry.timestamp_ms != max_so_far {
                problems.push(Problem {
                    file: paths.time_index.clone(),
                    position: (i * index::TIME_ENTRY_LEN) as u64,
                    message: format!(
                        "time index entry {i} (ts {}, offset +{}) does not match the log",
                        entry.timestamp_ms, entry.relative_offset
                    ),
                });
                break;
            }
        }
    }
    report.problems.extend(problems);
    Ok(())
}

/// A short, printable preview of a value.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let text = match std::str::from_utf8(cut) {
        Ok(s) => s.escape_debug().to_string(),
        Err(_) => cut.iter().map(|b| format!("{b:02x}")).collect(),
    };
    if bytes.len() > max {
        format!("{text}…")
    } else {
        text
    }
}
