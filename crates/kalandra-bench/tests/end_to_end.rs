//! The load generator end to end against a real `kalandra-server` process
//! on loopback, on tiny scenarios; and its error for an unreachable server.
#![allow(missing_docs)]

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The server binary: next to the generator in the target directory,
/// built on demand when only this crate's tests were built.
fn server_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_kalandra-bench"));
    let dir = bench.parent().expect("the binary has a directory").to_owned();
    let server = dir.join("kalandra-server");
    if !server.is_file() {
        let profile_dir = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
        let target_dir = dir.parent().expect("a target directory").to_owned();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "-p", "kalandra-server", "--bin", "kalandra-server"])
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir == "release" {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building kalandra-server failed");
    }
    assert!(server.is_file(), "{} exists", server.display());
    server
}

fn bench(args: &[&str]) -> Output {
    let server = server_binary();
    Command::new(env!("CARGO_BIN_EXE_kalandra-bench"))
        .arg("--server-bin")
        .arg(server)
        .arg("--json")
        .args(args)
        .output()
        .expect("run kalandra-bench")
}

fn reports(output: &Output) -> Vec<serde_json::Value> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kalandra-bench failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("JSON output: {e}: {stderr}"))
}

fn figure(report: &serde_json::Value, name: &str) -> f64 {
    report["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no figure {name} in {report}"))["value"]
        .as_f64()
        .expect("a number")
}

#[test]
fn a_tiny_throughput_run_acknowledges_every_frame_and_every_receiver_decrypts_them() {
    let output = bench(&[
        "throughput",
        "--rooms",
        "2",
        "--members",
        "3",
        "--senders-per-room",
        "2",
        "--frames-per-sender",
        "40",
        "--window",
        "8",
        "--verify",
    ]);
    let reports = reports(&output);
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report["scenario"], "throughput");
    assert_eq!(figure(report, "acked_frames"), 160.0, "2 rooms × 2 senders × 40 frames");
    assert_eq!(figure(report, "refused_frames"), 0.0);
    // One member per room does not send: it gets every frame of its room.
    assert_eq!(figure(report, "receiver_deliveries"), 160.0);
    assert_eq!(figure(report, "verified"), 160.0, "signature, sender-key decryption and content checked");
    assert_eq!(figure(report, "verify_failures"), 0.0);
    assert!(figure(report, "acked_frames_per_second") > 0.0);
    assert!(figure(report, "ack_latency_p99_ms") >= figure(report, "ack_latency_p50_ms"));
    assert!(figure(report, "server_cpu_cores") >= 0.0, "the server's CPU time is read from /proc");
}

#[test]
fn tiny_latency_fanout_commit_and_connections_runs_complete() {
    let latency = reports(&bench(&[
        "latency",
        "--members",
        "4",
        "--senders",
        "2",
        "--rate",
        "200",
        "--duration-s",
        "1",
    ]));
    assert_eq!(figure(&latency[0], "frames"), 200.0);
    assert_eq!(figure(&latency[0], "frames_not_received_by_all"), 0.0);
    assert!(figure(&latency[0], "send_to_all_p99_ms") > 0.0);

    let fanout = reports(&bench(&["fanout", "--members", "6", "--frames", "30", "--window", "4"]));
    assert_eq!(figure(&fanout[0], "deliveries"), 150.0, "30 frames × 5 receivers");
    assert_eq!(figure(&fanout[0], "acked_frames"), 30.0);

    let commit = reports(&bench(&["commit", "--members", "3,5", "--iterations", "2"]));
    assert_eq!(commit.len(), 2);
    assert_eq!(commit[1]["scenario"], "commit-5");
    assert!(figure(&commit[1], "self_update_ack_ms_median") > 0.0);
    assert!(figure(&commit[1], "add_one_ack_ms_median") > 0.0);

    let connections = reports(&bench(&["connections", "--count", "20"]));
    assert_eq!(figure(&connections[0], "connections"), 20.0);
    assert!(figure(&connections[0], "server_rss_after_mib") > 0.0);
}

#[test]
fn a_tiny_federation_run_measures_every_delivery_across_two_linked_servers() {
    let reports = reports(&bench(&[
        "federation",
        "--a-receivers",
        "1",
        "--b-receivers",
        "1",
        "--rate",
        "50",
        "--duration-s",
        "1",
        "--rounds",
        "2",
        "--senders",
        "2",
        "--frames-per-sender",
        "20",
        "--throughput-window",
        "4",
    ]));
    assert_eq!(reports.len(), 3);
    let lag = &reports[0];
    assert_eq!(lag["scenario"], "federation-lag");
    // Two rounds of 50 frames; the local room has as many receivers as the
    // room across (2).
    assert_eq!(figure(lag, "frames_per_room"), 100.0);
    assert_eq!(figure(lag, "local_to_receivers_samples"), 200.0);
    assert_eq!(figure(lag, "across_to_a_samples"), 100.0, "the sender on b reaches the receiver on a");
    assert_eq!(figure(lag, "across_to_b_samples"), 100.0, "and the receiver on b, through both servers");
    assert_eq!(figure(lag, "local_missing_deliveries"), 0.0);
    assert_eq!(figure(lag, "across_missing_deliveries"), 0.0);
    assert_eq!(figure(lag, "refused_frames"), 0.0);
    assert!(figure(lag, "across_to_b_p99_ms") >= figure(lag, "across_to_b_p50_ms"));
    assert!(figure(lag, "across_server_b_cpu_cores") >= 0.0, "both servers' CPU time is read");

    let throughput = &reports[1];
    assert_eq!(throughput["scenario"], "federation-throughput");
    assert_eq!(figure(throughput, "local_acked_frames"), 40.0, "2 senders × 20 frames");
    assert_eq!(figure(throughput, "across_acked_frames"), 40.0);
    assert_eq!(figure(throughput, "across_receiver_deliveries"), 40.0, "the creator on a gets them all");
    assert_eq!(figure(throughput, "refused_frames"), 0.0);
    assert!(figure(throughput, "across_acked_frames_per_second") > 0.0);

    let catch_up = &reports[2];
    assert_eq!(catch_up["scenario"], "federation-catch-up");
    assert_eq!(figure(catch_up, "replica_behind_frames"), 40.0, "written on a while b was down");
    assert!(figure(catch_up, "catch_up_frames_per_second") > 0.0);
    assert!(figure(catch_up, "restart_to_live_seconds") >= figure(catch_up, "catch_up_seconds"));
}

#[test]
fn an_unreachable_server_is_a_clear_error_with_its_own_exit_code() {
    // A loopback UDP port that nothing listens on: bound, noted, released.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let output = Command::new(env!("CARGO_BIN_EXE_kalandra-bench"))
        .args(["--server", &address, "--fingerprint", &"ab".repeat(32), "--connect-timeout-ms", "1000"])
        .args(["throughput", "--rooms", "1"])
        .output()
        .expect("run kalandra-bench");
    assert_eq!(output.status.code(), Some(i32::from(kalandra_bench::error::EXIT_UNREACHABLE)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("cannot reach the server at {address}")), "{stderr}");
    assert!(output.stdout.is_empty(), "no report for a run that did not happen");
}

#[test]
fn a_server_address_without_a_fingerprint_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_kalandra-bench"))
        .args(["--server", "127.0.0.1:9", "throughput"])
        .output()
        .expect("run kalandra-bench");
    assert_eq!(output.status.code(), Some(i32::from(kalandra_bench::error::EXIT_USAGE)));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--fingerprint"));
}
