//! How a device recognises its server: a host name in `--server`, a pinned
//! fingerprint, a CA file or the system's roots (with the server name
//! checked), and a wrong pin refused at `init` without leaving a device.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{ok, Server};

/// Runs `kalandra --dir <dir> <args>` with `SSL_CERT_FILE` set to `roots`
/// (what the system's roots are for rustls-native-certs).
async fn kalandra_with_roots(dir: &Path, roots: &Path, args: &[&str]) -> Output {
    let (dir, roots) = (dir.to_owned(), roots.to_owned());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kalandra"))
            .arg("--dir")
            .arg(&dir)
            .args(&args)
            .env_remove("KALANDRA_STORE_KEY")
            .env_remove("KALANDRA_CLIENT_DIR")
            .env_remove("SSL_CERT_DIR")
            .env("SSL_CERT_FILE", &roots)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_ca_files_and_system_roots_verify_the_server() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let cert = server_dir.path().join("tls").join("cert.pem");
    let by_name = format!("localhost:{}", server.address.port());
    // Another server's certificate: roots that do not vouch for this one.
    let other_dir = tempfile::tempdir().unwrap();
    kalandra_server::load_or_create_server_identity(other_dir.path(), None, None).unwrap();
    let other_cert = other_dir.path().join("tls").join("cert.pem");

    // A CA file and a host name: the chain and the name verify.
    let devices = tempfile::tempdir().unwrap();
    let alice = devices.path().join("alice");
    let cert_arg = cert.to_str().unwrap();
    ok(&alice, &["init", "--server", &by_name, "--ca-file", cert_arg]).await;
    let room = ok(&alice, &["room", "create"]).await.trim().to_owned();
    assert_eq!(room.len(), 32, "{room}");

    // The same CA, but a name the certificate is not valid for.
    let wrong_name = devices.path().join("wrong-name");
    let args = ["init", "--server", &by_name, "--ca-file", cert_arg, "--server-name", "other.example"];
    let refused = common::kalandra(&wrong_name, &args).await;
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("not trusted"), "{}", stderr(&refused));
    assert!(!wrong_name.exists(), "a refused init leaves no device");

    // System roots: trusted when they include the server's certificate...
    let bob = devices.path().join("bob");
    let joined = kalandra_with_roots(&bob, &cert, &["init", "--server", &by_name, "--system-roots"]).await;
    assert!(joined.status.success(), "{}", stderr(&joined));
    // ...and refused when they do not.
    let carol = devices.path().join("carol");
    let refused =
        kalandra_with_roots(&carol, &other_cert, &["init", "--server", &by_name, "--system-roots"]).await;
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(!carol.exists(), "a refused init leaves no device");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_is_a_mismatch_and_leaves_no_device() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let by_name = format!("localhost:{}", server.address.port());
    let mut wrong = server.fingerprint_hex.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();

    let devices = tempfile::tempdir().unwrap();
    let dir = devices.path().join("device");
    let refused = common::kalandra(&dir, &["init", "--server", &by_name, "--fingerprint", &wrong]).await;
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(message.contains("fingerprint mismatch"), "{message}");
    assert!(message.contains(&wrong) && message.contains(&server.fingerprint_hex), "{message}");
    assert!(!dir.exists(), "a refused init leaves no device");

    // An existing directory keeps what it had, and nothing of the device.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let refused = common::kalandra(&dir, &["init", "--server", &by_name, "--fingerprint", &wrong]).await;
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);

    // The right pin, by host name, then works in the same directory.
    ok(&dir, &["init", "--server", &by_name, "--fingerprint", &server.fingerprint_hex]).await;
    ok(&dir, &["room", "create"]).await;
    server.stop().await;
}
