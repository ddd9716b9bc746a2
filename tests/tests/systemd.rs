//! systemd integration, end to end: the test plays systemd (a
//! `NOTIFY_SOCKET` datagram socket and `WATCHDOG_USEC`) around the built
//! binary. The watchdog pings stop when the outbox writer thread freezes
//! (a debug-build test hook) while the process lives on; SIGHUP re-reads
//! the configuration files (a new rule in place, an invalid edit refused,
//! anything else an in-process restart, same PID throughout); and the
//! shipped units pass `systemd-analyze verify` with an exposure score of
//! at most 2.0.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the daemon told "systemd", each message with when it arrived.
struct Notifications {
    heard: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notifications {
    fn listen(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (heard2, stop2) = (heard.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    heard2.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        Self {
            heard,
            stop,
            thread: Some(thread),
        }
    }

    fn heard(&self) -> Vec<(Instant, String)> {
        self.heard.lock().unwrap().clone()
    }

    /// When each message carrying `state` (e.g. `WATCHDOG=1`) arrived.
    fn times(&self, state: &str) -> Vec<Instant> {
        self.heard()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == state))
            .map(|(t, _)| t)
            .collect()
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `pid` runs (exists and is not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn log(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.join("sluice.log")).unwrap_or_default()
}

#[test]
fn watchdog_pings_stop_when_the_outbox_writer_freezes_while_the_process_lives() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: the writer-freeze hook exists only in debug builds");
        return;
    }
    const PERIOD: Duration = Duration::from_millis(400);
    const FREEZE_AFTER: Duration = Duration::from_millis(4000);
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("notify.sock");
    let systemd = Notifications::listen(&sock);
    let mut gw = Gateway::new(&tmp.path().join("gw"), &GatewaySpec::default());
    gw.env = vec![
        ("NOTIFY_SOCKET".into(), sock.display().to_string()),
        (
            "WATCHDOG_USEC".into(),
            (PERIOD.as_micros() as u64).to_string(),
        ),
        (
            "SLUICE_TEST_FREEZE_WRITER_AFTER_MS".into(),
            (FREEZE_AFTER.as_millis() as u64).to_string(),
        ),
    ];
    // The outbox opens after this, so the writer freezes no earlier than
    // `spawned + FREEZE_AFTER`.
    let spawned = Instant::now();
    gw.start();
    let pid = gw.pid().unwrap();
    wait_for("READY=1", Duration::from_secs(10), || {
        !systemd.times("READY=1").is_empty()
    });
    let ready = systemd.times("READY=1")[0];
    assert!(
        ready < spawned + FREEZE_AFTER - Duration::from_millis(1500),
        "the daemon took {:?} to get ready; the test needs it well before the freeze",
        ready - spawned
    );

    // Alive: a ping at least every period (the daemon probes every quarter).
    wait_for(
        "the writer to freeze and the pings to stop",
        Duration::from_secs(20),
        || log(&gw).contains("the outbox writer did not answer"),
    );
    pause(3 * PERIOD + Duration::from_secs(1));
    let pings = systemd.times("WATCHDOG=1");
    let before: Vec<Instant> = pings
        .iter()
        .copied()
        .filter(|t| *t < spawned + FREEZE_AFTER)
        .collect();
    assert!(
        before.len() >= 5,
        "pings while the writer runs: {} ({pings:?})",
        before.len()
    );
    let widest = before
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        widest < PERIOD,
        "a live pipeline is pinged at least once a period: {widest:?}"
    );
    let last = *pings.last().unwrap();
    assert!(
        last > spawned + FREEZE_AFTER - PERIOD,
        "pings continued up to the freeze (last {:?} after spawn)",
        last - spawned
    );
    // The writer freezes at the first command it takes FREEZE_AFTER after
    // the outbox opened (before READY=1); a probe comes every PERIOD / 4 and
    // the one never answered times out half a period later: the pings stop
    // within two periods of the freeze.
    assert!(
        last < ready + FREEZE_AFTER + 2 * PERIOD,
        "pings stopped within two periods of the freeze (last {:?} after spawn, ready after {:?})",
        last - spawned,
        ready - spawned
    );
    assert!(
        Instant::now() - last > 3 * PERIOD,
        "no ping since the freeze: the last was {:?} ago",
        Instant::now() - last
    );
    assert!(
        log(&gw).contains("test hook: the outbox writer freezes now"),
        "the hook fired"
    );
    eprintln!(
        "{} pings before the freeze (widest gap {widest:?}, ready after {:?}); last ping {:?} after spawn, none in the {:?} since",
        before.len(),
        ready - spawned,
        last - spawned,
        Instant::now() - last
    );
    // The process lives on, stuck: exactly what systemd's watchdog is for.
    assert!(running(pid), "the daemon is still running");
    assert!(
        gw.try_status().is_some(),
        "the admin socket still answers (only the writer is stuck)"
    );
    assert!(systemd.times("STOPPING=1").is_empty());
    // A frozen writer never finishes the final commit: SIGKILL, as systemd
    // would after WatchdogSec.
    gw.kill9();
}

#[test]
fn sighup_applies_a_new_rule_in_place_refuses_an_invalid_edit_and_restarts_for_other_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("notify.sock");
    let systemd = Notifications::listen(&sock);
    let mut gw = Gateway::new(&tmp.path().join("gw"), &GatewaySpec::default());
    gw.env = vec![("NOTIFY_SOCKET".into(), sock.display().to_string())];
    let token = gw.add_device("dev-1");
    gw.start();
    let pid = gw.pid().unwrap();
    let before = gw.status();
    let post = |gw: &Gateway, body: Json| {
        let code = curl(&["-X", "POST", "-d", &body.to_string(), &gw.url(&token)]).0;
        assert_eq!(code, 200);
    };
    let newest = |gw: &Gateway| -> Json {
        let peek = gw.cli_json(&["queue", "peek", "-n", "1000", "--json"]);
        peek.as_array().unwrap().last().unwrap()["values"].clone()
    };
    let ready_count = || systemd.times("READY=1").len();
    wait_for("READY=1", Duration::from_secs(10), || ready_count() == 1);

    post(&gw, json!({"secret": 1, "ok": 1}));
    assert_eq!(newest(&gw), json!({"secret": 1, "ok": 1}), "no rule yet");

    // A rule added to the file: applied in place on SIGHUP.
    let original = std::fs::read_to_string(&gw.config).unwrap();
    let with_rule = format!(
        "{original}\n[[rules]]\nname = \"no-secret\"\nkeys = \"secret\"\nactions = [{{ type = \"drop\" }}]\n"
    );
    std::fs::write(&gw.config, &with_rule).unwrap();
    signal(pid, "HUP");
    wait_for("the rule in effect", Duration::from_secs(10), || {
        gw.try_status()
            .is_some_and(|s| s["rules"][0]["rule"] == "no-secret")
    });
    post(&gw, json!({"secret": 2, "ok": 2}));
    assert_eq!(
        newest(&gw),
        json!({"ok": 2}),
        "the new rule dropped the key"
    );
    assert_eq!(gw.pid(), Some(pid));
    assert!(running(pid));
    let after = gw.status();
    assert_eq!(after["listeners"], before["listeners"], "nothing re-bound");
    assert!(after["uptime_s"].as_u64() >= before["uptime_s"].as_u64());
    wait_for("RELOADING=1 then READY=1", Duration::from_secs(5), || {
        ready_count() == 2
    });
    let reloading = systemd.times("RELOADING=1");
    assert_eq!(reloading.len(), 1);
    assert!(reloading[0] < systemd.times("READY=1")[1]);
    assert!(
        systemd
            .heard()
            .iter()
            .any(|(_, m)| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC (systemd 253+ requires it)"
    );

    // An invalid edit: refused with the key named, nothing changes.
    let invalid = with_rule.replace("max_bytes = \"64MiB\"", "max_bytes = \"12XB\"");
    assert_ne!(invalid, with_rule);
    std::fs::write(&gw.config, &invalid).unwrap();
    signal(pid, "HUP");
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        log(&gw).contains("keeping the running one")
    });
    let refusal = log(&gw)
        .lines()
        .find(|l| l.contains("keeping the running one"))
        .unwrap()
        .to_owned();
    assert!(refusal.contains("outbox.max_bytes"), "{refusal}");
    assert!(refusal.contains("ERROR"), "{refusal}");
    wait_for("READY=1 after the refusal", Duration::from_secs(5), || {
        ready_count() == 3
    });
    assert!(running(pid));
    // The CLI reads the file too (and refuses it): ask the daemon through
    // a valid copy.
    let mut cli = Gateway::new(&tmp.path().join("cli"), &GatewaySpec::default());
    std::fs::write(&cli.config, &with_rule).unwrap();
    cli.http = gw.http.clone();
    assert_eq!(gw.cli(&["status", "--json"]).status.code(), Some(2));
    post(&cli, json!({"secret": 3, "ok": 3}));
    assert_eq!(newest(&cli), json!({"ok": 3}), "the rule still holds");
    let st = cli.status();
    assert_eq!(st["listeners"], before["listeners"]);
    assert_eq!(st["rules"][0]["rule"], "no-secret");

    // Another key changed: an in-process restart, same PID, and systemd
    // hears RELOADING=1 … READY=1, never STOPPING=1.
    let larger = with_rule.replace("max_bytes = \"64MiB\"", "max_bytes = \"32MiB\"");
    std::fs::write(&gw.config, &larger).unwrap();
    signal(pid, "HUP");
    wait_for("the in-process restart", Duration::from_secs(20), || {
        log(&gw).contains("restarting with the configuration on disk") && ready_count() == 4
    });
    wait_for("the daemon back", Duration::from_secs(20), || {
        gw.try_status().is_some()
    });
    assert!(running(pid));
    assert_eq!(gw.pid(), Some(pid));
    assert!(
        systemd.times("STOPPING=1").is_empty(),
        "{:?}",
        systemd.heard()
    );
    let http = gw.status()["listeners"]["http"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.http = Some(http);
    post(&gw, json!({"secret": 4, "ok": 4}));
    assert_eq!(
        newest(&gw),
        json!({"ok": 4}),
        "the rule survived the restart"
    );

    assert_eq!(gw.stop(), Some(0));
    wait_for("STOPPING=1", Duration::from_secs(5), || {
        !systemd.times("STOPPING=1").is_empty()
    });
}

/// The units with `ExecStart=`/`ExecReload=` pointing at the built binary
/// (systemd-analyze checks that the programs exist), copied to `dir`.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    ["sluice.service", "sluice-update@.service"]
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(src.join(name)).unwrap();
            let out = dir.join(name);
            std::fs::write(&out, text.replace("/usr/bin/sluice", SLUICE)).unwrap();
            out
        })
        .collect()
}

/// `systemd-analyze`, or None (with the reason printed) when it is not
/// installed; under CI=true a missing one fails the test.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("systemd-analyze");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "systemd-analyze is required under CI (apt-get install systemd)"
    );
    eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
    None
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_sandbox_to_an_exposure_of_2_or_less() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let units = units_in(tmp.path());
    let out = Command::new(analyze)
        .arg("verify")
        .args(&units)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("sluice"),
        "systemd-analyze verify has something to say about our units: {said}"
    );

    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&units[0])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level for sluice.service"))
        .unwrap_or_else(|| panic!("no overall score in: {text}"));
    let score: f64 = overall
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unreadable score: {overall}"));
    eprintln!("{overall}");
    assert!(score <= 2.0, "exposure {score} > 2.0: {text}");
}
