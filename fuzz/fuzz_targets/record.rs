//! Arbitrary bytes as a stored outbox record body (disk bytes): decoded or
//! refused, never a panic; what decodes re-encodes to the same record.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_cloud_sync::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Record::decode(data) {
        let mut again = Vec::new();
        if r.encode_into(&mut again).is_ok() {
            assert_eq!(Record::decode(&again).ok(), Some(r));
        }
    }
});
