//! Arbitrary bytes through `AnyPayload::decode` for an opcode chosen by the
//! first two bytes; see `kalandra_proto_fuzz::check_payload_input`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kalandra_proto_fuzz::check_payload_input(data);
});
