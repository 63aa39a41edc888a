//! A fleet's shared user state: the changelog topic (role `serve`'s replicas write it, each for
//! the partitions it owns, and restore from it; role `train` reads all of it into its store) and
//! a serving replica's partition life cycle ([`Replica`], plugged into ingestion).

mod changelog;
mod follow;
mod pending;
mod replica;

pub use changelog::Horizon;
pub use follow::ChangelogReader;
pub use replica::{Replica, ReplicaContext};
