//! The Notification Service Extension path, measured: a key cache for 100
//! rooms (current and previous epoch each), 1,000 sealed pushes, and
//! `decrypt_push(cache, payload)` alone on each, timed per push; then the
//! peak resident memory of the process (VmHWM from /proc/self/status).
//!
//! Run with
//! `cargo run --release -p client-core --example nse_decrypt`.
//!
//! The decrypt path calls no MLS code; the binary links client-core, and the
//! linker keeps only what is reachable from here.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use client_core::push::{decrypt_push, export_notification_keys, seal_push, NotificationKey};
use kalandra_proto::RoomId;

const ROOMS: usize = 100;
const CURRENT_EPOCH: u64 = 42;
const PUSHES: usize = 1000;
/// A realistic notification (sender name and preview), and a large one.
const PLAINTEXT_SIZES: [usize; 2] = [200, 1024];
/// Passes over the 1,000 pushes; the first is reported apart (cold caches).
const PASSES: usize = 5;

fn room(index: usize) -> RoomId {
    let mut id = [0x6b; 16];
    id[8..].copy_from_slice(&u64::try_from(index).expect("small").to_be_bytes());
    RoomId(id)
}

fn pcek(index: usize, epoch: u64) -> [u8; 32] {
    let mut pcek = [0x5a; 32];
    pcek[..8].copy_from_slice(&u64::try_from(index).expect("small").to_be_bytes());
    pcek[8..16].copy_from_slice(&epoch.to_be_bytes());
    pcek
}

fn key(index: usize, epoch: u64) -> NotificationKey {
    NotificationKey::from_pcek(room(index), epoch, &pcek(index, epoch))
}

/// A `/proc/self/status` field in KiB (Linux only).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

fn show_kib(value: Option<u64>) -> String {
    value.map_or_else(
        || "unavailable".to_string(),
        |kib| format!("{kib} KiB ({:.1} MiB)", kib as f64 / 1024.0),
    )
}

/// Push `index`: one room in turn, every third one sealed in the previous epoch.
fn push(keys: &[NotificationKey], index: usize, plaintext_bytes: usize) -> Vec<u8> {
    let room_index = index % ROOMS;
    let previous = index.is_multiple_of(3);
    let key = &keys[room_index * 2 + usize::from(!previous)];
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&u64::try_from(index).expect("small").to_be_bytes());
    let plaintext = vec![u8::try_from(index % 251).expect("small"); plaintext_bytes];
    seal_push(key, &plaintext, &nonce).expect("seal")
}

struct Stats {
    min: Duration,
    mean: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let count = u32::try_from(samples.len()).expect("small");
    let p99_index = (samples.len() * 99).div_ceil(100) - 1;
    Stats { min: samples[0], mean: total / count, p99: samples[p99_index], max: samples[samples.len() - 1] }
}

fn print_stats(label: &str, stats: &Stats) {
    println!(
        "  {label:<28} min {:>7.2} µs  mean {:>7.2} µs  p99 {:>7.2} µs  max {:>7.2} µs",
        stats.min.as_secs_f64() * 1e6,
        stats.mean.as_secs_f64() * 1e6,
        stats.p99.as_secs_f64() * 1e6,
        stats.max.as_secs_f64() * 1e6,
    );
}

fn main() {
    let hwm_start = status_kib("VmHWM:");
    let keys: Vec<NotificationKey> =
        (0..ROOMS).flat_map(|index| [key(index, CURRENT_EPOCH - 1), key(index, CURRENT_EPOCH)]).collect();
    let cache = export_notification_keys(&keys).expect("cache");
    let cache = cache.as_bytes();

    // What one NSE invocation does: one cache, one push, one call.
    let single = push(&keys, 1, PLAINTEXT_SIZES[0]);
    let started = Instant::now();
    let message = decrypt_push(cache, &single).expect("decrypt");
    let first_call = started.elapsed();
    assert_eq!(message.plaintext.len(), PLAINTEXT_SIZES[0]);
    let hwm_single = status_kib("VmHWM:");

    println!("key cache: {ROOMS} rooms x 2 epochs = {} entries, {} bytes", keys.len(), cache.len());
    println!("first decrypt_push of the process: {:.2} µs", first_call.as_secs_f64() * 1e6);

    let mut worst_p99 = Duration::ZERO;
    for plaintext_bytes in PLAINTEXT_SIZES {
        let pushes: Vec<Vec<u8>> = (0..PUSHES).map(|index| push(&keys, index, plaintext_bytes)).collect();
        println!(
            "{PUSHES} pushes, {plaintext_bytes} B plaintext ({} B payload), {PASSES} passes:",
            pushes[0].len()
        );
        let mut cold = Vec::with_capacity(PUSHES);
        let mut warm = Vec::with_capacity(PUSHES * (PASSES - 1));
        for pass in 0..PASSES {
            for (index, payload) in pushes.iter().enumerate() {
                let started = Instant::now();
                let message = decrypt_push(black_box(cache), black_box(payload));
                let elapsed = started.elapsed();
                let message = message.expect("every push decrypts");
                assert_eq!(message.room_id, room(index % ROOMS));
                assert_eq!(message.plaintext.len(), plaintext_bytes);
                black_box(message);
                if pass == 0 {
                    cold.push(elapsed)
                } else {
                    warm.push(elapsed)
                }
            }
        }
        let cold = stats(cold);
        let warm = stats(warm);
        print_stats("first pass (per push)", &cold);
        print_stats("later passes (per push)", &warm);
        worst_p99 = worst_p99.max(cold.p99).max(warm.p99);
    }

    let hwm_end = status_kib("VmHWM:");
    println!("peak RSS (VmHWM) at start:                {}", show_kib(hwm_start));
    println!("peak RSS after one NSE-style decrypt:     {}", show_kib(hwm_single));
    println!("peak RSS after all passes (1,000 pushes held in memory): {}", show_kib(hwm_end));
    let under_1ms = worst_p99 < Duration::from_millis(1);
    let under_20mb = hwm_end.is_some_and(|kib| kib * 1024 <= 20 * 1000 * 1000);
    println!("goals: p99 < 1 ms: {under_1ms}; peak RSS <= 20 MB: {under_20mb}");
}
