//! vaultpool-proxy's session tracker (both directions, cut every way) and its startup
//! packet parser, over arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vaultpool::proxy::fuzz_protocol(data);
});
