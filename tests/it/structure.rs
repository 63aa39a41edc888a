//! The shape of the code, checked: the modules' references to each other (`crate::x` paths in
//! `src/`) form no cycle, and no stage imports the daemon that wires them (each gets a context
//! of what it uses instead).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name through `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    collect(&src, &mut files);
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A cycle through `start`, if any (depth-first).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    let here = path.last().unwrap().clone();
    for next in graph.get(&here).into_iter().flatten() {
        if let Some(pos) = path.iter().position(|m| m == next) {
            let mut c = path[pos..].to_vec();
            c.push(next.clone());
            return Some(c);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(c) = cycle_from(graph, path, done) {
            return Some(c);
        }
        path.pop();
    }
    done.insert(here);
    None
}

#[test]
fn the_modules_form_no_import_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "read too few modules: {graph:?}");
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = cycle_from(&graph, &mut vec![m.clone()], &mut done) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn no_stage_imports_the_daemon() {
    let graph = module_graph();
    for stage in [
        "ingest", "store", "train", "live", "serve", "http", "notify", "activity",
    ] {
        let deps = graph
            .get(stage)
            .unwrap_or_else(|| panic!("no module {stage}"));
        assert!(!deps.contains("daemon"), "{stage} imports daemon: {deps:?}");
    }
    // data flows one way: ingest never reaches into scoring or training, nor they into ingest
    for (from, to) in [
        ("ingest", "serve"),
        ("ingest", "train"),
        ("serve", "ingest"),
        ("serve", "train"),
        ("train", "ingest"),
        ("train", "serve"),
        ("store", "ingest"),
    ] {
        assert!(
            !graph[from].contains(to),
            "{from} imports {to}: {:?}",
            graph[from]
        );
    }
}
