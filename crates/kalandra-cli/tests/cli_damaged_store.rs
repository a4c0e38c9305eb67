//! A device whose `client.redb` is damaged: every command that opens it
//! exits with the documented code 7 and one clear line, never a panic.

mod common;

use std::path::Path;

use client_core::client::STORE_FILE_NAME;
use common::{init_device, kalandra, ok, Server};

/// redb's page size.
const PAGE_BYTES: usize = 4096;
/// `kalandra`'s exit code for a damaged or unreadable device store.
const EXIT_STORE_DAMAGED: i32 = 7;

fn copy_device(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A way of damaging the store file's bytes.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Writes pseudo-random garbage over `page` of the store file.
fn garbage_page(bytes: &mut [u8], page: usize) {
    let page = &mut bytes[page * PAGE_BYTES..(page + 1) * PAGE_BYTES];
    for (byte, i) in page.iter_mut().zip((0..=u8::MAX).cycle()) {
        *byte = i.wrapping_mul(31).wrapping_add(7);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_exits_7_with_one_line_and_no_panic() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let pristine = tempfile::tempdir().unwrap();
    init_device(pristine.path(), &server).await;
    let room = ok(pristine.path(), &["room", "create"]).await.trim().to_owned();
    for i in 0..20 {
        ok(pristine.path(), &["send", "--room", &room, &format!("message {i}")]).await;
    }
    let original = std::fs::read(pristine.path().join(STORE_FILE_NAME)).unwrap();
    assert!(original.len() > 8 * PAGE_BYTES);

    // The garbage covers every page of the file's first half after the
    // header, where the device's data is.
    let damages: Vec<(&str, Damage)> = vec![
        ("truncated to half", Box::new(|bytes: &mut Vec<u8>| bytes.truncate(bytes.len() / 2))),
        ("garbage over pages in the middle", {
            Box::new(|bytes: &mut Vec<u8>| {
                for page in 1..bytes.len() / PAGE_BYTES / 2 {
                    garbage_page(bytes, page);
                }
            })
        }),
        ("zeroed header", Box::new(|bytes: &mut Vec<u8>| bytes[..PAGE_BYTES].fill(0))),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        copy_device(pristine.path(), dir.path());
        let mut bytes = original.clone();
        damage(&mut bytes);
        std::fs::write(dir.path().join(STORE_FILE_NAME), &bytes).unwrap();
        for args in [&["room", "list"][..], &["whoami"], &["send", "--room", &room, "hello?"]] {
            let output = kalandra(dir.path(), args).await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(EXIT_STORE_DAMAGED), "{what}, {args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{what}, {args:?}: {stderr}");
            assert!(stderr.starts_with("kalandra: the device store "), "{what}: {stderr}");
            assert!(stderr.contains("client.redb is damaged: "), "{what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
            assert!(output.stdout.is_empty(), "{what}");
        }
    }
    // The undamaged device still works.
    assert!(ok(pristine.path(), &["room", "list"]).await.starts_with(&room));
    server.stop().await;
}
