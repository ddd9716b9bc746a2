//! End-to-end tests of the gateway self-update hooks: the real `sluice`
//! binary with `firmware.handoff = "direct"` and shell scripts standing in
//! for RAUC (`install`, `mark-good`, `mark-bad`) that record their calls, a
//! TLS mosquitto as the cloud, and a daemon stop + start standing in for
//! the reboot that follows an install.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// `firmware.confirm_timeout` of these tests.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

/// A gateway pointed at `cloud` whose `[firmware]` hooks are scripts in
/// `dir/hooks/` appending `install <path>`, `commit` or `rollback` to
/// `dir/calls`.
fn gateway_with_hooks(cloud: &Cloud, dir: &Path) -> Gateway {
    let gw = cloud.gateway(dir, "");
    let hooks = dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let calls = dir.join("calls");
    let script = |name: &str, line: &str| {
        let p = hooks.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{line}\" >> '{}'\n", calls.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    };
    let section = format!(
        "\n[firmware]\nhandoff = \"direct\"\ngateway_version = \"1.0\"\n\
         install_command = \"{} {{path}}\"\ncommit_command = \"{}\"\n\
         rollback_command = \"{}\"\nconfirm_timeout = \"{}s\"\n",
        script("rauc-install", "install $1"),
        script("rauc-mark-good", "commit"),
        script("rauc-mark-bad", "rollback"),
        CONFIRM_TIMEOUT.as_secs()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&gw.config)
        .unwrap()
        .write_all(section.as_bytes())
        .unwrap();
    gw
}

/// What the hook scripts recorded, in order.
fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `sluice firmware stage IMG --title gw-os --version V --gateway [extra]`
/// with a fresh image for `version`; returns the CLI's output and where the
/// store must have put the image (`ready/<sha256>.bin`).
fn stage_gateway(gw: &Gateway, version: &str, extra: &[&str]) -> (Output, PathBuf) {
    let bytes = format!("gateway root filesystem {version}\n").repeat(1000);
    let src = gw.dir.join(format!("gw-os-{version}.raucb"));
    std::fs::write(&src, &bytes).unwrap();
    let sha: String = Sha256::digest(bytes.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut args = vec![
        "firmware",
        "stage",
        src.to_str().unwrap(),
        "--title",
        "gw-os",
        "--version",
        version,
        "--gateway",
    ];
    args.extend_from_slice(extra);
    let out = gw.cli(&args);
    let ready = gw
        .dir
        .join("state/firmware/ready")
        .join(format!("{sha}.bin"));
    (out, ready)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn marker(gw: &Gateway) -> PathBuf {
    gw.dir.join("state/firmware/gateway-pending.json")
}

fn installed_record(gw: &Gateway) -> Option<Json> {
    std::fs::read(gw.dir.join("state/firmware/gateway.json"))
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

fn gateway_reports(cloud: &Cloud) -> Vec<Json> {
    cloud
        .seen_on(&format!("{PREFIX}/firmware/state"))
        .into_iter()
        .filter(|r| r["target"] == "gateway")
        .collect()
}

fn log(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.join("sluice.log")).unwrap_or_default()
}

#[test]
fn a_gateway_update_is_committed_after_a_healthy_restart_and_cannot_be_downgraded() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway_with_hooks(&cloud, tmp.path());
    gw.start();

    let (out, image) = stage_gateway(&gw, "2.0", &[]);
    assert!(out.status.success(), "stage --gateway: {}", stderr(&out));
    assert_eq!(calls(tmp.path()), [format!("install {}", image.display())]);
    assert!(image.is_file());
    assert!(marker(&gw).is_file(), "the pending marker is written");
    let audit = stderr(&out);
    let sha = image.file_stem().unwrap().to_str().unwrap();
    assert!(
        audit.contains("local firmware staging") && audit.contains("actor") && audit.contains(sha),
        "an audit line names who staged which image: {audit}"
    );

    // The reboot that follows the install, with the cloud up.
    gw.stop();
    let restarted = Instant::now();
    gw.start();
    wait_for("the commit hook", Duration::from_secs(20), || {
        calls(tmp.path()).len() >= 2
    });
    assert!(
        restarted.elapsed() < CONFIRM_TIMEOUT + Duration::from_secs(5),
        "committed as soon as the uplink connected"
    );
    wait_for(
        "the success report on P/firmware/state",
        Duration::from_secs(20),
        || !gateway_reports(&cloud).is_empty(),
    );
    let reports = gateway_reports(&cloud);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!(
        (
            &r["title"],
            &r["version"],
            &r["state"],
            &r["result"],
            &r["result_code"]
        ),
        (
            &Json::from("gw-os"),
            &Json::from("2.0"),
            &Json::from("idle"),
            &Json::from("success"),
            &Json::from(1)
        ),
        "{r}"
    );
    // Past the confirmation window (a pacing step: what is checked is that
    // nothing else happens): committed once, never rolled back.
    pause((CONFIRM_TIMEOUT + Duration::from_secs(1)).saturating_sub(restarted.elapsed()));
    assert_eq!(
        calls(tmp.path()),
        [format!("install {}", image.display()), "commit".to_owned()]
    );
    assert!(!marker(&gw).exists(), "the marker is gone after the commit");
    let rec = installed_record(&gw).expect("gateway.json written at commit");
    assert_eq!(rec["version"], "2.0", "{rec}");
    assert!(log(&gw).contains("gateway update outcome"));

    // Anti-rollback: 2.0 is the floor now.
    for v in ["1.0", "2.0"] {
        let (out, _) = stage_gateway(&gw, v, &[]);
        assert_eq!(out.status.code(), Some(1), "version {v} must be refused");
        assert!(
            stderr(&out).contains("not newer than the installed 2.0"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        calls(tmp.path()).len(),
        2,
        "no installer ran for a refused version"
    );
    assert!(!marker(&gw).exists());

    let (out, older) = stage_gateway(&gw, "1.0", &["--allow-downgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        calls(tmp.path()).last().unwrap(),
        &format!("install {}", older.display())
    );
    assert!(marker(&gw).is_file());
}

#[test]
fn a_gateway_update_is_rolled_back_when_the_uplink_stays_down_after_the_restart() {
    let mut cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = gateway_with_hooks(&cloud, tmp.path());
    gw.start();

    let (out, image) = stage_gateway(&gw, "2.0", &[]);
    assert!(out.status.success(), "stage --gateway: {}", stderr(&out));
    assert_eq!(calls(tmp.path()), [format!("install {}", image.display())]);

    // The new system comes up without a working uplink.
    gw.stop();
    cloud.broker.stop();
    let restarted = Instant::now();
    gw.start();
    wait_for("the rollback hook", Duration::from_secs(20), || {
        calls(tmp.path()).len() >= 2
    });
    let waited = restarted.elapsed();
    assert!(
        waited >= CONFIRM_TIMEOUT,
        "rolled back after {waited:?}, before firmware.confirm_timeout"
    );
    assert_eq!(
        calls(tmp.path()),
        [
            format!("install {}", image.display()),
            "rollback".to_owned()
        ]
    );
    // The hook wrote its line before it returned; the marker goes after.
    wait_for(
        "the marker gone after the rollback",
        Duration::from_secs(5),
        || !marker(&gw).exists(),
    );
    assert!(
        installed_record(&gw).is_none(),
        "a rolled-back version is not recorded as installed"
    );
    let text = log(&gw);
    assert!(
        text.contains("the uplink did not connect within 3s; rolled back"),
        "{text}"
    );

    // The failure report waited for the link and reaches the cloud when it
    // is back.
    cloud.broker.start();
    wait_for(
        "the failure report on P/firmware/state",
        Duration::from_secs(30),
        || !gateway_reports(&cloud).is_empty(),
    );
    let r = &gateway_reports(&cloud)[0];
    assert_eq!(r["version"], "2.0", "{r}");
    assert_eq!(r["result"], "update_failed", "{r}");
    assert_eq!(r["result_code"], 8, "{r}");
    assert_eq!(
        r["error"], "the uplink did not connect within 3s; rolled back",
        "{r}"
    );
    // A healthy link now does not commit what was rolled back.
    assert_eq!(calls(tmp.path()).len(), 2, "{:?}", calls(tmp.path()));

    // The floor is still the configured 1.0: 2.0 may be tried again.
    let (out, _) = stage_gateway(&gw, "2.0", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}
