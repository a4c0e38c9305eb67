//! uniffi's binding generator, built against the same uniffi as the library
//! (see docs/MOBILE.md and scripts/generate-bindings.sh):
//!
//! ```text
//! cargo run -p kalandra-ffi --bin uniffi-bindgen -- generate \
//!     --library target/debug/libkalandra_ffi.so --language python --out-dir bindings/python
//! ```

fn main() {
    uniffi::uniffi_bindgen_main()
}
