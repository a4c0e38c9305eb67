//! Liveness as a bounded check: from a state, heal the world and let it
//! quiesce under one fair schedule, then require that the handover is
//! decided and the room takes frames again.
//!
//! Healing: every crashed actor restarts from what it persisted; every
//! message in flight is lost (the worst a partition can have done); from
//! then on the network is reliable (first in, first out) and, round after
//! round, every actor's retry tick fires and the new authority's driver
//! consents to an offer it was told is ready. Operators start no new
//! handover and abort nothing. A probe frame from the client is resent every
//! round until it is acknowledged.
//!
//! Stateright's `eventually` properties are of no use here: they are
//! judged only on paths that end, and this model has no end (retry timers
//! always fire, and a duplicating network never empties); a cycle that
//! never makes progress would pass unnoticed.

use std::borrow::Cow;
use std::collections::VecDeque;

use stateright::actor::{Actor, Command, Id, Out};

use super::{HandoverModel, ModelState, Msg, Node, NodeState, NodeStorage, Timer, CLIENT, DOMAINS, PROBE};
use crate::room::Role;

/// Rounds (ticks, then deliveries until the network is empty) before giving up.
const HEAL_ROUNDS_MAX: usize = 64;
/// Deliveries in one round before giving up (a message storm is a failure).
const HEAL_DELIVERIES_MAX: usize = 4_096;

struct World<'a> {
    nodes: &'a [Node],
    states: Vec<NodeState>,
    storages: Vec<Option<NodeStorage>>,
    queue: VecDeque<(usize, usize, Msg)>,
    probe_acknowledged: bool,
}

/// Heals the world from `state`; `Err` says what did not come right.
pub(crate) fn heal(model: &HandoverModel, state: &ModelState) -> Result<(), String> {
    let mut world = World {
        nodes: &model.actors,
        states: state.actor_states.iter().map(|node| (**node).clone()).collect(),
        storages: state.actor_storages.clone(),
        queue: VecDeque::new(),
        probe_acknowledged: false,
    };
    for actor in (0..world.nodes.len()).filter(|&actor| state.crashed[actor]) {
        let mut out = Out::new();
        world.states[actor] = world.nodes[actor].on_start(Id::from(actor), &world.storages[actor], &mut out);
        world.apply(actor, out);
    }
    world.queue.clear(); // Everything in flight is lost, the restarts' messages too.
    let mut quiet_rounds = 0;
    for _ in 0..HEAL_ROUNDS_MAX {
        let before = world.states.clone();
        if !world.probe_acknowledged {
            world.queue.push_back((CLIENT, world.nodes[CLIENT].config.client_home, Msg::Submit(PROBE)));
        }
        world.tick();
        world.deliver_all()?;
        quiet_rounds = if world.states == before { quiet_rounds + 1 } else { 0 };
        if quiet_rounds >= 2 {
            return world.check();
        }
    }
    Err(format!("still changing after {HEAL_ROUNDS_MAX} rounds"))
}

impl World<'_> {
    fn apply(&mut self, actor: usize, out: Out<Node>) {
        for command in out {
            match command {
                Command::Send(dst, msg) => {
                    let dst = usize::from(dst);
                    if dst == CLIENT && matches!(msg, Msg::Ack { frame, .. } if frame == PROBE) {
                        self.probe_acknowledged = true;
                    }
                    self.queue.push_back((actor, dst, msg));
                }
                Command::Save(storage) => self.storages[actor] = Some(storage),
                Command::SetTimer(..) | Command::CancelTimer(_) | Command::ChooseRandom(..) => {}
            }
        }
    }

    fn tick(&mut self) {
        for actor in 0..self.nodes.len() {
            for timer in [Timer::Retry, Timer::Consent] {
                let mut state = Cow::Borrowed(&self.states[actor]);
                let mut out = Out::new();
                self.nodes[actor].on_timeout(Id::from(actor), &mut state, &timer, &mut out);
                if let Cow::Owned(next) = state {
                    self.states[actor] = next;
                }
                self.apply(actor, out);
            }
        }
    }

    fn deliver_all(&mut self) -> Result<(), String> {
        for _ in 0..HEAL_DELIVERIES_MAX {
            let Some((src, dst, msg)) = self.queue.pop_front() else {
                return Ok(());
            };
            let mut state = Cow::Borrowed(&self.states[dst]);
            let mut out = Out::new();
            self.nodes[dst].on_msg(Id::from(dst), &mut state, Id::from(src), msg, &mut out);
            if let Cow::Owned(next) = state {
                self.states[dst] = next;
            }
            self.apply(dst, out);
        }
        Err(format!("more than {HEAL_DELIVERIES_MAX} deliveries in one round"))
    }

    /// Quiet: the handover is decided everywhere, every domain knows the
    /// same newest record, its authority sequences, logs are equal, the
    /// client's frames are settled and the probe was acknowledged.
    fn check(&self) -> Result<(), String> {
        if !self.probe_acknowledged {
            return Err("the probe frame was never acknowledged".into());
        }
        let domains: Vec<_> = self.states[..DOMAINS]
            .iter()
            .map(|state| match state {
                NodeState::Domain(domain) => domain,
                NodeState::Client(_) => unreachable!("actors 0..DOMAINS are domains"),
            })
            .collect();
        if let Some(NodeState::Client(client)) = self.states.get(CLIENT) {
            if client.settled < self.nodes[CLIENT].config.client_frames {
                return Err(format!("the client settled only {} frames", client.settled));
            }
        }
        let first = &domains[0];
        for domain in &domains {
            let record = domain.room.record();
            if record.sealed.is_some() || record.accepted.is_some() || domain.consent.is_some() {
                return Err(format!("{:?} still has an undecided handover", domain.room.me()));
            }
            if domain.room.top() != first.room.top() || domain.view().log != first.view().log {
                return Err(format!(
                    "{:?} disagrees with A on the newest record or the log",
                    domain.room.me()
                ));
            }
        }
        let authority = domains.iter().find(|domain| domain.room.me() == first.room.top().authority());
        match authority.map(|domain| domain.room.role()) {
            Some(Role::Authority { .. }) => Ok(()),
            role => Err(format!("the newest record's authority is {role:?}")),
        }
    }
}
