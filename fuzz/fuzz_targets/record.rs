//! Arbitrary bytes as a stored outbox record body (disk bytes): decoded or
//! refused, never a panic; what decodes re-encodes stably.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_cloud_sync::Record;

fuzz_target!(|data: &[u8]| {
    // Compared as encodings: a stored F64 may be NaN, which is not equal
    // to itself.
    if let Ok(r) = Record::decode(data) {
        let mut once = Vec::new();
        if r.encode_into(&mut once).is_ok() {
            let back = Record::decode(&once);
            assert!(back.is_ok(), "a fresh encoding decodes");
            let mut twice = Vec::new();
            if let Ok(back) = back {
                assert!(back.encode_into(&mut twice).is_ok(), "it encoded once");
                assert_eq!(once, twice);
            }
        }
    }
});
