//! End-to-end tests of the ThingsBoard device API over sluice's HTTP
//! listener beyond telemetry, with curl as the device and mosquitto (TLS,
//! password auth) as the cloud: client attributes upstream, attribute
//! requests, long polls for shared-attribute changes and commands with the
//! device's answers going back up, client-side RPC, and firmware downloads
//! by chunk and by `Range`.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A curl request running in the background (a long poll).
fn spawn_curl(url: &str) -> Child {
    Command::new("curl")
        .args(["-s", "-i", "--max-time", "30", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The status and body of a finished `spawn_curl`.
fn finish(child: Child) -> (u16, String) {
    let out = child.wait_with_output().unwrap();
    split(&String::from_utf8_lossy(&out.stdout))
}

/// (status, body) of a `curl -i` answer.
fn split(text: &str) -> (u16, String) {
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

fn get(url: &str) -> (u16, String) {
    let (_, text) = curl(&[url]);
    split(&text)
}

fn post(url: &str, body: &str) -> (u16, String) {
    let (_, text) = curl(&["-H", "Content-Type: application/json", "-d", body, url]);
    split(&text)
}

fn json_of(body: &str) -> Json {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
}

#[test]
fn http_device_attributes_long_polls_and_commands_round_trip_through_the_cloud() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "command_timeout = \"10s\"\n");
    let token = gw.add_device("dev-1");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    // The uplink subscribes to the downlink right after CONNACK.
    pause(Duration::from_millis(500));
    let base = format!("http://{}/api/v1/{token}", gw.http.as_ref().unwrap());

    // Client attributes go up on P/attributes and are answered back.
    let (code, _) = post(&format!("{base}/attributes"), r#"{"model":"bench","fw":1}"#);
    assert_eq!(code, 200);
    wait_for(
        "client attributes upstream",
        Duration::from_secs(15),
        || !cloud.seen_on(&format!("{PREFIX}/attributes")).is_empty(),
    );
    let up = cloud.seen_on(&format!("{PREFIX}/attributes"));
    assert_eq!(up[0]["records"][0]["device"], "dev-1");
    assert_eq!(
        up[0]["records"][0]["values"],
        json!({"model": "bench", "fw": 1})
    );
    let (code, body) = get(&format!("{base}/attributes?clientKeys=model"));
    assert_eq!(code, 200);
    assert_eq!(json_of(&body), json!({"client": {"model": "bench"}}));
    // The HTTP SDK's snake_case, repeated keys.
    let (code, body) = get(&format!(
        "{base}/attributes?client_keys=model&client_keys=fw&shared_keys=targetTemp"
    ));
    assert_eq!(code, 200);
    assert_eq!(
        json_of(&body),
        json!({"client": {"model": "bench", "fw": 1}, "shared": {}})
    );
    let (code, body) = post(&format!("{base}/attributes"), "[1,2]");
    assert_eq!(code, 400, "{body}");
    assert!(json_of(&body)["error"].is_string());
    let bad = format!("http://{}/api/v1/nope", gw.http.as_ref().unwrap());
    assert_eq!(get(&format!("{bad}/attributes")).0, 401);
    assert_eq!(get(&format!("{bad}/rpc?timeout=10")).0, 401);

    // Nothing to deliver: 408 at the timeout.
    let (code, _) = get(&format!("{base}/attributes/updates?timeout=300"));
    assert_eq!(code, 408);

    // A shared attribute set in the cloud reaches the long poll.
    let poll = spawn_curl(&format!("{base}/attributes/updates?timeout=20000"));
    pause(Duration::from_millis(300));
    cloud.publish(
        &format!("{PREFIX}/attributes/shared"),
        &json!({"device": "dev-1", "values": {"targetTemp": 23}}),
    );
    let (code, body) = finish(poll);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_of(&body), json!({"targetTemp": 23}));
    let (_, body) = get(&format!("{base}/attributes?sharedKeys=targetTemp"));
    assert_eq!(json_of(&body), json!({"shared": {"targetTemp": 23}}));

    // A newer poll takes over from an older one.
    let older = spawn_curl(&format!("{base}/attributes/updates?timeout=20000"));
    pause(Duration::from_millis(300));
    let (code, _) = get(&format!("{base}/attributes/updates?timeout=200"));
    assert_eq!(code, 408);
    assert_eq!(finish(older).0, 409);

    // A command from the cloud reaches the rpc long poll; the answer goes up.
    let (code, _) = get(&format!("{base}/rpc?timeout=200"));
    assert_eq!(code, 408);
    let poll = spawn_curl(&format!("{base}/rpc?timeout=20000"));
    pause(Duration::from_millis(300));
    cloud.publish(
        &format!("{PREFIX}/commands"),
        &json!({"id": "cmd-1", "device": "dev-1", "method": "setGpio", "params": {"pin": 7}}),
    );
    let (code, body) = finish(poll);
    assert_eq!(code, 200, "{body}");
    let command = json_of(&body);
    let id = command["id"].as_u64().expect("an integer id");
    assert_eq!(
        command,
        json!({"id": id, "method": "setGpio", "params": {"pin": 7}})
    );
    let (code, _) = post(&format!("{base}/rpc/{id}"), r#"{"ok":true,"pin":7}"#);
    assert_eq!(code, 200);
    let responses = format!("{PREFIX}/commands/response");
    wait_for("the command response", Duration::from_secs(15), || {
        !cloud.seen_on(&responses).is_empty()
    });
    assert_eq!(
        cloud.seen_on(&responses),
        vec![json!({"id": "cmd-1", "device": "dev-1", "result": {"ok": true, "pin": 7}})]
    );
    // A second answer to the same command, or one to no command: 404.
    assert_eq!(post(&format!("{base}/rpc/{id}"), "{}").0, 404);
    assert_eq!(post(&format!("{base}/rpc/999999"), "{}").0, 404);
    assert_eq!(post(&format!("{base}/rpc/abc"), "{}").0, 400);

    // Client-side RPC answers in the body.
    let (code, body) = post(
        &format!("{base}/rpc"),
        r#"{"method":"getCurrentTime","params":{}}"#,
    );
    assert_eq!(code, 200);
    assert!(json_of(&body)["currentTime"].as_i64().unwrap() > 1_600_000_000_000);
    let (code, body) = post(
        &format!("{base}/rpc"),
        r#"{"method":"getSessionLimits","params":{}}"#,
    );
    assert_eq!(code, 200);
    assert!(json_of(&body)["maxPayloadSize"].as_u64().unwrap() > 0);
    let (code, body) = post(&format!("{base}/rpc"), r#"{"method":"reboot"}"#);
    assert_eq!(code, 200);
    assert_eq!(json_of(&body), json!({"error": "unsupported method"}));
    assert_eq!(post(&format!("{base}/rpc"), "not json").0, 400);

    let st = gw.status();
    assert_eq!(st["commands"]["delivered"], 1);
    assert_eq!(st["commands"]["answered"], 1);
    assert_eq!(st["commands"]["attribute_pushes"], 1);
    assert_eq!(st["uplink"]["responses_sent"], 1);
    assert!(st["ingest"].to_string().contains("unauthorized"));
    // A poll still waiting at shutdown is told to come back; it does not
    // hold the daemon up.
    let pending = spawn_curl(&format!("{base}/rpc?timeout=60000"));
    pause(Duration::from_millis(300));
    let stopping = std::time::Instant::now();
    assert_eq!(gw.stop(), Some(0));
    assert!(stopping.elapsed() < Duration::from_secs(5));
    let (code, text) = finish(pending);
    assert_eq!(code, 503, "{text}");
}

/// Runs curl with `args`, the body to a file: (status, headers, body).
fn download(dir: &Path, args: &[&str]) -> (u16, String, Vec<u8>) {
    let (h, b) = (dir.join("headers"), dir.join("body"));
    let _ = std::fs::remove_file(&b);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    let headers = std::fs::read_to_string(&h).unwrap();
    let code = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, headers, std::fs::read(&b).unwrap_or_default())
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn http_firmware_by_chunks_and_by_range_matches_the_staged_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let token = gw.add_device("dev-1");
    let other = gw.add_device("dev-2");
    let image: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    gw.stage_firmware(&image, "bench.bin", "2.0", "dev-1");
    gw.start();
    let host = gw.http.clone().unwrap();
    let fw = |t: &str, q: &str| format!("http://{host}/api/v1/{t}/firmware?{q}");
    let dl = tmp.path().join("dl");
    std::fs::create_dir_all(&dl).unwrap();

    // The device learns what to fetch from its shared attributes.
    let (code, body) = get(&format!(
        "http://{host}/api/v1/{token}/attributes?sharedKeys=fw_title,fw_version,fw_size"
    ));
    assert_eq!(code, 200);
    assert_eq!(
        json_of(&body),
        json!({"shared": {"fw_title": "bench.bin", "fw_version": "2.0", "fw_size": 100_000}})
    );

    // By chunks, as the HTTP SDK fetches: one extra chunk past the end is
    // an empty 200.
    let mut got = Vec::new();
    let mut served = 0;
    for k in 0..=(100_000 / 4096 + 1) {
        let q = format!("title=bench.bin&version=2.0&size=4096&chunk={k}");
        let (code, headers, body) = download(&dl, &[&fw(&token, &q)]);
        assert_eq!(code, 200, "chunk {k}: {headers}");
        assert_eq!(
            header(&headers, "content-length"),
            Some(&*body.len().to_string())
        );
        served += body.len();
        got.extend(body);
    }
    assert!(got == image, "the chunks are the image");

    // The whole image in one go.
    let (code, _, body) = download(&dl, &[&fw(&token, "title=bench.bin&version=2.0")]);
    assert_eq!(code, 200);
    assert!(body == image);
    served += body.len();

    // A range of the whole image, and a suffix range within a chunk.
    let (code, headers, body) = download(
        &dl,
        &[
            "-H",
            "Range: bytes=1000-1999",
            &fw(&token, "title=bench.bin&version=2.0"),
        ],
    );
    assert_eq!(code, 206, "{headers}");
    assert_eq!(
        header(&headers, "content-range"),
        Some("bytes 1000-1999/100000")
    );
    assert!(body == image[1000..2000]);
    served += body.len();
    let (code, headers, body) = download(
        &dl,
        &[
            "-H",
            "Range: bytes=-100",
            &fw(&token, "title=bench.bin&version=2.0&size=4096&chunk=2"),
        ],
    );
    assert_eq!(code, 206, "{headers}");
    assert_eq!(
        header(&headers, "content-range"),
        Some("bytes 3996-4095/4096")
    );
    assert!(body == image[8192 + 3996..8192 + 4096]);
    served += body.len();
    // Resuming a download with curl -C: the rest of the image.
    std::fs::write(dl.join("body"), &image[..60_000]).unwrap();
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-C", "-", "-o"])
        .arg(dl.join("body"))
        .arg(fw(&token, "title=bench.bin&version=2.0"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(dl.join("body")).unwrap() == image);
    served += 40_000;

    // Refusals.
    let (code, headers, _) = download(
        &dl,
        &[
            "-H",
            "Range: bytes=100000-",
            &fw(&token, "title=bench.bin&version=2.0"),
        ],
    );
    assert_eq!(code, 416);
    assert_eq!(header(&headers, "content-range"), Some("bytes */100000"));
    assert_eq!(get(&fw(&token, "title=bench.bin&version=1.0")).0, 404);
    assert_eq!(
        get(&fw(&other, "title=bench.bin&version=2.0")).0,
        403,
        "not targeted by a campaign"
    );
    assert_eq!(get(&fw("nope", "title=bench.bin&version=2.0")).0, 401);
    assert_eq!(
        get(&fw(&token, "title=bench.bin&version=2.0&size=big")).0,
        400
    );

    assert_eq!(
        gw.status()["commands"]["firmware_bytes_served"],
        json!(served)
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn thingsboard_http_sdk_attributes_polls_commands_and_firmware_through_the_gateway() {
    if !has_python_module("tb_device_http") {
        return;
    }
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "");
    let token = gw.add_device("dev-http");
    let image = ota_image();
    let image_file = gw.stage_firmware(&image, "bench_http.bin", "3.0", "dev-http");
    let sha = {
        let out = Command::new("sha256sum").arg(&image_file).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().next().unwrap().to_owned()
    };
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    pause(Duration::from_millis(500));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/tb_http_device.py"
    );
    let sdk_dir = tmp.path().join("sdk-cwd");
    std::fs::create_dir_all(&sdk_dir).unwrap();
    let out = Command::new("timeout")
        .args(["120", "python3", script])
        .arg(format!("http://{}", gw.http.as_ref().unwrap()))
        .arg(&token)
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
        json!(["connected", "attributes", "polls", "firmware"])
    );
    assert_eq!(
        got["attribute_response"],
        json!({"client": {"model": "bench-http"}, "shared": {"fw_title": "bench_http.bin"}})
    );
    assert_eq!(got["push"], json!({"targetTemp": 21}));
    let id = got["command"]["id"].as_u64().unwrap();
    assert_eq!(
        got["command"],
        json!({"id": id, "method": "blink", "params": {"n": 3}})
    );
    assert_eq!(got["firmware"], json!({"size": 204_800, "sha256_ok": true}));
    let responses = format!("{PREFIX}/commands/response");
    wait_for("the command response", Duration::from_secs(15), || {
        !cloud.seen_on(&responses).is_empty()
    });
    assert_eq!(
        cloud.seen_on(&responses),
        vec![json!({"id": "cmd-http", "device": "dev-http",
                    "result": {"method": "reply", "params": {"ok": true}}})]
    );
    let states = || -> Vec<String> {
        cloud
            .observer
            .records()
            .iter()
            .filter_map(|(_, d, r)| {
                (d == "dev-http")
                    .then(|| r["values"]["fw_state"].as_str().map(str::to_owned))
                    .flatten()
            })
            .collect()
    };
    wait_for("fw_state UPDATED upstream", Duration::from_secs(15), || {
        states().last().map(String::as_str) == Some("UPDATED")
    });
    // The SDK queues the one dict it keeps mutating, so a state can be sent
    // twice and its predecessor never: check the outcome, not the sequence.
    let states = states();
    assert!(!states.iter().any(|s| s == "FAILED"), "{states:?}");
    assert_eq!(gw.stop(), Some(0));
}
