//! Arbitrary bytes through `FrameDecoder`, cut into chunks chosen by the
//! input's first bytes; see `kalandra_proto_fuzz::check_frame_decoder_input`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kalandra_proto_fuzz::check_frame_decoder_input(data);
});
