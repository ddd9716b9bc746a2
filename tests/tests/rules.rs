//! End-to-end tests of the telemetry rules (`[[rules]]`) with real clients
//! (mosquitto_pub, curl) and a TLS mosquitto as the cloud: aggregation into
//! windows, range and drop rules, open windows surviving `kill -9`, and
//! `sluice tail`.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const RULES: &str = r#"
[[rules]]
name = "debug-off"
keys = "debug*"
actions = [{ type = "drop" }]

[[rules]]
name = "humidity"
keys = "hum"
actions = [{ type = "range", min = 0, max = 100 }]

[[rules]]
name = "temp-10s"
keys = "temp"
actions = [{ type = "aggregate", window = "10s", functions = ["min", "max", "avg", "count"] }]

[[rules]]
name = "energy-1h"
keys = "energy"
actions = [{ type = "aggregate", window = "1h", functions = ["sum", "count"] }]
"#;

fn gateway(dir: &std::path::Path, cloud: &Cloud) -> Gateway {
    let gw = cloud.gateway(dir, "");
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(RULES);
    std::fs::write(&gw.config, config).unwrap();
    gw
}

fn publish_lines(gw: &Gateway, token: &str, lines: &[String]) {
    let out = mosquitto_pub(
        gw,
        &[
            "-u",
            token,
            "-q",
            "1",
            "-t",
            "v1/devices/me/telemetry",
            "-l",
        ],
        &(lines.join("\n") + "\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Telemetry records of `device` seen by the cloud, as (ts, values).
fn upstream(cloud: &Cloud, device: &str) -> Vec<(i64, Json)> {
    cloud
        .observer
        .records()
        .into_iter()
        .filter(|(_, d, _)| d == device)
        .map(|(_, _, r)| (r["ts"].as_i64().unwrap(), r["values"].clone()))
        .collect()
}

#[test]
fn hundred_one_hertz_readings_become_ten_window_aggregates_and_range_rules_cut() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway(tmp.path(), &cloud);
    let token = gw.add_device("dev-1");
    gw.start();
    // 100 readings at 1 Hz from a 10 s boundary in the past: temp = i.
    let base: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let lines: Vec<String> = (0..100)
        .map(|i| {
            let mut values = json!({"temp": i});
            if i % 25 == 0 {
                values["hum"] = json!(if i == 50 { 150 } else { 40 });
                values["debug_level"] = json!(3);
            }
            json!({"ts": base + i * 1000, "values": values}).to_string()
        })
        .collect();
    publish_lines(&gw, &token, &lines);
    wait_for("ten aggregates upstream", Duration::from_secs(20), || {
        upstream(&cloud, "dev-1")
            .iter()
            .filter(|(_, v)| v.get("temp_count").is_some())
            .count()
            == 10
    });
    let got = upstream(&cloud, "dev-1");
    let aggregates: Vec<&(i64, Json)> = got
        .iter()
        .filter(|(_, v)| v.get("temp_count").is_some())
        .collect();
    for (w, (ts, v)) in aggregates.iter().enumerate() {
        let w = w as i64;
        assert_eq!(*ts, base + (w + 1) * 10_000, "window end as ts");
        assert_eq!(v["temp_min"], json!(10.0 * w as f64), "{v}");
        assert_eq!(v["temp_max"], json!(10.0 * w as f64 + 9.0), "{v}");
        assert_eq!(v["temp_avg"], json!(10.0 * w as f64 + 4.5), "{v}");
        assert_eq!(v["temp_count"], json!(10), "{v}");
    }
    // No raw temp left, hum 150 dropped, the three good hum readings
    // passed, debug keys gone.
    assert!(
        got.iter()
            .all(|(_, v)| v.get("temp").is_none() && v.get("debug_level").is_none())
    );
    let hums: Vec<Json> = got
        .iter()
        .filter_map(|(_, v)| v.get("hum").cloned())
        .collect();
    assert_eq!(hums, vec![json!(40), json!(40), json!(40)]);
    let st = gw.status();
    let rules = st["rules"].as_array().unwrap();
    let by = |name: &str| rules.iter().find(|r| r["rule"] == name).unwrap().clone();
    assert_eq!(by("humidity")["dropped"], 1, "{st}");
    assert_eq!(by("debug-off")["dropped"], 4, "{st}");
    assert_eq!(by("temp-10s")["matched"], 100, "{st}");
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn an_open_window_survives_kill_9_with_every_acknowledged_reading() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway(tmp.path(), &cloud);
    let token = gw.add_device("meter");
    // Next hour's window (future timestamps): wall time cannot close it
    // during the test, so it stays open across the kills.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let hour: i64 = (now / 3_600_000 + 1) * 3_600_000;
    let mut sent = 0i64;
    let mut sum = 0i64;
    for round in 0..3 {
        gw.start();
        let lines: Vec<String> = (0..40)
            .map(|i| {
                let v = round * 100 + i;
                json!({"ts": hour + 1000 + (round * 40 + i) * 1000, "values": {"energy": v}})
                    .to_string()
            })
            .collect();
        publish_lines(&gw, &token, &lines);
        for i in 0..40 {
            sent += 1;
            sum += round * 100 + i;
        }
        // Every reading was PUBACKed, i.e. its contribution committed.
        gw.kill9();
    }
    gw.start();
    // A reading of the next hour closes the window.
    publish_lines(
        &gw,
        &token,
        &[json!({"ts": hour + 3_600_000 + 5, "values": {"energy": 1}}).to_string()],
    );
    wait_for("the hour's aggregate", Duration::from_secs(20), || {
        upstream(&cloud, "meter")
            .iter()
            .any(|(_, v)| v.get("energy_sum").is_some())
    });
    let agg: Vec<(i64, Json)> = upstream(&cloud, "meter")
        .into_iter()
        .filter(|(_, v)| v.get("energy_sum").is_some())
        .collect();
    assert_eq!(agg.len(), 1, "{agg:?}");
    assert_eq!(agg[0].0, hour + 3_600_000);
    assert_eq!(
        agg[0].1["energy_count"],
        json!(sent),
        "every acked reading counted once"
    );
    assert_eq!(agg[0].1["energy_sum"], json!(sum as f64));
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn tail_shows_what_leaves_the_rules_and_what_they_dropped() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway(tmp.path(), &cloud);
    let token = gw.add_device("dev-1");
    gw.add_device("dev-2");
    gw.start();
    let mut child = Command::new(SLUICE)
        .arg("--config")
        .arg(&gw.config)
        .args(["tail", "--device", "dev-1", "--dropped", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });
    pause(Duration::from_millis(500));
    let url = format!(
        "http://{}/api/v1/{token}/telemetry",
        gw.http.as_ref().unwrap()
    );
    let (code, _) = curl(&["-X", "POST", "-d", r#"{"hum":150,"pressure":1013}"#, &url]);
    assert_eq!(code, 200);
    wait_for("two tail lines", Duration::from_secs(10), || {
        lines.lock().unwrap().len() >= 2
    });
    let _ = child.kill();
    let _ = child.wait();
    let got: Vec<Json> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        got.iter()
            .any(|e| e["stream"] == "telemetry" && e["values"] == json!({"pressure": 1013})),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|e| e["dropped_by"] == "humidity" && e["values"] == json!({"hum": 150})),
        "{got:?}"
    );
    assert!(got.iter().all(|e| e["device"] == "dev-1"));
    assert_eq!(gw.stop(), Some(0));
}
