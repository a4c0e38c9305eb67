//! The server process as an operator runs it: configuration refused before
//! anything is created, one line per fatal error, exit codes, a damaged
//! database, and SIGHUP reloading the certificate and the peers'
//! federation keys.

mod process;

use std::path::Path;
use std::time::Duration;

use client_core::connection::{client_config_pinned, parse_fingerprint, Connection};
use ed25519_dalek::SigningKey;
use process::{command, http_get, run, ServerProcess};

const FINGERPRINT_PREFIX: &str = "certificate fingerprint (sha256): ";
const RELOADED_PREFIX: &str = "reloaded the TLS certificate; fingerprint (sha256): ";

/// The one line of a fatal error on standard error.
fn single_fatal_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line for one fatal error:\n{stderr}");
    assert!(lines[0].starts_with("kalandra-server: "), "{stderr}");
    lines[0]
}

fn assert_nothing_created(data_dir: &Path) {
    assert!(!data_dir.exists(), "{} was created", data_dir.display());
}

#[test]
fn a_bad_webhook_url_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut cmd = command(&data_dir);
    cmd.env("KALANDRA_PUSH_WEBHOOK_URL", "ftp://push.example/hook");
    let (status, _, stderr) = run(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(single_fatal_line(&stderr).contains("push_webhook_url"), "{stderr}");
    assert_nothing_created(&data_dir);
}

#[test]
fn addresses_in_use_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let mut cmd = command(&data_dir);
    cmd.env("KALANDRA_ADMIN_LISTEN", tcp.local_addr().expect("address").to_string());
    let (status, _, stderr) = run(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(single_fatal_line(&stderr).contains("binding admin HTTP"), "{stderr}");
    assert_nothing_created(&data_dir);

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let mut cmd = command(&data_dir);
    cmd.env("KALANDRA_LISTEN", udp.local_addr().expect("address").to_string());
    let (status, _, stderr) = run(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(single_fatal_line(&stderr).contains("binding QUIC"), "{stderr}");
    assert_nothing_created(&data_dir);
}

#[test]
fn a_damaged_database_exits_3_with_one_line_and_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start(command(&data_dir), &dir.path().join("first.log"));
    server.signal("TERM");
    assert_eq!(server.wait().code(), Some(0), "{}", server.stderr());

    let database = data_dir.join("kalandra.redb");
    let mut bytes = std::fs::read(&database).expect("database");
    assert!(bytes.len() > 8192, "a database of {} bytes", bytes.len());
    for byte in &mut bytes[4096..] {
        *byte ^= 0x5a;
    }
    std::fs::write(&database, &bytes).expect("damage");

    let (status, _, stderr) = run(command(&data_dir));
    assert_eq!(status.code(), Some(3), "{stderr}");
    let line = single_fatal_line(&stderr);
    assert!(line.contains("damaged") && line.contains("restore it from a backup"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn fingerprint_of(lines: &[String], prefix: &str) -> Option<String> {
    lines.iter().rev().find_map(|line| line.strip_prefix(prefix)).map(str::to_owned)
}

async fn connects(server: &ServerProcess, fingerprint: &str) -> bool {
    let pin = parse_fingerprint(fingerprint).expect("fingerprint");
    let key = SigningKey::from_bytes(&[7; 32]);
    let config = client_config_pinned(pin).expect("client config");
    Connection::connect(server.quic, "localhost", config, &key, Duration::from_secs(10)).await.is_ok()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start(command(&data_dir), &dir.path().join("server.log"));
    let old = fingerprint_of(&server.stdout, FINGERPRINT_PREFIX).expect("fingerprint printed");

    // A renewal: another self-signed identity, made by a second server.
    let other_dir = dir.path().join("other");
    let other = ServerProcess::start(command(&other_dir), &dir.path().join("other.log"));
    let new = fingerprint_of(&other.stdout, FINGERPRINT_PREFIX).expect("fingerprint printed");
    drop(other);
    assert_ne!(old, new);

    // A broken renewal is refused and the old certificate stays.
    std::fs::write(data_dir.join("tls/cert.pem"), "not a certificate").expect("break cert");
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.child.try_wait().expect("try_wait").is_none(), "SIGHUP stopped the server");
    assert!(connects(&server, &old).await, "the old certificate is still served");

    for name in ["cert.pem", "key.pem"] {
        std::fs::copy(other_dir.join("tls").join(name), data_dir.join("tls").join(name)).expect("copy");
    }
    server.signal("HUP");
    let mut reloaded = None;
    for _ in 0..50 {
        reloaded = fingerprint_of(&server.more_stdout(Duration::from_millis(200)), RELOADED_PREFIX);
        if reloaded.is_some() {
            break;
        }
    }
    assert_eq!(reloaded.as_deref(), Some(new.as_str()), "stderr:\n{}", server.stderr());
    assert!(connects(&server, &new).await, "new connections get the new certificate");
    assert!(!connects(&server, &old).await, "and not the old one");
    assert_eq!(http_get(server.admin, "/healthz", &[]).0, 200);

    server.signal("TERM");
    assert_eq!(server.wait().code(), Some(0), "{}", server.stderr());
    assert!(server.stderr().contains("TLS certificate not reloaded"), "{}", server.stderr());
}

/// The configuration of a.test with b.test as its peer, accepting the keys
/// of `seeds`.
fn federated_config(seeds: &[u8]) -> String {
    let keys: Vec<String> = seeds
        .iter()
        .map(|seed| {
            let key = hex::encode(SigningKey::from_bytes(&[*seed; 32]).verifying_key().to_bytes());
            format!("{{ key = \"{key}\" }}")
        })
        .collect();
    format!(
        "domain = \"a.test\"\n\n[federation]\nlisten = \"127.0.0.1:0\"\n\n[[federation.peers]]\ndomain = \"b.test\"\nkeys = [{}]\n",
        keys.join(", ")
    )
}

#[tokio::test]
async fn sighup_takes_a_peers_new_federation_key_from_the_configuration() {
    const RELOADED: &str = "reloaded the federation keys of b.test";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, federated_config(&[2])).expect("config");
    let mut start = command(&dir.path().join("data"));
    start.arg("--config").arg(&config);
    let mut server = ServerProcess::start(start, &dir.path().join("server.log"));

    // A configuration that does not load changes nothing, and stops nothing.
    std::fs::write(&config, "domain = [").expect("broken config");
    server.signal("HUP");
    // Handled before the next configuration is written.
    for _ in 0..300 {
        if server.stderr().contains("configuration not reloaded") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.stderr().contains("configuration not reloaded"), "{}", server.stderr());
    assert!(server.child.try_wait().expect("try_wait").is_none(), "SIGHUP stopped the server");

    std::fs::write(&config, federated_config(&[2, 12])).expect("config with b's new key");
    server.signal("HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if server.more_stdout(Duration::from_millis(200)).iter().any(|line| line == RELOADED) {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "stdout: {:?}\nstderr:\n{}", server.stdout, server.stderr());
    server.signal("TERM");
    assert_eq!(server.wait().code(), Some(0), "{}", server.stderr());
}
