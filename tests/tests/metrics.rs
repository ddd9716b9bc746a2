//! End-to-end tests of observability: `/metrics` scraped from a running
//! gateway and parsed by Prometheus' own Python client parser
//! (`prometheus_client`, `scripts/prom_parse.py`) while curl, mosquitto_pub
//! and coap-client-notls drive traffic and a TLS mosquitto plays the cloud;
//! `/healthz` and `/readyz`; `sluice log-level` changing what the running
//! daemon logs; text logs without timestamps under systemd.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One scrape: the raw text and what prometheus_client made of it.
struct Scrape {
    text: String,
    families: Vec<Json>,
}

impl Scrape {
    fn take(addr: &str) -> Self {
        let (code, text) = curl(&[&format!("http://{addr}/metrics")]);
        assert_eq!(code, 200, "{text}");
        let header_end = text.find("\r\n\r\n").unwrap() + 4;
        let (head, body) = text.split_at(header_end);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/scripts/prom_parse.py"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client refused the exposition: {}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            text: body.to_owned(),
            families: serde_json::from_slice(&out.stdout).unwrap(),
        }
    }

    /// The family holding samples named `sample` (prometheus_client names a
    /// counter family without `_total`, a histogram without `_bucket`…).
    fn family(&self, sample: &str) -> &Json {
        self.families
            .iter()
            .find(|f| {
                f["samples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == sample)
            })
            .unwrap_or_else(|| panic!("no family has a sample {sample}:\n{}", self.text))
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Json> {
        self.families
            .iter()
            .flat_map(|f| f["samples"].as_array().unwrap())
            .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .collect()
    }

    /// The one sample `name{labels}`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.samples(name, labels);
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?} must be one sample, found {found:?}"
        );
        found[0]["value"].as_f64().unwrap()
    }

    /// The sum of every sample `name{labels…}` (e.g. over streams).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.samples(name, labels);
        assert!(!found.is_empty(), "no sample {name}{labels:?}");
        found.iter().map(|s| s["value"].as_f64().unwrap()).sum()
    }
}

const PROTOCOLS: [&str; 3] = ["mqtt", "coap", "http"];
const RESULTS: [&str; 5] = ["ok", "bad_payload", "unauthorized", "too_large", "rejected"];
const DROP_REASONS: [&str; 4] = ["full", "expired", "purged", "rejected"];
const STREAMS: [&str; 3] = ["telemetry", "attributes", "alarms"];

/// Every metric DESIGN.md names, with its type: present with a sample for
/// each documented label value, each 0 on a fresh gateway.
fn assert_documented_families_start_at_zero(s: &Scrape) {
    for (sample, kind) in [
        ("sluice_ingest_messages_total", "counter"),
        ("sluice_ingest_commit_seconds_count", "histogram"),
        ("sluice_outbox_records", "gauge"),
        ("sluice_outbox_bytes", "gauge"),
        ("sluice_outbox_oldest_age_seconds", "gauge"),
        ("sluice_outbox_dropped_total", "counter"),
        ("sluice_uplink_connected", "gauge"),
        ("sluice_uplink_records_acked_total", "counter"),
        ("sluice_devices_connected", "gauge"),
        ("sluice_auth_failures_total", "counter"),
        ("sluice_firmware_bytes_served_total", "counter"),
    ] {
        assert_eq!(s.family(sample)["type"], kind, "{sample}");
    }
    for p in PROTOCOLS {
        for r in RESULTS {
            let labels = [("protocol", p), ("result", r)];
            assert_eq!(s.value("sluice_ingest_messages_total", &labels), 0.0);
        }
        assert_eq!(
            s.value("sluice_auth_failures_total", &[("protocol", p)]),
            0.0
        );
        assert_eq!(s.value("sluice_devices_connected", &[("protocol", p)]), 0.0);
    }
    for st in STREAMS {
        let stream = [("stream", st)];
        assert_eq!(s.value("sluice_outbox_records", &stream), 0.0);
        assert_eq!(s.value("sluice_outbox_bytes", &stream), 0.0);
        assert_eq!(s.value("sluice_outbox_oldest_age_seconds", &stream), 0.0);
        for r in DROP_REASONS {
            let labels = [("reason", r), ("stream", st)];
            assert_eq!(s.value("sluice_outbox_dropped_total", &labels), 0.0);
        }
    }
    assert_eq!(s.value("sluice_ingest_commit_seconds_count", &[]), 0.0);
    assert_eq!(s.value("sluice_ingest_commit_seconds_sum", &[]), 0.0);
    assert_eq!(
        s.value("sluice_ingest_commit_seconds_bucket", &[("le", "+Inf")]),
        0.0
    );
    assert_eq!(s.value("sluice_uplink_records_acked_total", &[]), 0.0);
    assert_eq!(s.value("sluice_firmware_bytes_served_total", &[]), 0.0);
    // 0 or 1 depending on how far the first connect got.
    assert!(s.value("sluice_uplink_connected", &[]) <= 1.0);
}

/// Prometheus naming: HELP and TYPE on every family, `_total` on counters,
/// base units, only bounded label names, no device name or token in any
/// label value.
fn assert_conventions(s: &Scrape, forbidden: &[&str]) {
    for f in &s.families {
        let name = f["name"].as_str().unwrap();
        assert!(
            !f["help"].as_str().unwrap().is_empty(),
            "{name} has no HELP"
        );
        assert!(
            ["counter", "gauge", "histogram"].contains(&f["type"].as_str().unwrap()),
            "{name} is {}",
            f["type"]
        );
        for unit in [
            "_ms",
            "_millis",
            "_milliseconds",
            "_kb",
            "_kib",
            "_mb",
            "_percent",
        ] {
            assert!(!name.contains(unit), "{name}: not a base unit");
        }
        for sample in f["samples"].as_array().unwrap() {
            for (k, v) in sample["labels"].as_object().unwrap() {
                assert!(
                    [
                        "protocol", "result", "reason", "stream", "rule", "outcome", "kind", "le",
                        "version", "arch", "os"
                    ]
                    .contains(&k.as_str()),
                    "{name}: label {k} is not one of the bounded ones"
                );
                let v = v.as_str().unwrap();
                assert!(
                    !forbidden.contains(&v),
                    "{name}: label {k}={v} names a device"
                );
            }
        }
    }
    for line in s.text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            } else {
                assert!(!name.ends_with("_total"), "{kind} {name} ends in _total");
            }
        }
    }
    let typed: Vec<&str> = s
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|r| r.split(' ').next().unwrap())
        .collect();
    let helped = s.text.lines().filter(|l| l.starts_with("# HELP ")).count();
    assert_eq!(typed.len(), helped, "a family without HELP or TYPE");
    assert_eq!(typed.len(), s.families.len(), "a sample outside its family");
}

/// A `/proc/PID/status` figure (`VmRSS:   9344 kB` → bytes, `Threads: 9`).
fn proc_status(pid: u32, key: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    let n: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    if line.ends_with("kB") { n * 1024.0 } else { n }
}

fn assert_process_metrics_match_proc(s: &Scrape, pid: u32) {
    let rss = s.value("process_resident_memory_bytes", &[]);
    let vm_rss = proc_status(pid, "VmRSS:");
    assert!(
        rss > vm_rss / 2.0 && rss < vm_rss * 2.0,
        "RSS {rss} vs VmRSS {vm_rss}"
    );
    let vsize = s.value("process_virtual_memory_bytes", &[]);
    let vm_size = proc_status(pid, "VmSize:");
    assert!(
        vsize > vm_size / 2.0 && vsize < vm_size * 2.0,
        "{vsize} vs {vm_size}"
    );
    let fds = s.value("process_open_fds", &[]);
    let in_proc = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!(
        fds > 3.0 && fds < in_proc * 2.0 + 10.0,
        "open fds {fds}, /proc has {in_proc}"
    );
    assert!(s.value("process_max_fds", &[]) >= fds);
    let threads = s.value("process_threads", &[]);
    assert!(threads >= 2.0, "threads {threads}");
    assert!(threads <= proc_status(pid, "Threads:") * 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = s.value("process_start_time_seconds", &[]);
    assert!(
        start > now - 300.0 && start <= now + 1.0,
        "{start} vs {now}"
    );
    assert!(s.value("process_cpu_seconds_total", &[]) >= 0.0);
    assert_eq!(s.family("process_cpu_seconds_total")["type"], "counter");
    let info = s.samples("sluice_build_info", &[]);
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0]["value"], 1.0);
    assert_eq!(info[0]["labels"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info[0]["labels"]["arch"], std::env::consts::ARCH);
}

fn coap_client(args: &[&str]) -> String {
    let o = Command::new("timeout")
        .args(["60", "coap-client-notls"])
        .args(args)
        .output()
        .expect("coap-client-notls must be installed (libcoap3-bin)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A device that stays connected: `mosquitto_sub` on its attribute topic.
fn mqtt_session(gw: &Gateway, token: &str) -> Child {
    let (host, port) = gw.mqtt.as_ref().unwrap().rsplit_once(':').unwrap();
    Command::new("mosquitto_sub")
        .args(["-h", host, "-p", port, "-u", token, "-q", "1"])
        .args(["-t", "v1/devices/me/attributes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn every_documented_metric_is_exported_parsed_by_prometheus_and_moves_with_traffic() {
    if !has_python_module("prometheus_client") {
        return;
    }
    let mut cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            mqtt: true,
            coap: Some(String::new()),
            cloud: Some((cloud.broker.port, cloud.pki.ca.clone())),
            ..GatewaySpec::default()
        },
    );
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str("\n[metrics]\nbind = \"127.0.0.1:0\"\n");
    std::fs::write(&gw.config, text).unwrap();
    // The MQTT publisher and the long-lived MQTT session are two devices: a
    // device's newer session takes over its older one.
    let devices = ["dev-http", "dev-mqtt", "dev-coap", "dev-mqtt-session"];
    let tokens: Vec<String> = devices.iter().map(|d| gw.add_device(d)).collect();
    let (http_token, mqtt_token, coap_token) = (&tokens[0], &tokens[1], &tokens[2]);
    gw.start();
    let addr = gw.status()["listeners"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = gw.pid().unwrap();
    assert_eq!(curl(&[&format!("http://{addr}/healthz")]).0, 200);
    assert_eq!(curl(&[&format!("http://{addr}/readyz")]).0, 200);
    assert_eq!(curl(&[&format!("http://{addr}/nothing")]).0, 404);

    let fresh = Scrape::take(&addr);
    assert_documented_families_start_at_zero(&fresh);
    let mut forbidden: Vec<&str> = devices.to_vec();
    forbidden.extend(tokens.iter().map(String::as_str));
    assert_conventions(&fresh, &forbidden);
    assert_process_metrics_match_proc(&fresh, pid);

    wait_for("the uplink to connect", Duration::from_secs(20), || {
        Scrape::take(&addr).value("sluice_uplink_connected", &[]) == 1.0
    });
    // The cloud goes away: what devices send waits in the outbox.
    cloud.broker.stop();
    wait_for("the uplink to notice", Duration::from_secs(20), || {
        Scrape::take(&addr).value("sluice_uplink_connected", &[]) == 0.0
    });

    let url = gw.url(http_token);
    for n in 0..3 {
        assert_eq!(curl(&["-d", &format!("{{\"n\":{n}}}"), &url]).0, 200);
    }
    assert_eq!(curl(&["-d", "{\"n\":1}", &gw.url("no-such-token")]).0, 401);
    assert_eq!(curl(&["-d", "{\"n\":", &url]).0, 400);

    let mut session = mqtt_session(&gw, &tokens[3]);
    let out = mosquitto_pub(
        &gw,
        &[
            "-u",
            mqtt_token,
            "-q",
            "1",
            "-t",
            "v1/devices/me/telemetry",
            "-l",
        ],
        "{\"n\":10}\n{\"n\":11}\n",
    );
    assert!(out.status.success(), "{out:?}");
    let refused = mosquitto_pub(
        &gw,
        &[
            "-u",
            "wrong-token",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            "{}",
        ],
        "",
    );
    assert!(!refused.status.success(), "a bad token must be refused");

    let coap = gw.coap.clone().unwrap();
    let answer = coap_client(&[
        "-m",
        "post",
        "-e",
        "{\"n\":20}",
        &format!("coap://{coap}/api/v1/{coap_token}/telemetry"),
    ]);
    assert!(!answer.contains("4."), "{answer}");
    let observe_out = tmp.path().join("observe.out");
    let mut observer = Command::new("coap-client-notls")
        .args(["-m", "get", "-s", "30"])
        .arg(format!(
            "coap://{coap}/api/v1/{coap_token}/attributes/updates"
        ))
        .stdout(std::fs::File::create(&observe_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    wait_for("both device sessions", Duration::from_secs(15), || {
        let s = Scrape::take(&addr);
        s.value("sluice_devices_connected", &[("protocol", "mqtt")]) == 1.0
            && s.value("sluice_devices_connected", &[("protocol", "coap")]) == 1.0
    });
    let during = Scrape::take(&addr);
    let ingest = |p: &str, r: &str| {
        during.value(
            "sluice_ingest_messages_total",
            &[("protocol", p), ("result", r)],
        )
    };
    assert_eq!(ingest("http", "ok"), 3.0);
    assert_eq!(ingest("http", "unauthorized"), 1.0);
    assert_eq!(ingest("http", "bad_payload"), 1.0);
    assert_eq!(ingest("mqtt", "ok"), 2.0);
    assert_eq!(ingest("mqtt", "unauthorized"), 1.0);
    assert_eq!(ingest("coap", "ok"), 1.0);
    for (p, r) in [
        ("http", "too_large"),
        ("mqtt", "rejected"),
        ("coap", "bad_payload"),
    ] {
        assert_eq!(ingest(p, r), 0.0, "{p} {r}");
    }
    let auth = |p: &str| during.value("sluice_auth_failures_total", &[("protocol", p)]);
    assert_eq!((auth("http"), auth("mqtt"), auth("coap")), (1.0, 1.0, 0.0));
    // Every stored message went through a commit: 3 HTTP, 2 MQTT, 1 CoAP.
    assert_eq!(during.value("sluice_ingest_commit_seconds_count", &[]), 6.0);
    assert!(during.value("sluice_ingest_commit_seconds_sum", &[]) > 0.0);
    assert_eq!(
        during.value("sluice_ingest_commit_seconds_bucket", &[("le", "+Inf")]),
        6.0
    );
    let telemetry = [("stream", "telemetry")];
    assert_eq!(
        during.value("sluice_outbox_records", &telemetry),
        6.0,
        "{}",
        String::from_utf8_lossy(&gw.cli(&["queue", "peek", "-n", "20", "--json"]).stdout)
    );
    assert_eq!(during.sum("sluice_outbox_records", &[]), 6.0);
    assert!(during.value("sluice_outbox_bytes", &telemetry) > 6.0 * 8.0);
    assert!(during.value("sluice_outbox_oldest_age_seconds", &telemetry) > 0.0);
    assert_eq!(during.value("sluice_uplink_connected", &[]), 0.0);
    assert_eq!(during.value("sluice_uplink_records_acked_total", &[]), 0.0);
    assert_eq!(during.sum("sluice_outbox_dropped_total", &[]), 0.0);
    assert_conventions(&during, &forbidden);
    assert_process_metrics_match_proc(&during, pid);

    // The cloud is back: the outbox drains and the acks are counted.
    cloud.broker.start();
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        let s = Scrape::take(&addr);
        s.sum("sluice_outbox_records", &[]) == 0.0
            && s.value("sluice_uplink_records_acked_total", &[]) == 6.0
    });
    let after = Scrape::take(&addr);
    assert_eq!(after.value("sluice_uplink_connected", &[]), 1.0);
    assert_eq!(after.sum("sluice_outbox_bytes", &[]), 0.0);
    assert_eq!(
        after.value("sluice_outbox_oldest_age_seconds", &telemetry),
        0.0
    );
    assert!(
        after.value("process_cpu_seconds_total", &[])
            >= fresh.value("process_cpu_seconds_total", &[])
    );
    wait_for("the records at the cloud", Duration::from_secs(15), || {
        cloud.observer.records().len() >= 6
    });

    // Devices leaving show too.
    let _ = session.kill();
    let _ = session.wait();
    let _ = observer.kill();
    let _ = observer.wait();
    wait_for("the MQTT session to end", Duration::from_secs(15), || {
        Scrape::take(&addr).value("sluice_devices_connected", &[("protocol", "mqtt")]) == 0.0
    });
    assert_eq!(gw.stop(), Some(0));
}

/// The gateway's log so far.
fn log(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.join("sluice.log")).unwrap_or_default()
}

const UNKNOWN_TOKEN_LINE: &str = "HTTP request with an unknown or revoked token";

#[test]
fn log_level_changes_what_the_running_daemon_logs_and_refuses_a_bad_filter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let stopped = gw.cli(&["log-level"]);
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert!(
        String::from_utf8_lossy(&stopped.stderr).contains("no running sluice daemon"),
        "{stopped:?}"
    );
    gw.start();
    let shown = gw.cli(&["log-level"]);
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "info");

    // At info, a refused token leaves no line (the answer is sent after
    // the log call, so nothing can still be on its way).
    let bad_url = gw.url("no-such-token");
    assert_eq!(curl(&["-d", "{}", &bad_url]).0, 401);
    assert!(!log(&gw).contains(UNKNOWN_TOKEN_LINE), "{}", log(&gw));

    let changed = gw.cli_json(&["log-level", "debug", "--json"]);
    assert_eq!(changed, json!({"previous": "info", "filter": "debug"}));
    assert_eq!(curl(&["-d", "{}", &bad_url]).0, 401);
    wait_for("the debug line", Duration::from_secs(5), || {
        log(&gw).contains(UNKNOWN_TOKEN_LINE)
    });
    assert!(log(&gw).contains("log filter changed"));

    // Bad filters are refused with exit 2 and leave the filter alone.
    for bad in ["a=loud", "sluice_agent[span]=debug", " "] {
        let out = gw.cli(&["log-level", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a log filter"), "{bad:?}: {err}");
    }
    // The daemon checks too, whatever client asks.
    let mut req = std::os::unix::net::UnixStream::connect(tmp.path().join("admin.sock")).unwrap();
    use std::io::{BufRead, Write};
    req.write_all(b"{\"cmd\":\"log_level\",\"filter\":\"x=loud\"}\n")
        .unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&req).read_line(&mut reply).unwrap();
    let reply: Json = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("not a log filter"),
        "{reply}"
    );
    let shown = gw.cli(&["log-level"]);
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "debug");

    // Per-target filters, and back down: the HTTP listener at warn.
    let out = gw.cli(&["log-level", "sluice_agent::http=warn,debug"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "log filter: debug -> sluice_agent::http=warn,debug"
    );
    let lines_before = log(&gw).matches(UNKNOWN_TOKEN_LINE).count();
    assert_eq!(curl(&["-d", "{}", &bad_url]).0, 401);
    assert_eq!(log(&gw).matches(UNKNOWN_TOKEN_LINE).count(), lines_before);
    assert_eq!(gw.stop(), Some(0));
}

/// Whether a text log line starts with an RFC 3339 timestamp.
fn stamped(line: &str) -> bool {
    line.len() > 20 && line.as_bytes()[4] == b'-' && line.as_bytes()[10] == b'T'
}

#[test]
fn text_logs_leave_timestamps_to_journald_under_systemd_and_json_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();

    let mut plain = Gateway::new(&tmp.path().join("plain"), &GatewaySpec::default());
    plain
        .env
        .push(("SLUICE__LOG__FORMAT".into(), "text".into()));
    plain.start();
    assert_eq!(plain.stop(), Some(0));
    let text = log(&plain);
    assert!(text.lines().count() >= 2, "{text}");
    assert!(text.lines().all(stamped), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes in a file: {text:?}"
    );

    for var in ["JOURNAL_STREAM", "INVOCATION_ID"] {
        let mut unit = Gateway::new(&tmp.path().join(var), &GatewaySpec::default());
        unit.env.push((var.into(), "8:12345".into()));
        unit.start();
        assert_eq!(unit.stop(), Some(0));
        let text = log(&unit);
        assert!(text.lines().count() >= 2, "{text}");
        assert!(
            text.lines().all(|l| !stamped(l)
                && ["INFO", "WARN", "ERROR"].contains(&l.split_whitespace().next().unwrap())),
            "{var}: {text}"
        );
    }

    let mut json_unit = Gateway::new(&tmp.path().join("json"), &GatewaySpec::default());
    json_unit.env.push(("INVOCATION_ID".into(), "abc".into()));
    json_unit
        .env
        .push(("SLUICE__LOG__FORMAT".into(), "json".into()));
    json_unit.start();
    assert_eq!(json_unit.stop(), Some(0));
    let text = log(&json_unit);
    for line in text.lines() {
        let v: Json = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
    }
}

/// Regression: SIGTERM was caught only once the main loop first waited for
/// it, so one sent during start-up (systemd stopping a service that just
/// started, `sluice status` already answering) killed the daemon with no
/// exit code. Now it is caught before the admin socket exists, and
/// start-up ends in a clean stop.
#[test]
fn sigterm_during_start_up_stops_the_daemon_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let socket = tmp.path().join("admin.sock");
    for round in 0..5 {
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::File::create(tmp.path().join("sluice.log")).unwrap();
        let mut child = Command::new(SLUICE)
            .arg("--config")
            .arg(&gw.config)
            .arg("run")
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "no admin socket");
            pause(Duration::from_millis(1));
        }
        signal(child.id(), "TERM");
        let mut code = None;
        wait_for("the daemon to exit", Duration::from_secs(30), || {
            code = child.try_wait().unwrap();
            code.is_some()
        });
        assert_eq!(code.unwrap().code(), Some(0), "round {round}: {}", log(&gw));
    }
}
