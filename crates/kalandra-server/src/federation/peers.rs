//! The peer domains' accepted federation keys, shared by the links, the
//! relay and the remote directory, and replaceable while the server runs:
//! when a peer rotates its key, the operator lists the new key in the
//! configuration and reloads it (SIGHUP), with no restart.

use std::sync::{Arc, PoisonError, RwLock};

use kalandra_proto::federation::{DomainName, PeerKeys};
use kalandra_proto::payload::{DomainKey, DomainKeys, DomainKeysOf, DomainKeysRequest};

use crate::federation::handshake::{PeerTable, RefusedDomains};

/// The accepted keys of each configured peer, as last loaded.
#[derive(Debug)]
pub struct SharedPeers {
    table: RwLock<Arc<PeerTable>>,
}

/// What a reload of the peers' keys changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerKeysReload {
    /// Peers whose accepted keys changed (now in force).
    pub changed: Vec<DomainName>,
    /// Peers added, removed, or refused or accepted again by the new
    /// configuration: not applied, they take a restart.
    pub not_applied: Vec<DomainName>,
}

impl SharedPeers {
    /// The peers of `table`.
    pub fn new(table: PeerTable) -> Arc<SharedPeers> {
        Arc::new(SharedPeers { table: RwLock::new(Arc::new(table)) })
    }

    /// The peers and their keys now.
    pub fn current(&self) -> Arc<PeerTable> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes the keys `configured` lists for the peers already known; a
    /// peer the configuration adds or leaves out is reported, not applied.
    pub fn replace_keys(&self, configured: &PeerTable) -> PeerKeysReload {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = PeerTable::clone(&table);
        let mut reload = PeerKeysReload::default();
        for (domain, keys) in next.iter_mut() {
            match configured.get(domain) {
                Some(new_keys) if new_keys != keys => {
                    *keys = new_keys.clone();
                    reload.changed.push(domain.clone());
                }
                Some(_) => {}
                None => reload.not_applied.push(domain.clone()),
            }
        }
        reload.not_applied.extend(configured.keys().filter(|domain| !next.contains_key(*domain)).cloned());
        *table = Arc::new(next);
        reload
    }
}

/// The answer to a client's `DomainKeysRequest`: for each domain asked,
/// the keys this server accepts for it (`own` for its own domain: its
/// current key and earlier ones configured; a peer's configured keys; none
/// for a domain it does not know or refuses), each with its end.
pub fn domain_keys(
    own: &PeerKeys,
    peers: &PeerTable,
    refused: &RefusedDomains,
    request: &DomainKeysRequest,
) -> DomainKeys {
    let listed = |keys: &PeerKeys| -> Vec<DomainKey> {
        let keys = keys.keys().iter();
        keys.map(|key| DomainKey { key: key.key.to_bytes(), valid_until_ms: key.valid_until_ms }).collect()
    };
    let keys_of = |domain: &DomainName| -> Vec<DomainKey> {
        if domain == own.domain() {
            return listed(own);
        }
        if refused.contains(domain) {
            return Vec::new();
        }
        peers.get(domain).map(listed).unwrap_or_default()
    };
    let domains = request
        .domains
        .iter()
        .map(|domain| DomainKeysOf { domain: domain.clone(), keys: keys_of(domain) })
        .collect();
    DomainKeys { domains }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use kalandra_proto::federation::{PeerKey, PeerKeys};

    use super::*;

    fn keys(name: &str, seeds: &[u8]) -> (DomainName, PeerKeys) {
        let domain = DomainName::parse(name).unwrap();
        let keys = seeds
            .iter()
            .map(|seed| PeerKey {
                key: SigningKey::from_bytes(&[*seed; 32]).verifying_key(),
                valid_until_ms: None,
            })
            .collect();
        (domain.clone(), PeerKeys::new(domain, keys).unwrap())
    }

    #[test]
    fn domain_keys_answer_own_and_peer_keys_and_none_for_unknown_or_refused_domains() {
        let own_key = SigningKey::from_bytes(&[9; 32]).verifying_key();
        let own = DomainName::parse("a.test").unwrap();
        let retired =
            PeerKey { key: SigningKey::from_bytes(&[8; 32]).verifying_key(), valid_until_ms: Some(7) };
        let own_keys =
            PeerKeys::new(own.clone(), vec![PeerKey { key: own_key, valid_until_ms: None }, retired])
                .unwrap();
        let (b, mut b_keys) = keys("b.test", &[1, 2]);
        let mut listed = b_keys.keys().to_vec();
        listed[0].valid_until_ms = Some(5_000);
        b_keys = PeerKeys::new(b.clone(), listed).unwrap();
        let (c, c_keys) = keys("c.test", &[3]);
        let peers = PeerTable::from([(b.clone(), b_keys), (c.clone(), c_keys)]);
        let refused = RefusedDomains::from([c.clone()]);
        let x = DomainName::parse("x.test").unwrap();
        let request = DomainKeysRequest { domains: vec![x.clone(), own.clone(), b.clone(), c.clone()] };
        let answer = domain_keys(&own_keys, &peers, &refused, &request);
        let domains: Vec<_> = answer.domains.iter().map(|entry| entry.domain.clone()).collect();
        assert_eq!(domains, vec![x, own, b, c], "in request order");
        let counts: Vec<_> = answer.domains.iter().map(|entry| entry.keys.len()).collect();
        assert_eq!(counts, vec![0, 2, 2, 0], "unknown and refused: none");
        assert_eq!(answer.domains[1].keys[0].key, own_key.to_bytes());
        assert_eq!(answer.domains[1].keys[1].valid_until_ms, Some(7), "an earlier key, with its end");
        assert_eq!(answer.domains[2].keys[0].valid_until_ms, Some(5_000), "with the end of its acceptance");
    }

    #[test]
    fn a_reload_takes_new_keys_of_known_peers_and_reports_the_rest() {
        let peers = SharedPeers::new(PeerTable::from([keys("b.test", &[1]), keys("c.test", &[3])]));
        let before = peers.current();
        let configured = PeerTable::from([keys("b.test", &[1, 2]), keys("d.test", &[4])]);
        let reload = peers.replace_keys(&configured);
        let domain = |name: &str| DomainName::parse(name).unwrap();
        assert_eq!(reload.changed, vec![domain("b.test")]);
        assert_eq!(reload.not_applied, vec![domain("c.test"), domain("d.test")]);
        let now = peers.current();
        assert_eq!(now.get(&domain("b.test")), configured.get(&domain("b.test")), "b's new key in force");
        assert!(now.contains_key(&domain("c.test")) && !now.contains_key(&domain("d.test")));
        assert_eq!(
            before.get(&domain("b.test")).map(|keys| keys.accepted(0).count()),
            Some(1),
            "a snapshot stays"
        );
        assert_eq!(peers.replace_keys(&configured).changed, Vec::<DomainName>::new(), "nothing new");
    }
}
