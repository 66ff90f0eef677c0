//! Vault's response envelope and every typed decoder behind it, over arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    vaultpool::vault::fuzz_decode(body);
});
