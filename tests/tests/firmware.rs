//! End-to-end tests of firmware manifests: signed with `sluice fleet sign`,
//! published on the cloud mosquitto's `P/firmware`, the image downloaded
//! from a real HTTPS server on loopback (`scripts/range_server.py`, Python's
//! http.server + ssl with Range support and a request log), served to the
//! targeted devices over HTTP, with progress on `P/firmware/state`.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The HTTPS server the manifests point at.
struct FileServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl FileServer {
    fn start(dir: &Path, pki: &Pki, port: u16, rate: Option<u64>) -> Self {
        let log = dir.join("range_server.log");
        let mut cmd = Command::new("python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/range_server.py"
        ))
        .arg("--cert")
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key)
        .arg("--dir")
        .arg(dir.join("www"))
        .args(["--port", &port.to_string()])
        .arg("--log")
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(r) = rate {
            cmd.args(["--rate", &r.to_string()]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("range_server.py said {line:?}"));
        Self { child, port, log }
    }

    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn kill(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic bytes that do not compress to nothing.
fn image(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn states(cloud: &Cloud) -> Vec<Json> {
    cloud.seen_on(&format!("{PREFIX}/firmware/state"))
}

fn wait_state(cloud: &Cloud, what: &str, limit: Duration, pred: impl Fn(&Json) -> bool) -> Json {
    let mut found = None;
    wait_for(what, limit, || {
        found = states(cloud).into_iter().find(|r| pred(r));
        found.is_some()
    });
    found.unwrap()
}

/// A gateway with `[fleet]` trusting `public` and `[firmware]` trusting
/// the test CA for downloads, plus `extra` firmware lines.
fn gateway(cloud: &Cloud, dir: &Path, public: &str, extra: &str) -> Gateway {
    let gw = cloud.gateway(dir, "");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .unwrap()
        .write_all(
            format!(
                "\n[fleet]\ntrusted_keys = [\"{public}\"]\n\n[firmware]\nca_file = \"{}\"\n\
                 idle_timeout = \"2s\"\n{extra}\n",
                cloud.pki.ca.display()
            )
            .as_bytes(),
        )
        .unwrap();
    gw
}

fn add_device(gw: &Gateway, name: &str, kind: &str) -> String {
    let out = gw.cli(&["devices", "add", name, "--type", kind]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn http(gw: &Gateway) -> String {
    gw.status()["listeners"]["http"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// GETs the device's firmware into `out`; returns the status code.
fn fetch(gw: &Gateway, token: &str, title: &str, version: &str, out: &Path) -> u16 {
    let url = format!(
        "http://{}/api/v1/{token}/firmware?title={title}&version={version}",
        http(gw)
    );
    let o = Command::new("curl")
        .args(["-s", "-o"])
        .arg(out)
        .args(["-w", "%{http_code}", &url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0)
}

fn shared_fw(gw: &Gateway, token: &str) -> Json {
    let (code, body) = curl(&[&format!(
        "http://{}/api/v1/{token}/attributes?sharedKeys=fw_title,fw_version,fw_checksum",
        http(gw)
    )]);
    assert_eq!(code, 200, "{body}");
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<Json>(json).unwrap()["shared"].clone()
}

fn post(gw: &Gateway, token: &str, body: &Json) {
    let url = format!("http://{}/api/v1/{token}/telemetry", http(gw));
    assert_eq!(curl(&["-X", "POST", "-d", &body.to_string(), &url]).0, 200);
}

#[test]
fn a_signed_manifest_is_downloaded_and_served_to_its_devices_one_at_a_time() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "fleet.key");
    let (stranger, _) = keygen(tmp.path(), "stranger.key");
    let bytes = image(300 * 1024, 7);
    let sha = hex(&bytes);
    std::fs::create_dir_all(tmp.path().join("www")).unwrap();
    std::fs::write(tmp.path().join("www/thermo-2.0.bin"), &bytes).unwrap();
    let server = FileServer::start(tmp.path(), &cloud.pki, 0, None);
    let mut gw = gateway(
        &cloud,
        tmp.path(),
        &public,
        "max_concurrent_devices = 1\ndevice_timeout = \"3s\"\n",
    );
    let t1 = add_device(&gw, "th-1", "thermo");
    let t2 = add_device(&gw, "th-2", "thermo");
    let other = add_device(&gw, "other-1", "meter");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.try_status()
            .is_some_and(|s| s["uplink"]["connected"] == json!(true))
    });
    pause(Duration::from_millis(500));

    let manifest = |version: &str, sha: &str| {
        json!({
            "title": "thermo", "version": version,
            "url": format!("https://127.0.0.1:{}/thermo-2.0.bin", server.port),
            "size": bytes.len(), "sha256": sha,
            "targets": {"gateway": false, "devices": [], "types": ["thermo"]},
        })
    };
    // A stranger's signature: rejected, nothing downloaded.
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &stranger, &manifest("2.0", &sha)),
    );
    let r = wait_state(&cloud, "rejection", Duration::from_secs(10), |r| {
        r["status"] == "rejected"
    });
    assert!(r["error"].as_str().unwrap().contains("signature"), "{r}");
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // The real one: accepted for both thermo devices, downloaded, verified.
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &manifest("2.0", &sha)),
    );
    let acc = wait_state(&cloud, "acceptance", Duration::from_secs(10), |r| {
        r["status"] == "accepted"
    });
    let mut targets: Vec<&str> = acc["targets"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    targets.sort_unstable();
    assert_eq!(targets, ["th-1", "th-2"], "{acc}");
    let done = wait_state(&cloud, "download", Duration::from_secs(20), |r| {
        r["target"] == "download" && r["state"] == "downloaded"
    });
    assert_eq!(done["result"], "success");
    assert_eq!(done["result_code"], 1);
    let ready = gw.dir.join(format!("state/firmware/ready/{sha}.bin"));
    assert_eq!(hex(&std::fs::read(&ready).unwrap()), sha);

    // One slot: exactly one thermo device is admitted; the other and the
    // untargeted meter may not fetch.
    let (first, second) = {
        let mut admitted = None;
        wait_for("an admitted device", Duration::from_secs(10), || {
            admitted = [(&t1, &t2), (&t2, &t1)]
                .into_iter()
                .find(|(a, _)| shared_fw(&gw, a)["fw_version"] == "2.0");
            admitted.is_some()
        });
        admitted.unwrap()
    };
    assert_eq!(
        shared_fw(&gw, second),
        json!({}),
        "the queued device sees nothing"
    );
    let out = tmp.path().join("fetched.bin");
    assert_eq!(fetch(&gw, second, "thermo", "2.0", &out), 403);
    assert_eq!(fetch(&gw, &other, "thermo", "2.0", &out), 403);
    // Over MQTT 5 the untargeted device's chunk request is refused with
    // PUBACK 0x87 (mosquitto_pub reports it on stderr).
    let o = mosquitto_pub(
        &gw,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            &other,
            "-t",
            "v2/fw/request/1/chunk/0",
            "-m",
            "1024",
        ],
        "",
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Not authorized"), "{err}");
    assert_eq!(fetch(&gw, first, "thermo", "2.0", &out), 200);
    assert_eq!(hex(&std::fs::read(&out).unwrap()), sha);

    // Its progress goes up; UPDATED frees the slot for the other one.
    post(&gw, first, &json!({"fw_state": "DOWNLOADING"}));
    wait_state(&cloud, "downloading", Duration::from_secs(10), |r| {
        r["target"] == "device" && r["fw_state"] == "DOWNLOADING"
    });
    post(
        &gw,
        first,
        &json!({"fw_state": "UPDATED", "current_fw_title": "thermo", "current_fw_version": "2.0"}),
    );
    let upd = wait_state(&cloud, "updated", Duration::from_secs(10), |r| {
        r["target"] == "device" && r["fw_state"] == "UPDATED"
    });
    assert_eq!(
        (upd["state"].clone(), upd["result_code"].clone()),
        (json!("idle"), json!(1))
    );
    wait_for(
        "the second device admitted",
        Duration::from_secs(10),
        || shared_fw(&gw, second)["fw_version"] == "2.0",
    );
    assert_eq!(fetch(&gw, second, "thermo", "2.0", &out), 200);
    assert_eq!(hex(&std::fs::read(&out).unwrap()), sha);

    // It never reports: after device_timeout it is failed.
    let stuck = wait_state(&cloud, "the stuck device", Duration::from_secs(10), |r| {
        r["target"] == "device" && r["result"] == "update_failed"
    });
    assert!(
        stuck["error"].as_str().unwrap().contains("device_timeout"),
        "{stuck}"
    );

    // An older manifest for the updated device does not downgrade it.
    let first_name = if first == &t1 { "th-1" } else { "th-2" };
    let second_name = if first == &t1 { "th-2" } else { "th-1" };
    let before = states(&cloud).len();
    let mut older = manifest("1.9", &sha);
    older["targets"] = json!({"gateway": false, "devices": [first_name], "types": []});
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &older),
    );
    let old = wait_state(
        &cloud,
        "the downgrade rejected",
        Duration::from_secs(10),
        |r| r["status"] == "rejected" && r["version"] == "1.9",
    );
    assert!(
        old["error"].as_str().unwrap().contains("not newer"),
        "{old}"
    );
    assert_eq!(shared_fw(&gw, first)["fw_version"], "2.0");
    assert!(states(&cloud).len() > before);

    // `sluice firmware status` shows it all.
    let st = gw.cli_json(&["firmware", "status", "--json"]);
    assert_eq!(st["downloads"][0]["state"], "ready", "{st}");
    let campaigns = st["campaigns"].as_array().unwrap();
    let state_of = |d: &str| {
        campaigns
            .iter()
            .find(|c| c["device"] == d)
            .map(|c| c["state"].clone())
    };
    assert_eq!(state_of(first_name), Some(json!("updated")), "{st}");
    assert_eq!(state_of(second_name), Some(json!("failed")), "{st}");
    // Counted: the stranger's and the downgrade refused, one accepted.
    let commands = &gw.status()["commands"];
    assert_eq!(
        (
            &commands["manifests_accepted"],
            &commands["manifests_rejected"]
        ),
        (&json!(1), &json!(2)),
        "{commands}"
    );
    // And `sluice status` sums it up.
    wait_for("the status summary", Duration::from_secs(5), || {
        let f = &gw.status()["firmware"];
        f["campaigns"] == json!({"updated": 1, "failed": 1}) && f["downloads"]["ready"] == 1
    });
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_download_interrupted_by_kill_9_resumes_with_range_and_a_bad_hash_never_reaches_ready() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "fleet.key");
    let bytes = image(1024 * 1024, 11);
    let sha = hex(&bytes);
    std::fs::create_dir_all(tmp.path().join("www")).unwrap();
    std::fs::write(tmp.path().join("www/big.bin"), &bytes).unwrap();
    // 256 KiB/s: about four seconds for the image.
    let server = FileServer::start(tmp.path(), &cloud.pki, 0, Some(256 * 1024));
    let mut gw = gateway(&cloud, tmp.path(), &public, "max_size = \"1000TiB\"\n");
    add_device(&gw, "d-1", "box");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.try_status()
            .is_some_and(|s| s["uplink"]["connected"] == json!(true))
    });
    pause(Duration::from_millis(500));
    let manifest = json!({
        "title": "box", "version": "3.1",
        "url": format!("https://127.0.0.1:{}/big.bin", server.port),
        "size": bytes.len(), "sha256": sha, "targets": {"gateway": false, "devices": ["d-1"], "types": []},
    });
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &manifest),
    );
    let part = gw.dir.join(format!("state/firmware/staging/{sha}.part"));
    wait_for("part of the image", Duration::from_secs(20), || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() >= 200 * 1024)
    });
    gw.kill9();
    let had = std::fs::metadata(&part).unwrap().len();
    assert!(had < bytes.len() as u64, "killed mid-transfer");
    gw.start();
    wait_for("the image ready", Duration::from_secs(30), || {
        gw.dir
            .join(format!("state/firmware/ready/{sha}.bin"))
            .exists()
    });
    let log = server.requests();
    assert!(
        log.iter().any(|l| l.contains("range=bytes=")
            && !l.contains("range=bytes=0-")
            && l.contains("status=206")),
        "no resumed request in {log:?}"
    );
    assert_eq!(
        hex(&std::fs::read(gw.dir.join(format!("state/firmware/ready/{sha}.bin"))).unwrap()),
        sha
    );

    // A manifest whose sha256 does not match the served bytes: rejected
    // after the download, nothing in ready/.
    let wrong = hex(b"something else");
    let bad = json!({
        "title": "box", "version": "3.2",
        "url": format!("https://127.0.0.1:{}/big.bin", server.port),
        "size": bytes.len(), "sha256": wrong, "targets": {"gateway": false, "devices": ["d-1"], "types": []},
    });
    cloud.publish(&format!("{PREFIX}/firmware"), &sign(tmp.path(), &key, &bad));
    let r = wait_state(&cloud, "integrity failure", Duration::from_secs(30), |r| {
        r["target"] == "download" && r["version"] == "3.2" && r["state"] == "idle"
    });
    assert_eq!(r["result"], "integrity_failure", "{r}");
    assert_eq!(r["result_code"], 5);
    assert!(
        !gw.dir
            .join(format!("state/firmware/ready/{wrong}.bin"))
            .exists()
    );
    assert!(
        !gw.dir
            .join(format!("state/firmware/staging/{wrong}.part"))
            .exists()
    );

    // An image bigger than the disk: refused before any request.
    let requests = server.requests().len();
    let huge = json!({
        "title": "box", "version": "9.0",
        "url": format!("https://127.0.0.1:{}/huge.bin", server.port),
        "size": 900u64 << 40, "sha256": hex(b"huge"), "targets": {"gateway": false, "devices": ["d-1"], "types": []},
    });
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &huge),
    );
    let r = wait_state(&cloud, "no space", Duration::from_secs(10), |r| {
        r["target"] == "download" && r["version"] == "9.0" && r["state"] == "idle"
    });
    assert_eq!(r["result"], "not_enough_storage", "{r}");
    assert_eq!(server.requests().len(), requests, "no request was made");
    assert_eq!(gw.stop(), Some(0));
}

/// `VmRSS` / `VmHWM` of `pid` in kB.
fn rss_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn twenty_devices_fetching_a_5_mb_image_at_once_keep_memory_flat() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .unwrap()
        .write_all(b"\n[firmware]\nmax_concurrent_devices = 20\n")
        .unwrap();
    let tokens: Vec<String> = (0..20)
        .map(|i| add_device(&gw, &format!("big-{i}"), "big"))
        .collect();
    let bytes = image(5 * 1024 * 1024, 3);
    let sha = hex(&bytes);
    let src = tmp.path().join("big.bin");
    std::fs::write(&src, &bytes).unwrap();
    let out = gw.cli(&[
        "firmware",
        "stage",
        src.to_str().unwrap(),
        "--title",
        "big",
        "--version",
        "1",
        "--type",
        "big",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.start();
    let pid = gw.pid().unwrap();
    pause(Duration::from_millis(500));
    let idle = rss_kb(pid, "VmRSS:");
    let host = http(&gw);
    // Ten fetch the whole image, ten in 64 KiB chunks as the HTTP SDK does;
    // all at once.
    let children: Vec<(usize, Child)> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let dst = tmp.path().join(format!("got-{i}"));
            let script = if i % 2 == 0 {
                format!("curl -s -o {} 'http://{host}/api/v1/{t}/firmware?title=big&version=1'", dst.display())
            } else {
                format!(
                    "for k in $(seq 0 80); do curl -s 'http://{host}/api/v1/{t}/firmware?title=big&version=1&size=65536&chunk='$k; done > {}",
                    dst.display()
                )
            };
            (i, Command::new("sh").args(["-c", &script]).spawn().unwrap())
        })
        .collect();
    let mut peak = idle;
    let mut running = children;
    while !running.is_empty() {
        peak = peak.max(rss_kb(pid, "VmRSS:"));
        running.retain_mut(|(_, c)| c.try_wait().unwrap().is_none());
        pause(Duration::from_millis(20));
    }
    for i in 0..20 {
        let got = std::fs::read(tmp.path().join(format!("got-{i}"))).unwrap();
        assert_eq!(got.len(), bytes.len(), "device {i}");
        assert_eq!(hex(&got), sha, "device {i}");
    }
    let served = gw.status()["commands"]["firmware_bytes_served"]
        .as_u64()
        .unwrap();
    assert!(served >= 20 * bytes.len() as u64, "{served}");
    let hwm = rss_kb(pid, "VmHWM:");
    eprintln!(
        "RSS idle {idle} kB, peak sampled {peak} kB, VmHWM {hwm} kB while 20 devices fetched {} bytes each",
        bytes.len()
    );
    // One image held per device would be 100 MiB; streaming keeps the
    // growth to buffers.
    assert!(
        hwm.saturating_sub(idle) < 24 * 1024,
        "memory grew from {idle} kB to {hwm} kB"
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_manifest_for_the_gateway_hands_the_verified_image_to_the_installer_and_commits_after_restart()
{
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(tmp.path(), "fleet.key");
    let bytes = image(64 * 1024, 5);
    let sha = hex(&bytes);
    std::fs::create_dir_all(tmp.path().join("www")).unwrap();
    std::fs::write(tmp.path().join("www/os.img"), &bytes).unwrap();
    let server = FileServer::start(tmp.path(), &cloud.pki, 0, None);
    // A script standing in for `rauc install` / `rauc status mark-good`.
    let calls = tmp.path().join("calls");
    let hook = tmp.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    let mut gw = gateway(
        &cloud,
        tmp.path(),
        &public,
        &format!(
            "handoff = \"direct\"\ngateway_version = \"1.0\"\n\
             install_command = \"sh {h} install {{path}}\"\ncommit_command = \"sh {h} commit\"\n\
             rollback_command = \"sh {h} rollback\"\nconfirm_timeout = \"5s\"\n",
            h = hook.display()
        ),
    );
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.try_status()
            .is_some_and(|s| s["uplink"]["connected"] == json!(true))
    });
    pause(Duration::from_millis(500));
    let manifest = |version: &str| {
        json!({
            "title": "gw-os", "version": version,
            "url": format!("https://127.0.0.1:{}/os.img", server.port),
            "size": bytes.len(), "sha256": sha,
            "targets": {"gateway": true, "devices": [], "types": []},
        })
    };
    // Not newer than what the gateway runs: refused, nothing fetched.
    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &manifest("0.9")),
    );
    let r = wait_state(
        &cloud,
        "the old gateway image refused",
        Duration::from_secs(10),
        |r| r["status"] == "rejected",
    );
    assert!(r["error"].as_str().unwrap().contains("not newer"), "{r}");
    assert!(server.requests().is_empty());

    cloud.publish(
        &format!("{PREFIX}/firmware"),
        &sign(tmp.path(), &key, &manifest("2.0")),
    );
    wait_state(&cloud, "updating", Duration::from_secs(20), |r| {
        r["target"] == "gateway" && r["state"] == "updating"
    });
    let ready = gw.dir.join(format!("state/firmware/ready/{sha}.bin"));
    wait_for("the installer called", Duration::from_secs(10), || {
        std::fs::read_to_string(&calls).is_ok_and(|c| c.contains("install"))
    });
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        format!("install {}\n", ready.display())
    );
    // The reboot: the daemon starts again, reaches the cloud, commits.
    assert_eq!(gw.stop(), Some(0));
    gw.start();
    wait_for("the commit", Duration::from_secs(15), || {
        std::fs::read_to_string(&calls).is_ok_and(|c| c.contains("commit"))
    });
    wait_state(&cloud, "success", Duration::from_secs(10), |r| {
        r["target"] == "gateway" && r["result_code"] == 1
    });
    assert!(
        !std::fs::read_to_string(&calls)
            .unwrap()
            .contains("rollback")
    );
    wait_for("the new version in status", Duration::from_secs(5), || {
        gw.status()["firmware"]["gateway_version"] == "2.0"
    });
    assert_eq!(gw.stop(), Some(0));
}
