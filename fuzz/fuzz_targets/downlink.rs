//! Arbitrary bytes as what the cloud sends down (cloud bytes): the first
//! byte picks a topic of either profile, the rest is the payload; parsed or
//! refused, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_cloud_sync::downlink;
use sluice_cloud_sync::profile::tb;

fuzz_target!(|data: &[u8]| {
    let topic = match data.first().map_or(0, |b| b % 8) {
        0 => "p/commands",
        1 => "p/attributes/shared",
        2 => tb::RPC,
        3 => tb::ATTRIBUTES,
        4 => tb::ME_ATTRIBUTES,
        5 => "v1/devices/me/rpc/request/7",
        6 => "v1/devices/me/attributes/response/2",
        _ => "elsewhere",
    };
    let payload = data.get(1..).unwrap_or_default();
    let _ = downlink::parse("p/commands", "p/attributes/shared", topic, payload);
    let _ = tb::parse("gw", topic, payload);
    let _ = tb::session_limits(payload);
    let _ = tb::is_own_echo(topic, payload);
});
