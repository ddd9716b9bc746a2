//! End-to-end tests of `sluice doctor` run as the real binary against real
//! peers: a TLS mosquitto as the cloud (password and mutual-TLS listeners),
//! openssl-made certificates (one expired in 2020), a closed port as an
//! unreachable broker, a read-only tmpfs as the state dir, and a port held
//! by another socket. Each case checks the exit code (0 unless a check
//! fails) and that the failing check carries its fix.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `sluice doctor --json ARGS`: (exit code, report).
fn doctor(gw: &Gateway, args: &[&str]) -> (i32, Json) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = gw.cli(&all);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

fn finding<'a>(report: &'a Json, check: &str) -> &'a Json {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {report:#}"))
}

fn checks_with(report: &Json, status: &str) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == status)
        .map(|f| f["check"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts `check` failed, its detail mentions `detail` and its fix `fix`.
fn assert_fails(report: &Json, check: &str, detail: &str, fix: &str) {
    let f = finding(report, check);
    assert_eq!(f["status"], "fail", "{check}: {f:#}");
    assert!(
        f["detail"].as_str().unwrap().contains(detail),
        "{check}: detail should mention {detail:?}: {f:#}"
    );
    assert!(
        f["fix"].as_str().unwrap_or_default().contains(fix),
        "{check}: fix should mention {fix:?}: {f:#}"
    );
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client certificate for `cn` signed by `pki`'s CA that expired on
/// 2020-01-02 (`openssl ca` sets both dates; openssl 3.0's `x509` cannot).
fn expired_client_cert(pki: &Pki, dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let ca_dir = pki.ca.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n\
         [ext]\nextendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    let (crt, key, csr) = (
        dir.join("expired.crt"),
        dir.join("expired.key"),
        dir.join("expired.csr"),
    );
    key_and_csr(cn, &key, &csr);
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args([
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-extensions",
                "ext",
            ])
            .args([
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ])
            .arg("-cert")
            .arg(&pki.ca)
            .arg("-keyfile")
            .arg(ca_dir.join("ca.key"))
            .arg("-in")
            .arg(&csr)
            .arg("-out")
            .arg(&crt),
    );
    (crt, key)
}

/// Every check a gateway with a password-authenticated TLS cloud and the
/// HTTP and MQTT listeners reports.
const HEALTHY_CHECKS: &[&str] = &[
    "config",
    "daemon",
    "listener.http",
    "listener.mqtt",
    "state_dir.writable",
    "state_dir.owner",
    "state_dir.space",
    "state_dir.inodes",
    "outbox",
    "cloud.tls_files",
    "cloud.credentials",
    "cloud.dns",
    "cloud.tcp",
    "cloud.tls",
    "clock",
    "watchdog",
];

#[test]
fn doctor_passes_a_healthy_gateway_with_the_daemon_stopped_and_running() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = cloud.gateway(tmp.path(), "");

    // Stopped: the checks read the configuration and probe on their own.
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 0, "{report:#}");
    for check in HEALTHY_CHECKS {
        finding(&report, check);
    }
    assert_eq!(checks_with(&report, "fail"), Vec::<String>::new());
    assert_eq!(report["ok"], true);
    assert_eq!(finding(&report, "daemon")["status"], "warn");
    assert!(
        finding(&report, "daemon")["detail"]
            .as_str()
            .unwrap()
            .contains("not running"),
        "{report:#}"
    );
    let tls = finding(&report, "cloud.tls")["detail"].as_str().unwrap();
    assert!(tls.contains("TLS 1.3"), "{tls}");
    // Every finding that is not ok says what to do.
    for f in report["findings"].as_array().unwrap() {
        assert_eq!(f["fix"].is_string(), f["status"] != "ok", "{f:#}");
    }

    // Running: listeners and the outbox come from the daemon, plus its uplink.
    gw.add_device("dev-1");
    gw.start();
    wait_for("the uplink to connect", Duration::from_secs(20), || {
        gw.status()["uplink"]["connected"] == true
    });
    let (code, report) = doctor(&gw, &["--quick-check"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(checks_with(&report, "fail"), Vec::<String>::new());
    assert_eq!(finding(&report, "daemon")["status"], "ok", "{report:#}");
    let http = finding(&report, "listener.http");
    assert_eq!(http["status"], "ok");
    assert!(
        http["detail"]
            .as_str()
            .unwrap()
            .contains(gw.http.as_deref().unwrap()),
        "{http:#}"
    );
    assert_eq!(finding(&report, "uplink")["status"], "ok", "{report:#}");
    let outbox = finding(&report, "outbox");
    assert!(
        outbox["detail"]
            .as_str()
            .unwrap()
            .contains("quick_check ok"),
        "{outbox:#}"
    );

    // The human table: one line per check, then the summary.
    let out = gw.cli(&["doctor"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ok    config "), "{text}");
    assert!(text.trim_end().ends_with(", 0 failures"), "{text}");
    assert!(gw.stop() == Some(0));
}

#[test]
fn doctor_fails_an_expired_client_certificate_with_the_fix() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let spec = |cert: (PathBuf, PathBuf)| GatewaySpec {
        mqtt: true,
        cloud: Some((cloud.broker.mtls_port, cloud.pki.ca.clone())),
        client_cert: Some(cert),
        ..GatewaySpec::default()
    };

    // The control: a valid certificate (2 days: a warning) on the mTLS port.
    let gw = Gateway::new(
        &tmp.path().join("valid"),
        &spec(cloud.pki.client_cert("gw")),
    );
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(finding(&report, "cloud.client_cert")["status"], "warn");
    // The broker's own 2-day certificate is only a warning.
    assert_ne!(
        finding(&report, "cloud.tls")["status"],
        "fail",
        "{report:#}"
    );

    let expired = expired_client_cert(&cloud.pki, &tmp.path().join("pki"), "gw");
    let gw = Gateway::new(&tmp.path().join("expired"), &spec(expired));
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(
        &report,
        "cloud.client_cert",
        "expired on 2020-01-02",
        "renew the certificate in cloud.cert_file",
    );
    // The broker refuses it too (a TLS 1.3 alert after the handshake).
    assert_fails(&report, "cloud.tls", "expired", "cloud.cert_file");

    let out = gw.cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    assert!(text.contains("FAIL  cloud.client_cert"), "{text}");
    assert!(text.contains("fix: renew the certificate"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checks failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn doctor_fails_an_unreachable_broker_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    // A port that nothing listens on.
    let closed = free_port();
    let mut gw = Gateway::new(
        &tmp.path().join("gw"),
        &GatewaySpec {
            cloud: Some((closed, pki.ca.clone())),
            ..GatewaySpec::default()
        },
    );
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "cloud.tcp", "refused", "cloud.url");
    assert_eq!(checks_with(&report, "fail"), vec!["cloud.tcp"]);

    // With the daemon running, its own view of the uplink fails too.
    gw.start();
    wait_for("the uplink to fail once", Duration::from_secs(20), || {
        gw.status()["uplink"]["error"].is_string()
    });
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(finding(&report, "daemon")["status"], "ok");
    assert_eq!(
        checks_with(&report, "fail"),
        vec!["cloud.tcp", "uplink"],
        "{report:#}"
    );
    assert!(gw.stop() == Some(0));
}

/// A read-only tmpfs mounted over a directory, unmounted on drop.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    /// `None` (with the reason printed) where mounting is not permitted.
    fn over(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=128m", "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir.to_owned())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a read-only tmpfs (root in a privileged container is needed): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn doctor_fails_a_read_only_state_dir_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(finding(&report, "state_dir.writable")["status"], "ok");
    assert_eq!(finding(&report, "cloud")["status"], "ok", "offline mode");

    // Root ignores permission bits: a read-only filesystem stops even root.
    let Some(_mount) = ReadOnlyMount::over(&state) else {
        return;
    };
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(
        &report,
        "state_dir.writable",
        "read-only",
        "StateDirectory=",
    );
    assert_eq!(checks_with(&report, "fail"), vec!["state_dir.writable"]);
}

#[test]
fn doctor_fails_a_listener_port_held_by_another_process() {
    let tmp = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            http_port: port,
            ..GatewaySpec::default()
        },
    );
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(
        &report,
        "listener.http",
        "in use",
        &format!("sport = :{port}"),
    );
    drop(holder);
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn doctor_reports_a_bad_configuration_as_a_failed_check() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::new(tmp.path(), &GatewaySpec::default());
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str("\n[metrics]\nbind = \"not an address\"\n");
    std::fs::write(&gw.config, text).unwrap();
    let (code, report) = doctor(&gw, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_fails(&report, "config", "metrics.bind", "sluice check-config");
    // What needs no configuration is still checked.
    finding(&report, "clock");
    finding(&report, "watchdog");
}
