//! End-to-end tests of sluice against real peers: mosquitto (TLS 1.3,
//! password auth) as the cloud, mosquitto_sub as the cloud-side consumer,
//! curl as the devices, and the sluice binary as a real process.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Each test binary uses a different part of the shared harness.
#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

struct World {
    _tmp: tempfile::TempDir,
    pki: Pki,
    broker: Broker,
    observer: Option<Observer>,
}

fn world_with_broker() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let mut broker = Broker::new(tmp.path(), &pki, free_port());
    broker.start();
    let observer = Some(Observer::start(
        &broker,
        &pki,
        &format!("obs-{}", broker.port),
    ));
    World {
        _tmp: tmp,
        pki,
        broker,
        observer,
    }
}

impl World {
    fn dir(&self, name: &str) -> std::path::PathBuf {
        let d = self._tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn spec(&self) -> GatewaySpec {
        GatewaySpec {
            cloud: Some((self.broker.port, self.pki.ca.clone())),
            ..GatewaySpec::default()
        }
    }
    fn observer(&self) -> &Observer {
        self.observer.as_ref().unwrap()
    }
}

fn bodies(from: i64, to: i64) -> Vec<String> {
    (from..to).map(|n| format!("{{\"n\":{n}}}")).collect()
}

/// Asserts that for each device the `n` values strictly increase with seq.
fn assert_order_by_seq(records: &[(u64, String, Json)]) {
    let mut sorted = records.to_vec();
    sorted.sort_by_key(|r| r.0);
    sorted.dedup_by_key(|r| r.0);
    for (dev, pairs) in by_device(&sorted) {
        for w in pairs.windows(2) {
            assert!(
                w[0].1 < w[1].1,
                "device {dev}: n {} then {} by seq",
                w[0].1,
                w[1].1
            );
        }
    }
}

/// Asserts that a seq always names the same reading.
fn assert_duplicates_share_seq(records: &[(u64, String, Json)]) {
    let mut by_seq: HashMap<u64, (String, i64)> = HashMap::new();
    let mut by_reading: HashMap<(String, i64), u64> = HashMap::new();
    for (seq, dev, r) in records {
        let n = r["values"]["n"].as_i64().unwrap();
        let prev = by_seq.insert(*seq, (dev.clone(), n));
        assert!(
            prev.is_none() || prev == Some((dev.clone(), n)),
            "seq {seq} carried two readings"
        );
        let prev = by_reading.insert((dev.clone(), n), *seq);
        assert!(
            prev.is_none() || prev == Some(*seq),
            "reading {dev}/{n} arrived under two seqs"
        );
    }
}

#[test]
fn thousand_readings_from_ten_devices_arrive_exactly_once_in_order() {
    let w = world_with_broker();
    let mut gw = Gateway::new(&w.dir("gw"), &w.spec());
    let tokens: Vec<String> = (0..10)
        .map(|i| gw.add_device(&format!("dev-{i}")))
        .collect();
    gw.start();

    let clients: Vec<_> = tokens
        .iter()
        .map(|t| curl_posts(&gw.url(t), &bodies(0, 100)))
        .collect();
    for c in clients {
        let codes = curl_codes(c);
        assert_eq!(codes.len(), 100);
        assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    }

    wait_for(
        "1000 records at the broker",
        Duration::from_secs(60),
        || w.observer().records().len() >= 1000,
    );
    wait_for("an empty outbox", Duration::from_secs(20), || {
        gw.status()["outbox"]["records"] == 0
    });
    let recs = w.observer().records();
    assert_eq!(recs.len(), 1000, "no duplicates without failures");
    let seqs: BTreeSet<u64> = recs.iter().map(|r| r.0).collect();
    assert_eq!(seqs.len(), 1000, "each seq exactly once");
    let per_dev = by_device(&recs);
    assert_eq!(per_dev.len(), 10);
    for (dev, pairs) in &per_dev {
        let ns: Vec<i64> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(ns, (0..100).collect::<Vec<_>>(), "{dev}: arrival order");
    }
    assert_order_by_seq(&recs);
    // Every batch carries the gateway and its epoch.
    let st = gw.status();
    let epoch = st["gateway"]["epoch"].as_str().unwrap().to_owned();
    for s in w.observer().seen() {
        if s.topic == "sluice/gw-test/telemetry" {
            // cloud.batch_max_bytes = "2KiB" in the test config.
            assert!(s.payload.to_string().len() <= 2048);
            assert_eq!(s.payload["gateway"], "gw-test");
            assert_eq!(s.payload["epoch"], epoch.as_str());
            assert_eq!(s.payload["v"], 1);
        }
    }
    assert_eq!(st["uplink"]["connected"], true);
    assert_eq!(st["uplink"]["records_acked"], 1000);
    assert_eq!(st["ingest"]["messages"]["http"]["ok"], 1000);
    assert_eq!(st["outbox"]["bytes"], 0);
    assert!(st["uplink"]["last_ack_age_s"].as_u64().unwrap() < 60);
    assert!(
        w.observer()
            .seen()
            .iter()
            .any(|s| s.topic == "sluice/gw-test/status" && s.payload["state"] == "online")
    );

    assert_eq!(gw.stop(), Some(0), "SIGTERM exits 0");
    wait_for("the offline status", Duration::from_secs(10), || {
        w.observer()
            .seen()
            .iter()
            .any(|s| s.topic == "sluice/gw-test/status" && s.payload["state"] == "offline")
    });
    assert!(!gw.dir.join("admin.sock").exists(), "admin socket removed");
}

#[test]
fn broker_outage_with_publishes_in_flight_loses_nothing() {
    let mut w = world_with_broker();
    let mut gw = Gateway::new(&w.dir("gw"), &w.spec());
    let tokens: Vec<String> = (0..4).map(|i| gw.add_device(&format!("dev-{i}"))).collect();
    gw.start();

    // Ingest runs while the broker goes down, so publishes are in flight.
    let first: Vec<_> = tokens
        .iter()
        .map(|t| curl_posts(&gw.url(t), &bodies(0, 150)))
        .collect();
    wait_for("some records acked", Duration::from_secs(30), || {
        gw.status()["uplink"]["records_acked"].as_u64().unwrap() > 20
    });
    w.broker.stop();
    for c in first {
        assert!(curl_codes(c).iter().all(|c| *c == 200));
    }
    wait_for("the uplink to notice", Duration::from_secs(20), || {
        gw.status()["uplink"]["connected"] == false
    });
    let during: Vec<_> = tokens
        .iter()
        .map(|t| curl_posts(&gw.url(t), &bodies(150, 300)))
        .collect();
    for c in during {
        let codes = curl_codes(c);
        assert!(
            codes.iter().all(|c| *c == 200),
            "ingest keeps answering 200: {codes:?}"
        );
    }
    let st = gw.status();
    assert!(st["outbox"]["records"].as_u64().unwrap() >= 600, "{st}");
    assert!(st["outbox"]["oldest_age_s"].is_u64());
    assert_eq!(st["outbox"]["dropped"]["full"], 0);

    w.broker.start();
    wait_for(
        "all 1200 readings at the broker",
        Duration::from_secs(90),
        || {
            let recs = w.observer().records();
            by_device(&recs)
                .values()
                .map(|v| v.iter().map(|p| p.1).collect::<BTreeSet<_>>().len())
                .sum::<usize>()
                >= 1200
        },
    );
    wait_for("an empty outbox", Duration::from_secs(30), || {
        gw.status()["outbox"]["records"] == 0
    });
    let recs = w.observer().records();
    for (dev, pairs) in by_device(&recs) {
        let ns: BTreeSet<i64> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(ns, (0..300).collect(), "{dev}: every reading arrived");
    }
    assert_duplicates_share_seq(&recs);
    assert_order_by_seq(&recs);
    drop(w.observer.take());
}

#[test]
fn publishes_lost_on_a_broken_link_are_sent_again_under_the_same_seq() {
    let w = world_with_broker();
    let link = FaultyLink::start(w.broker.port);
    let spec = GatewaySpec {
        cloud: Some((link.port, w.pki.ca.clone())),
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let tokens: Vec<String> = (0..4).map(|i| gw.add_device(&format!("dev-{i}"))).collect();
    gw.start();
    let clients: Vec<_> = tokens
        .iter()
        .map(|t| curl_posts(&gw.url(t), &bodies(0, 400)))
        .collect();
    wait_for("some records acked", Duration::from_secs(30), || {
        gw.status()["uplink"]["records_acked"].as_u64().unwrap() > 50
    });
    // Publishes sent now vanish: the broker never sees them, no PUBACK comes.
    link.blackhole();
    pause(Duration::from_millis(700));
    let acked_in_the_dark = gw.status()["uplink"]["records_acked"].as_u64().unwrap();
    link.cut_and_heal();
    for c in clients {
        assert!(curl_codes(c).iter().all(|c| *c == 200));
    }
    wait_for(
        "all 1600 readings at the broker",
        Duration::from_secs(60),
        || {
            by_device(&w.observer().records())
                .values()
                .map(|v| v.iter().map(|p| p.1).collect::<BTreeSet<_>>().len())
                .sum::<usize>()
                >= 1600
        },
    );
    wait_for("an empty outbox", Duration::from_secs(30), || {
        gw.status()["outbox"]["records"] == 0
    });
    let recs = w.observer().records();
    assert_duplicates_share_seq(&recs);
    assert_order_by_seq(&recs);
    eprintln!(
        "broken link: {} records received for 1600 readings; {acked_in_the_dark} acked before the cut",
        recs.len()
    );
}

#[test]
fn kill_9_twenty_times_loses_no_acknowledged_reading() {
    let w = world_with_broker();
    let spec = GatewaySpec {
        http_port: free_port(),
        ..w.spec()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let tokens: Vec<String> = (0..3).map(|i| gw.add_device(&format!("dev-{i}"))).collect();
    let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut rng = 0x2545_f491_u64;
    for round in 0..20i64 {
        gw.start();
        let clients: Vec<_> = tokens
            .iter()
            .map(|t| curl_posts(&gw.url(t), &bodies(round * 1000, round * 1000 + 200)))
            .collect();
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        pause(Duration::from_millis(30 + (rng >> 33) % 300));
        gw.kill9();
        for (i, c) in clients.into_iter().enumerate() {
            for (k, code) in curl_codes(c).into_iter().enumerate() {
                if code == 200 {
                    acked
                        .entry(format!("dev-{i}"))
                        .or_default()
                        .push(round * 1000 + k as i64);
                }
            }
        }
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total > 100,
        "the kills left too few acknowledged readings to mean anything: {total}"
    );

    gw.start();
    wait_for(
        "every acknowledged reading at the broker",
        Duration::from_secs(120),
        || {
            let seen = by_device(&w.observer().records());
            acked.iter().all(|(dev, ns)| {
                let got: BTreeSet<i64> = seen
                    .get(dev)
                    .map(|v| v.iter().map(|p| p.1).collect())
                    .unwrap_or_default();
                ns.iter().all(|n| got.contains(n))
            })
        },
    );
    let recs = w.observer().records();
    assert_duplicates_share_seq(&recs);
    assert_order_by_seq(&recs);
    eprintln!(
        "kill -9 x20: {total} acknowledged readings, {} records received (with duplicates)",
        recs.len()
    );
}

#[test]
fn bad_requests_get_clear_errors_and_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    gw.start();
    let url = gw.url(&token);

    let (code, text) = curl(&["-d", "{\"t\":1}", &gw.url("wrong-token")]);
    assert_eq!(code, 401, "{text}");
    // The token is checked before the body.
    let (code, _) = curl(&["-d", "{not json", &gw.url("wrong-token")]);
    assert_eq!(code, 401);

    for (body, why) in [
        ("{\"t\":", "not valid JSON"),
        ("{\"t\":null}", "null is not a value"),
        (
            "{\"ts\":\"yesterday\",\"values\":{\"t\":1}}",
            "must be an integer (unix milliseconds)",
        ),
        ("[1,2]", "expected a JSON object"),
    ] {
        let (code, text) = curl(&["-d", body, &url]);
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }

    let big = tmp.path().join("big.json");
    std::fs::write(&big, format!("{{\"s\":\"{}\"}}", "x".repeat(70_000))).unwrap();
    let big_arg = format!("@{}", big.display());
    let (code, _) = curl(&["--data-binary", &big_arg, &url]);
    assert_eq!(code, 413, "declared length over the limit");
    let (code, _) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &big_arg,
        &url,
    ]);
    assert_eq!(code, 413, "chunked body over the limit");

    let (code, _) = curl(&["-d", "{\"t\":21.5}", &url]);
    assert_eq!(code, 200, "the daemon is unaffected");

    let st = gw.status();
    let http = &st["ingest"]["messages"]["http"];
    assert_eq!(http["unauthorized"], 2);
    assert_eq!(http["bad_payload"], 4);
    assert_eq!(http["too_large"], 2);
    assert_eq!(http["ok"], 1);
    assert_eq!(st["ingest"]["auth_failures"]["http"], 2);
    assert_eq!(st["outbox"]["records"], 1, "bad input stored nothing");
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn senml_posts_are_stored_with_resolved_names_and_times_and_bad_packs_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    gw.start();
    let url = gw.url(&token);
    let post = |content_type: &str, body: &str| {
        let header = format!("Content-Type: {content_type}");
        curl(&["-H", &header, "--data-binary", body, &url])
    };

    // Base name and base time carry forward; one record per resolved time.
    let (code, text) = post(
        "application/senml+json",
        r#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"n":"temp","u":"Cel","v":23.5},
            {"n":"open","vb":false},
            {"n":"temp","t":60,"v":24}]"#,
    );
    assert_eq!(code, 200, "{text}");
    // A time below 2^28 s is relative to now.
    let before_ms = now_ms();
    let (code, text) = post(
        "application/senml+json; charset=utf-8",
        r#"[{"n":"rel","t":-5,"v":1}]"#,
    );
    let after_ms = now_ms();
    assert_eq!(code, 200, "{text}");

    let recs = peek_all(&gw);
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(recs.iter().all(|r| r["device"] == "dev-1"));
    assert_eq!(recs[0]["ts"], 1_320_067_464_000_i64);
    assert_eq!(recs[0]["ts_trusted"], true);
    assert_eq!(
        recs[0]["values"],
        serde_json::json!({
            "urn:dev:ow:10e2073a01080063:temp": 23.5,
            "urn:dev:ow:10e2073a01080063:open": false,
        })
    );
    assert_eq!(recs[1]["ts"], 1_320_067_524_000_i64);
    assert_eq!(
        recs[1]["values"],
        serde_json::json!({ "urn:dev:ow:10e2073a01080063:temp": 24 })
    );
    let rel = recs[2]["ts"].as_i64().unwrap();
    assert!(
        (before_ms - 5_000 - 2_000..=after_ms - 5_000 + 2_000).contains(&rel),
        "relative ts {rel} not about 5 s before {before_ms}..{after_ms}"
    );
    assert_eq!(recs[2]["values"], serde_json::json!({ "rel": 1 }));

    for (body, why) in [
        (
            r#"[{"n":"a","v":1},{"n":"a b","v":2}]"#,
            r#"entry 1: name \"a b\" has characters SenML forbids"#,
        ),
        (
            r#"[{"n":"a","v":1,"vs":"x"}]"#,
            "entry 0: more than one value field",
        ),
        (r#"[{"n":"a"}]"#, "entry 0: no value and no sum"),
        (r#"[{"bver":11,"n":"a","v":1}]"#, "not supported (only 10)"),
        (r#"{"n":"a","v":1}"#, "SenML must be a JSON array"),
    ] {
        let (code, text) = post("application/senml+json", body);
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
    // Any other content type is ThingsBoard JSON, as ThingsBoard does
    // (DESIGN.md "Body formats"): nothing answers 415.
    let (code, text) = post("text/plain", r#"{"plain":1}"#);
    assert_eq!(code, 200, "{text}");

    let st = gw.status();
    let http = &st["ingest"]["messages"]["http"];
    assert_eq!(http["ok"], 3);
    assert_eq!(http["bad_payload"], 5);
    assert_eq!(st["outbox"]["records"], 4, "bad packs stored nothing");
    assert_eq!(gw.stop(), Some(0));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn revoked_tokens_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    gw.start();
    // Registered while the daemon runs: usable at once.
    let token = gw.add_device("dev-1");
    assert_eq!(curl(&["-d", "{\"a\":1}", &gw.url(&token)]).0, 200);
    let out = gw.cli(&["devices", "revoke", "dev-1"]);
    assert!(out.status.success());
    assert_eq!(curl(&["-d", "{\"a\":1}", &gw.url(&token)]).0, 401);
    let out = gw.cli(&["devices", "rotate-token", "dev-1"]);
    let fresh = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(curl(&["-d", "{\"a\":1}", &gw.url(&fresh)]).0, 200);
    let list: Json = gw.cli_json(&["devices", "list", "--json"]);
    assert_eq!(list[0]["name"], "dev-1");
    assert_eq!(list[0]["revoked"], false);
}

/// A broker that is down again, with the observer's persistent subscription
/// already registered: whatever the gateway publishes once the broker is back
/// is queued for the observer, whichever of the two reconnects first.
fn broker_down_with_observer(dir: &std::path::Path, pki: &Pki, id: &str) -> (Broker, Observer) {
    let mut broker = Broker::new(dir, pki, free_port());
    broker.start();
    let obs = Observer::start(&broker, pki, id);
    broker.stop();
    (broker, obs)
}

#[test]
fn outbox_bound_drop_oldest_keeps_the_newest_and_counts_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let (mut broker, obs) = broker_down_with_observer(tmp.path(), &pki, "obs-drop");
    let spec = GatewaySpec {
        max_bytes: "4KiB".into(),
        cloud: Some((broker.port, pki.ca.clone())),
        ..GatewaySpec::default()
    };
    let gw_dir = tmp.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let mut gw = Gateway::new(&gw_dir, &spec);
    let token = gw.add_device("dev-1");
    gw.start();
    let codes = curl_codes(curl_posts(&gw.url(&token), &bodies(0, 300)));
    assert!(codes.iter().all(|c| *c == 200), "drop_oldest never refuses");

    let st = gw.status();
    let kept = st["outbox"]["records"].as_u64().unwrap();
    let dropped = st["outbox"]["dropped"]["full"].as_u64().unwrap();
    assert!(st["outbox"]["bytes"].as_u64().unwrap() <= 4096, "{st}");
    assert!(dropped > 0 && kept > 0);
    assert_eq!(kept + dropped, 300, "{st}");
    assert_eq!(st["uplink"]["connected"], false);
    let q = gw.cli_json(&["queue", "stats", "--json"]);
    assert_eq!(q["records"], kept);
    assert_eq!(q["dropped"]["full"], dropped);

    // The broker comes up: exactly the newest `kept` readings arrive.
    broker.start();
    wait_for(
        "the kept records at the broker",
        Duration::from_secs(60),
        || obs.records().len() as u64 >= kept,
    );
    let ns: BTreeSet<i64> = obs
        .records()
        .iter()
        .map(|r| r.2["values"]["n"].as_i64().unwrap())
        .collect();
    let newest: BTreeSet<i64> = (300 - kept as i64..300).collect();
    assert_eq!(ns, newest, "oldest evicted first");
}

#[test]
fn outbox_bound_reject_answers_503_with_retry_after_and_keeps_what_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        max_bytes: "4KiB".into(),
        when_full: "reject",
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(tmp.path(), &spec);
    let token = gw.add_device("dev-1");
    gw.start();
    let codes = curl_codes(curl_posts(&gw.url(&token), &bodies(0, 200)));
    let ok = codes.iter().filter(|c| **c == 200).count() as u64;
    let refused = codes.iter().filter(|c| **c == 503).count() as u64;
    assert_eq!(ok + refused, 200, "{codes:?}");
    assert!(ok > 0 && refused > 0);
    // Once full, everything after is refused (nothing is evicted).
    let first_503 = codes.iter().position(|c| *c == 503).unwrap();
    assert!(codes[first_503..].iter().all(|c| *c == 503));

    let (code, text) = curl(&["-d", "{\"n\":1}", &gw.url(&token)]);
    assert_eq!(code, 503);
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 5"),
        "{text}"
    );

    let st = gw.status();
    assert_eq!(st["outbox"]["records"], ok);
    assert_eq!(st["outbox"]["dropped"]["rejected"], refused + 1);
    assert_eq!(st["outbox"]["dropped"]["full"], 0);
    assert_eq!(st["ingest"]["messages"]["http"]["rejected"], refused + 1);
    assert_eq!(gw.stop(), Some(0));

    // Nothing corrupts: SQLite agrees, and the CLI reads the same figures stopped.
    let db = rusqlite::Connection::open(tmp.path().join("state/outbox.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let rows: i64 = db
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows as u64, ok);
    let q = gw.cli_json(&["queue", "stats", "--json"]);
    assert_eq!(q["records"], ok);
}

#[test]
fn config_errors_exit_2_naming_the_key_and_layers_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let base = std::fs::read_to_string(&gw.config).unwrap();

    let typo = base.replace("max_bytes", "max_byte");
    std::fs::write(&gw.config, &typo).unwrap();
    for cmd in [&["check-config"][..], &["run"][..]] {
        let out = gw.cli(cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("max_byte"));
    }

    let bad = base.replace("max_bytes = \"64MiB\"", "max_bytes = \"12XB\"");
    std::fs::write(&gw.config, &bad).unwrap();
    let out = gw.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outbox.max_bytes: \"12XB\" is not a size"),
        "{err}"
    );

    std::fs::write(&gw.config, &base).unwrap();
    std::fs::create_dir_all(tmp.path().join("conf.d")).unwrap();
    std::fs::write(
        tmp.path().join("conf.d/10-age.toml"),
        "[outbox]\nmax_age = \"2d\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(SLUICE)
        .arg("check-config")
        .env("SLUICE_CONFIG", &gw.config)
        .env("SLUICE__OUTBOX__MAX_BYTES", "1GiB")
        .env("SLUICE__OUTBOX__WHEN_FULL", "reject")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("max_bytes = \"1GiB\""),
        "env overrides the file: {text}"
    );
    assert!(text.contains("when_full = \"reject\""), "{text}");
    assert!(
        text.contains("max_age = \"2d\""),
        "conf.d overrides the file: {text}"
    );
}

#[test]
fn every_example_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let out = std::process::Command::new(SLUICE)
                .arg("--config")
                .arg(&p)
                .arg("check-config")
                // The reference config leaves gateway.id to /etc/machine-id,
                // which containers may lack.
                .env("SLUICE__GATEWAY__ID", "gw-ci")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 2, "configs/ holds the examples");
}

#[test]
fn a_second_daemon_on_the_same_admin_socket_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    gw.start();
    let out = gw.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another sluice daemon is running"));
    // And a stale socket left by kill -9 does not stop a restart.
    gw.kill9();
    assert!(tmp.path().join("admin.sock").exists());
    gw.start();
    assert!(gw.status()["uptime_s"].is_u64());
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut gw = Gateway::new(&tmp.path().join("gw"), &GatewaySpec::default());
    gw.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "200000".into()),
    ];
    gw.start();
    let mut heard = Vec::new();
    let mut buf = [0u8; 512];
    while !heard.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(heard[0].contains("READY=1"), "{heard:?}");
    assert_eq!(gw.stop(), Some(0));
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 within 10 s");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

#[test]
fn mutual_tls_with_a_client_certificate_reaches_the_broker() {
    let w = world_with_broker();
    let spec = GatewaySpec {
        cloud: Some((w.broker.mtls_port, w.pki.ca.clone())),
        client_cert: Some(w.pki.client_cert("gw-cert")),
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let token = gw.add_device("dev-1");
    gw.start();
    let codes = curl_codes(curl_posts(&gw.url(&token), &bodies(0, 20)));
    assert!(codes.iter().all(|c| *c == 200));
    wait_for("20 records via mutual TLS", Duration::from_secs(30), || {
        w.observer().records().len() >= 20
    });
    assert_eq!(gw.status()["uplink"]["connected"], true);
}

#[test]
fn a_broker_certificate_from_another_ca_is_refused_and_readings_wait() {
    let w = world_with_broker();
    let stranger = Pki::generate(&w.dir("other-ca"));
    let spec = GatewaySpec {
        cloud: Some((w.broker.port, stranger.ca.clone())),
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let token = gw.add_device("dev-1");
    gw.start();
    let codes = curl_codes(curl_posts(&gw.url(&token), &bodies(0, 10)));
    assert!(codes.iter().all(|c| *c == 200));
    wait_for(
        "the uplink to report its TLS failure",
        Duration::from_secs(20),
        || gw.status()["uplink"]["error"].is_string(),
    );
    let st = gw.status();
    assert_eq!(st["uplink"]["connected"], false);
    let err = st["uplink"]["error"].as_str().unwrap().to_ascii_lowercase();
    assert!(err.contains("certificate") || err.contains("tls"), "{err}");
    assert_eq!(st["outbox"]["records"], 10);
    assert!(w.observer().records().is_empty());
}

#[test]
fn queue_peek_purge_and_check_work_with_the_daemon_running_or_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    gw.start();
    assert!(
        curl_codes(curl_posts(&gw.url(&token), &bodies(0, 5)))
            .iter()
            .all(|c| *c == 200)
    );

    let peek: Json = gw.cli_json(&["queue", "peek", "-n", "2", "--json"]);
    assert_eq!(peek.as_array().unwrap().len(), 2);
    assert_eq!(peek[0]["device"], "dev-1");
    assert_eq!(peek[0]["stream"], "telemetry");
    assert_eq!(
        (
            peek[0]["values"]["n"].as_i64(),
            peek[1]["values"]["n"].as_i64()
        ),
        (Some(0), Some(1))
    );
    assert!(peek[0]["seq"].as_u64() < peek[1]["seq"].as_u64());

    let out = gw.cli(&["queue", "check"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let out = gw.cli(&["queue", "purge", "--older-than", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "purged 0 records"
    );
    pause(Duration::from_millis(1100));
    let out = gw.cli(&[
        "queue",
        "purge",
        "--older-than",
        "1s",
        "--stream",
        "telemetry",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "purged 5 records",
        "through the daemon"
    );
    let st = gw.status();
    assert_eq!(st["outbox"]["records"], 0);
    assert_eq!(st["outbox"]["dropped"]["purged"], 5);
    assert_eq!(st["outbox"]["streams"]["telemetry"]["dropped"]["purged"], 5);

    assert!(
        curl_codes(curl_posts(&gw.url(&token), &bodies(5, 8)))
            .iter()
            .all(|c| *c == 200)
    );
    assert_eq!(gw.stop(), Some(0));
    pause(Duration::from_millis(20));
    let out = gw.cli(&["queue", "purge", "--older-than", "0s"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "purged 3 records",
        "daemon stopped"
    );
    let q = gw.cli_json(&["queue", "stats", "--json"]);
    assert_eq!(
        (q["records"].as_u64(), q["dropped"]["purged"].as_u64()),
        (Some(0), Some(8))
    );
    assert!(gw.cli(&["queue", "check"]).status.success());

    let out = gw.cli(&["queue", "peek", "--stream", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown outbox stream"));
    let out = gw.cli(&["queue", "purge", "--older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_corrupt_outbox_is_set_aside_and_the_daemon_starts_anyway() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    std::fs::create_dir_all(tmp.path().join("state")).unwrap();
    std::fs::write(
        tmp.path().join("state/outbox.db"),
        b"this is not a database, it is a very bad day".repeat(200),
    )
    .unwrap();
    gw.start();
    assert_eq!(curl(&["-d", "{\"n\":1}", &gw.url(&token)]).0, 200);
    let st = gw.status();
    assert_eq!(st["outbox"]["corrupt_set_aside"], 1);
    assert_eq!(st["outbox"]["records"], 1);
    let moved = std::fs::read_dir(tmp.path().join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .count();
    assert_eq!(moved, 1);
}

#[test]
fn metrics_healthz_and_readyz_are_served_with_every_documented_series() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str("\n[metrics]\nbind = \"127.0.0.1:0\"\n");
    std::fs::write(&gw.config, text).unwrap();
    let mut gw = gw;
    let token = gw.add_device("dev-1");
    gw.start();
    let addr = gw.status()["listeners"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(curl(&[&format!("http://{addr}/healthz")]).0, 200);
    assert_eq!(curl(&[&format!("http://{addr}/readyz")]).0, 200);
    let (code, before) = curl(&[&format!("http://{addr}/metrics")]);
    assert_eq!(code, 200);
    for series in [
        "sluice_ingest_messages_total{protocol=\"coap\",result=\"too_large\"} 0",
        "sluice_ingest_commit_seconds_count 0",
        "sluice_outbox_records{stream=\"telemetry\"} 0",
        "sluice_outbox_bytes{stream=\"alarms\"} 0",
        "sluice_outbox_oldest_age_seconds{stream=\"telemetry\"} 0",
        "sluice_outbox_dropped_total{reason=\"expired\",stream=\"telemetry\"} 0",
        "sluice_uplink_connected 0",
        "sluice_uplink_records_acked_total 0",
        "sluice_devices_connected{protocol=\"mqtt\"} 0",
        "sluice_auth_failures_total{protocol=\"http\"} 0",
        "sluice_firmware_bytes_served_total 0",
        "sluice_commands_total{outcome=\"failed\"} 0",
        "sluice_coap_messages_total{kind=\"duplicates\"} 0",
        "sluice_outbox_commit_seconds_bucket{le=\"+Inf\"}",
        "sluice_outbox_commit_batch_records_count",
    ] {
        assert!(before.contains(series), "missing {series}");
    }
    assert_eq!(curl(&["-d", "{\"n\":1}", &gw.url(&token)]).0, 200);
    assert_eq!(curl(&["-d", "{\"n\":1}", &gw.url("bad")]).0, 401);
    let (_, after) = curl(&[&format!("http://{addr}/metrics")]);
    for series in [
        "sluice_ingest_messages_total{protocol=\"http\",result=\"ok\"} 1",
        "sluice_ingest_messages_total{protocol=\"http\",result=\"unauthorized\"} 1",
        "sluice_ingest_commit_seconds_count 1",
        "sluice_outbox_records{stream=\"telemetry\"} 1",
        "sluice_auth_failures_total{protocol=\"http\"} 1",
    ] {
        assert!(after.contains(series), "missing {series}");
    }
}

#[test]
fn sluice_bench_loads_a_running_gateway_and_reports_what_it_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    gw.start();
    let url = format!("http://{}", gw.http.as_ref().unwrap());
    let report = gw.cli_json(&[
        "bench",
        "--protocol",
        "http",
        "--devices",
        "5",
        "--messages",
        "2000",
        "--concurrency",
        "8",
        "--url",
        &url,
        "--json",
    ]);
    assert_eq!(report["ok"], 2000, "{report}");
    assert!(report["msgs_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    let st = gw.status();
    assert_eq!(
        st["outbox"]["records"], 2000,
        "every acknowledged bench message is stored"
    );
    assert_eq!(st["devices"]["registered"], 5);
    let out = gw.cli(&["bench", "--protocol", "mqtt", "--url", &url]);
    assert_eq!(out.status.code(), Some(2));
}

/// A backlog of `old` builds while the broker is down; once the link is up,
/// `new` (caught up) sends 20 readings while the backlog drains slowly
/// (rate-capped). Returns the arrival order as (device, n).
fn backlog_then_live(drain: &str) -> Vec<(String, i64)> {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let (mut broker, obs) = broker_down_with_observer(tmp.path(), &pki, &format!("obs-{drain}"));
    let spec = GatewaySpec {
        cloud: Some((broker.port, pki.ca.clone())),
        cloud_extra: format!(
            "drain = \"{drain}\"\nbackfill_share = 0.25\nmax_bytes_per_sec = \"4KiB\"\n"
        ),
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(&tmp.path().join("gw"), &spec);
    let old = gw.add_device("old");
    let new = gw.add_device("new");
    gw.start();
    assert!(
        curl_codes(curl_posts(&gw.url(&old), &bodies(0, 200)))
            .iter()
            .all(|c| *c == 200)
    );
    broker.start();
    wait_for("the uplink to connect", Duration::from_secs(20), || {
        gw.status()["uplink"]["connected"] == true
    });
    assert!(
        curl_codes(curl_posts(&gw.url(&new), &bodies(0, 20)))
            .iter()
            .all(|c| *c == 200)
    );
    wait_for("all 220 readings", Duration::from_secs(60), || {
        obs.records().len() >= 220
    });
    let recs = obs.records();
    assert_order_by_seq(&recs);
    recs.iter()
        .map(|(_, dev, r)| (dev.clone(), r["values"]["n"].as_i64().unwrap()))
        .collect()
}

fn last_index(order: &[(String, i64)], dev: &str) -> usize {
    order.iter().rposition(|(d, _)| d == dev).unwrap()
}

#[test]
fn live_first_sends_caught_up_devices_ahead_of_the_backlog_and_fifo_does_not() {
    for (drain, live_ahead) in [("live_first", true), ("fifo", false)] {
        let order = backlog_then_live(drain);
        for dev in ["old", "new"] {
            let ns: Vec<i64> = order
                .iter()
                .filter(|(d, _)| d == dev)
                .map(|(_, n)| *n)
                .collect();
            let expect: Vec<i64> = (0..if dev == "old" { 200 } else { 20 }).collect();
            assert_eq!(
                ns, expect,
                "{drain}: {dev}'s readings arrive once and in order"
            );
        }
        let (new_done, old_done) = (last_index(&order, "new"), last_index(&order, "old"));
        assert_eq!(
            new_done < old_done,
            live_ahead,
            "{drain}: new finished at {new_done}, old at {old_done}"
        );
    }
}

fn mqtt_spec() -> GatewaySpec {
    GatewaySpec {
        mqtt: true,
        ..GatewaySpec::default()
    }
}

fn peek_all(gw: &Gateway) -> Vec<Json> {
    let out = gw.cli(&["queue", "peek", "-n", "10000", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice::<Json>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn mqtt_311_and_5_publishes_at_qos1_are_stored_and_wrong_tokens_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &mqtt_spec());
    let token = gw.add_device("dev-1");
    gw.start();
    let telemetry = "v1/devices/me/telemetry";
    for (version, n) in [("mqttv311", 0), ("mqttv5", 1)] {
        let body = format!("{{\"n\":{n}}}");
        let out = mosquitto_pub(
            &gw,
            &[
                "-V", version, "-q", "1", "-u", &token, "-t", telemetry, "-m", &body,
            ],
            "",
        );
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // mosquitto_pub exits after its PUBACK, so the records are committed.
    let ns: Vec<i64> = peek_all(&gw)
        .iter()
        .map(|r| {
            assert_eq!(r["device"], "dev-1");
            r["values"]["n"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(ns, vec![0, 1]);

    for version in ["mqttv311", "mqttv5"] {
        let out = mosquitto_pub(
            &gw,
            &[
                "-V",
                version,
                "-q",
                "1",
                "-u",
                "wrong-token",
                "-t",
                telemetry,
                "-m",
                "{\"n\":9}",
            ],
            "",
        );
        assert!(!out.status.success(), "{version}: a wrong token is refused");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("bad user name or password"),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st = gw.status();
    assert_eq!(st["ingest"]["auth_failures"]["mqtt"], 2);
    assert_eq!(st["ingest"]["messages"]["mqtt"]["ok"], 2);
    assert_eq!(st["outbox"]["records"], 2);
    assert_eq!(gw.stop(), Some(0), "SIGTERM stops the MQTT listener too");
}

/// A CONNECT (MQTT 3.1.1, clean session) with `token` as the username and
/// a keep-alive of `keep_alive_s`.
fn raw_connect(token: &str, keep_alive_s: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, keep_alive_s];
    for field in [&b"raw"[..], token.as_bytes()] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// A PUBLISH whose first byte is `first` (0x30 = QoS 0) with a raw topic.
fn raw_publish(first: u8, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if first & 0b0110 != 0 {
        body.extend_from_slice(&[0, 1]);
    }
    body.extend_from_slice(payload);
    let mut frame = vec![first, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// Opens a raw TCP connection to the MQTT listener; with `token`, connects
/// and checks the CONNACK accepts it.
fn raw_mqtt(gw: &Gateway, token: Option<&str>) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw.mqtt.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if let Some(token) = token {
        s.write_all(&raw_connect(token, 60)).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    }
    s
}

/// Whether the server closes `s` (EOF or reset) within its read timeout,
/// whatever it sent before.
fn closed_by_server(mut s: std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn protocol_errors(metrics_addr: &str) -> BTreeMap<String, u64> {
    let (code, text) = curl(&[&format!("http://{metrics_addr}/metrics")]);
    assert_eq!(code, 200);
    text.lines()
        .filter_map(|l| l.strip_prefix("sluice_mqtt_protocol_errors_total{reason=\""))
        .map(|l| {
            let (reason, n) = l.split_once("\"} ").unwrap();
            (reason.to_owned(), n.parse().unwrap())
        })
        .collect()
}

#[test]
fn mqtt_malformed_oversized_and_out_of_order_packets_close_the_connection_and_are_counted() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &mqtt_spec());
    let text = std::fs::read_to_string(&gw.config).unwrap().replace(
        "[listeners.mqtt]\nbind = \"127.0.0.1:0\"\n",
        "[listeners.mqtt]\nbind = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\n",
    ) + "\n[metrics]\nbind = \"127.0.0.1:0\"\n";
    std::fs::write(&gw.config, text).unwrap();
    let mut gw = gw;
    let token = gw.add_device("dev-1");
    gw.start();
    let metrics = gw.status()["listeners"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let reasons = [
        "malformed",
        "too_large",
        "not_connect_first",
        "protocol_violation",
        "connect_timeout",
        "keepalive_timeout",
    ];
    let before = protocol_errors(&metrics);
    for r in reasons {
        assert_eq!(
            before.get(r),
            Some(&0),
            "{r} is exported at 0 from start-up"
        );
    }
    let telemetry = b"v1/devices/me/telemetry";
    let mut expected: BTreeMap<String, u64> = reasons.iter().map(|r| (r.to_string(), 0)).collect();
    let cases: [(&str, Option<&str>, Vec<u8>, &str); 7] = [
        (
            "CONNECT twice",
            Some(token.as_str()),
            raw_connect(&token, 60),
            "protocol_violation",
        ),
        (
            "PUBLISH before CONNECT",
            None,
            raw_publish(0x30, telemetry, b"{}"),
            "not_connect_first",
        ),
        (
            "non-UTF-8 topic",
            Some(token.as_str()),
            raw_publish(0x30, b"v1/devices/\xff\xfe/telemetry", b"{}"),
            "malformed",
        ),
        (
            "length overflow",
            None,
            vec![0x30, 0xff, 0xff, 0xff, 0xff],
            "malformed",
        ),
        (
            "QoS bits 11",
            Some(token.as_str()),
            raw_publish(0x36, telemetry, b"{}"),
            "malformed",
        ),
        (
            "over max_packet_size",
            Some(token.as_str()),
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            "too_large",
        ),
        (
            "silence before CONNECT",
            None,
            Vec::new(),
            "connect_timeout",
        ),
    ];
    for (what, login, bytes, reason) in cases {
        let mut s = raw_mqtt(&gw, login);
        s.write_all(&bytes).unwrap();
        assert!(
            closed_by_server(s),
            "{what}: the gateway closes the connection"
        );
        *expected.get_mut(reason).unwrap() += 1;
        assert_eq!(protocol_errors(&metrics), expected, "after {what}");
    }
    // Keep-alive 1 s: silence past 1.5 s closes the session.
    let mut s = raw_mqtt(&gw, None);
    s.write_all(&raw_connect(&token, 1)).unwrap();
    assert!(
        closed_by_server(s),
        "keep-alive timeout closes the connection"
    );
    *expected.get_mut("keepalive_timeout").unwrap() += 1;
    assert_eq!(
        protocol_errors(&metrics),
        expected,
        "after the keep-alive timeout"
    );

    let out = mosquitto_pub(
        &gw,
        &[
            "-q",
            "1",
            "-u",
            &token,
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            "{\"n\":1}",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "the gateway still serves: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = gw.status();
    assert_eq!(st["ingest"]["messages"]["mqtt"]["ok"], 1);
    for (reason, n) in &expected {
        assert_eq!(
            st["ingest"]["mqtt_protocol_errors"][reason], *n,
            "status {reason}"
        );
    }
    assert_eq!(
        st["outbox"]["records"], 1,
        "nothing from the bad connections was stored"
    );
}

#[test]
fn mqtt_five_hundred_lines_at_qos1_are_all_stored_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &mqtt_spec());
    let token = gw.add_device("dev-1");
    gw.start();
    let lines: String = (0..500).map(|n| format!("{{\"n\":{n}}}\n")).collect();
    let started = std::time::Instant::now();
    let out = mosquitto_pub(
        &gw,
        &[
            "-q",
            "1",
            "-u",
            &token,
            "-t",
            "v1/devices/me/telemetry",
            "-l",
        ],
        &lines,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "mosquitto_pub -l, 500 lines, QoS 1: {:?} (not a benchmark)",
        started.elapsed()
    );
    let ns: Vec<i64> = peek_all(&gw)
        .iter()
        .map(|r| r["values"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..500).collect::<Vec<_>>());
    assert_eq!(gw.status()["ingest"]["messages"]["mqtt"]["ok"], 500);
}

#[test]
fn mqtt_readings_reach_the_cloud() {
    let w = world_with_broker();
    let spec = GatewaySpec {
        mqtt: true,
        ..w.spec()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let token = gw.add_device("dev-m");
    gw.start();
    for (version, n) in [("mqttv311", 0), ("mqttv5", 1)] {
        let body = format!("{{\"n\":{n}}}");
        let out = mosquitto_pub(
            &gw,
            &[
                "-V",
                version,
                "-q",
                "1",
                "-u",
                &token,
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                &body,
            ],
            "",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for(
        "2 MQTT readings at the broker",
        Duration::from_secs(30),
        || w.observer().records().len() >= 2,
    );
    let got: Vec<(String, i64)> = w
        .observer()
        .records()
        .iter()
        .map(|r| (r.1.clone(), r.2["values"]["n"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, vec![("dev-m".into(), 0), ("dev-m".into(), 1)]);
}

/// The ThingsBoard SDK's session set-up, done with paho-mqtt (MQTT 5, empty
/// client id, the SDK's four subscriptions, then `getSessionLimits`).
const PAHO_SESSION_LIMITS: &str = r#"
import json, sys, threading
import paho.mqtt.client as mqtt
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
got, connected = {}, threading.Event()
done = threading.Event()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
c.username_pw_set(token)
def on_connect(cl, u, flags, rc, props):
    got["rc"] = int(rc.value if hasattr(rc, "value") else rc)
    got["assigned"] = getattr(props, "AssignedClientIdentifier", None)
    got["receive_max"] = getattr(props, "ReceiveMaximum", None)
    got["max_packet"] = getattr(props, "MaximumPacketSize", None)
    connected.set()
def on_message(cl, u, msg):
    got.setdefault("messages", []).append([msg.topic, json.loads(msg.payload)])
    if len(got["messages"]) == 2:
        done.set()
c.on_connect, c.on_message = on_connect, on_message
c.connect(host, port, keepalive=120)
c.loop_start()
assert connected.wait(10), "no CONNACK"
for t in ["v1/devices/me/attributes", "v1/devices/me/attributes/response/+",
          "v1/devices/me/rpc/request/+", "v1/devices/me/rpc/response/+"]:
    c.subscribe(t, qos=1)
c.publish("v1/devices/me/rpc/request/1", json.dumps({"method": "getSessionLimits", "params": {"timeout": 5000}}), qos=1)
c.publish("v1/devices/me/rpc/request/2", json.dumps({"method": "getCurrentTime", "params": {}}), qos=1)
done.wait(10)
c.loop_stop()
c.disconnect()
print(json.dumps(got))
"#;

#[test]
fn mqtt_get_session_limits_is_answered_to_the_requesting_paho_session() {
    if !has_python_module("paho.mqtt.client") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &mqtt_spec());
    let token = gw.add_device("dev-1");
    gw.start();
    let addr = gw.mqtt.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = tmp.path().join("paho_limits.py");
    std::fs::write(&script, PAHO_SESSION_LIMITS).unwrap();
    let out = std::process::Command::new("timeout")
        .args(["30", "python3"])
        .arg(&script)
        .args([host, port, &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["rc"], 0);
    assert_eq!(got["assigned"], "sluice-dev-1");
    assert_eq!(got["receive_max"], 100);
    assert_eq!(got["max_packet"], 256 * 1024);
    let messages = got["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{got}");
    assert_eq!(messages[0][0], "v1/devices/me/rpc/response/1");
    assert_eq!(
        messages[0][1],
        serde_json::json!({"maxPayloadSize": 262144, "maxInflightMessages": 100,
            "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}})
    );
    assert_eq!(messages[1][0], "v1/devices/me/rpc/response/2");
    assert!(messages[1][1]["currentTime"].as_i64().unwrap() > 1_700_000_000_000);
    // The device never got its own requests back.
    assert!(
        messages
            .iter()
            .all(|m| !m[0].as_str().unwrap().contains("request"))
    );
}

#[test]
fn sluice_bench_over_mqtt_stores_every_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &mqtt_spec());
    gw.start();
    let url = format!("mqtt://{}", gw.mqtt.as_ref().unwrap());
    let report = gw.cli_json(&[
        "bench",
        "--protocol",
        "mqtt",
        "--qos",
        "1",
        "--devices",
        "5",
        "--messages",
        "2000",
        "--url",
        &url,
        "--json",
    ]);
    assert_eq!(report["ok"], 2000, "{report}");
    assert_eq!(report["concurrency"], 5, "one connection per device");
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    let st = gw.status();
    assert_eq!(
        st["outbox"]["records"], 2000,
        "every PUBACKed message is stored"
    );
    assert_eq!(st["ingest"]["messages"]["mqtt"]["ok"], 2000);
}

/// A gateway with `[listeners.mqtt]` and `[listeners.mqtts]` (the PKI's
/// server certificate); `mtls` makes the PKI's CA the client CA.
fn mqtts_gateway(dir: &std::path::Path, pki: &Pki, mtls: bool) -> Gateway {
    let gw = Gateway::new(dir, &mqtt_spec());
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str(&format!(
        "\n[listeners.mqtts]\nbind = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.cert.display(),
        pki.key.display()
    ));
    if mtls {
        text.push_str(&format!("client_ca_file = \"{}\"\n", pki.ca.display()));
    }
    std::fs::write(&gw.config, text).unwrap();
    gw
}

/// An MQTT client command aimed at the gateway's TLS listener, trusting the
/// PKI's CA.
fn mqtts_client(gw: &Gateway, pki: &Pki, program: &str) -> std::process::Command {
    let st = gw.status();
    let addr = st["listeners"]["mqtts"].as_str().expect("mqtts is on");
    let (_, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = std::process::Command::new(program);
    cmd.args(["-h", "localhost", "-p", port, "--cafile"])
        .arg(&pki.ca);
    cmd
}

/// What `openssl x509 -fingerprint -sha256` prints after the `=`.
fn openssl_sha256(cert: &std::path::Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    line.trim().rsplit_once('=').unwrap().1.to_owned()
}

fn cli_ok(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn mqtts_with_a_server_certificate_takes_token_publishes_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let mut gw = mqtts_gateway(&tmp.path().join("gw"), &pki, false);
    let token = gw.add_device("dev-tls");
    gw.start();
    for (version, n) in [("mqttv311", 0), ("mqttv5", 1)] {
        let out = mqtts_client(&gw, &pki, "mosquitto_pub")
            .args(["-V", version, "-q", "1", "-u", &token])
            .args([
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                &format!("{{\"n\":{n}}}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = mqtts_client(&gw, &pki, "mosquitto_pub")
        .args([
            "-q",
            "1",
            "-u",
            "wrong-token",
            "-t",
            "v1/devices/me/telemetry",
        ])
        .args(["-m", "{\"n\":9}"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a wrong token is refused over TLS too"
    );
    let got: Vec<(String, i64)> = peek_all(&gw)
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["values"]["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("dev-tls".into(), 0), ("dev-tls".into(), 1)]);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn mtls_a_registered_client_certificate_publishes_without_a_username_and_an_unknown_one_is_refused()
{
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let mut gw = mqtts_gateway(&tmp.path().join("gw"), &pki, true);
    let (cert, key) = pki.client_cert("cam-1");
    let fingerprint = openssl_sha256(&cert);
    let token = cli_ok(
        &gw,
        &["devices", "add", "cam-1", "--cert-sha256", &fingerprint],
    );
    assert_eq!(token.trim().len(), 20, "a token is still generated");
    let shown = cli_ok(&gw, &["devices", "show", "cam-1"]);
    assert!(
        shown.contains(&fingerprint.replace(':', "").to_lowercase()),
        "{shown}"
    );
    let plain = gw.add_device("plain");
    gw.start();

    let out = mqtts_client(&gw, &pki, "mosquitto_pub")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-V", "mqttv5", "-q", "1", "-t", "v1/devices/me/telemetry"])
        .args(["-m", "{\"by\":\"cert\"}"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Client certificates are optional: a token device connects without one.
    let out = mqtts_client(&gw, &pki, "mosquitto_pub")
        .args(["-q", "1", "-u", &plain, "-t", "v1/devices/me/telemetry"])
        .args(["-m", "{\"by\":\"token\"}"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (stranger, stranger_key) = pki.client_cert("stranger");
    for version in ["mqttv311", "mqttv5"] {
        let out = mqtts_client(&gw, &pki, "mosquitto_pub")
            .arg("--cert")
            .arg(&stranger)
            .arg("--key")
            .arg(&stranger_key)
            .args(["-V", version, "-q", "1", "-t", "v1/devices/me/telemetry"])
            .args(["-m", "{\"by\":\"stranger\"}"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{version}: an unregistered certificate"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("refused") || stderr.contains("bad user name"),
            "{stderr}"
        );
    }

    let got: Vec<(String, String)> = peek_all(&gw)
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["values"]["by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("cam-1".into(), "cert".into()),
            ("plain".into(), "token".into())
        ]
    );
    assert_eq!(gw.status()["ingest"]["auth_failures"]["mqtt"], 2);
}

/// Kills a still-running child when the test ends early.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Reaped, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        child.0.try_wait().unwrap().is_some()
    });
}

#[test]
fn revoking_a_device_disconnects_its_live_sessions_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let mut gw = mqtts_gateway(&tmp.path().join("gw"), &pki, true);
    let token = gw.add_device("dev-tok");
    let (cert, key) = pki.client_cert("cam-2");
    cli_ok(
        &gw,
        &[
            "devices",
            "add",
            "cam-2",
            "--cert-sha256",
            &openssl_sha256(&cert),
        ],
    );
    gw.start();
    let addr = gw.mqtt.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let quiet = |c: &mut std::process::Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    };
    let mut by_token = std::process::Command::new("mosquitto_sub");
    by_token
        .args(["-h", host, "-p", port, "-V", "mqttv5", "-u", &token])
        .args(["-t", "v1/devices/me/attributes"]);
    quiet(&mut by_token);
    let mut by_token = Reaped(by_token.spawn().unwrap());
    let mut by_cert = mqtts_client(&gw, &pki, "mosquitto_sub");
    by_cert
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-t", "v1/devices/me/attributes"]);
    quiet(&mut by_cert);
    let mut by_cert = Reaped(by_cert.spawn().unwrap());
    wait_for("both sessions up", Duration::from_secs(10), || {
        gw.status()["devices"]["connected"] == 2
    });

    cli_ok(&gw, &["devices", "revoke", "dev-tok"]);
    wait_exit(&mut by_token, "the revoked token's mosquitto_sub exits");
    assert!(
        by_cert.0.try_wait().unwrap().is_none(),
        "the other device stays connected"
    );
    assert_eq!(gw.status()["devices"]["connected"], 1);

    cli_ok(&gw, &["devices", "revoke", "cam-2"]);
    wait_exit(
        &mut by_cert,
        "the revoked certificate's mosquitto_sub exits",
    );
    assert_eq!(gw.status()["devices"]["connected"], 0);
}

/// mosquitto_pub `-l -d` at QoS 1: the `n` of every line whose PUBACK it
/// printed (mids count lines from 1 in order).
fn mqtt_pubacked(
    mqtt: &str,
    token: &str,
    from: i64,
    count: i64,
    kill_after: Duration,
    gw: &mut Gateway,
) -> Vec<i64> {
    let (host, port) = mqtt.rsplit_once(':').unwrap();
    // stdbuf: line-buffered stdout, so no printed PUBACK is lost when the
    // client is killed below.
    let mut child = std::process::Command::new("stdbuf")
        .args(["-oL", "mosquitto_pub"])
        .args([
            "-h",
            host,
            "-p",
            port,
            "-u",
            token,
            "-q",
            "1",
            "-t",
            "v1/devices/me/telemetry",
            "-l",
            "-d",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines: String = (from..from + count)
        .map(|n| format!("{{\"n\":{n}}}\n"))
        .collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let _ = stdin.write_all(lines.as_bytes());
    });
    pause(kill_after);
    gw.kill9();
    // mosquitto_pub would retry the dead gateway for ever: stop it too.
    pause(Duration::from_millis(100));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once("received PUBACK (Mid: ")?
                .1
                .split(',')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .map(|mid| from + mid - 1)
        .collect()
}

#[test]
fn mqtt_qos1_sigkill_loses_no_pubacked_message() {
    let w = world_with_broker();
    let spec = GatewaySpec {
        mqtt: true,
        ..w.spec()
    };
    let mut gw = Gateway::new(&w.dir("gw"), &spec);
    let token = gw.add_device("dev-1");
    let mut acked = Vec::new();
    for round in 0..8i64 {
        gw.start();
        let mqtt = gw.mqtt.clone().unwrap();
        let delay = Duration::from_millis(40 + (round as u64 * 37) % 160);
        acked.extend(mqtt_pubacked(
            &mqtt,
            &token,
            round * 10_000,
            3000,
            delay,
            &mut gw,
        ));
    }
    assert!(
        acked.len() > 100,
        "too few PUBACKs to mean anything: {}",
        acked.len()
    );
    gw.start();
    wait_for(
        "every PUBACKed message at the cloud",
        Duration::from_secs(90),
        || {
            let seen: BTreeSet<i64> = w
                .observer()
                .records()
                .iter()
                .map(|r| r.2["values"]["n"].as_i64().unwrap())
                .collect();
            acked.iter().all(|n| seen.contains(n))
        },
    );
    let recs = w.observer().records();
    assert_duplicates_share_seq(&recs);
    assert_order_by_seq(&recs);
    eprintln!(
        "mqtt kill -9 x8: {} PUBACKed messages, all at the cloud ({} records received)",
        acked.len(),
        recs.len()
    );
}

#[test]
fn status_without_a_daemon_says_so_and_shows_the_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    gw.add_device("dev-2");
    gw.start();
    let codes = curl_codes(curl_posts(&gw.url(&token), &bodies(0, 3)));
    assert_eq!(codes, [200, 200, 200]);
    let epoch = gw.status()["gateway"]["epoch"].clone();
    assert_eq!(gw.stop(), Some(0));

    let out = gw.cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "not running is not ok");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running sluice daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["running"], false);
    assert_eq!(st["gateway"]["epoch"], epoch);
    assert_eq!(st["outbox"]["records"], 3, "{st}");
    assert_eq!(st["devices"]["registered"], 2);
    let human = gw.cli(&["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("not running"));
}
