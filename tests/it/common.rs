//! The integration tests' helpers: the kit's harness (a real broker at KAFKA_BROKERS, the daemon
//! as a child process, its HTTP surface), shared with the benchmarks.
#![allow(unused_imports)]

pub use multivaed_kit::fleet::*;
pub use multivaed_kit::harness::*;

/// The machine, shared by tests that may run beside others and held alone by the ones that
/// cannot (see the binary's documentation).
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test that may run beside another.
pub fn share_the_machine() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// A test that needs the machine to itself.
pub fn the_machine_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// The status of a GET (0: no answer).
pub fn status(d: &Daemon, path: &str) -> u16 {
    d.get(path).map(|(s, _)| s).unwrap_or(0)
}
