//! Crash points for the fault-injection tests. `MULTIVAED_CRASH_AT=name[:n]` aborts the process
//! (no destructors, no flush: as abrupt as SIGKILL) the n-th time (default: the first) the named
//! point is passed. Unset, a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSED: AtomicU64 = AtomicU64::new(0);

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let spec = std::env::var("MULTIVAED_CRASH_AT").ok()?;
        let (name, n) = match spec.split_once(':') {
            Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some((name, n.max(1)))
    })
}

/// Marks a point where a crash must lose nothing acknowledged; aborts there when asked to.
pub fn crash_point(name: &'static str) {
    if let Some((target, n)) = target() {
        if target == name && PASSED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("MULTIVAED_CRASH_AT: aborting at {name}");
            std::process::abort();
        }
    }
}
