//! multivaed's test kit: [`harness`] (a real broker, fresh topics, the daemon as a child
//! process, its HTTP surface and metrics) and [`fleet`] (a fleet's topics and processes) for the
//! integration tests and the benchmarks, and the [`bench`]marks themselves. Not part of the
//! product library.

pub mod bench;
pub mod fleet;
pub mod harness;
