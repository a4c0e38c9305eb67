//! The key-package directory across domains.
//!
//! The home side ([`HomeDirectory`]) answers a peer's claim with its usual
//! claim-once take and a home certificate for each claimed package's
//! identity key, signed with this domain's federation key. The claiming
//! side checks the answer ([`check_claimed`], pure): one entry per sender
//! id asked, in order; each package with a certificate of the peer's own
//! domain that verifies under the peer's configured keys, for the sender
//! id asked; and the package's credential identity being the certified
//! key. A domain thus cannot present another domain's users.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{DomainName, HomeCertificate, HomeCertificateError, PeerKeys};
use kalandra_proto::home::{check_leaf_certificate, LeafCertificateError};
use kalandra_proto::limits::KEY_PACKAGES_PER_CLAIM_MAX;
use kalandra_proto::payload::{ClaimedKeyPackage, KeyPackageClaimed};
use kalandra_proto::{ErrorCode, RoomId, SenderId};

use crate::admin::metrics::Metrics;
use crate::config::FEDERATION_PEERS_MAX;
use crate::federation::handshake::{PeerTable, RefusedDomains};
use crate::federation::peers::SharedPeers;
use crate::federation::registry::LinkRegistry;
use crate::federation::requests::{
    refusal, LinkRequest, LinkRequestError, LinkResponse, RefusalCode, RemoteKeyPackage,
};
use crate::federation::welcomes::{record_remote_users, WelcomeInbox};
use crate::node::Clock;
use crate::store::Store;
use crate::transport::directory::{key_package_identity_and_home, key_package_ref_and_identity};
use crate::transport::rate_limit::{KeyedLimiter, RetryAfterMs};

/// How long a home certificate issued with a claimed key package is valid.
pub const HOME_CERTIFICATE_VALIDITY_MS: u64 = 24 * 60 * 60 * 1000;

const _: () = assert!(
    HOME_CERTIFICATE_VALIDITY_MS > 60 * 1000,
    "a certificate outlives the claim and the commit that uses it"
);

/// Key packages one peer domain may claim here per second, sustained: each
/// claim takes packages for good and costs a durable write, so a peer
/// cannot drain this domain's directory or load its storage.
pub const PEER_CLAIMED_PACKAGES_PER_SECOND: u32 = 100;
/// Key packages one peer domain may claim here at once (the bucket's size).
pub const PEER_CLAIMED_PACKAGES_BURST: u32 = 1_000;

const _: () = assert!(
    PEER_CLAIMED_PACKAGES_BURST >= KEY_PACKAGES_PER_CLAIM_MAX,
    "the largest claim fits a full bucket"
);
const _: () = assert!(PEER_CLAIMED_PACKAGES_PER_SECOND <= PEER_CLAIMED_PACKAGES_BURST);

/// Why a peer's answer to a claim was refused: each is the peer's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimAnswerError {
    /// Not one entry per sender id asked, in order.
    #[error("the answer does not list the sender ids asked, in order")]
    WrongAnswer,
    /// A key package without a home certificate.
    #[error("key package of {sender_id} without a home certificate")]
    MissingCertificate {
        /// The entry's sender id.
        sender_id: u64,
    },
    /// A certificate of another domain than the answering peer's: a domain
    /// presenting another domain's user.
    #[error("{peer} presents a user homed at {home}")]
    ForeignUser {
        /// The answering peer.
        peer: DomainName,
        /// The certificate's domain.
        home: DomainName,
    },
    /// The certificate does not verify (forged, expired, bad key).
    #[error("home certificate: {0}")]
    HomeCertificate(HomeCertificateError),
    /// The certificate is for another user than the sender id asked.
    #[error("certificate of {certified} for the entry of {requested}")]
    CertificateSenderMismatch {
        /// The sender id asked.
        requested: SenderId,
        /// The certified key's.
        certified: SenderId,
    },
    /// The key package does not verify, or its credential identity is not
    /// the certified key.
    #[error("key package of {sender_id} is not the certified user's: {detail}")]
    IdentityMismatch {
        /// The entry's sender id.
        sender_id: u64,
        /// What is wrong.
        detail: String,
    },
}

impl ClaimAnswerError {
    /// A stable snake_case name, one of [`FEDERATION_REFUSAL_CODES`](super::codes::FEDERATION_REFUSAL_CODES).
    pub fn code(&self) -> &'static str {
        match self {
            ClaimAnswerError::WrongAnswer => "wrong_answer",
            ClaimAnswerError::MissingCertificate { .. } => "missing_certificate",
            ClaimAnswerError::ForeignUser { .. } => "foreign_user",
            ClaimAnswerError::HomeCertificate(_) => "bad_home_certificate",
            ClaimAnswerError::CertificateSenderMismatch { .. } => "certificate_sender_mismatch",
            ClaimAnswerError::IdentityMismatch { .. } => "identity_mismatch",
        }
    }
}

/// Checks `peer`'s answer to a claim of `requested` at `now_ms`; returns
/// the answer for the client (key packages only, in request order).
pub fn check_claimed(
    peer: &PeerKeys,
    requested: &[u64],
    answer: Vec<RemoteKeyPackage>,
    now_ms: u64,
) -> Result<KeyPackageClaimed, ClaimAnswerError> {
    if answer.len() != requested.len()
        || answer.iter().zip(requested).any(|(entry, asked)| entry.sender_id != *asked)
    {
        return Err(ClaimAnswerError::WrongAnswer);
    }
    let mut key_packages = Vec::with_capacity(answer.len());
    for entry in answer {
        if let Some(key_package) = &entry.key_package {
            check_entry(peer, entry.sender_id, key_package, entry.home_certificate.as_ref(), now_ms)?;
        }
        key_packages.push(ClaimedKeyPackage { sender_id: entry.sender_id, key_package: entry.key_package });
    }
    Ok(KeyPackageClaimed { key_packages })
}

fn check_entry(
    peer: &PeerKeys,
    sender_id: u64,
    key_package: &[u8],
    certificate: Option<&HomeCertificate>,
    now_ms: u64,
) -> Result<(), ClaimAnswerError> {
    let certificate = certificate.ok_or(ClaimAnswerError::MissingCertificate { sender_id })?;
    if certificate.domain != *peer.domain() {
        return Err(ClaimAnswerError::ForeignUser {
            peer: peer.domain().clone(),
            home: certificate.domain.clone(),
        });
    }
    let certified = certificate.verify(peer, now_ms).map_err(ClaimAnswerError::HomeCertificate)?;
    if certified != SenderId(sender_id) {
        return Err(ClaimAnswerError::CertificateSenderMismatch {
            requested: SenderId(sender_id),
            certified,
        });
    }
    let (identity, leaf_home) = key_package_identity_and_home(key_package)
        .map_err(|error| ClaimAnswerError::IdentityMismatch { sender_id, detail: error.to_string() })?;
    if identity != certificate.identity_key {
        return Err(ClaimAnswerError::IdentityMismatch {
            sender_id,
            detail: "credential identity is not the certified key".to_owned(),
        });
    }
    check_leaf_home(peer, sender_id, &identity, leaf_home, now_ms)
}

/// The home certificate a claimed package's leaf carries, if any, must be
/// the answering peer's own, for the package's key, and valid: members
/// check it (`home::check_member_home`), and a peer must not hand out a
/// leaf that names another domain.
fn check_leaf_home(
    peer: &PeerKeys,
    sender_id: u64,
    identity: &[u8; 32],
    leaf_home: kalandra_mls::LeafHomeCertificate,
    now_ms: u64,
) -> Result<(), ClaimAnswerError> {
    check_leaf_certificate(leaf_home, identity, peer, now_ms).map_err(|error| match error {
        LeafCertificateError::Certificate(HomeCertificateError::WrongDomain { claimed, .. }) => {
            ClaimAnswerError::ForeignUser { peer: peer.domain().clone(), home: claimed }
        }
        LeafCertificateError::Certificate(error) => ClaimAnswerError::HomeCertificate(error),
        error @ (LeafCertificateError::Unreadable(_) | LeafCertificateError::OtherKey) => {
            ClaimAnswerError::IdentityMismatch { sender_id, detail: error.to_string() }
        }
    })
}

/// The peer to claim `domain`'s users through: refused if the operator
/// refuses the domain (whether or not it has keys), unknown if it is not
/// a peer.
pub fn claim_peer<'a>(
    domain: &DomainName,
    peers: &'a PeerTable,
    refused: &RefusedDomains,
) -> Result<&'a PeerKeys, RemoteClaimError> {
    if refused.contains(domain) {
        return Err(RemoteClaimError::RefusedDomain { domain: domain.clone() });
    }
    peers.get(domain).ok_or_else(|| RemoteClaimError::UnknownDomain { domain: domain.clone() })
}

/// Why a client's claim of another domain's users failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteClaimError {
    /// The domain is not a configured peer (caller misuse).
    #[error("{domain} is not a peer domain")]
    UnknownDomain {
        /// The domain named.
        domain: DomainName,
    },
    /// The operator refuses the domain (final, not retryable).
    #[error("{domain} is refused by this server's operator")]
    RefusedDomain {
        /// The domain named.
        domain: DomainName,
    },
    /// The peer cannot be reached now (retryable).
    #[error(transparent)]
    Unreachable(#[from] LinkRequestError),
    /// The peer refused the claim.
    #[error("{domain} refused: {}: {message}", code.as_str())]
    Refused {
        /// The peer.
        domain: DomainName,
        /// Its code.
        code: RefusalCode,
        /// Its message.
        message: String,
    },
    /// The peer's answer does not verify (peer misbehaviour).
    #[error("{domain}'s answer refused: {error}")]
    BadAnswer {
        /// The peer.
        domain: DomainName,
        /// What is wrong.
        error: ClaimAnswerError,
    },
    /// A task failed (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl RemoteClaimError {
    /// The wire error code for the client.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            RemoteClaimError::UnknownDomain { .. } => ErrorCode::UnknownDomain,
            RemoteClaimError::RefusedDomain { .. } => ErrorCode::FederationRefused,
            RemoteClaimError::Unreachable(LinkRequestError::TooLarge { .. }) => ErrorCode::Internal,
            RemoteClaimError::Unreachable(_) => ErrorCode::DomainUnreachable,
            RemoteClaimError::Refused { code: RefusalCode::BadRequest, .. } => ErrorCode::FederationRefused,
            RemoteClaimError::Refused { .. } => ErrorCode::DomainUnreachable,
            RemoteClaimError::BadAnswer { .. } => ErrorCode::FederationRefused,
            RemoteClaimError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The home side: answers peers' requests (blocking: storage): claims of
/// this server's users' key packages, and Welcomes for them.
pub struct HomeDirectory {
    /// This server's store.
    pub store: Arc<dyn Store>,
    /// This server's domain.
    pub domain: DomainName,
    /// Its federation key, which signs home certificates.
    pub key: SigningKey,
    /// ms since the Unix epoch.
    pub clock: Clock,
    /// Stores peers' Welcomes for this server's users.
    pub welcomes: WelcomeInbox,
    /// Key packages each peer may still claim ([`HomeDirectory::claim_rate`]).
    pub claim_rate: Mutex<KeyedLimiter<DomainName>>,
    /// Counts claims refused for their rate.
    pub metrics: Metrics,
}

impl HomeDirectory {
    /// The answer to `peer`'s `request`.
    pub fn answer(&self, peer: &DomainName, request: LinkRequest) -> LinkResponse {
        match request {
            LinkRequest::ClaimKeyPackages { sender_ids } => {
                tracing::debug!(%peer, count = sender_ids.len(), "key-package claim from a peer");
                match self.within_claim_rate(peer, sender_ids.len()) {
                    Ok(()) => self.claim(&sender_ids),
                    Err(refused) => refused,
                }
            }
            LinkRequest::DeliverWelcome { room_id, recipients, welcome } => {
                self.welcomes.accept(peer, RoomId(room_id), recipients, welcome)
            }
        }
    }

    /// The limiter of peers' claims: [`PEER_CLAIMED_PACKAGES_PER_SECOND`]
    /// per peer, in bursts of up to [`PEER_CLAIMED_PACKAGES_BURST`].
    pub fn claim_rate() -> Mutex<KeyedLimiter<DomainName>> {
        let (rate, burst) =
            (f64::from(PEER_CLAIMED_PACKAGES_PER_SECOND), f64::from(PEER_CLAIMED_PACKAGES_BURST));
        Mutex::new(KeyedLimiter::new(rate, burst, FEDERATION_PEERS_MAX))
    }

    /// Takes `count` packages from `peer`'s allowance, or the refusal
    /// (`too_many_requests`, retryable: its message says when).
    fn within_claim_rate(&self, peer: &DomainName, count: usize) -> Result<(), LinkResponse> {
        let now_ms = (self.clock)();
        let mut limiter = self.claim_rate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The count is checked against KEY_PACKAGES_PER_CLAIM_MAX by the claim itself.
        let tokens = f64::from(u32::try_from(count).unwrap_or(u32::MAX).min(KEY_PACKAGES_PER_CLAIM_MAX));
        limiter.try_take(peer.clone(), now_ms, tokens).map_err(|RetryAfterMs(retry_after_ms)| {
            self.metrics.federation_refused("claim_rate");
            tracing::info!(%peer, count, retry_after_ms, "a peer's key-package claim refused for its rate");
            let message = format!("claim rate exceeded; retry in {retry_after_ms} ms");
            refusal(RefusalCode::TooManyRequests, &message)
        })
    }

    /// Claims one package of each of `sender_ids` exactly as a local claim
    /// does, each with a fresh home certificate.
    fn claim(&self, sender_ids: &[u64]) -> LinkResponse {
        if sender_ids.is_empty() || sender_ids.len() > KEY_PACKAGES_PER_CLAIM_MAX as usize {
            let message =
                format!("{} sender ids, expected 1 to {KEY_PACKAGES_PER_CLAIM_MAX}", sender_ids.len());
            return refusal(RefusalCode::BadRequest, &message);
        }
        let not_after_ms = (self.clock)().saturating_add(HOME_CERTIFICATE_VALIDITY_MS);
        let mut key_packages = Vec::with_capacity(sender_ids.len());
        let mut handed_out = Vec::with_capacity(sender_ids.len());
        for &sender_id in sender_ids {
            let claimed = match self.store.claim_key_package(sender_id) {
                Ok(claimed) => claimed,
                Err(error) => return refusal(RefusalCode::Unavailable, &error.to_string()),
            };
            let Some(claimed) = claimed else {
                key_packages.push(RemoteKeyPackage { sender_id, key_package: None, home_certificate: None });
                continue;
            };
            // Stored packages were verified on upload, as their uploader's.
            let (key_package_ref, identity) = match key_package_ref_and_identity(&claimed.key_package) {
                Ok(inspected) => inspected,
                Err(error) => return refusal(RefusalCode::Unavailable, &error.to_string()),
            };
            handed_out.push((sender_id, key_package_ref));
            let certificate = HomeCertificate::issue(&self.key, self.domain.clone(), identity, not_after_ms);
            key_packages.push(RemoteKeyPackage {
                sender_id,
                key_package: Some(claimed.key_package.to_vec()),
                home_certificate: Some(certificate),
            });
        }
        // A peer's Welcome for a user must name a package handed out here
        // (`WelcomeInbox`); packages whose record failed are lost, as ones
        // whose answer is lost on the way.
        if let Err(error) = self.store.record_handed_out_claims(&handed_out, (self.clock)()) {
            return refusal(RefusalCode::Unavailable, &error.to_string());
        }
        LinkResponse::Claimed { key_packages }
    }
}

/// Claims key packages of other domains' users for this server's clients.
pub struct RemoteDirectory {
    /// This server's domain.
    pub domain: DomainName,
    /// The peers and the keys accepted for them.
    pub peers: Arc<SharedPeers>,
    /// The domains the operator refuses: never claimed through.
    pub refused: RefusedDomains,
    /// The links that are up.
    pub registry: Arc<LinkRegistry>,
    /// ms since the Unix epoch (certificate validity).
    pub clock: Clock,
    /// Counts refused answers.
    pub metrics: Metrics,
    /// Records the users claimed as the peer's (their Welcomes go there).
    pub store: Arc<dyn Store>,
}

impl RemoteDirectory {
    /// Claims one key package of each of `sender_ids`, users of `domain`,
    /// through that domain; the answer is checked before it is returned,
    /// and the users with a package are recorded as `domain`'s.
    pub async fn claim(
        &self,
        domain: &DomainName,
        sender_ids: &[u64],
    ) -> Result<KeyPackageClaimed, RemoteClaimError> {
        let peer = match claim_peer(domain, &self.peers.current(), &self.refused) {
            Ok(peer) => peer.clone(),
            Err(error) => {
                let code = match error {
                    RemoteClaimError::RefusedDomain { .. } => "refused_domain",
                    _ => "unknown_domain",
                };
                self.metrics.federation_refused(code);
                return Err(error);
            }
        };
        let request = LinkRequest::ClaimKeyPackages { sender_ids: sender_ids.to_vec() };
        let key_packages = match self.registry.request(domain, request).await? {
            LinkResponse::Claimed { key_packages } => key_packages,
            LinkResponse::Refused { code, message } => {
                return Err(RemoteClaimError::Refused { domain: domain.clone(), code, message });
            }
            LinkResponse::WelcomeStored {} => {
                self.metrics.federation_refused(ClaimAnswerError::WrongAnswer.code());
                let error = ClaimAnswerError::WrongAnswer;
                return Err(RemoteClaimError::BadAnswer { domain: domain.clone(), error });
            }
        };
        let (requested, now_ms) = (sender_ids.to_vec(), (self.clock)());
        let checked =
            tokio::task::spawn_blocking(move || check_claimed(&peer, &requested, key_packages, now_ms))
                .await
                .map_err(|error| RemoteClaimError::Internal(error.to_string()))?;
        let claimed = checked.map_err(|error| {
            tracing::warn!(peer = %domain, %error, "a peer's key-package answer refused");
            self.metrics.federation_refused(error.code());
            RemoteClaimError::BadAnswer { domain: domain.clone(), error }
        })?;
        let certified = claimed.key_packages.iter().filter(|entry| entry.key_package.is_some());
        record_remote_users(&self.store, domain, certified.map(|entry| entry.sender_id).collect()).await;
        Ok(claimed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use client_core::mls::{generate_key_packages, Identity, MlsProvider};
    use kalandra_proto::federation::PeerKey;

    use super::*;
    use crate::federation::codes::FEDERATION_REFUSAL_CODES;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn federation_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn peer_keys(name: &str, seed: u8) -> PeerKeys {
        let key = PeerKey { key: federation_key(seed).verifying_key(), valid_until_ms: None };
        PeerKeys::new(domain(name), vec![key]).unwrap()
    }

    /// A user's key package and identity key.
    fn user(seed: u8) -> (Vec<u8>, [u8; 32]) {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let package = generate_key_packages(&provider, &identity, 1, now_secs).unwrap().remove(0).message;
        let key = *identity.public_key();
        (package, key)
    }

    fn entry(package: &[u8], certificate: HomeCertificate) -> RemoteKeyPackage {
        RemoteKeyPackage {
            sender_id: SenderId::from_identity_key(&certificate.identity_key).0,
            key_package: Some(package.to_vec()),
            home_certificate: Some(certificate),
        }
    }

    fn certify(seed: u8, name: &str, key: [u8; 32], not_after_ms: u64) -> HomeCertificate {
        HomeCertificate::issue(&federation_key(seed), domain(name), key, not_after_ms)
    }

    fn home_directory(clock: Arc<std::sync::atomic::AtomicU64>, metrics: &Metrics) -> HomeDirectory {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::new());
        let now = move || clock.load(std::sync::atomic::Ordering::Relaxed);
        let clock: Clock = Arc::new(now);
        HomeDirectory {
            store: Arc::clone(&store),
            domain: domain("a.test"),
            key: federation_key(1),
            clock: Arc::clone(&clock),
            welcomes: WelcomeInbox {
                store,
                rooms: Arc::new(crate::federation::rooms::RemoteRooms::default()),
                metrics: metrics.clone(),
                arrived: Arc::new(|_| {}),
                clock,
            },
            claim_rate: HomeDirectory::claim_rate(),
            metrics: metrics.clone(),
        }
    }

    fn claim_of(home: &HomeDirectory, peer: &str) -> Result<usize, RefusalCode> {
        let request = LinkRequest::ClaimKeyPackages { sender_ids: (1..=64).collect() };
        match home.answer(&domain(peer), request) {
            LinkResponse::Claimed { key_packages } => Ok(key_packages.len()),
            LinkResponse::Refused { code, .. } => Err(code),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peers_claims_beyond_its_rate_are_refused_retryably_and_counted() {
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(NOW_MS));
        let metrics = Metrics::new().unwrap();
        let home = home_directory(Arc::clone(&clock), &metrics);
        let burst_claims = PEER_CLAIMED_PACKAGES_BURST / KEY_PACKAGES_PER_CLAIM_MAX;
        for _ in 0..burst_claims {
            assert_eq!(claim_of(&home, "b.test"), Ok(64));
        }
        assert_eq!(claim_of(&home, "b.test"), Err(RefusalCode::TooManyRequests), "b's burst is spent");
        assert_eq!(claim_of(&home, "c.test"), Ok(64), "another peer has its own allowance");
        let page = metrics.render().unwrap();
        assert!(page.contains("kalandra_federation_refusals_total{code=\"claim_rate\"} 1\n"), "{page}");
        // The allowance comes back at the sustained rate.
        let refill_ms =
            1_000 * u64::from(KEY_PACKAGES_PER_CLAIM_MAX) / u64::from(PEER_CLAIMED_PACKAGES_PER_SECOND);
        clock.fetch_add(refill_ms, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(claim_of(&home, "b.test"), Ok(64));
        assert_eq!(claim_of(&home, "b.test"), Err(RefusalCode::TooManyRequests));
    }

    #[test]
    fn federation_claim_towards_a_refused_domain_is_refused_finally() {
        let peers = PeerTable::from([(domain("b.test"), peer_keys("b.test", 2))]);
        let refused = RefusedDomains::from([domain("b.test"), domain("r.test")]);
        for name in ["b.test", "r.test"] {
            let error = claim_peer(&domain(name), &peers, &refused).unwrap_err();
            assert_eq!(error, RemoteClaimError::RefusedDomain { domain: domain(name) });
            assert_eq!(error.error_code(), ErrorCode::FederationRefused, "final, not DomainUnreachable");
        }
        assert!(FEDERATION_REFUSAL_CODES.contains(&"refused_domain"));
        let none = RefusedDomains::new();
        assert!(claim_peer(&domain("b.test"), &peers, &none).is_ok());
        let unknown = claim_peer(&domain("c.test"), &peers, &none).unwrap_err();
        assert_eq!(unknown.error_code(), ErrorCode::UnknownDomain);
    }

    #[test]
    fn federation_claim_answer_with_the_home_certificate_is_accepted() {
        let (package, key) = user(1);
        let good = entry(&package, certify(2, "b.test", key, NOW_MS + 1));
        let asked = [good.sender_id];
        let claimed = check_claimed(&peer_keys("b.test", 2), &asked, vec![good], NOW_MS).unwrap();
        assert_eq!(claimed.key_packages[0].key_package.as_deref(), Some(package.as_slice()));
        let none = RemoteKeyPackage { sender_id: 9, key_package: None, home_certificate: None };
        let claimed = check_claimed(&peer_keys("b.test", 2), &[9], vec![none], NOW_MS).unwrap();
        assert_eq!(claimed.key_packages[0].key_package, None, "a user without packages, as locally");
    }

    /// A package of a new user whose leaf carries `leaf` (made for its key).
    fn user_with_leaf_certificate(
        seed: u8,
        leaf: impl FnOnce([u8; 32]) -> HomeCertificate,
    ) -> (Vec<u8>, [u8; 32]) {
        let provider = MlsProvider::from_seed([seed; 32]);
        let mut identity = Identity::generate(&provider).unwrap();
        identity.set_home_certificate(Some(leaf(*identity.public_key())));
        let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let package = generate_key_packages(&provider, &identity, 1, now_secs).unwrap().remove(0).message;
        (package, *identity.public_key())
    }

    #[test]
    fn federation_claim_answer_whose_leaf_names_another_home_is_refused() {
        let peer = peer_keys("b.test", 2);
        let check = |leaf: &dyn Fn([u8; 32]) -> HomeCertificate| {
            let (package, key) = user_with_leaf_certificate(5, leaf);
            let answer = entry(&package, certify(2, "b.test", key, NOW_MS + 1));
            check_claimed(&peer, &[answer.sender_id], vec![answer], NOW_MS).map(|_| ())
        };
        assert_eq!(check(&|key| certify(2, "b.test", key, NOW_MS + 1)), Ok(()), "b's own, in the leaf too");
        // b's user whose leaf says c.test (with c's key, or b's).
        let error = check(&|key| certify(3, "c.test", key, NOW_MS + 1)).unwrap_err();
        assert_eq!(error.code(), "foreign_user");
        let error = check(&|key| certify(2, "c.test", key, NOW_MS + 1)).unwrap_err();
        assert_eq!(error.code(), "foreign_user");
        // A leaf certificate of b that does not verify, or has ended.
        assert_eq!(
            check(&|key| certify(4, "b.test", key, NOW_MS + 1)).unwrap_err().code(),
            "bad_home_certificate"
        );
        assert_eq!(
            check(&|key| certify(2, "b.test", key, NOW_MS)).unwrap_err().code(),
            "bad_home_certificate"
        );
    }

    #[test]
    fn federation_claim_answer_for_another_domains_user_is_refused() {
        let (package, key) = user(1);
        // b presents a user certified by c (with c's key, which it cannot have, or its own).
        let foreign = entry(&package, certify(3, "c.test", key, NOW_MS + 1));
        let asked = [foreign.sender_id];
        let error = check_claimed(&peer_keys("b.test", 2), &asked, vec![foreign], NOW_MS).unwrap_err();
        assert_eq!(error.code(), "foreign_user");
    }

    #[test]
    fn federation_claim_answer_with_a_forged_or_expired_certificate_is_refused() {
        let (package, key) = user(1);
        let peer = peer_keys("b.test", 2);
        let forged = entry(&package, certify(4, "b.test", key, NOW_MS + 1));
        let asked = [forged.sender_id];
        let error = check_claimed(&peer, &asked, vec![forged], NOW_MS).unwrap_err();
        assert!(matches!(
            error,
            ClaimAnswerError::HomeCertificate(HomeCertificateError::BadSignature { .. })
        ));
        let expired = entry(&package, certify(2, "b.test", key, NOW_MS));
        let error = check_claimed(&peer, &asked, vec![expired], NOW_MS).unwrap_err();
        assert!(matches!(error, ClaimAnswerError::HomeCertificate(HomeCertificateError::Expired { .. })));
        let mut missing = entry(&package, certify(2, "b.test", key, NOW_MS + 1));
        missing.home_certificate = None;
        let error = check_claimed(&peer, &asked, vec![missing], NOW_MS).unwrap_err();
        assert_eq!(error.code(), "missing_certificate");
    }

    #[test]
    fn federation_claim_answer_with_another_users_key_package_is_refused() {
        let (package, key) = user(1);
        let (other_package, _) = user(5);
        let peer = peer_keys("b.test", 2);
        let swapped = entry(&other_package, certify(2, "b.test", key, NOW_MS + 1));
        let asked = [swapped.sender_id];
        let error = check_claimed(&peer, &asked, vec![swapped], NOW_MS).unwrap_err();
        assert_eq!(error.code(), "identity_mismatch");
        let good = entry(&package, certify(2, "b.test", key, NOW_MS + 1));
        let error = check_claimed(&peer, &[asked[0] ^ 1], vec![good.clone()], NOW_MS).unwrap_err();
        assert_eq!(error, ClaimAnswerError::WrongAnswer, "an entry for another sender id than asked");
        let mut relabelled = good;
        relabelled.sender_id ^= 1;
        let error = check_claimed(&peer, &[relabelled.sender_id], vec![relabelled], NOW_MS).unwrap_err();
        assert_eq!(error.code(), "certificate_sender_mismatch");
        let error = check_claimed(&peer, &[1, 2], Vec::new(), NOW_MS).unwrap_err();
        assert_eq!(error, ClaimAnswerError::WrongAnswer, "entries missing");
    }
}
