//! Arbitrary bytes as a ThingsBoard JSON telemetry payload: decoded or
//! refused with a reason, never a panic, never more records than the limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_agent::tbjson;
use sluice_cloud_sync::DeviceName;

fuzz_target!(|data: &[u8]| {
    let device = DeviceName::new("fuzz-dev");
    let trusted = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok(records) = tbjson::decode(data, &device, 1_800_000_000_000, trusted) {
        assert!(records.len() <= tbjson::MAX_RECORDS);
    }
});
