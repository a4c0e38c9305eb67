//! Writes the seed corpora to `fuzz/corpus/<target>/`.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds` (from the
//! repository root; RUSTC_BOOTSTRAP is not needed for this). Every seed is
//! first run through the target's checks, so a seed that breaks an invariant
//! is caught here rather than by the fuzzer.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<(String, Vec<u8>)>, fn(&[u8])); 2] = [
        (
            "frame_decoder",
            kalandra_proto_fuzz::seeds::frame_decoder(),
            kalandra_proto_fuzz::check_frame_decoder_input,
        ),
        (
            "payload_decode",
            kalandra_proto_fuzz::seeds::payload_decode(),
            kalandra_proto_fuzz::check_payload_input,
        ),
    ];
    for (target, seeds, check) in targets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        let mut total = 0;
        for (name, input) in &seeds {
            check(input);
            std::fs::write(dir.join(format!("seed-{name}")), input)?;
            total += input.len();
        }
        println!("{target}: {} seeds, {total} bytes in {}", seeds.len(), dir.display());
    }
    Ok(())
}
