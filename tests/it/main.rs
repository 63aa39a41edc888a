//! The integration tests, one binary: a module per behaviour, sharing the kit (a real broker at
//! `KAFKA_BROKERS`, the daemon as a child process, its HTTP surface). Tests that start many
//! processes or load the machine for minutes run alone (`the_machine_alone`); the others share
//! it two at a time (`share_the_machine`), as when each file was a binary of its own.

mod common;

mod broker;
mod demo;
mod deploy;
mod docs;
mod e2e;
mod faults;
mod fleet;
mod fleet_training;
mod lifecycle;
mod memory;
mod outage;
mod prometheus;
mod security;
mod structure;
mod systemd;
