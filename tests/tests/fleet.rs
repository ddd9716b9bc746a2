//! End-to-end tests of signed fleet configuration: keys and envelopes made
//! with the CLI, published retained on the cloud mosquitto's `P/config`,
//! applied by an in-process restart (same PID), rejected with a report when
//! tampered, signed by a stranger, replayed or invalid, and rolled back when
//! the uplink cannot connect with it.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::process::Command;
use std::time::Duration;

/// Publishes `envelope` retained on P/config, as a fleet manager would.
fn push(cloud: &Cloud, envelope: &Json) {
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &cloud.broker.port.to_string()])
        .arg("--cafile")
        .arg(&cloud.pki.ca)
        .args(["-u", OBS_USER.0, "-P", OBS_USER.1, "-q", "1", "-r"])
        .args([
            "-t",
            &format!("{PREFIX}/config"),
            "-m",
            &envelope.to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

fn reports(cloud: &Cloud) -> Vec<Json> {
    cloud.seen_on(&format!("{PREFIX}/config/state"))
}

fn wait_report(cloud: &Cloud, version: u64, status: &str, limit: Duration) -> Json {
    let mut found = None;
    wait_for(&format!("report v{version} {status}"), limit, || {
        found = reports(cloud)
            .into_iter()
            .find(|r| r["version"] == version && r["status"] == status);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn signed_configs_apply_in_process_bad_ones_are_rejected_and_an_unreachable_broker_rolls_back() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "fleet.key");
    let (stranger, _) = keygen(tmp.path(), "stranger.key");
    let mut gw = cloud.gateway(tmp.path(), "");
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(&format!(
        "\n[fleet]\ntrusted_keys = [\"{public}\"]\nconfirm_timeout = \"4s\"\n"
    ));
    std::fs::write(&gw.config, config).unwrap();
    let token = gw.add_device("dev-1");
    gw.start();
    let pid = gw.pid();
    let connected = |gw: &Gateway| {
        gw.try_status()
            .is_some_and(|s| s["uplink"]["connected"] == json!(true))
    };
    wait_for("the uplink", Duration::from_secs(15), || connected(&gw));
    pause(Duration::from_millis(500));

    // v1 adds a rule: a rules-only change, applied in place — no restart
    // of anything (same listener port, uptime keeps counting).
    let before = gw.status();
    let v1 = json!({"version": 1, "config": {"rules": [
        {"name": "no-secret", "keys": "secret", "actions": [{"type": "drop"}]}]}});
    push(&cloud, &sign(tmp.path(), &key, &v1));
    wait_report(&cloud, 1, "applied", Duration::from_secs(20));
    assert_eq!(gw.pid(), pid, "applied in process");
    let after = gw.status();
    assert_eq!(after["listeners"], before["listeners"], "nothing re-bound");
    assert!(after["uptime_s"].as_u64() >= before["uptime_s"].as_u64());
    assert_eq!(after["rules"][0]["rule"], "no-secret");
    let url = format!(
        "http://{}/api/v1/{token}/telemetry",
        gw.status()["listeners"]["http"].as_str().unwrap()
    );
    assert_eq!(
        curl(&["-X", "POST", "-d", r#"{"secret":42,"ok":1}"#, &url]).0,
        200
    );
    wait_for("the reading upstream", Duration::from_secs(10), || {
        cloud
            .observer
            .records()
            .iter()
            .any(|(_, d, r)| d == "dev-1" && r["values"] == json!({"ok": 1}))
    });
    assert!(
        cloud
            .observer
            .records()
            .iter()
            .all(|(_, _, r)| r["values"].get("secret").is_none()),
        "the fleet rule dropped the secret"
    );

    // Tampered payload (signature of v2, payload changed).
    let v2 = json!({"version": 2, "config": {"log": {"level": "debug"}}});
    let mut tampered = sign(tmp.path(), &key, &v2);
    use std::io::Write as _;
    let other = json!({"version": 2, "config": {"log": {"level": "trace"}}}).to_string();
    let mut enc = Command::new("base64")
        .args(["-w", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    enc.stdin
        .take()
        .unwrap()
        .write_all(other.as_bytes())
        .unwrap();
    tampered["payload"] = json!(
        String::from_utf8(enc.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
    );
    push(&cloud, &tampered);
    let r = wait_report(&cloud, 2, "rejected", Duration::from_secs(10));
    assert!(r["error"].as_str().unwrap().contains("signature"), "{r}");
    // Signed by a key the gateway does not trust.
    push(
        &cloud,
        &sign(tmp.path(), &stranger, &json!({"version": 3, "config": {}})),
    );
    let r = wait_report(&cloud, 3, "rejected", Duration::from_secs(10));
    assert!(r["error"].as_str().unwrap().contains("signature"), "{r}");
    // A config that does not validate.
    push(
        &cloud,
        &sign(
            tmp.path(),
            &key,
            &json!({"version": 4, "config": {"outbox": {"max_bytes": "12XB"}}}),
        ),
    );
    let r = wait_report(&cloud, 4, "rejected", Duration::from_secs(10));
    assert!(
        r["error"].as_str().unwrap().contains("outbox.max_bytes"),
        "{r}"
    );
    // v5 applies; then v1 again is a replay.
    push(
        &cloud,
        &sign(
            tmp.path(),
            &key,
            &json!({"version": 5, "config": v1["config"]}),
        ),
    );
    wait_report(&cloud, 5, "applied", Duration::from_secs(20));
    wait_for("the gateway back", Duration::from_secs(10), || {
        connected(&gw)
    });
    push(&cloud, &sign(tmp.path(), &key, &v1));
    let r = wait_report(&cloud, 1, "rejected", Duration::from_secs(10));
    assert!(r["error"].as_str().unwrap().contains("not newer"), "{r}");

    // v6 points the uplink at a broker that is not there: rolled back.
    let dead = free_port();
    push(
        &cloud,
        &sign(
            tmp.path(),
            &key,
            &json!({"version": 6, "config": {"cloud": {"url": format!("mqtts://127.0.0.1:{dead}")}}}),
        ),
    );
    let r = wait_report(&cloud, 6, "rolled_back", Duration::from_secs(40));
    assert!(
        r["error"].as_str().unwrap().contains("confirm_timeout"),
        "{r}"
    );
    assert_eq!(gw.pid(), pid, "rolled back in process");
    wait_for("the gateway on v5 again", Duration::from_secs(15), || {
        connected(&gw)
    });
    // v5's rule is in force again (the restarted listener bound a new
    // ephemeral port).
    let url = format!(
        "http://{}/api/v1/{token}/telemetry",
        gw.status()["listeners"]["http"].as_str().unwrap()
    );
    assert_eq!(
        curl(&["-X", "POST", "-d", r#"{"secret":7,"ok":2}"#, &url]).0,
        200
    );
    wait_for("the second reading", Duration::from_secs(10), || {
        cloud
            .observer
            .records()
            .iter()
            .any(|(_, _, r)| r["values"] == json!({"ok": 2}))
    });
    assert!(
        cloud
            .observer
            .records()
            .iter()
            .all(|(_, _, r)| r["values"].get("secret").is_none())
    );
    assert_eq!(gw.stop(), Some(0));
}

/// `printf %s TOKEN | sha256sum`, as an operator provisioning devices would.
fn token_sha256(token: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn a_fleet_config_provisions_a_device_by_token_hash_and_a_later_one_revokes_it() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "fleet.key");
    let mut gw = cloud.gateway(tmp.path(), "");
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(&format!(
        "\n[fleet]\ntrusted_keys = [\"{public}\"]\nconfirm_timeout = \"10s\"\n"
    ));
    std::fs::write(&gw.config, config).unwrap();
    let cli_token = gw.add_device("cli-dev");
    gw.start();
    let connected = |gw: &Gateway| {
        gw.try_status()
            .is_some_and(|s| s["uplink"]["connected"] == json!(true))
    };
    wait_for("the uplink", Duration::from_secs(15), || connected(&gw));
    let telemetry = |gw: &Gateway, token: &str, body: &str| {
        let url = format!(
            "http://{}/api/v1/{token}/telemetry",
            gw.status()["listeners"]["http"].as_str().unwrap()
        );
        curl(&["-X", "POST", "-d", body, &url]).0
    };
    let token = "provisioned-by-the-fleet-1";
    assert_eq!(telemetry(&gw, token, r#"{"before":1}"#), 401);

    // v1 provisions the device by the hash of its token: the token itself
    // is never in the envelope.
    let v1 = json!({"version": 1, "config": {"devices": [
        {"name": "fleet-dev", "type": "sensor", "token_sha256": token_sha256(token)}]}});
    let envelope = sign(tmp.path(), &key, &v1);
    assert!(!envelope.to_string().contains(token));
    push(&cloud, &envelope);
    wait_report(&cloud, 1, "applied", Duration::from_secs(20));
    wait_for("the gateway back", Duration::from_secs(10), || {
        connected(&gw)
    });
    assert_eq!(telemetry(&gw, token, r#"{"provisioned":1}"#), 200);
    wait_for("the reading upstream", Duration::from_secs(10), || {
        cloud
            .observer
            .records()
            .iter()
            .any(|(_, d, r)| d == "fleet-dev" && r["values"] == json!({"provisioned": 1}))
    });
    let list = gw.cli_json(&["devices", "list", "--json"]);
    let row = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        (&row("fleet-dev")["source"], &row("fleet-dev")["type"]),
        (&json!("config"), &json!("sensor"))
    );
    assert_eq!(row("cli-dev")["source"], "cli");

    // v2 no longer lists it: revoked (still listed), the CLI device untouched.
    push(
        &cloud,
        &sign(tmp.path(), &key, &json!({"version": 2, "config": {}})),
    );
    wait_report(&cloud, 2, "applied", Duration::from_secs(20));
    wait_for("the gateway back", Duration::from_secs(10), || {
        connected(&gw)
    });
    assert_eq!(telemetry(&gw, token, r#"{"after":1}"#), 401);
    assert_eq!(telemetry(&gw, &cli_token, r#"{"cli":1}"#), 200);
    let list = gw.cli_json(&["devices", "list", "--json"]);
    let dev = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "fleet-dev")
        .unwrap();
    assert_eq!(dev["revoked"], true);
    assert_eq!(gw.stop(), Some(0));
}
