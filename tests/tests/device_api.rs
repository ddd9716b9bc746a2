//! End-to-end tests of the ThingsBoard device API beyond telemetry, over
//! sluice's MQTT listener with real peers: the ThingsBoard Python device SDK
//! (`tb-mqtt-client`), `mosquitto_sub`/`mosquitto_pub` as devices and as
//! the cloud, and mosquitto (TLS, password auth) as the cloud broker.
//! Covers client attributes upstream, attribute requests, shared-attribute
//! pushes, commands from `P/commands` with their answers and errors, and
//! firmware chunks for a staged image.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A `mosquitto_sub` device session on the gateway: subscribed to `topics`
/// with `-v`, collecting `topic payload` lines.
struct DeviceSub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl DeviceSub {
    fn start(gw: &Gateway, token: &str, topics: &[&str]) -> Self {
        let addr = gw.mqtt.as_ref().unwrap();
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args([
            "-h", host, "-p", port, "-u", token, "-V", "5", "-q", "1", "-v",
        ]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for DeviceSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the device's session is registered with its filters (the
/// gateway counts it as connected).
fn wait_connected(gw: &Gateway, n: u64) {
    wait_for("device sessions", Duration::from_secs(10), || {
        gw.status()["devices"]["connected"].as_u64() == Some(n)
    });
    // SUBSCRIBE follows CONNACK at once; give it a moment to be processed.
    pause(Duration::from_millis(300));
}

#[test]
fn thingsboard_sdk_telemetry_attributes_rpc_and_firmware_through_the_gateway() {
    if !has_python_module("tb_device_mqtt") {
        return;
    }
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "");
    let token = gw.add_device("dev-1");
    // The 200 KiB OTA image staged for dev-1 before the daemon starts.
    let image = ota_image();
    let image_file = gw.stage_firmware(&image, "bench_fw.bin", "1.1", "dev-1");
    let sha = {
        let out = Command::new("sha256sum").arg(&image_file).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().next().unwrap().to_owned()
    };
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    // The uplink subscribes to the downlink right after CONNACK.
    pause(Duration::from_millis(500));

    let addr = gw.mqtt.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/tb_sdk_device.py"
    );
    let sdk_dir = tmp.path().join("sdk-cwd");
    std::fs::create_dir_all(&sdk_dir).unwrap();
    let out = Command::new("timeout")
        .args(["150", "python3", script, host, port, &token])
        .arg(cloud.broker.port.to_string())
        .arg(&cloud.pki.ca)
        .args([OBS_USER.0, OBS_USER.1, PREFIX, &sha])
        .current_dir(&sdk_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Json = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        got["steps"],
        json!(["connected", "published", "attributes", "rpc", "firmware"])
    );
    assert_eq!(got["telemetry_rc"], 0);
    assert_eq!(got["attributes_rc"], 0);
    // Attribute request before and after the cloud set a shared attribute.
    assert_eq!(
        got["attribute_response_before"],
        json!({"client": {"model": "bench"}, "shared": {}})
    );
    assert_eq!(got["push"], json!({"targetTemp": 23}));
    assert_eq!(
        got["attribute_response_after"],
        json!({"client": {"model": "bench"}, "shared": {"targetTemp": 23}})
    );
    // The SDK saw an integer request id and the cloud's method and params.
    let rpc = &got["rpc"];
    assert!(rpc[0].as_str().unwrap().parse::<u32>().is_ok(), "{rpc}");
    assert_eq!(rpc[1], json!({"method": "setGpio", "params": {"pin": 7}}));
    // Firmware: all 204 800 bytes, checksum verified, written by the SDK.
    assert_eq!(got["firmware"]["size"], 204_800);
    assert_eq!(got["firmware"]["sha256_ok"], true);
    assert_eq!(
        std::fs::read(sdk_dir.join("bench_fw.bin")).unwrap(),
        image,
        "the file the SDK wrote is the staged image"
    );

    // Upstream, on the cloud broker.
    wait_for(
        "the command response upstream",
        Duration::from_secs(15),
        || {
            !cloud
                .seen_on(&format!("{PREFIX}/commands/response"))
                .is_empty()
        },
    );
    assert_eq!(
        cloud.seen_on(&format!("{PREFIX}/commands/response")),
        vec![json!({"id": "cmd-1", "device": "dev-1", "result": {"ok": true, "pin": 7}})]
    );
    wait_for(
        "client attributes upstream",
        Duration::from_secs(15),
        || !cloud.seen_on(&format!("{PREFIX}/attributes")).is_empty(),
    );
    let attrs = cloud.seen_on(&format!("{PREFIX}/attributes"));
    assert_eq!(attrs[0]["gateway"], "gw-test");
    assert_eq!(attrs[0]["records"][0]["device"], "dev-1");
    assert_eq!(
        attrs[0]["records"][0]["values"],
        json!({"model": "bench", "fwSupported": true})
    );
    assert!(attrs[0]["records"][0].get("ts").is_none());
    let states = || -> Vec<String> {
        cloud
            .observer
            .records()
            .iter()
            .filter_map(|(_, d, r)| {
                (d == "dev-1")
                    .then(|| r["values"]["fw_state"].as_str().map(str::to_owned))
                    .flatten()
            })
            .collect()
    };
    wait_for("fw_state UPDATED upstream", Duration::from_secs(15), || {
        states().last().map(String::as_str) == Some("UPDATED")
    });
    // The gateway followed the SDK's own fw_state telemetry: the campaign
    // is done for dev-1, reported on P/firmware/state with LwM2M's
    // success, and the version it runs is recorded.
    wait_for("the campaign updated", Duration::from_secs(10), || {
        gw.cli_json(&["firmware", "status", "--json"])["campaigns"][0]["state"] == "updated"
    });
    let reports = cloud.seen_on(&format!("{PREFIX}/firmware/state"));
    let seen: Vec<&str> = reports
        .iter()
        .filter(|r| r["device"] == "dev-1")
        .filter_map(|r| r["fw_state"].as_str())
        .collect();
    assert_eq!(
        seen,
        [
            "DOWNLOADING",
            "DOWNLOADED",
            "VERIFIED",
            "UPDATING",
            "UPDATED"
        ],
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|r| r["device"] == "dev-1" && r["state"] == "idle" && r["result_code"] == 1)
    );
    let records = cloud.observer.records();
    assert!(records.iter().any(
        |(_, d, r)| d == "dev-1" && r["values"] == json!({"temperature": 21.5, "humidity": 40})
    ));
    assert_eq!(
        states(),
        [
            "IDLE",
            "DOWNLOADING",
            "DOWNLOADED",
            "VERIFIED",
            "UPDATING",
            "UPDATED"
        ]
    );
    let st = gw.status();
    assert_eq!(st["commands"]["answered"], 1);
    // The command response and the firmware reports went up outside the
    // outbox.
    let sent = st["uplink"]["responses_sent"].as_u64().unwrap();
    assert!(sent > reports.len() as u64, "{sent} vs {}", reports.len());
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn commands_fail_upstream_for_unknown_offline_unsubscribed_and_silent_devices() {
    // Unknown: at once. Offline or not listening: `offline` once the
    // command's timeout passes without the device listening. Silent:
    // `timeout`.
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "command_timeout = \"30s\"\n");
    let quiet = gw.add_device("quiet");
    gw.add_device("away");
    let deaf = gw.add_device("deaf");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    pause(Duration::from_millis(500));
    // `quiet` listens for commands but never answers; `deaf` is connected
    // without the RPC subscription.
    let quiet_sub = DeviceSub::start(&gw, &quiet, &["v1/devices/me/rpc/request/+"]);
    let _deaf_sub = DeviceSub::start(&gw, &deaf, &["v1/devices/me/attributes"]);
    wait_connected(&gw, 2);
    let commands = format!("{PREFIX}/commands");
    let sent = std::time::Instant::now();
    for (id, device, expires) in [
        (json!(1), "ghost", None),
        (json!("two"), "away", Some(1500)),
        (json!(3), "deaf", Some(1500)),
        (json!(4), "quiet", Some(1500)),
    ] {
        let mut c = json!({"id": id, "device": device, "method": "reboot", "params": {"delay": 1}});
        if let Some(ms) = expires {
            c["expires_ms"] = json!(ms);
        }
        cloud.publish(&commands, &c);
    }
    // A malformed command is refused and counted, not answered.
    cloud.publish(&commands, &json!({"device": "quiet", "method": "x"}));
    let responses = format!("{PREFIX}/commands/response");
    // The unknown device is answered at once; the offline and deaf ones
    // wait for their device to listen until their timeout.
    wait_for(
        "the unknown_device response",
        Duration::from_secs(10),
        || !cloud.seen_on(&responses).is_empty(),
    );
    pause(Duration::from_millis(1000).saturating_sub(sent.elapsed()));
    assert_eq!(
        cloud.seen_on(&responses).len(),
        1,
        "nothing but unknown_device within the first second"
    );
    wait_for("four error responses", Duration::from_secs(15), || {
        cloud.seen_on(&responses).len() >= 4
    });
    assert!(sent.elapsed() >= Duration::from_millis(1500));
    let mut by_id: Vec<(String, Json)> = cloud
        .seen_on(&responses)
        .into_iter()
        .map(|r| (r["id"].to_string(), r))
        .collect();
    by_id.sort_by(|a, b| a.0.cmp(&b.0));
    let codes: Vec<(Json, Json, Json)> = by_id
        .iter()
        .map(|(_, r)| {
            (
                r["id"].clone(),
                r["device"].clone(),
                r["error"]["code"].clone(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (json!("two"), json!("away"), json!("offline")),
            (json!(1), json!("ghost"), json!("unknown_device")),
            (json!(3), json!("deaf"), json!("offline")),
            (json!(4), json!("quiet"), json!("timeout")),
        ]
    );
    let message = |i: usize| by_id[i].1["error"]["message"].as_str().unwrap().to_owned();
    assert!(message(3).contains("1500 ms"));
    assert_eq!(message(0), "the device did not come online within 1500 ms");
    assert!(
        message(2).contains("connected but did not listen for commands"),
        "{}",
        message(2)
    );
    // The silent device did receive the command, under an integer id.
    let lines = quiet_sub.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let (topic, body) = lines[0].split_once(' ').unwrap();
    let id = topic.strip_prefix("v1/devices/me/rpc/request/").unwrap();
    assert!(id.parse::<u32>().is_ok());
    assert_eq!(
        serde_json::from_str::<Json>(body).unwrap(),
        json!({"method": "reboot", "params": {"delay": 1}})
    );
    // Its late answer is dropped, not sent up.
    let late = mosquitto_pub(
        &gw,
        &[
            "-u",
            &quiet,
            "-V",
            "5",
            "-q",
            "1",
            "-t",
            &format!("v1/devices/me/rpc/response/{id}"),
            "-m",
            "{\"late\":true}",
        ],
        "",
    );
    assert!(late.status.success());
    pause(Duration::from_millis(500));
    assert_eq!(cloud.seen_on(&responses).len(), 4);
    let st = gw.status();
    assert_eq!(st["commands"]["commands"], 4);
    assert_eq!(st["commands"]["delivered"], 1);
    assert_eq!(st["commands"]["failed"], 4);
    assert_eq!(st["commands"]["stray_answers"], 1);
    assert_eq!(st["uplink"]["downlink_refused"], 1);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_command_for_an_offline_device_is_delivered_when_it_connects_within_the_timeout() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "");
    let token = gw.add_device("sleepy");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    pause(Duration::from_millis(500));
    cloud.publish(
        &format!("{PREFIX}/commands"),
        &json!({"id": "wake-1", "device": "sleepy", "method": "setGpio",
                "params": {"pin": 3}, "expires_ms": 20000}),
    );
    wait_for("the command parked", Duration::from_secs(10), || {
        gw.status()["commands"]["parked"] == 1
    });
    // The device comes online and subscribes: the command arrives.
    let sub = DeviceSub::start(&gw, &token, &["v1/devices/me/rpc/request/+"]);
    let mut request = None;
    wait_for(
        "the parked command delivered",
        Duration::from_secs(10),
        || {
            request = sub.lines().first().cloned();
            request.is_some()
        },
    );
    let line = request.unwrap();
    let (topic, body) = line.split_once(' ').unwrap();
    assert_eq!(
        serde_json::from_str::<Json>(body).unwrap(),
        json!({"method": "setGpio", "params": {"pin": 3}})
    );
    let id = topic.strip_prefix("v1/devices/me/rpc/request/").unwrap();
    let answer = mosquitto_pub(
        &gw,
        &[
            "-u",
            &token,
            "-q",
            "1",
            "-t",
            &format!("v1/devices/me/rpc/response/{id}"),
            "-m",
            r#"{"pin":3,"on":true}"#,
        ],
        "",
    );
    assert!(answer.status.success());
    let responses = format!("{PREFIX}/commands/response");
    wait_for("the answer upstream", Duration::from_secs(10), || {
        !cloud.seen_on(&responses).is_empty()
    });
    assert_eq!(
        cloud.seen_on(&responses),
        vec![json!({"id": "wake-1", "device": "sleepy", "result": {"pin": 3, "on": true}})]
    );
    let st = gw.status();
    assert_eq!(
        (&st["commands"]["delivered"], &st["commands"]["failed"]),
        (&json!(1), &json!(0))
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn shared_attributes_persist_across_restarts_and_are_pushed_to_subscribers() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "");
    let token = gw.add_device("dev-1");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    pause(Duration::from_millis(500));
    let sub = DeviceSub::start(&gw, &token, &["v1/devices/me/attributes"]);
    wait_connected(&gw, 1);
    let shared = format!("{PREFIX}/attributes/shared");
    cloud.publish(
        &shared,
        &json!({"device": "dev-1", "values": {"targetTemp": 23, "mode": "eco"}}),
    );
    cloud.publish(
        &shared,
        &json!({"device": "dev-1", "values": {"mode": null}}),
    );
    wait_for("two pushes", Duration::from_secs(10), || {
        sub.lines().len() >= 2
    });
    let pushes: Vec<Json> = sub
        .lines()
        .iter()
        .map(|l| {
            let (topic, body) = l.split_once(' ').unwrap();
            assert_eq!(topic, "v1/devices/me/attributes");
            serde_json::from_str(body).unwrap()
        })
        .collect();
    assert_eq!(
        pushes,
        vec![
            json!({"targetTemp": 23, "mode": "eco"}),
            json!({"deleted": ["mode"]})
        ]
    );
    drop(sub);
    assert_eq!(gw.stop(), Some(0));
    // After a restart the device reads what was set while it was away.
    gw.start();
    let req = |id: u32, body: &str| {
        let addr = gw.mqtt.clone().unwrap();
        let (host, port) = addr.rsplit_once(':').unwrap();
        let sub = Command::new("mosquitto_rr")
            .args(["-h", host, "-p", port, "-u", &token, "-V", "5", "-q", "1"])
            .args(["-t", &format!("v1/devices/me/attributes/request/{id}")])
            .args(["-e", &format!("v1/devices/me/attributes/response/{id}")])
            .args(["-m", body, "-W", "10"])
            .output()
            .unwrap();
        assert!(
            sub.status.success(),
            "{}",
            String::from_utf8_lossy(&sub.stderr)
        );
        serde_json::from_slice::<Json>(&sub.stdout).unwrap()
    };
    assert_eq!(
        req(1, r#"{"sharedKeys":"targetTemp,mode"}"#),
        json!({"shared": {"targetTemp": 23}})
    );
    assert_eq!(
        req(2, ""),
        json!({"client": {}, "shared": {"targetTemp": 23}})
    );
    // Shared attributes for an unregistered device are ignored.
    cloud.publish(&shared, &json!({"device": "ghost", "values": {"x": 1}}));
    pause(Duration::from_millis(300));
    assert_eq!(gw.status()["commands"]["attribute_updates"], 0);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn failed_logins_from_one_address_are_throttled_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            mqtt: true,
            ..GatewaySpec::default()
        },
    );
    let text = std::fs::read_to_string(&gw.config).unwrap().replace(
        "[listeners.mqtt]\nbind = \"127.0.0.1:0\"\n",
        "[listeners.mqtt]\nbind = \"127.0.0.1:0\"\nauth_fail_limit = 3\nauth_fail_window = \"60s\"\n",
    );
    std::fs::write(&gw.config, text).unwrap();
    let token = gw.add_device("dev-1");
    gw.start();
    let try_login = |tok: &str, version: &str| {
        let out = mosquitto_pub(
            &gw,
            &[
                "-u",
                tok,
                "-V",
                version,
                "-q",
                "1",
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                "{\"t\":1}",
            ],
            "",
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_lowercase(),
        )
    };
    // The good token works before any failure.
    assert!(try_login(&token, "mqttv311").0);
    for _ in 0..3 {
        let (ok, err) = try_login("wrong-token", "mqttv311");
        assert!(!ok);
        assert!(err.contains("bad user name or password"), "{err}");
    }
    // Past the limit even the right token is refused, unchecked, with
    // "not authorised" (3.1.1 0x05; MQTT 5 0x87).
    let (ok, err) = try_login(&token, "mqttv311");
    assert!(!ok);
    assert!(err.contains("not authori"), "{err}");
    let (ok, err) = try_login(&token, "mqttv5");
    assert!(!ok);
    assert!(err.contains("not authori"), "{err}");
    let st = gw.status();
    assert_eq!(st["ingest"]["messages"]["mqtt"]["unauthorized"], 5, "{st}");
    assert_eq!(st["ingest"]["records"], 1);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn legacy_topics_map_to_telemetry_and_only_bridges_speak_for_others() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_spec = GatewaySpec {
        mqtt: true,
        ..GatewaySpec::default()
    };
    let mut gw = Gateway::new(tmp.path(), &gw_spec);
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(
        "\n[[mqtt.mappings]]\ntopic = \"sensors/+/temp\"\ndevice = \"{1}\"\nformat = \"number\"\nkey = \"temp\"\n\
         \n[[mqtt.mappings]]\ntopic = \"legacy/env\"\nformat = \"json\"\nkeys = { t = \"/temperature\", h = \"/env/humidity\" }\n",
    );
    std::fs::write(&gw.config, config).unwrap();
    let plain = gw.add_device("plain-1");
    let out = gw.cli(&["devices", "add", "bridge-1", "--bridge-for", "room-*"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bridge = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let shown = gw.cli_json(&["devices", "show", "bridge-1", "--json"]);
    assert_eq!(shown["bridge_for"], "room-*");
    gw.start();
    let publish = |token: &str, topic: &str, msg: &str| {
        mosquitto_pub(
            &gw,
            &[
                "-u", token, "-V", "mqttv5", "-q", "1", "-t", topic, "-m", msg,
            ],
            "",
        )
    };
    // A bridge publishes for the devices its glob allows.
    assert!(
        publish(&bridge, "sensors/room-7/temp", "21.5")
            .status
            .success()
    );
    assert!(
        publish(&bridge, "sensors/room-8/temp", "19")
            .status
            .success()
    );
    // Its own JSON on a mapped topic with pointers.
    assert!(
        publish(
            &bridge,
            "legacy/env",
            r#"{"temperature":3,"env":{"humidity":40.5}}"#
        )
        .status
        .success()
    );
    // A plain device may only publish for itself; a bridge only within its glob.
    // (mosquitto_pub exits 0 on a negative MQTT 5 PUBACK; it says so on
    // stderr.)
    let refused = |o: std::process::Output| {
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(
            err.contains("not authorized") || err.contains("payload format"),
            "{err}"
        );
    };
    refused(publish(&plain, "sensors/room-7/temp", "1"));
    assert!(
        publish(&plain, "sensors/plain-1/temp", "2")
            .status
            .success()
    );
    refused(publish(&bridge, "sensors/kitchen/temp", "1"));
    // A payload that does not fit the format: refused.
    refused(publish(&bridge, "sensors/room-7/temp", "warm"));
    let stored = gw.cli_json(&["queue", "peek", "-n", "100", "--json"]);
    let got: Vec<(String, Json)> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["values"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("room-7".into(), json!({"temp": 21.5})),
            ("room-8".into(), json!({"temp": 19})),
            ("bridge-1".into(), json!({"h": 40.5, "t": 3})),
            ("plain-1".into(), json!({"temp": 2})),
        ]
    );
    let st = gw.status();
    assert_eq!(st["ingest"]["messages"]["mqtt"]["unauthorized"], 2, "{st}");
    assert_eq!(st["ingest"]["messages"]["mqtt"]["bad_payload"], 1, "{st}");
    assert_eq!(gw.stop(), Some(0));
}
