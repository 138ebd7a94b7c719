//! Keeps the layer diagram of `src/lib.rs` true: scans `src/**/*.rs` for `crate::X` paths and
//! fails when a module imports from a layer above its own, or when sibling files of one
//! module import each other in a cycle (`api/auth.rs` <-> `api/http.rs` was one).
//!
//! Regression (issue 11, item 5): `log/writer.rs` imported `metrics`, `metrics.rs` imported
//! `broker::QueueInfo`, `group/state.rs` imported `broker::Ordering`, and `api/grpc.rs` <->
//! `api/receive.rs`, `api/auth.rs` <-> `api/http.rs` imported each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module of the crate with its layer, lowest first. A module may import
/// from its own layer and from those below it, never from one above.
const LAYERS: &[(&str, u8)] = &[
    // Storage: the partition log, the group-commit of fsyncs, the journal; generated proto.
    ("log", 0),
    ("commit", 0),
    ("journal", 0),
    ("proto", 0),
    ("storage", 0),
    // Pure rules and leaf services: group state machines, routing, metrics names, auth.
    ("group", 1),
    ("route", 1),
    ("metrics", 1),
    ("auth", 1),
    ("clock", 1),
    ("name", 1),
    ("hash", 1),
    // The broker wires storage and rules together.
    ("broker", 2),
    // Background work over the broker.
    ("maintenance", 3),
    // Replication: openraft groups over the broker's apply path, forwarding, placement.
    ("cluster", 3),
    // Adapters.
    ("api", 4),
    ("kafka", 4),
    // The edge: configuration, the command line, the client, the load generator.
    ("config", 5),
    ("cli", 5),
    ("client", 5),
    ("bench", 5),
    ("bench_queues", 5),
    // Binds it all together.
    ("server", 6),
];

/// Upward imports known and owned by another change, each with who removes it (none now).
const KNOWN_UPWARD: &[(&str, &str, &str)] = &[];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(top, file)` of a source file: `src/log/writer.rs` -> `("log", Some("writer"))`,
/// `src/log/mod.rs` -> `("log", None)`, `src/metrics.rs` -> `("metrics", None)`.
fn module_of(src: &Path, file: &Path) -> (String, Option<String>) {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [top] => (top.clone(), None),
        [top, sub] if sub == "mod" => (top.clone(), None),
        [top, sub, ..] => (top.clone(), Some(sub.clone())),
        [] => unreachable!("a file has a name"),
    }
}

/// The code of a file without its comment lines (docs may name any module).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
}

/// Identifiers that directly follow each occurrence of `prefix` in `line`.
fn idents_after<'a>(line: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `my_crate::`
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out.push(&rest[..end]);
        if rest[..end].is_empty() && rest.starts_with('{') {
            // `use super::{a, b::c}`: the first segment of each item.
            let close = rest.find('}').unwrap_or(rest.len());
            out.pop();
            for item in rest[1..close].split(',') {
                let first = item.trim().split("::").next().unwrap_or("").trim();
                out.push(first);
            }
        }
    }
    out
}

struct Scan {
    /// `(from top, to top)` -> where.
    cross: BTreeMap<(String, String), Vec<String>>,
    /// Per top module: `(from file, to sibling file)` -> where.
    siblings: BTreeMap<String, BTreeMap<(String, String), String>>,
}

fn scan() -> Scan {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut scan = Scan {
        cross: BTreeMap::new(),
        siblings: BTreeMap::new(),
    };
    for file in files {
        let (top, sub) = module_of(&src, &file);
        if top == "lib" || top == "main" {
            continue; // the crate root and the binary sit above every layer
        }
        let dir = file.parent().unwrap();
        let sibling_names: BTreeSet<String> = if sub.is_some() {
            let mut names = Vec::new();
            rust_files(dir, &mut names);
            names.iter().filter_map(|p| module_of(&src, p).1).collect()
        } else {
            BTreeSet::new()
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file.strip_prefix(&src).unwrap().display().to_string();
        for (number, line) in code_lines(&text) {
            let at = format!("src/{shown}:{number}: {}", line.trim());
            for target in idents_after(line, "crate::") {
                if target.is_empty() || target == top {
                    continue;
                }
                scan.cross
                    .entry((top.clone(), target.to_string()))
                    .or_default()
                    .push(at.clone());
            }
            let Some(sub) = &sub else { continue };
            let mut targets = idents_after(line, "super::");
            targets.extend(idents_after(line, &format!("crate::{top}::")));
            for target in targets {
                if target != sub.as_str() && sibling_names.contains(target) {
                    scan.siblings
                        .entry(top.clone())
                        .or_default()
                        .entry((sub.clone(), target.to_string()))
                        .or_insert_with(|| at.clone());
                }
            }
        }
    }
    scan
}

#[test]
fn every_module_is_in_the_layer_table() {
    let scan = scan();
    let unknown: BTreeSet<&String> = scan
        .cross
        .keys()
        .flat_map(|(from, to)| [from, to])
        .filter(|m| layer(m).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "add these modules to LAYERS in tests/layers.rs: {unknown:?}"
    );
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let scan = scan();
    let mut upward = Vec::new();
    for ((from, to), places) in &scan.cross {
        let (Some(low), Some(high)) = (layer(from), layer(to)) else {
            continue; // reported by every_module_is_in_the_layer_table
        };
        let known = KNOWN_UPWARD.iter().any(|(f, t, _)| f == from && t == to);
        if high > low && !known {
            upward.push(format!(
                "{from} (layer {low}) imports {to} (layer {high}):\n    {}",
                places.join("\n    ")
            ));
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn sibling_files_of_a_module_do_not_import_each_other_in_a_cycle() {
    let scan = scan();
    let mut cycles = Vec::new();
    for (top, edges) in &scan.siblings {
        for ((a, b), at) in edges {
            if a < b
                && let Some(back) = edges.get(&(b.clone(), a.clone()))
            {
                cycles.push(format!("{top}::{a} <-> {top}::{b}\n    {at}\n    {back}"));
            }
        }
        // Longer cycles: a depth-first search over the sibling graph.
        let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, b) in edges.keys() {
            graph.entry(a).or_default().push(b);
        }
        if let Some(cycle) = find_cycle(&graph)
            && cycle.len() > 3
        {
            cycles.push(format!("{top}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

fn find_cycle<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_scanner_sees_the_import_forms_it_checks() {
    assert_eq!(
        idents_after("use crate::broker::Ordering;", "crate::"),
        vec!["broker"]
    );
    assert_eq!(
        idents_after("use super::{json, error::ApiError};", "super::"),
        vec!["json", "error"]
    );
    assert_eq!(
        idents_after("x(crate::metrics::A, qcrate::no)", "crate::"),
        vec!["metrics"]
    );
}

#[test]
fn qit_inspect_uses_the_storage_layer_alone() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/inspect.rs");
    let text = std::fs::read_to_string(&path).unwrap();
    let used: BTreeSet<&str> = code_lines(&text)
        .flat_map(|(_, line)| idents_after(line, "qit::"))
        .collect();
    let above: Vec<&&str> = used.iter().filter(|m| layer(m) != Some(0)).collect();
    assert!(
        above.is_empty(),
        "qit-inspect works offline on storage alone, yet uses {above:?}"
    );
}
