//! Fault injection for the tests. `MULTIVAED_CRASH_AT=name[:n]` aborts the process (no
//! destructors, no flush: as abrupt as SIGKILL) the n-th time (default: the first) the named
//! crash point is passed; `MULTIVAED_PANIC_AT=name` panics the thread that passes the named
//! panic point (a stage's bug, which supervision must turn into a stop);
//! `MULTIVAED_STOP_AT=name[:n]` freezes the process (SIGSTOP to itself) the n-th time the named
//! crash point is passed, to be thawed by the test (a replica frozen mid-batch);
//! `MULTIVAED_DELAY_AT=name:ms` sleeps the thread that passes the named crash point for `ms`
//! each time (a slow disk or a huge partition, while the rest of the process runs);
//! `MULTIVAED_SCRAMBLE_AT=name[:n]` makes the n-th pass of the named scramble point corrupt
//! what it guards (a trainer shipping a version whose item table is shuffled: a bad model that
//! passes every offline gate). Unset, a point costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSED: AtomicU64 = AtomicU64::new(0);
static STOP_TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static STOP_PASSED: AtomicU64 = AtomicU64::new(0);

/// `name[:n]` from the variable `var`.
fn spec(var: &str) -> Option<(String, u64)> {
    let spec = std::env::var(var).ok()?;
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    Some((name, n.max(1)))
}

/// Marks a point where a crash must lose nothing acknowledged; aborts (or freezes) there when
/// asked to.
pub fn crash_point(name: &'static str) {
    if let Some(d) = delay_at(name) {
        std::thread::sleep(d);
    }
    if let Some((target, n)) = TARGET.get_or_init(|| spec("MULTIVAED_CRASH_AT")) {
        if target == name && PASSED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("MULTIVAED_CRASH_AT: aborting at {name}");
            std::process::abort();
        }
    }
    if let Some((target, n)) = STOP_TARGET.get_or_init(|| spec("MULTIVAED_STOP_AT")) {
        if target == name && STOP_PASSED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("MULTIVAED_STOP_AT: freezing at {name}");
            // the whole process stops here until SIGCONT
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
        }
    }
}

static DELAY_TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();

/// The delay asked for at `name`, if any.
fn delay_at(name: &str) -> Option<std::time::Duration> {
    let (target, ms) = DELAY_TARGET
        .get_or_init(|| spec("MULTIVAED_DELAY_AT"))
        .as_ref()?;
    (target == name).then(|| std::time::Duration::from_millis(*ms))
}

/// A point in a task where `MULTIVAED_DELAY_AT` may slow it down (a reader falling behind).
pub async fn delay_point(name: &str) {
    if let Some(d) = delay_at(name) {
        tokio::time::sleep(d).await;
    }
}

static SCRAMBLE_TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static SCRAMBLE_PASSED: AtomicU64 = AtomicU64::new(0);

/// Whether this pass of the named scramble point is to corrupt what it guards.
pub fn scramble_point(name: &'static str) -> bool {
    let Some((target, n)) = SCRAMBLE_TARGET.get_or_init(|| spec("MULTIVAED_SCRAMBLE_AT")) else {
        return false;
    };
    if target != name {
        return false;
    }
    let pass = SCRAMBLE_PASSED.fetch_add(1, Ordering::Relaxed) + 1;
    if pass == *n {
        eprintln!("MULTIVAED_SCRAMBLE_AT: scrambling at {name}");
    }
    pass == *n
}

static PANIC_TARGET: OnceLock<Option<String>> = OnceLock::new();

/// Marks a point inside a stage where a bug would panic; panics there when asked to.
pub fn panic_point(name: &'static str) {
    let target = PANIC_TARGET.get_or_init(|| std::env::var("MULTIVAED_PANIC_AT").ok());
    if target.as_deref() == Some(name) {
        panic!("MULTIVAED_PANIC_AT: panicking at {name}");
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
