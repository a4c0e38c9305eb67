//! The fault plan of a run, drawn from its seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::DiskFaults;
use crate::world::SimConfig;

/// A simulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    /// The server.
    Server,
    /// A client, by position.
    Client(usize),
    /// The server of another domain, keeping replicas, by position.
    Replica(usize),
}

impl Host {
    /// The turmoil host name.
    pub fn name(&self) -> String {
        match self {
            Host::Server => "server".to_owned(),
            Host::Client(index) => format!("client-{index}"),
            Host::Replica(index) => crate::domains::replica_host(*index),
        }
    }
}

/// One change to the world at a point of the fault phase.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Kill a host's software (unsynced disk writes are lost).
    Crash(Host),
    /// Start a crashed host again.
    Restart(Host),
    /// Drop every segment between the server and a client.
    Partition(usize),
    /// End a partition.
    Repair(usize),
    /// Set the disk's fault rates.
    DiskFaults(DiskFaults),
    /// Drop every segment between the authority and a replica's server.
    PartitionDomains(usize),
    /// End that partition.
    RepairDomains(usize),
}

/// Everything that goes wrong in one run.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Loss probability of each host's outgoing frames: the server's first,
    /// then each client's.
    pub loss: Vec<f64>,
    /// Largest one-way latency of a segment (jitter is drawn below it).
    pub latency_max_ms: u64,
    /// Time a durable write takes on the server's disk.
    pub disk_latency_ms: u64,
    /// Changes, by time from the start of the fault phase, in time order.
    pub changes: Vec<(u64, Change)>,
    /// Loss probability of each replica's outgoing frames.
    pub replica_loss: Vec<f64>,
}

/// Fewest and most server crashes in a plan with crashes.
pub const SERVER_CRASHES_MAX: u64 = 2;
/// Most client crashes in a plan with crashes.
pub const CLIENT_CRASHES_MAX: u64 = 3;
/// Most partitions in a plan with partitions.
pub const PARTITIONS_MAX: u64 = 3;
/// Most disk-fault windows in a plan with disk faults.
pub const DISK_FAULT_WINDOWS_MAX: u64 = 2;
/// Longest a crashed host stays down.
pub const DOWN_MS_MAX: u64 = 1_500;
/// Longest partition.
pub const PARTITION_MS_MAX: u64 = 2_500;
/// Most crashes of each replica's server in a plan with crashes.
pub const REPLICA_CRASHES_MAX: u64 = 2;
/// Most partitions between the authority and each replica's domain in a
/// plan with partitions.
pub const DOMAIN_PARTITIONS_MAX: u64 = 2;
/// Longest partition between the domains (longer than a link's idle
/// timeout, so that both ends see the link end).
pub const DOMAIN_PARTITION_MS_MAX: u64 = 4_000;

const _: () = assert!(DOMAIN_PARTITION_MS_MAX > crate::domains::LINK_IDLE_MS);

impl FaultPlan {
    /// The plan for `config`, drawn from its seed.
    pub fn draw(config: &SimConfig) -> FaultPlan {
        let mut rng = ChaCha8Rng::from_seed(crate::derive_seed(config.seed, b"fault plan", 0));
        let phase = config.fault_phase_ms.max(1);
        let loss = (0..=config.clients).map(|_| rng.gen_range(0.0..=config.loss_max.max(0.0))).collect();
        let latency_max_ms = rng.gen_range(1..=config.latency_max_ms.max(1));
        let disk_latency_ms = rng.gen_range(1..=config.disk_latency_max_ms.max(1));
        let mut changes = Vec::new();
        if config.crashes {
            let server_crashes =
                rng.gen_range(config.server_crashes_min..=SERVER_CRASHES_MAX.max(config.server_crashes_min));
            for _ in 0..server_crashes {
                let at = rng.gen_range(0..phase);
                let down = rng.gen_range(50..=DOWN_MS_MAX);
                changes.push((at, Change::Crash(Host::Server)));
                changes.push((at + down, Change::Restart(Host::Server)));
            }
            for _ in 0..rng.gen_range(0..=CLIENT_CRASHES_MAX) {
                let client = rng.gen_range(0..config.clients);
                let at = rng.gen_range(0..phase);
                let down = rng.gen_range(50..=DOWN_MS_MAX);
                changes.push((at, Change::Crash(Host::Client(client))));
                changes.push((at + down, Change::Restart(Host::Client(client))));
            }
        }
        if config.partitions {
            for _ in 0..rng.gen_range(0..=PARTITIONS_MAX) {
                let client = rng.gen_range(0..config.clients);
                let at = rng.gen_range(0..phase);
                let length = rng.gen_range(100..=PARTITION_MS_MAX);
                changes.push((at, Change::Partition(client)));
                changes.push((at + length, Change::Repair(client)));
            }
        }
        if config.disk_faults {
            for _ in 0..rng.gen_range(0..=DISK_FAULT_WINDOWS_MAX) {
                let at = rng.gen_range(0..phase);
                let length = rng.gen_range(100..=2_000);
                let faults = DiskFaults {
                    io_error_rate: rng.gen_range(0.0..0.05),
                    failed_sync_rate: rng.gen_range(0.0..0.05),
                };
                changes.push((at, Change::DiskFaults(faults)));
                changes.push((at + length, Change::DiskFaults(DiskFaults::default())));
            }
        }
        // Drawn last, so that the plan of one domain is the same as before.
        let replica_loss =
            (0..config.replica_domains).map(|_| rng.gen_range(0.0..=config.loss_max.max(0.0))).collect();
        for replica in 0..config.replica_domains {
            if config.crashes {
                let crashes = rng.gen_range(
                    config.replica_crashes_min..=REPLICA_CRASHES_MAX.max(config.replica_crashes_min),
                );
                for _ in 0..crashes {
                    let at = rng.gen_range(0..phase);
                    let down = rng.gen_range(50..=DOWN_MS_MAX);
                    changes.push((at, Change::Crash(Host::Replica(replica))));
                    changes.push((at + down, Change::Restart(Host::Replica(replica))));
                }
            }
            if config.partitions {
                for _ in 0..rng.gen_range(0..=DOMAIN_PARTITIONS_MAX) {
                    let at = rng.gen_range(0..phase);
                    let length = rng.gen_range(100..=DOMAIN_PARTITION_MS_MAX);
                    changes.push((at, Change::PartitionDomains(replica)));
                    changes.push((at + length, Change::RepairDomains(replica)));
                }
            }
        }
        changes.sort_by_key(|(at, _)| *at);
        FaultPlan { loss, latency_max_ms, disk_latency_ms, changes, replica_loss }
    }
}
