//! The README's first command: `multivaed demo` runs the whole path on an embedded broker and
//! stops by itself with a summary.

use std::process::Command;

use crate::common::*;

#[test]
fn demo_runs_end_to_end_and_stops_by_itself() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_multivaed"))
        .args([
            "demo",
            "--duration",
            "30",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .expect("a summary line");
    let field = |name: &str| -> u64 {
        summary
            .split(name)
            .nth(1)
            .and_then(|s| s.trim().split([',', ' ']).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
    };
    assert!(field("events ingested") > 10_000, "{summary}");
    assert!(field("users scored") > 1000, "{summary}");
    assert!(field("model version") >= 1, "{summary}");
    assert!(stdout.contains("recommendation for user-"), "{stdout}");
}
