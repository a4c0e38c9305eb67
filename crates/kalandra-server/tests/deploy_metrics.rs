//! A live server's `/metrics`: clean for `promtool check metrics`, every
//! series present before any traffic, and every metric name that the alert
//! rules and the Grafana dashboard in deploy/ use is exported.

mod process;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use process::{command, http_get, ServerProcess};

const RULES: &str = include_str!("../../../deploy/prometheus/kalandra-alerts.yml");
const DASHBOARD: &str = include_str!("../../../deploy/grafana/kalandra-dashboard.json");

/// Metric names in PromQL text: identifiers starting with `kalandra_` or
/// `process_` (the server's own names; `up` is Prometheus's).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let is_ident = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
        if is_ident(bytes[start]) && (start == 0 || !is_ident(bytes[start - 1])) {
            let end = (start..bytes.len()).find(|&i| !is_ident(bytes[i])).unwrap_or(bytes.len());
            let word = &promql[start..end];
            if word.starts_with("kalandra_") || word.starts_with("process_") {
                names.insert(word.to_owned());
            }
            start = end;
        } else {
            start += 1;
        }
    }
    names
}

/// The `expr:` lines of the rules file.
fn rule_expressions(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(|expr| expr.trim().to_owned())
        .collect()
}

fn dashboard_expressions(dashboard: &str) -> Vec<String> {
    let document: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
    let panels = document["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect()
}

/// Sample names on the page (`name{...} value` and `name value` lines).
fn exported_samples(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

fn promtool_available() -> bool {
    Command::new("promtool").arg("--version").output().is_ok_and(|output| output.status.success())
}

/// `promtool check metrics` on `page`: its complaints (empty when clean).
fn promtool_check_metrics(page: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().expect("stdin").write_all(page.as_bytes()).expect("feed promtool");
    let output = child.wait_with_output().expect("promtool output");
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        complaints
    } else {
        format!("exit {}: {complaints}", output.status)
    }
}

fn scrape(dir: &Path) -> (String, ServerProcess) {
    let server = ServerProcess::start(command(&dir.join("data")), &dir.join("stderr.log"));
    let (status, head, page) = http_get(server.admin, "/metrics", &[]);
    assert_eq!(status, 200, "{head}");
    (page, server)
}

#[test]
fn a_fresh_servers_metrics_cover_the_rules_and_the_dashboard_and_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (page, _server) = scrape(dir.path());
    let exported = exported_samples(&page);

    let mut used = BTreeSet::new();
    for expr in rule_expressions(RULES).iter().chain(&dashboard_expressions(DASHBOARD)) {
        used.extend(metric_names(expr));
    }
    assert!(used.len() >= 15, "the rules and the dashboard use the server's metrics: {used:?}");
    let missing: Vec<_> = used.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(missing.is_empty(), "used by deploy/ but not exported: {missing:?}\n{page}");
    // The checker finds a name that is not exported.
    assert!(!exported.contains("kalandra_frames_dropped_total"));
    assert!(metric_names("rate(kalandra_frames_dropped_total[5m]) > up")
        .contains("kalandra_frames_dropped_total"));

    for name in
        ["kalandra_rooms", "kalandra_room_members", "kalandra_connections_open", "kalandra_build_info"]
    {
        assert!(exported.contains(name), "{name} missing:\n{page}");
    }
    assert!(page.contains("kalandra_rejections_total{code=\"AuthenticationFailed\"} 0\n"), "{page}");
    assert!(page.contains("kalandra_push_dropped_total{reason=\"queue_full\"} 0\n"), "{page}");

    if !promtool_available() {
        assert!(
            std::env::var_os("KALANDRA_REQUIRE_PROMTOOL").is_none(),
            "promtool is required (scripts/ensure-promtool.sh installs it)"
        );
        eprintln!("promtool not installed: skipping `promtool check metrics` (scripts/ensure-promtool.sh)");
        return;
    }
    assert_eq!(promtool_check_metrics(&page), "", "promtool check metrics:\n{page}");
    // promtool does complain about a broken page.
    let broken = "# TYPE kalandra_bad counter\nkalandra_bad 1\n";
    assert!(!promtool_check_metrics(broken).is_empty(), "promtool must object to a counter without _total");
}

#[test]
fn admin_requests_are_counted_and_logged_without_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(&dir.path().join("data"));
    let token = "operator-token-0123456789abcdef";
    cmd.env("KALANDRA_ADMIN_TOKEN", token);
    let server = ServerProcess::start(cmd, &dir.path().join("stderr.log"));
    let (status, head, _) =
        http_get(server.admin, "/v1/rooms", &[("Authorization", "Bearer wrong-token-0123456789")]);
    assert_eq!(status, 401);
    assert!(
        head.contains("www-authenticate: Bearer realm=\"kalandra-admin\", error=\"invalid_token\""),
        "{head}"
    );
    let (status, head, _) = http_get(server.admin, "/v1/rooms", &[]);
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: Bearer realm=\"kalandra-admin\"\r\n"), "{head}");
    let (status, _, body) =
        http_get(server.admin, "/v1/rooms", &[("Authorization", &format!("bEaReR {token}"))]);
    assert_eq!(status, 200, "the scheme is case-insensitive: {body}");
    let (status, _, _) = http_get(
        server.admin,
        "/v1/rooms/00112233445566778899aabbccddeeff",
        &[("Authorization", &format!("Bearer {token}"))],
    );
    assert_eq!(status, 404);

    let (_, _, page) = http_get(server.admin, "/metrics", &[]);
    let count = |series: &str| {
        page.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse::<u64>().ok())
    };
    let rooms = "kalandra_admin_requests_total{method=\"GET\",route=\"/v1/rooms\"";
    assert_eq!(count(&format!("{rooms},status=\"401\"}}")), Some(2), "{page}");
    assert_eq!(count(&format!("{rooms},status=\"200\"}}")), Some(1), "{page}");
    let room = "kalandra_admin_requests_total{method=\"GET\",route=\"/v1/rooms/{room_id}\",status=\"404\"}";
    assert_eq!(count(room), Some(1), "{page}");
    assert_eq!(count("kalandra_auth_failures_total{surface=\"admin\"}"), Some(2), "{page}");
    assert_eq!(count("kalandra_rejections_total{code=\"AuthenticationFailed\"}"), Some(0), "{page}");

    let log = server.stderr();
    let access: Vec<&str> = log.lines().filter(|line| line.contains("admin request")).collect();
    assert!(access.len() >= 5, "one access line per request:\n{log}");
    assert!(
        access.iter().any(|line| line.contains("status=401") && line.contains("route=/v1/rooms")),
        "{log}"
    );
    assert!(!log.contains(token) && !log.contains("wrong-token"), "tokens never reach the log:\n{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes when stderr is a file:\n{log}");
}
