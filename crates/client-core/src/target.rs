//! Where a device's server is and how the device recognises it: a host name
//! or address with a port, the TLS server name, and the trust (a pinned
//! fingerprint, a CA file, or the system's roots). Host names are resolved
//! at every connect, so a server can move without the device noticing.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::connection::{Connection, ConnectionError};
use crate::tls::{client_tls, ServerTrust};

/// Port used when a server address names none.
pub const DEFAULT_PORT: u16 = 4433;
/// Longest host name accepted (RFC 1035: 253 characters).
pub const HOST_BYTES_MAX: usize = 253;
/// Resolved addresses tried at once, at most.
pub const RESOLVED_ADDRESSES_TRIED_MAX: usize = 4;

/// A server address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty, too long or with characters no host name has.
    #[error("{0:?} is not a host name or IP address")]
    BadHost(String),
    /// The text after the last `:` is not a port number.
    #[error("{0:?} has no valid port (1-65535)")]
    BadPort(String),
}

/// A host and port as given (`localhost:4433`, `198.51.100.7:4433`,
/// `[2001:db8::1]:4433`, `chat.example.org`); not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl ServerAddress {
    /// Parses `host[:port]`; the port defaults to [`DEFAULT_PORT`].
    pub fn parse(text: &str) -> Result<ServerAddress, AddressError> {
        let text = text.trim();
        if let Ok(address) = text.parse::<SocketAddr>() {
            return Ok(ServerAddress { host: address.ip().to_string(), port: address.port() });
        }
        if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(ServerAddress { host: ip.to_string(), port: DEFAULT_PORT });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().map_err(|_| AddressError::BadPort(text.to_owned()))?;
                if port == 0 {
                    return Err(AddressError::BadPort(text.to_owned()));
                }
                (host, port)
            }
            None => (text, DEFAULT_PORT),
        };
        if !is_host_name(host) {
            return Err(AddressError::BadHost(text.to_owned()));
        }
        Ok(ServerAddress { host: host.to_ascii_lowercase(), port })
    }

    /// Whether the host is an IP address (no resolution needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The addresses the host resolves to (the system resolver; IP
    /// addresses as they are).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, ConnectionError> {
        if let Some(ip) = self.ip() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConnectionError::Unreachable(format!("cannot resolve {}: {e}", self.host)))?;
        let mut addresses: Vec<SocketAddr> = Vec::new();
        for address in found {
            if !addresses.contains(&address) && addresses.len() < RESOLVED_ADDRESSES_TRIED_MAX {
                addresses.push(address);
            }
        }
        if addresses.is_empty() {
            return Err(ConnectionError::Unreachable(format!("{} resolves to no address", self.host)));
        }
        Ok(addresses)
    }
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Letters, digits, `-` and `.`, 1 to 253 characters, labels 1 to 63.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= HOST_BYTES_MAX
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Where the server is and how to recognise it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredTarget", into = "StoredTarget")]
pub struct ServerTarget {
    /// Host (name or IP address) and UDP port of its QUIC listener.
    pub address: ServerAddress,
    /// TLS server name: what a CA-issued certificate must be valid for
    /// (not checked under a pinned fingerprint).
    pub server_name: String,
    /// How the server's certificate is recognised.
    pub trust: ServerTrust,
}

impl ServerTarget {
    /// Resolves the address, connects with this target's TLS and
    /// authenticates with `identity`. A refused certificate is reported as
    /// [`ConnectionError::Certificate`].
    pub async fn connect(
        &self,
        identity: &SigningKey,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let tls = client_tls(&self.trust).map_err(|e| ConnectionError::Tls(e.to_string()))?;
        let addresses = self.address.resolve().await?;
        Connection::connect_any(&addresses, &self.server_name, tls, identity, timeout).await
    }
}

/// The stored form (CBOR in the device's store). A device written before
/// host names and other trusts existed stored `address` as an IP socket
/// address and a bare `fingerprint`; both still read.
#[derive(Serialize, Deserialize)]
struct StoredTarget {
    address: StoredAddress,
    server_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    system_roots: bool,
}

/// `host:port` as text; older devices stored a socket address (which CBOR,
/// not being human-readable, holds in serde's compact form).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredAddress {
    Text(String),
    Socket(CompactSocketAddr),
}

/// serde's compact form of `SocketAddr` (an externally tagged enum of
/// `(octets, port)`), which an untagged enum cannot read as `SocketAddr`.
#[derive(Serialize, Deserialize)]
enum CompactSocketAddr {
    V4(([u8; 4], u16)),
    V6(([u8; 16], u16)),
}

impl TryFrom<StoredTarget> for ServerTarget {
    type Error = String;

    fn try_from(stored: StoredTarget) -> Result<ServerTarget, String> {
        let address = match stored.address {
            StoredAddress::Text(text) => ServerAddress::parse(&text).map_err(|e| e.to_string())?,
            StoredAddress::Socket(CompactSocketAddr::V4((octets, port))) => {
                ServerAddress { host: IpAddr::from(octets).to_string(), port }
            }
            StoredAddress::Socket(CompactSocketAddr::V6((octets, port))) => {
                ServerAddress { host: IpAddr::from(octets).to_string(), port }
            }
        };
        let trust = match (stored.fingerprint, stored.ca_file, stored.system_roots) {
            (Some(fingerprint), None, false) => ServerTrust::Fingerprint(fingerprint),
            (None, Some(path), false) => ServerTrust::CaFile(path),
            (None, None, true) => ServerTrust::SystemRoots,
            _ => return Err("the stored server names not exactly one trust".into()),
        };
        Ok(ServerTarget { address, server_name: stored.server_name, trust })
    }
}

impl From<ServerTarget> for StoredTarget {
    fn from(target: ServerTarget) -> StoredTarget {
        let mut stored = StoredTarget {
            address: StoredAddress::Text(target.address.to_string()),
            server_name: target.server_name,
            fingerprint: None,
            ca_file: None,
            system_roots: false,
        };
        match target.trust {
            ServerTrust::Fingerprint(fingerprint) => stored.fingerprint = Some(fingerprint),
            ServerTrust::CaFile(path) => stored.ca_file = Some(path),
            ServerTrust::SystemRoots => stored.system_roots = true,
        }
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_names_or_ips_with_a_default_port() {
        let parse = |text: &str| ServerAddress::parse(text).map(|a| (a.host, a.port));
        assert_eq!(parse("localhost:4433"), Ok(("localhost".into(), 4433)));
        assert_eq!(parse("Chat.Example.org"), Ok(("chat.example.org".into(), DEFAULT_PORT)));
        assert_eq!(parse("127.0.0.1:9"), Ok(("127.0.0.1".into(), 9)));
        assert_eq!(parse("[::1]:9"), Ok(("::1".into(), 9)));
        assert_eq!(parse("::1"), Ok(("::1".into(), DEFAULT_PORT)));
        assert!(matches!(parse("localhost:0"), Err(AddressError::BadPort(_))));
        assert!(matches!(parse("localhost:http"), Err(AddressError::BadPort(_))));
        assert!(matches!(parse("bad host:1"), Err(AddressError::BadHost(_))));
        assert!(matches!(parse(":1"), Err(AddressError::BadHost(_))));
        assert!(matches!(parse("-a.example:1"), Err(AddressError::BadHost(_))));
        assert_eq!(ServerAddress::parse("[::1]:9").unwrap().to_string(), "[::1]:9");
    }

    fn round_trip(target: &ServerTarget) -> ServerTarget {
        let mut bytes = Vec::new();
        ciborium::into_writer(target, &mut bytes).unwrap();
        ciborium::from_reader(bytes.as_slice()).unwrap()
    }

    #[test]
    fn targets_round_trip_and_the_older_stored_form_still_reads() {
        let address = ServerAddress::parse("localhost:4433").unwrap();
        for trust in [
            ServerTrust::Fingerprint([7; 32]),
            ServerTrust::CaFile("/etc/kalandra/ca.pem".into()),
            ServerTrust::SystemRoots,
        ] {
            let target = ServerTarget { address: address.clone(), server_name: "localhost".into(), trust };
            assert_eq!(round_trip(&target), target);
        }
        #[derive(Serialize)]
        struct Older {
            address: SocketAddr,
            server_name: String,
            fingerprint: [u8; 32],
        }
        for address in ["127.0.0.1:4433", "[2001:db8::7]:9"] {
            let older = Older {
                address: address.parse().unwrap(),
                server_name: "localhost".into(),
                fingerprint: [9; 32],
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&older, &mut bytes).unwrap();
            let read: ServerTarget = ciborium::from_reader(bytes.as_slice()).unwrap();
            assert_eq!(read.address.to_string(), address);
            assert_eq!(read.trust, ServerTrust::Fingerprint([9; 32]));
        }
    }
}
