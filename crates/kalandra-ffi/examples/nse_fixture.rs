//! Writes the inputs of `examples/nse_memory.py`: a key cache file for 100
//! rooms (current and previous epoch each) and 1,000 sealed pushes of 200
//! plaintext bytes (every third one in the previous epoch), as
//! `FIXTURE_DIR/cache.klpc` and `FIXTURE_DIR/pushes.bin` (each push prefixed
//! by its length, u16 big-endian).
//!
//! `cargo run -p kalandra-ffi --example nse_fixture -- FIXTURE_DIR`
#![allow(missing_docs)]

use kalandra_nse::{export_notification_keys, seal_push, write_key_cache_file, NotificationKey};
use kalandra_proto::RoomId;

const ROOMS: u64 = 100;
const EPOCH: u64 = 42;
const PUSHES: u64 = 1000;
const PLAINTEXT_BYTES: usize = 200;

fn key(room: u64, epoch: u64) -> NotificationKey {
    let mut id = [0x6b; 16];
    id[8..].copy_from_slice(&room.to_be_bytes());
    let mut pcek = [0x5a; 32];
    pcek[..8].copy_from_slice(&room.to_be_bytes());
    pcek[8..16].copy_from_slice(&epoch.to_be_bytes());
    NotificationKey::from_pcek(RoomId(id), epoch, &pcek)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: nse_fixture FIXTURE_DIR")?);
    std::fs::create_dir_all(&dir)?;
    let keys: Vec<NotificationKey> =
        (0..ROOMS).flat_map(|room| [key(room, EPOCH - 1), key(room, EPOCH)]).collect();
    write_key_cache_file(&dir.join("cache.klpc"), &export_notification_keys(&keys)?)?;
    let mut pushes = Vec::new();
    for index in 0..PUSHES {
        let epoch = if index % 3 == 0 { EPOCH - 1 } else { EPOCH };
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&index.to_be_bytes());
        let payload = seal_push(&key(index % ROOMS, epoch), &[0x61; PLAINTEXT_BYTES], &nonce)?;
        pushes.extend_from_slice(&u16::try_from(payload.len())?.to_be_bytes());
        pushes.extend_from_slice(&payload);
    }
    std::fs::write(dir.join("pushes.bin"), pushes)?;
    println!("wrote {} keys and {PUSHES} pushes to {}", keys.len(), dir.display());
    Ok(())
}
