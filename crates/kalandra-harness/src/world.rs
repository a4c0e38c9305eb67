//! One run: builds the world, drives it through setup, the fault phase and
//! the heal phase, and checks it.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use kalandra_server::sim::MlsRoomGroup;

use crate::bugs::{Bugs, StaleEpochGroup};
use crate::check;
use crate::client::{self, ClientShared, ROOM};
use crate::disk::DiskFaults;
use crate::faults::{Change, FaultPlan, Host};
use crate::net::Loss;
use crate::server::{self, ServerShared, ShellBugs};
use crate::Transcript;

/// Time a failed server takes to be restarted (its supervisor's delay).
pub const SERVER_RESTART_DELAY_MS: u64 = 200;
/// Simulated time one step advances.
pub const TICK_MS: u64 = 1;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Clients (client 0 creates the room and adds the others).
    pub clients: usize,
    /// Highest loss probability drawn for a host's outgoing frames.
    pub loss_max: f64,
    /// Highest one-way latency drawn.
    pub latency_max_ms: u64,
    /// Highest disk write latency drawn.
    pub disk_latency_max_ms: u64,
    /// Length of the fault phase (the workload runs during it).
    pub fault_phase_ms: u64,
    /// Simulated time after healing within which everything must be delivered.
    pub heal_bound_ms: u64,
    /// Simulated time the fault-free setup may take.
    pub setup_bound_ms: u64,
    /// Crash and restart hosts.
    pub crashes: bool,
    /// At least this many server crashes when crashing.
    pub server_crashes_min: u64,
    /// Partition the server from clients.
    pub partitions: bool,
    /// Inject disk faults.
    pub disk_faults: bool,
    /// Probability per client tick of new work during the fault phase.
    pub work_rate: f64,
    /// Share of new work that is a self-update commit.
    pub update_share: f64,
    /// Injected bugs.
    pub bugs: Bugs,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            clients: 3,
            loss_max: 0.5,
            latency_max_ms: 50,
            disk_latency_max_ms: 10,
            fault_phase_ms: 6_000,
            heal_bound_ms: 30_000,
            setup_bound_ms: 10_000,
            crashes: true,
            server_crashes_min: 0,
            partitions: true,
            disk_faults: true,
            work_rate: 0.05,
            update_share: 0.15,
            bugs: Bugs::default(),
        }
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Frames the server sequenced (across restarts).
    pub sequenced: u64,
    /// Acknowledgements sent.
    pub acknowledged: u64,
    /// Frames fanned out.
    pub fanned_out: u64,
    /// Log entries delivered to clients, summed over clients.
    pub delivered: u64,
    /// Messages decrypted by clients, summed.
    pub plaintexts: u64,
    /// Length of the room's durable log at the end.
    pub log_len: u64,
    /// Final epoch.
    pub epoch: u64,
    /// Server starts.
    pub server_boots: u32,
    /// Client starts, summed.
    pub client_boots: u32,
    /// Client connections that authenticated, summed.
    pub sessions: u64,
    /// Storage failures.
    pub storage_failures: u64,
    /// Disk I/O errors and failed syncs injected.
    pub disk_faults: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Simulated time of the whole run.
    pub sim_ms: u64,
    /// The server's data was in the production redb store.
    pub on_redb: bool,
    /// Simulated time from healing to convergence.
    pub converged_after_heal_ms: Option<u64>,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// What the checkers found; empty when the run passed.
    pub failures: Vec<String>,
    /// Hash of every frame written and every epoch's exporter secret.
    pub transcript: [u8; 32],
    /// Entries in the transcript.
    pub transcript_entries: u64,
    /// Counters.
    pub stats: RunStats,
}

impl Outcome {
    /// Whether every checker passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

struct World<'a> {
    sim: turmoil::Sim<'a>,
    server: Rc<ServerShared>,
    clients: Vec<Rc<ClientShared>>,
    down: BTreeSet<Host>,
    restart_server_at: Option<u64>,
    failures: Vec<String>,
    stats: RunStats,
}

impl World<'_> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.sim.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One step; false if the simulation failed.
    fn step(&mut self) -> bool {
        if let Err(error) = self.sim.step() {
            self.failures.push(format!("simulation error: {error}"));
            return false;
        }
        if self.server.failed.get() && !self.down.contains(&Host::Server) {
            // The process exits after a storage failure; its supervisor restarts it.
            self.sim.crash("server");
            self.down.insert(Host::Server);
            self.restart_server_at = Some(self.now_ms() + SERVER_RESTART_DELAY_MS);
        }
        if let Some(at) = self.restart_server_at {
            if self.now_ms() >= at {
                self.restart(Host::Server);
            }
        }
        true
    }

    fn restart(&mut self, host: Host) {
        if self.down.remove(&host) {
            self.sim.bounce(host.name());
        }
        if host == Host::Server {
            self.restart_server_at = None;
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Crash(host) => {
                if self.down.insert(*host) {
                    self.sim.crash(host.name());
                    if *host == Host::Server {
                        self.restart_server_at = None;
                    }
                }
            }
            Change::Restart(host) => self.restart(*host),
            Change::Partition(client) => {
                self.stats.partitions += 1;
                self.sim.partition("server", Host::Client(*client).name());
            }
            Change::Repair(client) => self.sim.repair("server", Host::Client(*client).name()),
            Change::DiskFaults(faults) => self.server.disk.set_faults(*faults),
        }
    }

    fn converged(&self) -> bool {
        if !self.down.is_empty() || self.server.failed.get() {
            return false;
        }
        let views = self.server.rooms.borrow();
        let Some(view) = views.get(&ROOM) else { return false };
        self.clients.iter().all(|client| {
            let record = client.record.borrow();
            record.live
                && record.work_left == 0
                && record.last_applied.map(|index| index + 1) == Some(view.next_log_index)
                && record.epoch_and_tree.as_ref() == Some(&(view.epoch, view.tree_hash.clone()))
        })
    }
}

thread_local! {
    /// Panics on this thread since the last run began: any task's panic
    /// fails the seed, also one that tokio caught inside a spawned task.
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Records every panic of a thread that runs simulations (once per process).
fn record_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|panics| panics.borrow_mut().push(info.to_string()));
            previous(info);
        }));
    });
}

/// Runs one seed.
pub fn run(config: &SimConfig) -> Outcome {
    record_panics();
    PANICS.with(|panics| panics.borrow_mut().clear());
    kalandra_server::bugs::plant(crate::bugs::planted(&config.bugs));
    let plan = FaultPlan::draw(config);
    let transcript = Rc::new(RefCell::new(Transcript::default()));
    let sim = turmoil::Builder::new()
        .rng_seed(config.seed)
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(Duration::from_millis(TICK_MS))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(plan.latency_max_ms.max(1)))
        .build();
    let shell_bugs = ShellBugs {
        ack_before_durable: config.bugs.ack_before_durable,
        drop_frame_on_restart: config.bugs.drop_frame_on_restart,
    };
    let server = Rc::new(ServerShared::new(config.seed, shell_bugs));
    server.disk_latency_ms.set(plan.disk_latency_ms);
    let mut world = World {
        sim,
        server: Rc::clone(&server),
        clients: Vec::new(),
        down: BTreeSet::new(),
        restart_server_at: None,
        failures: Vec::new(),
        stats: RunStats::default(),
    };
    {
        let shared = Rc::clone(&server);
        if config.bugs.double_commit {
            world
                .sim
                .host("server", move || server::run::<StaleEpochGroup<MlsRoomGroup>>(Rc::clone(&shared)));
        } else {
            world.sim.host("server", move || server::run::<MlsRoomGroup>(Rc::clone(&shared)));
        }
    }
    for index in 0..config.clients.max(1) {
        let seed = u64::from_be_bytes(
            crate::derive_seed(config.seed, b"client", index as u64)[..8].try_into().expect("8 bytes"),
        );
        let shared = Rc::new(ClientShared::new(index, seed, Rc::clone(&transcript)));
        shared.work_rate.set(config.work_rate);
        shared.update_share.set(config.update_share);
        let host = Rc::clone(&shared);
        world.sim.host(Host::Client(index).name(), move || client::run(Rc::clone(&host)));
        world.clients.push(shared);
    }
    let others = world.clients[1..].iter().map(|c| c.sender_id()).collect();
    *world.clients[0].others.borrow_mut() = others;

    // Setup, without faults: the room exists and every client is a member.
    let setup_deadline = config.setup_bound_ms;
    while !world.converged() {
        if world.now_ms() > setup_deadline || !world.step() {
            world.failures.push(format!("setup did not complete within {setup_deadline} ms"));
            break;
        }
    }
    let members_ready = world.failures.is_empty();

    // Fault phase.
    if members_ready {
        for (client, loss) in world.clients.iter().zip(plan.loss.iter().skip(1)) {
            client.loss.set(Loss { rate: *loss });
            client.workload.set(true);
        }
        server.loss.set(Loss { rate: plan.loss[0] });
        let start = world.now_ms();
        let mut next_change = 0;
        while world.now_ms() < start + config.fault_phase_ms {
            while next_change < plan.changes.len() && start + plan.changes[next_change].0 <= world.now_ms() {
                let change = plan.changes[next_change].1.clone();
                world.apply(&change);
                next_change += 1;
            }
            if !world.step() {
                break;
            }
        }

        // Heal: every fault ends, the workload stops, and the world must converge.
        for client in &world.clients {
            client.workload.set(false);
            client.loss.set(Loss::default());
        }
        server.loss.set(Loss::default());
        server.disk.set_faults(DiskFaults::default());
        for index in 0..world.clients.len() {
            world.sim.repair("server", Host::Client(index).name());
        }
        let down: Vec<Host> = world.down.iter().copied().collect();
        for host in down {
            world.restart(host);
        }
        let healed = world.now_ms();
        let deadline = healed + config.heal_bound_ms;
        let mut converged = false;
        while world.failures.is_empty() {
            if world.converged() {
                converged = true;
                break;
            }
            if world.now_ms() > deadline || !world.step() {
                break;
            }
        }
        if converged {
            world.stats.converged_after_heal_ms = Some(world.now_ms() - healed);
        } else if world.failures.is_empty() {
            world.failures.push(format!(
                "not converged within {} ms after healing: {}",
                config.heal_bound_ms,
                check::describe_progress(&world.server, &world.clients)
            ));
        }
    }

    let mut failures = world.failures;
    failures.extend(PANICS.with(|panics| {
        panics.borrow().iter().take(3).map(|p| format!("a task panicked: {p}")).collect::<Vec<_>>()
    }));
    failures.extend(check::check(&world.server, &world.clients));
    let mut stats = world.stats;
    {
        let server_stats = *server.stats.borrow();
        stats.sequenced = server_stats.sequenced;
        stats.acknowledged = server_stats.acknowledged;
        stats.fanned_out = server_stats.fanned_out;
        stats.storage_failures = server_stats.storage_failures;
        stats.server_boots = server.boots.get();
        stats.on_redb = server.medium == crate::disk::Medium::Redb;
        let disk = server.disk.stats();
        stats.disk_faults = disk.io_errors + disk.failed_syncs;
        stats.log_len = server.disk.log(ROOM).len() as u64;
        stats.epoch = server.rooms.borrow().get(&ROOM).map_or(0, |view| view.epoch);
        for client in &world.clients {
            let record = client.record.borrow();
            stats.delivered += record.delivered.len() as u64;
            stats.plaintexts += record.plaintexts.len() as u64;
            stats.client_boots += record.boots;
            stats.sessions += record.sessions;
        }
        stats.sim_ms = u64::try_from(world.sim.elapsed().as_millis()).unwrap_or(u64::MAX);
    }
    let mut transcript = transcript.borrow().clone();
    for entry in server.disk.log(ROOM) {
        transcript.add(b"log", &entry.frame);
    }
    Outcome {
        seed: config.seed,
        failures,
        transcript: transcript.digest(),
        transcript_entries: transcript.entries(),
        stats,
    }
}
