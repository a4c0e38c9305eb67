//! Fuzzing invariants in the ordinary test suite.
//!
//! The checks are the fuzz targets' own: `fuzz/src/lib.rs` is included below
//! as a module, so `cargo test` runs exactly what `cargo fuzz` runs, on the
//! seed inputs (built in code, and the files committed under
//! `fuzz/corpus/<target>/`). An input a fuzzer finds to break an invariant
//! belongs here as its own test, with its bytes in hex.
//!
//! Campaign of 2026-11-22 (see `fuzz/README.md`): neither target found a
//! crash, so there is no crash regression yet.

#[allow(dead_code, unreachable_pub, clippy::all)]
#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};

use fuzz_checks::{check_frame_decoder_input, check_payload_input, check_stream, seeds, StreamPlan};

/// The committed seed files of a fuzz target, sorted by name.
fn corpus_files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes =
                std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn frame_decoder_seeds_hold_the_fuzz_invariants() {
    let built = seeds::frame_decoder();
    assert!(built.len() >= 30, "a seed per opcode plus streams");
    for (name, input) in &built {
        eprintln!("seed {name}");
        check_frame_decoder_input(input);
    }
    let files = corpus_files("frame_decoder");
    assert!(!files.is_empty(), "fuzz/corpus/frame_decoder holds the committed seeds");
    for (path, input) in &files {
        eprintln!("corpus file {}", path.display());
        check_frame_decoder_input(input);
    }
}

#[test]
fn payload_decode_seeds_hold_the_fuzz_invariants() {
    let built = seeds::payload_decode();
    assert_eq!(built.len(), kalandra_proto::Opcode::ALL.len(), "a seed per opcode");
    for (name, input) in &built {
        eprintln!("seed {name}");
        check_payload_input(input);
    }
    let files = corpus_files("payload_decode");
    assert!(!files.is_empty(), "fuzz/corpus/payload_decode holds the committed seeds");
    for (path, input) in &files {
        eprintln!("corpus file {}", path.display());
        check_payload_input(input);
    }
}

/// Every seed payload decodes (the checks above only say nothing panicked or
/// broke a round trip; a seed that stopped decoding would test much less).
#[test]
fn every_payload_seed_is_accepted() {
    for payload in seeds::payloads() {
        let opcode = payload.opcode();
        let decoded = kalandra_proto::AnyPayload::decode(opcode, &payload.encode())
            .unwrap_or_else(|error| panic!("{opcode:?} seed refused: {error}"));
        assert_eq!(decoded, payload);
    }
}

/// A stream of every seed frame, fed in many chunkings (including empty
/// calls), decodes to the same frames each time.
#[test]
fn seed_stream_survives_every_chunking() {
    let stream: Vec<u8> = seeds::payloads()
        .iter()
        .zip(0u64..)
        .flat_map(|(payload, sequence)| seeds::frame(payload, sequence).to_bytes().to_vec())
        .collect();
    let chunkings: [&[usize]; 9] =
        [&[], &[1], &[2, 3], &[127], &[128], &[129], &[0, 5], &[255, 1, 64], &[1000, 0, 17]];
    for limit in [None, Some(64 * 4), Some(kalandra_proto::limits::PAYLOAD_BYTES_MAX)] {
        for chunk_sizes in chunkings {
            let plan =
                StreamPlan { payload_bytes_max: limit, chunk_sizes: chunk_sizes.to_vec(), stream: &stream };
            check_stream(&plan);
        }
    }
}
