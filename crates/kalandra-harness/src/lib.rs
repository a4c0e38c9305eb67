//! Deterministic simulation of Kalandra: one server and several clients in
//! several rooms, and two other domains' servers each keeping a replica of
//! every room over its own faulty inter-domain link, running the real room core, MLS validation, session and
//! client-core code over turmoil's simulated network and a simulated disk,
//! under a fault plan drawn from one seed, with checkers of the ordering,
//! durability and end-to-end delivery promises. See `docs/TESTING.md`.
#![forbid(unsafe_code)]

pub mod bugs;
pub mod check;
pub mod client;
pub mod disk;
pub mod domains;
pub mod faults;
pub mod ledger;
pub mod net;
pub mod server;
pub mod world;

use sha2::{Digest, Sha256};

pub use bugs::Bugs;
pub use world::{run, Outcome, SimConfig};

/// A 32-byte seed for one purpose, derived from the run's seed.
pub fn derive_seed(seed: u64, purpose: &[u8], index: u64) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"kalandra simulation seed v1");
    hash.update(seed.to_be_bytes());
    hash.update((purpose.len() as u64).to_be_bytes());
    hash.update(purpose);
    hash.update(index.to_be_bytes());
    hash.finalize().into()
}

/// A running hash of everything a run produced that must be identical
/// across two runs of one seed: frames written, epochs and their exporter
/// secrets.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    hash: Sha256,
    entries: u64,
}

impl Transcript {
    /// Adds one labelled entry.
    pub fn add(&mut self, label: &[u8], bytes: &[u8]) {
        self.hash.update((label.len() as u64).to_be_bytes());
        self.hash.update(label);
        self.hash.update((bytes.len() as u64).to_be_bytes());
        self.hash.update(bytes);
        self.entries += 1;
    }

    /// Entries added.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The hash so far.
    pub fn digest(&self) -> [u8; 32] {
        self.hash.clone().finalize().into()
    }
}
