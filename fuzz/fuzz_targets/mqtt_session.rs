//! Arbitrary bytes from a device, through the MQTT listener's framing, the
//! 3.1.1/5 decoders, the session state machine and the encoder of its
//! answers, exactly as one connection runs them (`fuzz_mqtt_bytes`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice_agent::mqtt::fuzz_mqtt_bytes(data);
});
