//! The codebase's shape, checked: no product file grows past a size a reader can hold, and
//! the top-level modules import one another without a cycle (so each can be read, and
//! changed, from the modules it depends on alone).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const MAX_LINES: usize = 650;

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

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The product's code, without a file's `#[cfg(test)] mod tests { … }` at its end.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[test]
fn no_product_file_is_over_650_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("tests.rs"))
        .map(|f| (f, code(f).lines().count()))
        .filter(|(_, n)| *n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(
        long.is_empty(),
        "split these by concept (tests may go to a sibling tests.rs): {long:?}"
    );
}

/// `crate::name` paths and `use crate::{name, …}` groups: the top-level modules a file uses.
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let text: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find("};").unwrap_or(group.len())];
            group
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter_map(|p| p.split("::").next())
                .collect()
        } else {
            rest.split("::").next().into_iter().collect()
        };
        found.extend(
            names
                .into_iter()
                .filter(|n| modules.contains(*n))
                .map(str::to_string),
        );
    }
    found
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let entries: Vec<PathBuf> = std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let name = |p: &Path| p.file_stem().unwrap().to_string_lossy().to_string();
    let modules: BTreeSet<String> = entries
        .iter()
        .map(|p| name(p))
        .filter(|n| n != "lib" && n != "main")
        .collect();
    for entry in &entries {
        let module = name(entry);
        if !modules.contains(&module) {
            continue;
        }
        let mut files = Vec::new();
        if entry.is_dir() {
            rust_files(entry, &mut files);
        } else {
            files.push(entry.clone());
        }
        let edges = graph.entry(module.clone()).or_default();
        for f in files.iter().filter(|f| !f.ends_with("tests.rs")) {
            edges.extend(
                uses(&code(f), &modules)
                    .into_iter()
                    .filter(|m| *m != module),
            );
        }
    }
    // Depth-first search for a path back to a module on the current path.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
    assert!(graph.len() > 10, "the modules were found: {graph:?}");
}
