//! `deploy/federation-demo.sh` with the binaries of this build: two
//! `kalandra-server` processes on loopback, linked, and a chat between
//! their users with the `kalandra` command.
//!
//! Ignored by default: it needs the `kalandra-server` binary beside
//! `kalandra`, which building this package's tests does not build. Run it
//! with `cargo build -p kalandra-server -p kalandra-cli && cargo nextest
//! run -p kalandra-cli --run-ignored only -E 'test(federation_demo)'`.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs the kalandra-server binary beside kalandra: cargo build -p kalandra-server first"]
fn federation_demo_script_links_two_servers_and_their_users_chat() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kalandra")).parent().unwrap();
    assert!(
        bin_dir.join("kalandra-server").is_file(),
        "no kalandra-server in {}: cargo build -p kalandra-server first",
        bin_dir.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/federation-demo.sh");
    let output = Command::new("bash").arg(&script).env("KALANDRA_BIN_DIR", bin_dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the demo failed ({:?}):\n{stdout}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("hello alice, from b.test"), "{stdout}");
    assert!(stdout.lines().last().is_some_and(|line| line.starts_with("federation-demo: OK")), "{stdout}");
}
