//! The crate stays a pure core: few dependencies, no clock, thread or
//! random source outside the test-only model.

const MANIFEST: &str = include_str!("../Cargo.toml");

const SOURCES: [(&str, &str); 12] = [
    ("lib.rs", include_str!("lib.rs")),
    ("chain.rs", include_str!("chain.rs")),
    ("client.rs", include_str!("client.rs")),
    ("error.rs", include_str!("error.rs")),
    ("ids.rs", include_str!("ids.rs")),
    ("limits.rs", include_str!("limits.rs")),
    ("message.rs", include_str!("message.rs")),
    ("record.rs", include_str!("record.rs")),
    ("room.rs", include_str!("room.rs")),
    ("room/outgoing.rs", include_str!("room/outgoing.rs")),
    ("room/incoming.rs", include_str!("room/incoming.rs")),
    ("room/replica.rs", include_str!("room/replica.rs")),
];

const MORE_SOURCES: [(&str, &str); 2] =
    [("room/sequence.rs", include_str!("room/sequence.rs")), ("sign.rs", include_str!("sign.rs"))];

#[test]
fn only_the_named_dependencies() {
    let section = MANIFEST.split("[dependencies]").nth(1).expect("a [dependencies] section");
    let section = section.split("\n[").next().unwrap_or(section);
    let names: Vec<&str> = section
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split([' ', '=']).next().unwrap_or(line))
        .collect();
    assert_eq!(names, ["ed25519-dalek", "sha2", "thiserror"]);
}

#[test]
fn no_clock_thread_or_randomness_in_the_core() {
    let forbidden = ["Instant", "SystemTime", "std::thread", "tokio", "rand::", "OsRng", "thread_rng"];
    for (name, source) in SOURCES.iter().chain(MORE_SOURCES.iter()) {
        for word in forbidden {
            assert!(!source.contains(word), "{name} mentions {word}");
        }
    }
}
