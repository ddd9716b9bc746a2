//! End-to-end tests of the uplink's TLS files against a mosquitto whose
//! mutual-TLS listener trusts one CA: a client certificate rotated on disk is
//! used by the next reconnect, without a restart; one that does not load
//! keeps the previous; the certificate's expiry shows in the metrics and in
//! `sluice status --json`.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn bodies(from: i64, to: i64) -> Vec<String> {
    (from..to).map(|n| format!("{{\"n\":{n}}}")).collect()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A P-256 client certificate for `cn` valid for `days`, signed by `pki`'s
/// CA, written as `dir/name.crt` and `dir/name.key`.
fn client_cert(pki: &Pki, dir: &Path, name: &str, cn: &str, days: u32) -> (PathBuf, PathBuf) {
    let ca_dir = pki.ca.parent().unwrap();
    let (crt, key, csr, ext) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
    key_and_csr(cn, &key, &csr);
    run_ok(
        Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-days",
                &days.to_string(),
                "-CAcreateserial",
            ])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&pki.ca)
            .arg("-CAkey")
            .arg(ca_dir.join("ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&crt),
    );
    (crt, key)
}

/// The certificate's notAfter in unix seconds, as openssl and date see it.
fn not_after(cert: &Path) -> i64 {
    let end = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(cert),
    );
    let end = end.trim().strip_prefix("notAfter=").unwrap();
    run_ok(Command::new("date").args(["-u", "-d", end, "+%s"]))
        .trim()
        .parse()
        .unwrap()
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Replaces `to` by `from` as rotation tools do: a new file renamed over it.
fn rotate(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A gateway on the broker's mTLS port with its client certificate at
/// `dir/client.crt` + `dir/client.key` (copies of `cert`), and the metrics
/// listener on; started, with device `dev-1`. Returns it and the token.
fn gateway(broker: &Broker, ca: &Path, dir: &Path, cert: &(PathBuf, PathBuf)) -> (Gateway, String) {
    std::fs::create_dir_all(dir).unwrap();
    let (crt, key) = (dir.join("client.crt"), dir.join("client.key"));
    rotate(&cert.0, &crt);
    rotate(&cert.1, &key);
    let gw = Gateway::new(
        dir,
        &GatewaySpec {
            cloud: Some((broker.mtls_port, ca.to_owned())),
            client_cert: Some((crt, key)),
            ..GatewaySpec::default()
        },
    );
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str("\n[metrics]\nbind = \"127.0.0.1:0\"\n");
    std::fs::write(&gw.config, text).unwrap();
    let mut gw = gw;
    let token = gw.add_device("dev-1");
    gw.start();
    (gw, token)
}

/// One sample of the metrics exposition.
fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let addr = gw.status()["listeners"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, text) = curl(&[&format!("http://{addr}/metrics")]);
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn post(gw: &Gateway, token: &str, from: i64, to: i64) {
    let codes = curl_codes(curl_posts(&gw.url(token), &bodies(from, to)));
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
}

fn ns(obs: &Observer) -> Vec<i64> {
    let mut n: Vec<i64> = obs
        .records()
        .iter()
        .map(|(_, _, r)| r["values"]["n"].as_i64().unwrap())
        .collect();
    n.sort_unstable();
    n.dedup();
    n
}

#[test]
fn a_rotated_client_certificate_is_used_by_the_next_reconnect_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2, db) = (
        tmp.path().join("ca1"),
        tmp.path().join("ca2"),
        tmp.path().join("broker"),
    );
    for d in [&d1, &d2, &db] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (ca1, ca2) = (Pki::generate(&d1), Pki::generate(&d2));
    // The broker's own certificate is from CA1; its mTLS listener accepts
    // only client certificates from CA2.
    let mut broker = Broker::with_mtls_ca(&db, &ca1, free_port(), &ca2.ca);
    broker.start();
    let observer = Observer::start(&broker, &ca1, &format!("obs-{}", broker.port));

    let refused = client_cert(&ca1, tmp.path(), "from-ca1", "gw-cert", 2);
    let accepted = client_cert(&ca2, tmp.path(), "from-ca2", "gw-cert", 30);
    let (gw, token) = gateway(&broker, &ca1.ca, &tmp.path().join("gw"), &refused);
    let pid = gw.pid();
    post(&gw, &token, 0, 10);
    wait_for(
        "the broker to refuse the CA1 certificate",
        Duration::from_secs(20),
        || gw.status()["uplink"]["error"].is_string(),
    );
    let st = gw.status();
    assert_eq!(st["uplink"]["connected"], false);
    assert_eq!(st["outbox"]["records"], 10);
    assert_eq!(st["uplink"]["client_cert_not_after"], not_after(&refused.0));
    assert!(ns(&observer).is_empty());

    // Rotation: the key, then the certificate, each renamed into place.
    let dir = tmp.path().join("gw");
    rotate(&accepted.1, &dir.join("client.key"));
    rotate(&accepted.0, &dir.join("client.crt"));
    wait_for(
        "the queued readings over the rotated certificate",
        Duration::from_secs(30),
        || ns(&observer).len() >= 10,
    );
    assert_eq!(ns(&observer), (0..10).collect::<Vec<_>>());
    post(&gw, &token, 10, 15);
    wait_for("live readings", Duration::from_secs(20), || {
        ns(&observer).len() >= 15
    });

    let st = gw.status();
    assert_eq!(st["uplink"]["connected"], true);
    let want = not_after(&accepted.0);
    assert_eq!(st["uplink"]["client_cert_not_after"], want);
    assert!(st["uplink"]["tls_reloads"].as_u64().unwrap() >= 1);
    assert!(want - now_s() > 29 * 86_400);
    let left = metric(&gw, "sluice_uplink_client_cert_expiry_seconds").unwrap();
    assert!(
        (left - (want - now_s()) as f64).abs() < 60.0,
        "{left} vs {}",
        want - now_s()
    );
    // No restart.
    assert_eq!(gw.pid(), pid);
}

#[test]
fn a_client_certificate_that_does_not_load_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (d1, db) = (tmp.path().join("ca"), tmp.path().join("broker"));
    for d in [&d1, &db] {
        std::fs::create_dir_all(d).unwrap();
    }
    let pki = Pki::generate(&d1);
    let mut broker = Broker::new(&db, &pki, free_port());
    broker.start();
    let observer = Observer::start(&broker, &pki, &format!("obs-{}", broker.port));
    let cert = client_cert(&pki, tmp.path(), "good", "gw-cert", 7);
    let (gw, token) = gateway(&broker, &pki.ca, &tmp.path().join("gw"), &cert);
    post(&gw, &token, 0, 5);
    wait_for("readings over mTLS", Duration::from_secs(30), || {
        ns(&observer).len() >= 5
    });

    // A half-written certificate, then a reconnect (the broker restarts).
    std::fs::write(
        tmp.path().join("gw/client.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n",
    )
    .unwrap();
    broker.stop();
    broker.start();
    wait_for(
        "the reload failure to be counted",
        Duration::from_secs(20),
        || gw.status()["uplink"]["tls_reload_failures"] == 1,
    );
    post(&gw, &token, 5, 10);
    wait_for(
        "readings with the previous certificate",
        Duration::from_secs(30),
        || ns(&observer).len() >= 10,
    );
    let st = gw.status();
    assert_eq!(st["uplink"]["connected"], true);
    assert_eq!(st["uplink"]["client_cert_not_after"], not_after(&cert.0));
    assert_eq!(st["uplink"]["tls_reloads"], 0);
    assert_eq!(
        metric(&gw, "sluice_uplink_tls_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
}

#[test]
fn the_uplink_speaks_mqtt_5_when_asked_and_loses_nothing() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "mqtt_version = \"5\"\n");
    let token = gw.add_device("dev-5");
    gw.start();
    let url = format!(
        "http://{}/api/v1/{token}/telemetry",
        gw.http.as_ref().unwrap()
    );
    let bodies: Vec<String> = (0..50).map(|i| format!("{{\"n\":{i}}}")).collect();
    assert!(
        curl_codes(curl_posts(&url, &bodies))
            .iter()
            .all(|c| *c == 200)
    );
    wait_for("50 readings at the cloud", Duration::from_secs(20), || {
        cloud
            .observer
            .records()
            .iter()
            .filter(|(_, d, _)| d == "dev-5")
            .count()
            >= 50
    });
    let ns: Vec<i64> = cloud
        .observer
        .records()
        .iter()
        .filter(|(_, d, _)| d == "dev-5")
        .map(|(_, _, r)| r["values"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..50).collect::<Vec<_>>(), "in order, once each");
    wait_for("the outbox empty", Duration::from_secs(10), || {
        gw.status()["outbox"]["records"] == 0
    });
    // The downlink works over MQTT 5 too.
    cloud.publish(
        &format!("{PREFIX}/commands"),
        &serde_json::json!({"id": "v5", "device": "nobody", "method": "x"}),
    );
    wait_for("the command response", Duration::from_secs(10), || {
        cloud
            .seen_on(&format!("{PREFIX}/commands/response"))
            .iter()
            .any(|r| r["id"] == "v5" && r["error"]["code"] == "unknown_device")
    });
    let log = cloud.broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("as gw-test") && l.contains("(p5,")),
        "the gateway connected with MQTT 5: {log}"
    );
    assert_eq!(gw.stop(), Some(0));
    // The clean stop published the offline status (retained) over MQTT 5.
    assert!(
        cloud
            .seen_on(&format!("{PREFIX}/status"))
            .iter()
            .any(|s| s["state"] == "offline")
    );
}
