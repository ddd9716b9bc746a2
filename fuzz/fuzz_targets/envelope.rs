//! Arbitrary bytes as a signed envelope (fleet configuration or firmware
//! manifest, cloud bytes): never a panic, and never verified by a key that
//! signed nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 32];
    assert!(sluice_agent::fleet::open(data, &[key]).is_err());
    assert!(sluice_agent::fleet::verify(data, &[key]).is_err());
});
