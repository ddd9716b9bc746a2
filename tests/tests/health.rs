//! End-to-end tests of gateway health telemetry (`P/health`) and of the
//! commands the cloud addresses to the gateway itself, against a TLS
//! mosquitto as the cloud; the figures are checked against /proc.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::io::Write;
use std::time::Duration;

/// A started gateway pointed at `cloud`, with health every second.
fn gateway_with_health(cloud: &Cloud, dir: &std::path::Path, devices: &[&str]) -> Gateway {
    let mut gw = cloud.gateway(dir, "");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .unwrap()
        .write_all(b"\n[health]\ninterval = \"1s\"\n")
        .unwrap();
    for d in devices {
        gw.add_device(d);
    }
    gw.start();
    gw
}

fn health_topic() -> String {
    format!("{PREFIX}/health")
}

/// A `/proc` figure in kB (`VmRSS:   9344 kB`), as bytes.
fn proc_kb(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} not in {file}"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn health_arrives_every_interval_with_values_that_match_proc() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let gw = gateway_with_health(&cloud, tmp.path(), &[]);
    wait_for("three health messages", Duration::from_secs(30), || {
        cloud.seen_on(&health_topic()).len() >= 3
    });
    let pid = gw.pid().unwrap();
    let vm_rss = proc_kb(&format!("/proc/{pid}/status"), "VmRSS:");
    let mem_total = proc_kb("/proc/meminfo", "MemTotal:");
    let docs = cloud.seen_on(&health_topic());

    // On schedule: about a second apart (the first may follow the uplink's
    // connect, so only consecutive pairs are checked).
    let ts: Vec<i64> = docs.iter().map(|d| d["ts"].as_i64().unwrap()).collect();
    for pair in ts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((500..=2500).contains(&gap), "health gaps {ts:?}");
    }
    assert!((now_ms() - ts[ts.len() - 1]).abs() < 60_000, "{ts:?}");

    for d in &docs {
        assert_eq!(d["gateway"], "gw-test", "{d}");
        assert!(d["uptime_s"].as_u64().is_some(), "{d}");
        for k in ["process_pct", "system_pct"] {
            let pct = d["cpu"][k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&pct), "cpu.{k} {pct}");
        }
        assert_eq!(
            d["memory"]["system_total_bytes"].as_u64().unwrap(),
            mem_total,
            "MemTotal of /proc/meminfo"
        );
        let avail = d["memory"]["system_available_bytes"].as_u64().unwrap();
        assert!(avail > 0 && avail <= mem_total, "{d}");
        assert!(d["disk"]["total_bytes"].as_u64().unwrap() > 0, "{d}");
        assert!(
            d["disk"]["available_bytes"].as_u64().unwrap()
                <= d["disk"]["total_bytes"].as_u64().unwrap()
        );
        assert!(
            d["disk"]["path"].as_str().unwrap().ends_with("/state"),
            "{d}"
        );
        match &d["temperature_c"] {
            Json::Null => {}
            t => assert!((-40.0..=150.0).contains(&t.as_f64().unwrap()), "{t}"),
        }
        assert_eq!(d["uplink"]["connected"], true, "{d}");
        assert_eq!(
            d["devices"],
            json!({"registered": 0, "connected": {"mqtt": 0, "coap": 0}})
        );
        assert!(d["outbox"]["streams"].is_object(), "{d}");
        assert!(d["outbox"]["records"].as_u64().is_some(), "{d}");
        assert!(d["ingest"].is_object(), "{d}");
    }
    let uptimes: Vec<u64> = docs
        .iter()
        .map(|d| d["uptime_s"].as_u64().unwrap())
        .collect();
    assert!(uptimes.windows(2).all(|w| w[0] <= w[1]), "{uptimes:?}");

    // Resident memory: the last document against the daemon's VmRSS now.
    let rss = docs[docs.len() - 1]["memory"]["process_rss_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        rss > vm_rss / 3 && rss < vm_rss * 3,
        "process_rss_bytes {rss} vs VmRSS {vm_rss}"
    );
}

#[test]
fn the_gateway_answers_commands_addressed_to_itself_and_refuses_reboot() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway_with_health(&cloud, tmp.path(), &["dev-1"]);
    // A health message proves the uplink is connected and subscribed.
    wait_for("a health message", Duration::from_secs(30), || {
        !cloud.seen_on(&health_topic()).is_empty()
    });
    let commands = format!("{PREFIX}/commands");
    let responses = format!("{PREFIX}/commands/response");
    let answer = |id: Json| answer(&cloud, &responses, id);

    cloud.publish(
        &commands,
        &json!({"id": "g1", "device": "gw-test", "method": "gateway_ping"}),
    );
    let r = answer(json!("g1"));
    assert_eq!(r["device"], "gw-test");
    assert_eq!(r["result"]["pong"], true, "{r}");

    cloud.publish(
        &commands,
        &json!({"id": "g2", "device": "gw-test", "method": "gateway_reboot"}),
    );
    let r = answer(json!("g2"));
    assert_eq!(r["device"], "gw-test");
    assert_eq!(r["error"]["code"], "not_allowed", "{r}");
    assert!(r.get("result").is_none());

    cloud.publish(
        &commands,
        &json!({"id": 3, "device": "gw-test", "method": "gateway_frobnicate"}),
    );
    let r = answer(json!(3));
    assert_eq!(r["error"]["code"], "unknown_method", "{r}");

    cloud.publish(
        &commands,
        &json!({"id": "g4", "device": "gw-test", "method": "gateway_devices"}),
    );
    let r = answer(json!("g4"));
    assert_eq!(r["result"]["registered"], 1, "{r}");
    assert_eq!(
        r["result"]["devices"],
        json!([{"name": "dev-1", "type": "sensor", "connected": []}])
    );

    cloud.publish(
        &commands,
        &json!({"id": "g5", "device": "gw-test", "method": "gateway_status"}),
    );
    let r = answer(json!("g5"));
    assert_eq!(r["result"]["gateway"], "gw-test", "{r}");
    assert!(
        r["result"]["memory"]["system_total_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );

    // The refused reboot left the daemon running; it still stops cleanly.
    assert!(gw.try_status().is_some());
    assert_eq!(gw.stop(), Some(0));
}

/// The response on `topic` whose id is `id`, once it arrives.
fn answer(cloud: &Cloud, topic: &str, id: Json) -> Json {
    let mut found = None;
    wait_for(
        &format!("the response to {id}"),
        Duration::from_secs(15),
        || {
            found = cloud.seen_on(topic).into_iter().find(|r| r["id"] == id);
            found.is_some()
        },
    );
    found.unwrap()
}
