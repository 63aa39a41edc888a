//! The documentation cannot drift from the product: every relative link and anchor of the
//! README and docs/ resolves, `../shared` (the authors' machines) appears only in development
//! material, every key of configs/multivaed.toml is in docs/configuration.md (and every key there
//! is in the file), and every metric the daemon registers is in docs/metrics.md.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The user documentation: the README, the changelog, the benchmarks and docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = ["README.md", "CHANGELOG.md", "BENCHMARKS.md"]
        .iter()
        .map(|p| root().join(p))
        .collect();
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    docs.sort();
    docs
}

/// Lines outside code fences.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings.
fn anchors(text: &str) -> HashSet<String> {
    prose(text)
        .into_iter()
        .filter_map(|l| {
            let t = l.trim_start_matches('#');
            (l.starts_with('#') && t.starts_with(' ')).then(|| slug(t))
        })
        .collect()
}

/// The targets of inline links `[text](target)` in a line, inline code left out.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut code = false;
    let bytes: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            '`' => code = !code,
            ']' if !code && bytes.get(i + 1) == Some(&'(') => {
                let rest: String = bytes[i + 2..].iter().collect();
                if let Some(end) = rest.find(')') {
                    out.push(rest[..end].to_string());
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Every broken relative link: (file, target, why).
fn broken_links() -> Vec<(String, String, String)> {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(root()).unwrap().display().to_string();
        for line in prose(&text) {
            for target in link_targets(line) {
                if target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let file = if path.is_empty() {
                    doc.clone()
                } else {
                    doc.parent().unwrap().join(path)
                };
                if !file.exists() {
                    broken.push((name.clone(), target.clone(), "no such file".into()));
                    continue;
                }
                if let Some(a) = anchor {
                    let there = std::fs::read_to_string(&file).unwrap_or_default();
                    if !anchors(&there).contains(a) {
                        broken.push((name.clone(), target.clone(), "no such heading".into()));
                    }
                }
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let broken = broken_links();
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

#[test]
fn shared_paths_of_the_authors_machines_appear_only_in_development_material() {
    let allowed = ["docs/development.md", "BENCHMARKS.md"];
    for doc in documents() {
        let name = doc.strip_prefix(root()).unwrap().display().to_string();
        if allowed.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(
            !text.contains("../shared"),
            "{name} refers to ../shared, which exists only on the authors' machines"
        );
    }
}

/// `section.key` of every key set in configs/multivaed.toml (`key` alone at the top).
fn shipped_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("configs/multivaed.toml")).unwrap();
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        if let Some((k, _)) = line.split_once('=') {
            let k = k.trim().trim_matches('"');
            keys.insert(if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            });
        }
    }
    keys
}

/// `section.key` of every key docs/configuration.md's table lists (`(top)` for the top level).
fn documented_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let mut keys = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(section), Some(list)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let section = section.trim_matches('`');
        if section == "section" || section.starts_with('-') {
            continue;
        }
        // values in parentheses (`role` (`all`, `serve`, `train`)) are not keys
        let mut keys_only = String::new();
        let mut depth = 0;
        for c in list.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => keys_only.push(c),
                _ => {}
            }
        }
        for item in keys_only.split(',') {
            let Some(key) = item.split('`').nth(1) else {
                continue;
            };
            keys.insert(if section == "(top)" {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

#[test]
fn every_configuration_key_is_documented_and_every_documented_key_exists() {
    let shipped = shipped_keys();
    let documented = documented_keys();
    assert!(shipped.len() > 40, "too few keys read: {shipped:?}");
    let undocumented: Vec<&String> = shipped.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "keys of configs/multivaed.toml missing from docs/configuration.md: {undocumented:?}"
    );
    // sub-tables (kafka.properties, models.options) are documented as keys of their section
    let phantom: Vec<&String> = documented
        .difference(&shipped)
        .filter(|k| !["kafka.properties", "models.options"].contains(&k.as_str()))
        .collect();
    assert!(
        phantom.is_empty(),
        "keys in docs/configuration.md that configs/multivaed.toml does not have: {phantom:?}"
    );
}

/// Every metric name src/metrics.rs registers (its string literals starting `multivaed_`).
fn registered_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            // the process collector's standard series are documented as one family
            s.starts_with("multivaed_")
                && !s.starts_with("multivaed_process_")
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        })
        .map(String::from)
        .collect()
}

#[test]
fn every_registered_metric_is_documented() {
    let registered = registered_metrics();
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let missing: Vec<&String> = registered
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/metrics.md: {missing:?}"
    );
}

/// The `multivaed` commands the README and docs/running.md show (`target/release/multivaed …`
/// or `cargo run --release -- …` in their code blocks): each subcommand exists and takes every
/// flag shown, by its own `--help`.
#[test]
fn the_commands_the_docs_show_exist_with_their_flags() {
    let mut checked = 0;
    for doc in ["README.md", "docs/running.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let mut fenced = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            let command = line.split('#').next().unwrap_or("").trim();
            let rest = match (
                command.strip_prefix("target/release/multivaed "),
                command.strip_prefix("cargo run --release -- "),
            ) {
                (Some(r), _) | (_, Some(r)) if fenced => r,
                _ => continue,
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let subcommand: Vec<&str> = words
                .iter()
                .take_while(|w| !w.starts_with('-') && !w.contains(['/', '.', '[', '<']))
                .copied()
                .collect();
            let out = std::process::Command::new(multivaed_kit::harness::daemon_exe())
                .args(&subcommand)
                .arg("--help")
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{doc}: `multivaed {}` is not a command",
                subcommand.join(" ")
            );
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap_or(flag);
                assert!(
                    help.contains(flag),
                    "{doc}: `multivaed {}` has no {flag}",
                    subcommand.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} commands found in the docs");
}
