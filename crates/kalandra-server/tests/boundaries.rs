//! The pure room core stays pure: no module of it names a runtime, a
//! clock, a socket or a driver module. (The simulation runs this code; a
//! clock read or a spawn inside it would make runs diverge from production
//! or from each other.)

use std::path::Path;

/// Words no pure module may contain outside comments.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "quinn",
    "axum",
    "redb",
    "Instant::now",
    "SystemTime",
    "thread::spawn",
    "crate::node",
    "crate::transport",
    "crate::admin",
    "crate::server",
];

/// The pure modules: the room core (shard, sequencer, MLS state, roles,
/// audit records), the connection protocol, the federation link handshake
/// and the link's request layer.
const PURE: &[&str] = &[
    "src/room",
    "src/protocol",
    "src/federation/handshake.rs",
    "src/federation/requests.rs",
    "src/federation/follow.rs",
];

fn violations(path: &Path, found: &mut Vec<String>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("readable source dir") {
            violations(&entry.expect("dir entry").path(), found);
        }
        return;
    }
    let text = std::fs::read_to_string(path).expect("readable source");
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    for (number, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or_default();
        for word in FORBIDDEN {
            if line.contains(word) {
                found.push(format!("{}:{}: {word}", path.display(), number + 1));
            }
        }
    }
}

#[test]
fn the_room_core_imports_no_runtime_clock_or_driver() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for module in PURE {
        violations(&root.join(module), &mut found);
    }
    assert!(found.is_empty(), "pure modules reach outside: {found:#?}");
}

#[test]
fn the_boundary_check_sees_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leak.rs");
    std::fs::write(
        &file,
        "fn f() { let _ = std::time::Instant::now(); }\n// tokio in a comment is fine\nuse crate::transport::outbox::Outbox;\n",
    )
    .unwrap();
    let mut found = Vec::new();
    violations(&file, &mut found);
    assert_eq!(found.len(), 2, "{found:?}");
}
