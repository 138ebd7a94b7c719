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
    /// Leader epoch (the Raft term of the entry that wrote it on a cluster replica).
    pub leader_epoch: u64,
    /// Raft log index of the entry that wrote it (0 on a single node and in v1 batches).
    pub raft_index: u64,
    /// Format version of the batch (1 or 2).
    pub version: u8,
    /// What the batch is: `data`, or a Raft group's own entry (`blank`, `membership`,
    /// `command`), whose record is no message.
    pub entry_type: &'static str,
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
    /// Records (messages) in this segment: those of data batches.
    pub fn record_count(&self) -> u64 {
        self.batches
            .iter()
            .filter(|b| b.entry_type == "data")
            .map(|b| u64::from(b.records))
            .sum()
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
            Ok(records) if with_records && header.entry_type.is_data() => {
                report.records.extend(records)
            }
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
            raft_index: header.raft_index,
            version: header.version,
            entry_type: header.entry_type.name(),
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

/// Where two copies of one partition first differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The offset (of the batch or record) where they part.
    pub offset: u64,
    /// What differs, naming both sides.
    pub what: String,
}

/// Compares two scans of one partition (say, the same partition on two cluster replicas),
/// both made with records: batch for batch (offset range, record count, compression,
/// leader epoch, Raft index) and record for record (offset, timestamp, key, headers, value). File
/// positions are not compared: equal batches give equal positions anyway, and a copy
/// whose retention or compaction ran at another moment differs in its first segments.
/// With `common_start`, only the offsets both copies still hold are compared (retention
/// runs on each copy by itself); otherwise their first offsets must match too.
/// `None` when the two hold the same log.
pub fn compare(a: &[SegmentReport], b: &[SegmentReport], common_start: bool) -> Option<Difference> {
    let start_a = first_offset(a);
    let start_b = first_offset(b);
    if !common_start && start_a != start_b {
        return Some(Difference {
            offset: start_a.min(start_b),
            what: format!("the first batch starts at offset {start_a} in A, {start_b} in B"),
        });
    }
    let from = start_a.max(start_b);
    let batches_a = batches_from(a, from);
    let batches_b = batches_from(b, from);
    for (x, y) in batches_a.iter().zip(&batches_b) {
        if let Some(what) = batch_difference(x, y) {
            return Some(Difference {
                offset: x.base_offset.min(y.base_offset),
                what,
            });
        }
    }
    if batches_a.len() != batches_b.len() {
        let offset = batches_a
            .get(batches_b.len())
            .or_else(|| batches_b.get(batches_a.len()))
            .map_or(from, |batch| batch.base_offset);
        return Some(Difference {
            offset,
            what: format!(
                "A has {} batches from offset {from}, B has {}",
                batches_a.len(),
                batches_b.len()
            ),
        });
    }
    let records_a = records_from(a, from);
    let records_b = records_from(b, from);
    records_a
        .iter()
        .zip(&records_b)
        .find(|(x, y)| x != y)
        .map(|(x, y)| Difference {
            offset: x.offset.min(y.offset),
            what: format!(
                "record differs: A has offset {} ts {} value {}, B has offset {} ts {} value {}",
                x.offset,
                x.timestamp_ms,
                preview(&x.value, 32),
                y.offset,
                y.timestamp_ms,
                preview(&y.value, 32)
            ),
        })
}

fn first_offset(reports: &[SegmentReport]) -> u64 {
    reports
        .iter()
        .flat_map(|r| r.batches.first())
        .map(|b| b.base_offset)
        .next()
        .unwrap_or_else(|| reports.first().map_or(0, |r| r.base_offset))
}

fn batches_from(reports: &[SegmentReport], from: u64) -> Vec<&BatchSummary> {
    reports
        .iter()
        .flat_map(|r| r.batches.iter())
        .filter(|b| b.next_offset > from)
        .collect()
}

fn records_from(reports: &[SegmentReport], from: u64) -> Vec<&StoredRecord> {
    reports
        .iter()
        .flat_map(|r| r.records.iter())
        .filter(|r| r.offset >= from)
        .collect()
}

fn batch_difference(x: &BatchSummary, y: &BatchSummary) -> Option<String> {
    let shape = |b: &BatchSummary| {
        (
            b.base_offset,
            b.next_offset,
            b.records,
            b.compression,
            b.leader_epoch,
            b.raft_index,
            b.entry_type,
        )
    };
    (shape(x) != shape(y)).then(|| {
        format!(
            "batch differs: A has offsets {}..{} ({} {} records, {}, epoch {}, Raft index {}), B has {}..{} ({} {} records, {}, epoch {}, Raft index {})",
            x.base_offset,
            x.next_offset,
            x.records,
            x.entry_type,
            x.compression,
            x.leader_epoch,
            x.raft_index,
            y.base_offset,
            y.next_offset,
            y.records,
            y.entry_type,
            y.compression,
            y.leader_epoch,
            y.raft_index
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{FsyncPolicy, LogConfig, PartitionLog, Record};

    fn record(value: &str, ts: i64) -> Record {
        Record {
            timestamp_ms: ts,
            key: None,
            headers: Vec::new(),
            value: Bytes::from(value.to_string()),
        }
    }

    async fn write(dir: &Path, batches: &[&[(&str, i64)]]) {
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(dir, config).unwrap();
        for batch in batches {
            let records = batch.iter().map(|(v, ts)| record(v, *ts)).collect();
            log.append(records).await.unwrap();
        }
        log.flush().await.unwrap();
    }

    async fn scan(batches: &[&[(&str, i64)]]) -> (tempfile::TempDir, Vec<SegmentReport>) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), batches).await;
        let reports = inspect(dir.path(), true).unwrap();
        (dir, reports)
    }

    #[tokio::test]
    async fn equal_logs_compare_equal() {
        let batches: &[&[(&str, i64)]] = &[&[("a", 1), ("b", 2)], &[("c", 3)]];
        let (_a, a) = scan(batches).await;
        let (_b, b) = scan(batches).await;
        assert_eq!(compare(&a, &b, false), None);
    }

    #[tokio::test]
    async fn a_changed_value_a_split_batch_and_a_missing_tail_are_found() {
        let (_a, a) = scan(&[&[("a", 1), ("b", 2)], &[("c", 3)]]).await;
        let (_v, value) = scan(&[&[("a", 1), ("B", 2)], &[("c", 3)]]).await;
        let found = compare(&a, &value, false).unwrap();
        assert_eq!(found.offset, 1, "{found:?}");
        assert!(found.what.contains("record differs"), "{found:?}");

        let (_s, split) = scan(&[&[("a", 1)], &[("b", 2)], &[("c", 3)]]).await;
        let found = compare(&a, &split, false).unwrap();
        assert!(found.what.contains("batch differs"), "{found:?}");

        let (_t, short) = scan(&[&[("a", 1), ("b", 2)]]).await;
        let found = compare(&a, &short, false).unwrap();
        assert_eq!(found.offset, 2, "{found:?}");
        assert!(found.what.contains("A has 2 batches"), "{found:?}");

        let (_ts, other_time) = scan(&[&[("a", 1), ("b", 9)], &[("c", 3)]]).await;
        assert!(compare(&a, &other_time, false).is_some());
    }
}
