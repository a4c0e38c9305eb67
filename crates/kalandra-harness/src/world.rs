//! One run: builds the world (rooms with overlapping members, the server,
//! the clients), drives it through setup, the fault phase and the heal
//! phase, and checks it.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use kalandra_proto::RoomId;
use kalandra_server::sim::MlsRoomGroup;
use kalandra_server::store::Store;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bugs::Bugs;
use crate::check;
use crate::client::{self, Cast, ClientShared, RoomPlan};
use crate::disk::DiskFaults;
use crate::faults::{Change, FaultPlan, Host};
use crate::net::Loss;
use crate::server::{self, ServerShared};

/// The domain that orders every room of the simulation.
pub const AUTHORITY_DOMAIN: &str = "a.test";

/// Time a failed server takes to be restarted (its supervisor's delay).
pub const SERVER_RESTART_DELAY_MS: u64 = 200;
/// Simulated time one step advances.
pub const TICK_MS: u64 = 1;
/// Most rooms a world holds.
pub const ROOMS_MAX: usize = 8;
/// Domains keeping replicas in a default run: with the authority's, three
/// domains.
pub const REPLICA_DOMAINS_DEFAULT: usize = 2;
/// Most domains keeping replicas in one run.
pub const REPLICA_DOMAINS_MAX: usize = 4;

const _: () = assert!(REPLICA_DOMAINS_DEFAULT <= REPLICA_DOMAINS_MAX);
/// Chance that a client other than the creator is among a room's first members.
pub const INITIAL_MEMBER_SHARE: f64 = 0.6;
/// Simulated time within which, after convergence, a message each honest
/// member writes in each of its rooms must be read by every other honest
/// member of the room.
pub const PROBE_BOUND_MS: u64 = 10_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Clients.
    pub clients: usize,
    /// Rooms (room `r` is created by client `r mod clients`; odd rooms are
    /// open to external joins).
    pub rooms: usize,
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
    /// Share of new work that changes membership or redacts.
    pub membership_share: f64,
    /// Hostile clients, taken among the clients that create no room (the
    /// last first; fewer if there are not enough).
    pub hostile: usize,
    /// Domains besides the authority's, each keeping a replica of every
    /// room (`crate::domains`), with crashes of its server and partitions
    /// between it and the authority.
    pub replica_domains: usize,
    /// At least this many crashes of each replica's server when crashing.
    pub replica_crashes_min: u64,
    /// Injected bugs.
    pub bugs: Bugs,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            clients: 4,
            rooms: 2,
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
            update_share: 0.12,
            membership_share: 0.08,
            hostile: 1,
            replica_domains: REPLICA_DOMAINS_DEFAULT,
            replica_crashes_min: 0,
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
    /// Messages opened after a later one of the same sender (out of order).
    pub opened_late: u64,
    /// Entries in the rooms' durable logs at the end.
    pub log_len: u64,
    /// Commits (and external joins) in the logs.
    pub commits: u64,
    /// External joins in the logs.
    pub external_joins: u64,
    /// Server proposals (kicks, bans) in the logs.
    pub server_proposals: u64,
    /// Entries erased.
    pub redacted: u64,
    /// Moderation acts answered.
    pub moderation_acts: u64,
    /// Highest final epoch of a room.
    pub epoch: u64,
    /// Storage transactions of log entries.
    pub transactions: u64,
    /// Most storage batches in flight at once.
    pub batches_in_flight_max: u64,
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
    /// Intents the clients acted on, by kind (Update, Invite, Remove,
    /// Kick, Ban, Leave, CoverProposals, join).
    pub intents: std::collections::BTreeMap<String, u64>,
    /// Hostile acts, as "act: outcome" ("sent", or the server's answer).
    pub hostile: std::collections::BTreeMap<String, u64>,
    /// Commits members could not process, sequenced.
    pub bad_commits: u64,
    /// `CommitVoided` entries in the logs.
    pub voids: u64,
    /// External joins again after being stuck past a commit's window.
    pub rejoins: u64,
    /// Entries in the replicas' durable logs at the end (all replicas).
    pub replica_log_len: u64,
    /// Starts of the replicas' servers.
    pub replica_boots: u32,
    /// Inter-domain links that came up.
    pub domain_links: u64,
    /// Follows the replicas asked.
    pub follows: u64,
    /// Partitions between the authority and a replica's domain.
    pub domain_partitions: u64,
    /// Batches of the authority's frames a replica refused (then followed again).
    pub replica_refusals: u64,
    /// Signed heads the replicas checked, by outcome.
    pub head_checks: std::collections::BTreeMap<String, u64>,
    /// Entries erased at the authority whose frame a replica still holds
    /// (each one also a failure).
    pub replica_holds_erased: u64,
    /// Entries the replicas erased after their authority did.
    pub replica_erased: u64,
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
    /// The other domains' servers, keeping replicas.
    replicas: Vec<ReplicaDomain>,
    cast: Rc<Cast>,
    clients: Vec<Rc<ClientShared>>,
    down: BTreeSet<Host>,
    restart_server_at: Option<u64>,
    failures: Vec<String>,
    stats: RunStats,
}

/// The server of a domain that keeps replicas, as the world tracks it.
struct ReplicaDomain {
    shared: Rc<ServerShared>,
    restart_at: Option<u64>,
    /// Rooms recorded on its disk as ordered by the authority.
    recorded: BTreeSet<RoomId>,
    /// The most of each room it held durably so far.
    durable: std::collections::BTreeMap<RoomId, u64>,
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
        for index in 0..self.replicas.len() {
            self.step_replica(index);
        }
        true
    }

    /// A replica's server is restarted after a storage failure like the
    /// authority's; and it must never hold less of a room than it held
    /// durably before (checker (b) for the other domains).
    fn step_replica(&mut self, index: usize) {
        let host = Host::Replica(index);
        let shared = Rc::clone(&self.replicas[index].shared);
        self.record_new_rooms(index);
        if shared.failed.get() && !self.down.contains(&host) {
            self.sim.crash(host.name());
            self.down.insert(host);
            self.replicas[index].restart_at = Some(self.now_ms() + SERVER_RESTART_DELAY_MS);
        }
        if self.replicas[index].restart_at.is_some_and(|at| self.now_ms() >= at) {
            self.restart(host);
        }
        if self.down.contains(&host) {
            return;
        }
        let durable = &mut self.replicas[index].durable;
        for (room_id, view) in shared.rooms.borrow().iter() {
            let held = durable.entry(*room_id).or_default();
            if view.next_log_index < *held {
                self.failures.push(format!(
                    "{}: the replica of room {room_id} lost durable entries: it held {held}, now {}",
                    host.name(),
                    view.next_log_index
                ));
            }
            *held = (*held).max(view.next_log_index);
        }
    }

    fn restart(&mut self, host: Host) {
        if self.down.remove(&host) {
            self.sim.bounce(host.name());
        }
        self.cancel_restart(host);
    }

    fn cancel_restart(&mut self, host: Host) {
        match host {
            Host::Server => self.restart_server_at = None,
            Host::Replica(index) => self.replicas[index].restart_at = None,
            Host::Client(_) => {}
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Crash(host) => {
                if self.down.insert(*host) {
                    self.sim.crash(host.name());
                    self.cancel_restart(*host);
                }
            }
            Change::Restart(host) => self.restart(*host),
            Change::Partition(client) => {
                self.stats.partitions += 1;
                self.sim.partition("server", Host::Client(*client).name());
            }
            Change::Repair(client) => self.sim.repair("server", Host::Client(*client).name()),
            Change::DiskFaults(faults) => self.server.disk.set_faults(*faults),
            Change::PartitionDomains(replica) => {
                self.stats.domain_partitions += 1;
                self.sim.partition("server", Host::Replica(*replica).name());
            }
            Change::RepairDomains(replica) => self.sim.repair("server", Host::Replica(*replica).name()),
        }
    }

    /// Every room is settled: the server holds no uncovered proposal;
    /// every member (as the server's group has them) reads the room live at
    /// its head, epoch and tree hash; nobody else holds its group; no client
    /// has work left. At setup, the first members are in too.
    fn converged(&self, setup: bool) -> bool {
        if !self.down.is_empty() || self.server.failed.get() {
            return false;
        }
        let senders = self.cast.senders.borrow();
        if self.clients.iter().any(|client| client.record.borrow().work_left > 0) {
            return false;
        }
        let views = self.server.rooms.borrow();
        if !self.replicas_converged(&views) {
            return false;
        }
        self.cast.rooms.iter().all(|plan| {
            let Some(view) = views.get(&plan.room_id) else { return false };
            let first = plan.initial.iter().chain([&plan.creator]);
            if view.proposals_pending > 0
                || (setup && !first.into_iter().all(|c| view.members.contains(&senders[*c])))
            {
                return false;
            }
            self.clients.iter().all(|client| {
                let record = client.record.borrow();
                let status = record.status.get(&plan.room_id).cloned().unwrap_or_default();
                if view.members.contains(&senders[client.index]) {
                    status.member
                        && status.live
                        && status.next_log_index == view.next_log_index
                        && status.epoch_and_tree == Some((view.epoch, view.tree_hash.clone()))
                } else {
                    !status.member && !status.joining
                }
            })
        })
    }
}

impl World<'_> {
    /// A room the authority holds is recorded on each replica's disk as
    /// ordered by the authority, as a Welcome of one of its members would
    /// record it; the replica then follows it.
    fn record_new_rooms(&mut self, index: usize) {
        let replica = &mut self.replicas[index];
        let created: Vec<RoomId> = self
            .server
            .rooms
            .borrow()
            .keys()
            .filter(|room_id| !replica.recorded.contains(room_id))
            .copied()
            .collect();
        if created.is_empty() {
            return;
        }
        let authority =
            kalandra_proto::federation::DomainName::parse(AUTHORITY_DOMAIN).expect("a domain name");
        for room_id in created {
            if replica.shared.disk.record_remote_room(room_id, &authority).is_ok() {
                replica.recorded.insert(room_id);
            }
        }
    }

    /// Every replica of every room is live at the authority's durable head.
    fn replicas_converged(
        &self,
        views: &std::collections::BTreeMap<RoomId, crate::server::RoomView>,
    ) -> bool {
        self.replicas.iter().all(|replica| {
            if replica.shared.failed.get() {
                return false;
            }
            let replicated = replica.shared.rooms.borrow();
            let live = replica.shared.live_replicas.borrow();
            self.cast.rooms.iter().all(|plan| {
                live.contains(&plan.room_id)
                    && replicated.get(&plan.room_id).map(|view| view.next_log_index)
                        == views.get(&plan.room_id).map(|view| view.next_log_index)
            })
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

/// The rooms of a world: room `r` is created by client `r mod clients`,
/// odd rooms are open to external joins, and each other client is among
/// its first members with [`INITIAL_MEMBER_SHARE`] (at least one is).
pub fn plan_rooms(config: &SimConfig) -> Vec<RoomPlan> {
    let clients = config.clients.max(1);
    let mut rng = ChaCha8Rng::from_seed(crate::derive_seed(config.seed, b"rooms", 0));
    (0..config.rooms.clamp(1, ROOMS_MAX))
        .map(|r| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&crate::derive_seed(config.seed, b"room-id", r as u64)[..16]);
            let creator = r % clients;
            let others: Vec<usize> = (0..clients).filter(|c| *c != creator).collect();
            let mut initial: Vec<usize> =
                others.iter().copied().filter(|_| rng.gen_bool(INITIAL_MEMBER_SHARE)).collect();
            if initial.is_empty() && !others.is_empty() {
                initial.push(others[rng.gen_range(0..others.len())]);
            }
            RoomPlan { room_id: RoomId(id), creator, open: r % 2 == 1, initial }
        })
        .collect()
}

/// The hostile clients: up to `config.hostile` of those that create no
/// room (a room's creator is its admin, whose report alone voids a commit),
/// the last first.
pub fn hostile_clients(config: &SimConfig, rooms: &[RoomPlan]) -> BTreeSet<usize> {
    let creators: BTreeSet<usize> = rooms.iter().map(|room| room.creator).collect();
    (0..config.clients.max(1)).rev().filter(|c| !creators.contains(c)).take(config.hostile).collect()
}

fn build(config: &SimConfig, plan: &FaultPlan) -> World<'static> {
    let sim = turmoil::Builder::new()
        .rng_seed(config.seed)
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(Duration::from_millis(TICK_MS))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(plan.latency_max_ms.max(1)))
        .build();
    let server = Rc::new(ServerShared {
        tamper_feed: config.bugs.equivocating_authority,
        ..ServerShared::new(config.seed, config.bugs.drop_frame_on_restart)
    });
    server.disk_latency_ms.set(plan.disk_latency_ms);
    let cast = Rc::new(Cast { rooms: plan_rooms(config), ..Cast::default() });
    let replicas: Vec<ReplicaDomain> = (0..config.replica_domains.min(REPLICA_DOMAINS_MAX))
        .map(|index| {
            let seed = u64::from_be_bytes(
                crate::derive_seed(config.seed, b"replica", index as u64)[..8].try_into().expect("8 bytes"),
            );
            let shared = ServerShared {
                ignore_erasures: config.bugs.replica_ignores_erasures,
                ..ServerShared::replica(seed, config.bugs.replica_drops_frame_on_restart)
            };
            shared.disk_latency_ms.set(plan.disk_latency_ms);
            ReplicaDomain {
                shared: Rc::new(shared),
                restart_at: None,
                recorded: BTreeSet::new(),
                durable: std::collections::BTreeMap::new(),
            }
        })
        .collect();
    let mut world = World {
        sim,
        server: Rc::clone(&server),
        replicas: Vec::new(),
        cast: Rc::clone(&cast),
        clients: Vec::new(),
        down: BTreeSet::new(),
        restart_server_at: None,
        failures: Vec::new(),
        stats: RunStats::default(),
    };
    world.sim.host("server", move || server::run::<MlsRoomGroup>(Rc::clone(&server)));
    for (index, replica) in replicas.iter().enumerate() {
        let shared = Rc::clone(&replica.shared);
        world.sim.host(Host::Replica(index).name(), move || server::run::<MlsRoomGroup>(Rc::clone(&shared)));
    }
    world.replicas = replicas;
    let hostile = hostile_clients(config, &cast.rooms);
    for index in 0..config.clients.max(1) {
        let seed = u64::from_be_bytes(
            crate::derive_seed(config.seed, b"client", index as u64)[..8].try_into().expect("8 bytes"),
        );
        let mut shared = ClientShared::new(index, seed, Rc::clone(&cast));
        if hostile.contains(&index) {
            shared.behaviour = client::Behaviour::Hostile;
        }
        let shared = Rc::new(shared);
        shared.work_rate.set(config.work_rate);
        shared.update_share.set(config.update_share);
        shared.membership_share.set(config.membership_share);
        let host = Rc::clone(&shared);
        world.sim.host(Host::Client(index).name(), move || client::run(Rc::clone(&host)));
        world.clients.push(shared);
    }
    *cast.senders.borrow_mut() = world.clients.iter().map(|c| c.sender_id()).collect();
    world
}

/// Runs one seed.
pub fn run(config: &SimConfig) -> Outcome {
    record_panics();
    PANICS.with(|panics| panics.borrow_mut().clear());
    kalandra_server::bugs::plant(crate::bugs::planted(&config.bugs));
    client_core::bugs::plant(crate::bugs::planted_in_client(&config.bugs));
    let plan = FaultPlan::draw(config);
    let mut world = build(config, &plan);

    // Setup, without faults: the rooms exist with their first members.
    let setup_deadline = config.setup_bound_ms;
    while !world.converged(true) {
        if world.now_ms() > setup_deadline || !world.step() {
            world.failures.push(format!(
                "setup did not complete within {setup_deadline} ms: {}",
                check::describe_progress(&world.server, &world.cast, &world.clients)
            ));
            break;
        }
    }
    if world.failures.is_empty() {
        fault_phase(&mut world, config, &plan);
        heal(&mut world, config);
    }
    if world.failures.is_empty() {
        probe(&mut world);
    }

    let mut failures = std::mem::take(&mut world.failures);
    failures.extend(PANICS.with(|panics| {
        panics.borrow().iter().take(3).map(|p| format!("a task panicked: {p}")).collect::<Vec<_>>()
    }));
    if let Some(error) = world.server.recovery_error.borrow().as_ref() {
        failures.push(format!("recovery failed: {error}"));
    }
    failures.extend(check::check(&world.server, &world.cast, &world.clients));
    for (index, replica) in world.replicas.iter().enumerate() {
        let host = Host::Replica(index).name();
        if let Some(error) = replica.shared.recovery_error.borrow().as_ref() {
            failures.push(format!("{host}: the replica's recovery failed: {error}"));
        }
        let (replica_failures, holds_erased) =
            check::check_replica(&world.server, &replica.shared, &world.cast);
        failures.extend(replica_failures.into_iter().map(|failure| format!("{host}: {failure}")));
        world.stats.replica_holds_erased += holds_erased;
    }
    let stats = collect_stats(&world);
    let mut transcript = world.cast.transcript.borrow().clone();
    for plan in &world.cast.rooms {
        for entry in world.server.disk.log(plan.room_id) {
            transcript.add(b"log", &entry.bytes);
        }
        for entry in world.replicas.iter().flat_map(|replica| replica.shared.disk.log(plan.room_id)) {
            transcript.add(b"replica", &entry.bytes);
        }
    }
    kalandra_server::bugs::plant(Default::default());
    client_core::bugs::plant(Default::default());
    Outcome {
        seed: config.seed,
        failures,
        transcript: transcript.digest(),
        transcript_entries: transcript.entries(),
        stats,
    }
}

/// The workload runs under the fault plan.
fn fault_phase(world: &mut World<'_>, config: &SimConfig, plan: &FaultPlan) {
    for (client, loss) in world.clients.iter().zip(plan.loss.iter().skip(1)) {
        client.loss.set(Loss { rate: *loss });
        client.workload.set(true);
    }
    world.server.loss.set(Loss { rate: plan.loss[0] });
    for (replica, loss) in world.replicas.iter().zip(&plan.replica_loss) {
        replica.shared.loss.set(Loss { rate: *loss });
    }
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
}

/// Every fault ends, the workload stops, and the world must converge.
fn heal(world: &mut World<'_>, config: &SimConfig) {
    for client in &world.clients {
        client.workload.set(false);
        client.loss.set(Loss::default());
    }
    world.server.loss.set(Loss::default());
    world.server.disk.set_faults(DiskFaults::default());
    for index in 0..world.clients.len() {
        world.sim.repair("server", Host::Client(index).name());
    }
    for (index, replica) in world.replicas.iter().enumerate() {
        replica.shared.loss.set(Loss::default());
        replica.shared.disk.set_faults(DiskFaults::default());
        world.sim.repair("server", Host::Replica(index).name());
    }
    let down: Vec<Host> = world.down.iter().copied().collect();
    for host in down {
        world.restart(host);
    }
    let healed = world.now_ms();
    let deadline = healed + config.heal_bound_ms;
    while world.failures.is_empty() {
        if world.converged(false) {
            world.stats.converged_after_heal_ms = Some(world.now_ms() - healed);
            return;
        }
        if world.now_ms() > deadline || !world.step() {
            break;
        }
    }
    if world.failures.is_empty() {
        world.failures.push(format!(
            "not converged within {} ms after healing: {}",
            config.heal_bound_ms,
            check::describe_progress(&world.server, &world.cast, &world.clients)
        ));
    }
}

/// After convergence, every honest client writes one message in each room
/// it is a member of; the world must converge again within
/// [`PROBE_BOUND_MS`] (the checker then wants each read by every other
/// honest member).
fn probe(world: &mut World<'_>) {
    for client in world.clients.iter().filter(|c| c.behaviour == client::Behaviour::Honest) {
        client.probe.set(true);
    }
    let deadline = world.now_ms() + PROBE_BOUND_MS;
    loop {
        let written = world.clients.iter().all(|client| !client.probe.get());
        if written
            && world.converged(false)
            && check::check_probes(&world.cast.ledger.borrow(), &world.clients).is_empty()
        {
            return;
        }
        if world.now_ms() > deadline || !world.step() {
            break;
        }
    }
    world.failures.push(format!(
        "messages written after convergence not delivered within {PROBE_BOUND_MS} ms: {}",
        check::describe_progress(&world.server, &world.cast, &world.clients)
    ));
}

fn collect_stats(world: &World<'_>) -> RunStats {
    let server = &world.server;
    let mut stats = world.stats.clone();
    let server_stats = *server.stats.borrow();
    stats.sequenced = server_stats.sequenced;
    stats.acknowledged = server_stats.acknowledged;
    stats.fanned_out = server_stats.fanned_out;
    stats.storage_failures = server_stats.storage_failures;
    stats.transactions = server_stats.transactions;
    stats.batches_in_flight_max = server_stats.batches_in_flight_max;
    stats.moderation_acts = server_stats.moderation_acts;
    stats.server_boots = server.boots.get();
    stats.on_redb = server.medium == crate::disk::Medium::Redb;
    let disk = server.disk.stats();
    stats.disk_faults = disk.io_errors + disk.failed_syncs;
    for plan in &world.cast.rooms {
        let log = server.disk.log(plan.room_id);
        stats.log_len += log.len() as u64;
        stats.redacted += log.iter().filter(|entry| entry.erased).count() as u64;
        for entry in &log {
            let Ok(frame) = kalandra_proto::Frame::decode(&entry.bytes) else { continue };
            match frame.opcode() {
                kalandra_proto::Opcode::Commit => {
                    stats.commits += 1;
                    let bad = frame.decode_payload::<kalandra_proto::payload::Commit>().is_ok_and(|commit| {
                        world
                            .cast
                            .ledger
                            .borrow()
                            .bad_commits
                            .contains(&crate::ledger::digest(&commit.commit))
                    });
                    stats.bad_commits += u64::from(bad);
                }
                kalandra_proto::Opcode::CommitVoided => stats.voids += 1,
                kalandra_proto::Opcode::ExternalJoin => {
                    stats.commits += 1;
                    stats.external_joins += 1;
                }
                kalandra_proto::Opcode::Proposal
                    if frame.header().sender_id() == kalandra_server::sim::SERVER_SENDER_ID =>
                {
                    stats.server_proposals += 1
                }
                _ => {}
            }
        }
    }
    let ledger = world.cast.ledger.borrow();
    for intent in ledger.intents.values() {
        let kind: String = intent.what.chars().take_while(|c| c.is_alphanumeric()).collect();
        *stats.intents.entry(kind).or_default() += 1;
    }
    stats.rejoins = ledger.intents.keys().filter(|label| label.contains("-rejoin")).count() as u64;
    for ((act, outcome), count) in &ledger.hostile {
        *stats.hostile.entry(format!("{act}: {outcome}")).or_default() += count;
    }
    drop(ledger);
    stats.epoch = server.rooms.borrow().values().map(|view| view.epoch).max().unwrap_or(0);
    for client in &world.clients {
        let record = client.record.borrow();
        stats.delivered += record.rooms.values().map(|t| t.delivered.len() as u64).sum::<u64>();
        stats.plaintexts += record.plaintexts;
        stats.opened_late += record.opened_late;
        stats.client_boots += record.boots;
        stats.sessions += record.sessions;
    }
    stats.sim_ms = u64::try_from(world.sim.elapsed().as_millis()).unwrap_or(u64::MAX);
    for replica in world.replicas.iter().map(|replica| &replica.shared) {
        let replica_stats = *replica.stats.borrow();
        stats.replica_boots += replica.boots.get();
        stats.domain_links += replica_stats.links;
        stats.follows += replica_stats.follows;
        stats.replica_refusals += replica_stats.replica_refusals;
        stats.replica_erased += replica_stats.replica_erased;
        for (label, count) in replica.head_checks.borrow().iter() {
            *stats.head_checks.entry((*label).to_owned()).or_default() += count;
        }
        stats.replica_log_len +=
            world.cast.rooms.iter().map(|plan| replica.disk.log(plan.room_id).len() as u64).sum::<u64>();
    }
    stats
}
