//! End-to-end test of the `thingsboard` cloud profile against mosquitto
//! standing in for ThingsBoard: the gateway API's topics and payload shapes
//! (asserted as JSON), the getSessionLimits handshake, commands from
//! `v1/gateway/rpc` to an MQTT and a CoAP device with the answers back on
//! `v1/gateway/rpc`, shared attributes down, and the error reply for an
//! offline device after its timeout.

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

/// A `mosquitto_sub -v` on the cloud broker collecting (topic, payload).
struct CloudSub {
    child: Child,
    seen: Arc<Mutex<Vec<(String, Json)>>>,
}

impl CloudSub {
    fn start(cloud: &Cloud, topics: &[&str]) -> Self {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &cloud.broker.port.to_string()])
            .arg("--cafile")
            .arg(&cloud.pki.ca)
            .args(["-u", OBS_USER.0, "-P", OBS_USER.1, "-q", "1", "-v"]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some((t, p)) = line.split_once(' ') {
                    let p = serde_json::from_str(p).unwrap_or(Json::String(p.into()));
                    s2.lock().unwrap().push((t.to_owned(), p));
                }
            }
        });
        pause(Duration::from_millis(300));
        Self { child, seen }
    }

    fn on(&self, topic: &str) -> Vec<Json> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn wait(&self, topic: &str, what: &str, pred: impl Fn(&Json) -> bool) -> Json {
        let mut found = None;
        wait_for(what, Duration::from_secs(15), || {
            found = self.on(topic).into_iter().find(|p| pred(p));
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for CloudSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device-side `mosquitto_sub` on the gateway that exits after one message;
/// returns its "topic payload" line.
fn device_sub_one(gw: &Gateway, token: &str, topic: &str) -> std::thread::JoinHandle<String> {
    let addr = gw.mqtt.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let child = Command::new("mosquitto_sub")
        .args([
            "-h", host, "-p", port, "-u", token, "-q", "1", "-v", "-C", "1", "-W", "20", "-t",
            topic,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::spawn(move || String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap())
}

#[test]
fn the_thingsboard_gateway_api_carries_telemetry_attributes_and_rpc_both_ways() {
    let cloud = cloud();
    let sub = CloudSub::start(&cloud, &["v1/gateway/#", "v1/devices/me/#"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            mqtt: true,
            coap: Some(String::new()),
            cloud: Some((cloud.broker.port, cloud.pki.ca.clone())),
            cloud_extra: "profile = \"thingsboard\"\n".into(),
            ..GatewaySpec::default()
        },
    );
    let tok_m = gw.add_device("dev-m");
    let tok_c = gw.add_device("dev-c");
    gw.add_device("dev-off");
    gw.start();
    // The gateway asks for its session limits before forwarding anything.
    let ask = sub.wait("v1/devices/me/rpc/request/1", "getSessionLimits", |_| true);
    assert_eq!(
        ask,
        json!({"method": "getSessionLimits", "params": {"timeout": 5000}})
    );
    // Telemetry and client attributes of an MQTT device, accepted (stored)
    // but not forwarded while the limits are unknown.
    let pub_m = |topic: &str, msg: &str| {
        let o = mosquitto_pub(&gw, &["-u", &tok_m, "-q", "1", "-t", topic, "-m", msg], "");
        assert!(o.status.success());
    };
    pub_m(
        "v1/devices/me/telemetry",
        r#"{"ts":1767225600000,"values":{"t":21.5}}"#,
    );
    pub_m("v1/devices/me/attributes", r#"{"model":"m-1"}"#);
    pause(Duration::from_secs(1));
    assert!(
        sub.on("v1/gateway/telemetry").is_empty() && sub.on("v1/gateway/connect").is_empty(),
        "nothing is forwarded before the getSessionLimits answer"
    );
    cloud.publish(
        "v1/devices/me/rpc/response/1",
        &json!({"maxPayloadSize": 65536, "maxInflightMessages": 100, "rateLimits": {}}),
    );
    let connect = sub.wait("v1/gateway/connect", "connect", |p| p["device"] == "dev-m");
    assert_eq!(connect, json!({"device": "dev-m", "type": "sensor"}));
    let tel = sub.wait("v1/gateway/telemetry", "telemetry", |p| {
        p.get("dev-m").is_some()
    });
    assert_eq!(
        tel,
        json!({"dev-m": [{"ts": 1_767_225_600_000i64, "values": {"t": 21.5}}]})
    );
    let attrs = sub.wait("v1/gateway/attributes", "attributes", |p| {
        p.get("dev-m").is_some()
    });
    assert_eq!(attrs, json!({"dev-m": {"model": "m-1"}}));

    // A command for the MQTT device, answered by it.
    let req = device_sub_one(&gw, &tok_m, "v1/devices/me/rpc/request/+");
    pause(Duration::from_millis(500));
    cloud.publish(
        "v1/gateway/rpc",
        &json!({"device": "dev-m", "data": {"id": 42, "method": "setGpio", "params": {"pin": 7}}}),
    );
    let line = req.join().unwrap();
    let (topic, body) = line.trim().split_once(' ').unwrap();
    assert_eq!(
        serde_json::from_str::<Json>(body).unwrap(),
        json!({"method": "setGpio", "params": {"pin": 7}})
    );
    let n = topic.rsplit('/').next().unwrap();
    pub_m(&format!("v1/devices/me/rpc/response/{n}"), r#"{"ok":true}"#);
    let answer = sub.wait("v1/gateway/rpc", "the MQTT device's answer", |p| {
        p["id"] == 42
    });
    assert_eq!(
        answer,
        json!({"device": "dev-m", "id": 42, "data": {"ok": true}})
    );

    // Shared attributes down to the MQTT device.
    let attr = device_sub_one(&gw, &tok_m, "v1/devices/me/attributes");
    pause(Duration::from_millis(500));
    cloud.publish(
        "v1/gateway/attributes",
        &json!({"device": "dev-m", "data": {"targetTemp": 23}}),
    );
    let line = attr.join().unwrap();
    assert_eq!(line.trim(), r#"v1/devices/me/attributes {"targetTemp":23}"#);

    // A command for the CoAP device, which observes rpc and answers by POST.
    let coap = gw.coap.clone().unwrap();
    let out = tmp.path().join("rpc.out");
    let mut observer = Command::new("coap-client-notls")
        .args([
            "-m",
            "get",
            "-s",
            "15",
            &format!("coap://{coap}/api/v1/{tok_c}/rpc"),
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the CoAP observer", Duration::from_secs(10), || {
        gw.status()["coap"]["observers"] == 1
    });
    cloud.publish(
        "v1/gateway/rpc",
        &json!({"device": "dev-c", "data": {"id": 43, "method": "blink", "params": {}}}),
    );
    let mut cmd = None;
    wait_for("the CoAP notification", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        cmd = text.find(r#"{"method""#).and_then(|i| {
            serde_json::Deserializer::from_str(&text[i..])
                .into_iter::<Json>()
                .next()?
                .ok()
        });
        cmd.is_some()
    });
    let cmd = cmd.unwrap();
    assert_eq!(cmd["method"], "blink");
    let id = cmd["id"].as_u64().unwrap();
    let o = Command::new("coap-client-notls")
        .args([
            "-m",
            "post",
            "-e",
            r#"{"blinked":3}"#,
            &format!("coap://{coap}/api/v1/{tok_c}/rpc/{id}"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let answer = sub.wait("v1/gateway/rpc", "the CoAP device's answer", |p| {
        p["id"] == 43
    });
    assert_eq!(
        answer,
        json!({"device": "dev-c", "id": 43, "data": {"blinked": 3}})
    );
    let _ = observer.kill();
    let _ = observer.wait();

    // An offline device: the error reply in ThingsBoard's shape, once the
    // command's timeout (params.timeout) passed without it coming online.
    let sent = std::time::Instant::now();
    cloud.publish(
        "v1/gateway/rpc",
        &json!({"device": "dev-off", "data": {"id": 44, "method": "x", "params": {"timeout": 1000}}}),
    );
    pause(Duration::from_millis(700));
    assert!(
        sub.on("v1/gateway/rpc").iter().all(|p| p["id"] != 44),
        "no error before the timeout"
    );
    let err = sub.wait("v1/gateway/rpc", "the offline error", |p| p["id"] == 44);
    assert!(sent.elapsed() >= Duration::from_millis(1000));
    assert_eq!(err["device"], "dev-off");
    assert_eq!(err["data"]["code"], 503, "{err}");
    assert!(
        err["data"]["error"]
            .as_str()
            .unwrap()
            .contains("did not come online within 1000 ms"),
        "{err}"
    );
    // Nothing went to the generic profile's topics.
    assert!(
        cloud
            .observer
            .seen()
            .iter()
            .all(|s| !s.topic.starts_with("sluice/gw-test/")),
        "{:?}",
        cloud
            .observer
            .seen()
            .iter()
            .map(|s| s.topic.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_gateway_rpc_reaches_an_http_long_poll_and_its_answer_goes_back() {
    let cloud = cloud();
    let sub = CloudSub::start(&cloud, &["v1/gateway/#", "v1/devices/me/#"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            cloud: Some((cloud.broker.port, cloud.pki.ca.clone())),
            cloud_extra: "profile = \"thingsboard\"\n".into(),
            ..GatewaySpec::default()
        },
    );
    let token = gw.add_device("dev-h");
    gw.start();
    sub.wait("v1/devices/me/rpc/request/1", "getSessionLimits", |_| true);
    cloud.publish(
        "v1/devices/me/rpc/response/1",
        &json!({"maxPayloadSize": 65536}),
    );
    let base = format!("http://{}/api/v1/{token}", gw.http.as_ref().unwrap());
    let poll = {
        let url = format!("{base}/rpc?timeout=15000");
        std::thread::spawn(move || curl(&[&url]))
    };
    // Give the poll time to register as the device's HTTP channel.
    pause(Duration::from_millis(700));
    cloud.publish(
        "v1/gateway/rpc",
        &json!({"device": "dev-h", "data": {"id": 45, "method": "reboot", "params": {"in": 5}}}),
    );
    let (code, text) = poll.join().unwrap();
    assert_eq!(code, 200, "{text}");
    let body: Json = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["method"], "reboot");
    assert_eq!(body["params"], json!({"in": 5}));
    let n = body["id"].as_u64().unwrap();
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"rebooting":true}"#,
        &format!("{base}/rpc/{n}"),
    ]);
    assert_eq!(code, 200);
    let answer = sub.wait("v1/gateway/rpc", "the HTTP device's answer", |p| {
        p["id"] == 45
    });
    assert_eq!(
        answer,
        json!({"device": "dev-h", "id": 45, "data": {"rebooting": true}})
    );
    assert_eq!(gw.stop(), Some(0));
}
