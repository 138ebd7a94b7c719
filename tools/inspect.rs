//! `qit-inspect`: offline inspection of qit segment files.
//!
//! - `dump PATH`: batches and records (offset, timestamp, key, headers, value preview);
//! - `verify PATH`: every CRC, the offset sequence and both indexes; exit 0 only when sound;
//! - `stats PATH`: segments, batches, records, bytes, compression and time range;
//! - `compare A B`: two copies of one partition (say, on two cluster replicas), batch for
//!   batch and record for record; exit 0 only when they hold the same log.
//!
//! PATH is a segment `.log` file or a partition directory. `--json` prints JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use qit::log::inspect::{self, SegmentReport};
use qit::log::record;

#[derive(Parser)]
#[command(
    name = "qit-inspect",
    version,
    about = "Inspect qit segment files offline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Print batches and records.
    Dump {
        /// A `.log` file or a partition directory.
        path: PathBuf,
        /// Longest value preview in bytes.
        #[arg(long, default_value_t = 64)]
        preview: usize,
    },
    /// Check every CRC, the offset sequence and both indexes.
    Verify {
        /// A `.log` file or a partition directory.
        path: PathBuf,
    },
    /// Summarize.
    Stats {
        /// A `.log` file or a partition directory.
        path: PathBuf,
    },
    /// Compare two copies of one partition batch for batch and record for record.
    Compare {
        /// A partition directory (or `.log` file).
        a: PathBuf,
        /// The other copy.
        b: PathBuf,
        /// Compare only the offsets both copies still hold (retention runs on each copy
        /// by itself).
        #[arg(long)]
        common_start: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, with_records) = match &cli.command {
        Command::Compare { a, b, common_start } => {
            return compare(a, b, *common_start, cli.json);
        }
        Command::Dump { path, .. } => (path, true),
        Command::Verify { path } | Command::Stats { path } => (path, false),
    };
    let reports = match scan(path, with_records) {
        Ok(reports) => reports,
        Err(code) => return code,
    };
    match cli.command {
        Command::Dump { preview, .. } => dump(&reports, preview, cli.json),
        Command::Verify { .. } => return verify(&reports, cli.json),
        _ => stats(&reports, cli.json),
    }
    ExitCode::SUCCESS
}

/// Scans `path`; exit code 2 (said on stderr) when it has no segments or cannot be read.
fn scan(path: &std::path::Path, with_records: bool) -> Result<Vec<SegmentReport>, ExitCode> {
    match inspect::inspect(path, with_records) {
        Ok(reports) if !reports.is_empty() => Ok(reports),
        Ok(_) => {
            eprintln!("no segment files at {}", path.display());
            Err(ExitCode::from(2))
        }
        Err(error) => {
            eprintln!("error: {error}");
            Err(ExitCode::from(2))
        }
    }
}

fn compare(
    a: &std::path::Path,
    b: &std::path::Path,
    common_start: bool,
    as_json: bool,
) -> ExitCode {
    let (reports_a, reports_b) = match (scan(a, true), scan(b, true)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let problems = reports_a
        .iter()
        .chain(&reports_b)
        .map(|r| r.problems.len())
        .sum::<usize>();
    let difference = inspect::compare(&reports_a, &reports_b, common_start);
    let batches = reports_a.iter().map(|r| r.batches.len()).sum::<usize>();
    let records = reports_a
        .iter()
        .map(SegmentReport::record_count)
        .sum::<u64>();
    if as_json {
        println!(
            "{}",
            json!({"same": difference.is_none() && problems == 0, "difference": difference, "problems": problems, "batches": batches, "records": records})
        );
    } else if let Some(d) = &difference {
        println!("DIFFERENT at offset {}: {}", d.offset, d.what);
    } else if problems > 0 {
        println!("FAILED: {problems} problem(s) in the copies (run `verify` on each)");
    } else {
        println!("same: {batches} batches, {records} records");
    }
    if difference.is_none() && problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dump(reports: &[SegmentReport], preview: usize, as_json: bool) {
    for report in reports {
        if as_json {
            for r in report.records() {
                let line = json!({
                    "file": report.file,
                    "offset": r.offset,
                    "timestamp": r.timestamp_ms,
                    "key": r.key.as_ref().map(|k| inspect::preview(k, preview)),
                    "headers": r.headers.iter().map(|(k, v)| (k.clone(), inspect::preview(v, preview))).collect::<std::collections::BTreeMap<_, _>>(),
                    "value": inspect::preview(&r.value, preview),
                    "value_bytes": r.value.len(),
                });
                println!("{line}");
            }
            continue;
        }
        println!("segment {} ({} bytes)", report.file.display(), report.bytes);
        let mut records = report.records().iter().peekable();
        for b in &report.batches {
            println!(
                "  batch @{} v{} offsets {}..{} records {} bytes {} {} epoch {} raft index {}{}",
                b.position,
                b.version,
                b.base_offset,
                b.next_offset,
                b.records,
                b.bytes,
                b.compression,
                b.leader_epoch,
                b.raft_index,
                // A Raft group's own entry says so; data batches read as before.
                if b.entry_type == "data" {
                    String::new()
                } else {
                    format!(" ({} entry)", b.entry_type)
                }
            );
            while let Some(r) = records.next_if(|r| r.offset < b.next_offset) {
                let headers: Vec<String> = r
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}={}", inspect::preview(v, 32)))
                    .collect();
                println!(
                    "    {} ts {} key {} headers [{}] value {}",
                    r.offset,
                    r.timestamp_ms,
                    r.key
                        .as_ref()
                        .map_or("-".to_string(), |k| inspect::preview(k, 32)),
                    headers.join(", "),
                    inspect::preview(&r.value, preview)
                );
            }
        }
        for p in &report.problems {
            println!(
                "  PROBLEM {} @{}: {}",
                p.file.display(),
                p.position,
                p.message
            );
        }
    }
}

fn verify(reports: &[SegmentReport], as_json: bool) -> ExitCode {
    let problems: Vec<_> = reports.iter().flat_map(|r| r.problems.iter()).collect();
    if as_json {
        println!(
            "{}",
            json!({"ok": problems.is_empty(), "segments": reports.len(), "problems": problems})
        );
    } else {
        for p in &problems {
            println!("{}: byte {}: {}", p.file.display(), p.position, p.message);
        }
        let batches: usize = reports.iter().map(|r| r.batches.len()).sum();
        if problems.is_empty() {
            println!(
                "ok: {} segments, {batches} batches, every CRC and index entry sound",
                reports.len()
            );
        } else {
            println!("FAILED: {} problem(s)", problems.len());
        }
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn stats(reports: &[SegmentReport], as_json: bool) {
    let batches: Vec<_> = reports.iter().flat_map(|r| r.batches.iter()).collect();
    let records: u64 = reports.iter().map(SegmentReport::record_count).sum();
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let stored: u64 = batches.iter().map(|b| u64::from(b.bytes)).sum();
    // Uncompressed size: each batch's header (by its version) and records section.
    let raw: u64 = batches
        .iter()
        .map(|b| {
            let header = record::header_len(b.version).unwrap_or(record::HEADER_LEN);
            u64::from(b.raw_bytes) + header as u64
        })
        .sum();
    let first_ts = batches.iter().map(|b| b.first_timestamp_ms).min();
    let max_ts = batches.iter().map(|b| b.max_timestamp_ms).max();
    let first_offset = reports.first().map_or(0, |r| r.base_offset);
    let next_offset = reports.last().map_or(0, SegmentReport::next_offset);
    let ratio = if stored > 0 {
        raw as f64 / stored as f64
    } else {
        1.0
    };
    let value = json!({
        "segments": reports.len(),
        "batches": batches.len(),
        "records": records,
        "bytes": bytes,
        "first_offset": first_offset,
        "next_offset": next_offset,
        "compression_ratio": ratio,
        "first_timestamp": first_ts,
        "max_timestamp": max_ts,
        "problems": reports.iter().map(|r| r.problems.len()).sum::<usize>(),
    });
    if as_json {
        println!("{value}");
    } else {
        println!(
            "segments {}  batches {}  records {}  bytes {}  offsets {}..{}  compression {:.2}x  time {}..{}",
            reports.len(),
            batches.len(),
            records,
            bytes,
            first_offset,
            next_offset,
            ratio,
            first_ts.map_or("-".into(), |t| t.to_string()),
            max_ts.map_or("-".into(), |t| t.to_string()),
        );
    }
}
