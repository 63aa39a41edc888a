//! The integration tests' helpers: the kit's harness (a real broker at KAFKA_BROKERS, the daemon
//! as a child process, its HTTP surface), shared with the benchmarks.
#![allow(unused_imports)]

pub use multivaed_kit::fleet::*;
pub use multivaed_kit::harness::*;
