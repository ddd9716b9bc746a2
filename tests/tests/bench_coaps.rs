//! End-to-end tests of `sluice bench --protocol coaps` against the built
//! gateway with `[listeners.coaps]`: the bench registers its devices with
//! pre-shared keys, handshakes with the real DTLS listener, and every
//! POST it counts as acknowledged must be a stored record.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::Value as Json;
use std::path::Path;

/// A gateway with `[listeners.coaps]` on 127.0.0.1, port 0, started.
fn coaps_gateway(dir: &Path) -> Gateway {
    let mut gw = Gateway::new(dir, &GatewaySpec::default());
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str("\n[listeners.coaps]\nbind = \"127.0.0.1:0\"\n");
    std::fs::write(&gw.config, config).unwrap();
    gw.start();
    gw
}

/// `coaps://` + the address the coaps listener bound.
fn coaps_url(gw: &Gateway) -> String {
    let addr = gw.status()["listeners"]["coaps"]
        .as_str()
        .expect("the coaps listener is on")
        .to_owned();
    format!("coaps://{addr}")
}

/// The `coaps` counters of `sluice status`.
fn coaps(gw: &Gateway) -> Json {
    gw.status()["coaps"].clone()
}

#[test]
fn sluice_bench_over_coaps_stores_every_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coaps_gateway(tmp.path());
    let url = coaps_url(&gw);
    let report = gw.cli_json(&[
        "bench",
        "--protocol",
        "coaps",
        "--devices",
        "4",
        "--messages",
        "2000",
        "--concurrency",
        "16",
        "--url",
        &url,
        "--json",
    ]);
    assert_eq!(report["ok"], 2000, "{report}");
    assert_eq!(report["messages"], 2000);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert_eq!(report["protocol"], "coaps");
    assert_eq!(
        (report["devices"].clone(), report["concurrency"].clone()),
        (4.into(), 16.into())
    );
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    // The daemon said its pid: the CPU it spent is in the report.
    assert!(report["gateway_cpu_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["cpu_per_msg_us"].as_f64().unwrap() > 0.0, "{report}");

    let st = gw.status();
    assert_eq!(
        st["outbox"]["records"], 2000,
        "every 2.04 is a stored message"
    );
    assert_eq!(st["devices"]["registered"], 4);
    let records = gw.cli_json(&["queue", "peek", "-n", "5000", "--json"]);
    let mut devices: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    devices.sort_unstable();
    devices.dedup();
    assert_eq!(
        devices,
        ["bench-0", "bench-1", "bench-2", "bench-3"],
        "each record is the device of its session"
    );
    let c = coaps(&gw);
    assert_eq!(c["handshakes"], 16, "one session per slot: {c}");
    assert_eq!(c["auth_failures"], 0, "{c}");

    // Keys, not tokens: --tokens is refused before any load.
    let out = gw.cli(&[
        "bench",
        "--protocol",
        "coaps",
        "--url",
        &url,
        "--tokens",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tokens does not apply"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn sluice_bench_coaps_handshakes_counts_full_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coaps_gateway(tmp.path());
    let url = coaps_url(&gw);
    let before = coaps(&gw)["handshakes"].as_u64().unwrap();
    let report = gw.cli_json(&[
        "bench",
        "--protocol",
        "coaps",
        "--handshakes",
        "--devices",
        "4",
        "--messages",
        "200",
        "--concurrency",
        "8",
        "--url",
        &url,
        "--json",
    ]);
    assert_eq!(report["ok"], 200, "{report}");
    assert_eq!(report["handshakes"], true);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report["cpu_per_msg_us"].as_f64().unwrap() > 0.0, "{report}");
    let c = coaps(&gw);
    assert!(
        c["handshakes"].as_u64().unwrap() >= before + 200,
        "{before} then {c}"
    );
    // Each handshake ended with close_notify: nothing is left open.
    wait_for(
        "the sessions to close",
        std::time::Duration::from_secs(10),
        || coaps(&gw)["established"] == 0,
    );
    assert_eq!(gw.status()["outbox"]["records"], 0, "no POST was sent");
    assert_eq!(gw.stop(), Some(0));
}
