//! End-to-end tests of CoAP over DTLS 1.2 with per-device pre-shared keys
//! (`[listeners.coaps]`, issue 10) with real peers: libcoap's
//! `coap-client-openssl` and `coap-client-gnutls` as devices, a python
//! ClientHello flood (`scripts/dtls_hello_flood.py`), and a TLS mosquitto
//! as the cloud. The device is the one the handshake authenticated, so the
//! paths carry no token.
//!
//! libcoap's client exits 0 whatever happens: every check reads its output.
//! At `-v 6` it prints each PDU it receives (`v:1 t:ACK c:2.04 …`).

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::*;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const OPENSSL: &str = "coap-client-openssl";
const GNUTLS: &str = "coap-client-gnutls";

/// A device's DTLS credentials as libcoap takes them: `-k KEY` is the raw
/// bytes of the string, so the gateway gets their hex.
struct Psk {
    identity: &'static str,
    key: &'static str,
}

impl Psk {
    fn hex(&self) -> String {
        self.key.bytes().map(|b| format!("{b:02x}")).collect()
    }

    fn args(&self) -> [&str; 4] {
        ["-u", self.identity, "-k", self.key]
    }
}

const DEV_A: Psk = Psk {
    identity: "sensor-a@plant-1",
    key: "a-secret-for-a",
};
const DEV_B: Psk = Psk {
    identity: "sensor-b@plant-1",
    key: "b-has-another-key",
};

/// A gateway with `[listeners.coaps]` on 127.0.0.1, port 0, plus `extra`
/// lines in that section.
fn coaps_gateway(dir: &Path, cloud: Option<&Cloud>, extra: &str) -> Gateway {
    let gw = Gateway::new(
        dir,
        &GatewaySpec {
            cloud: cloud.map(|c| (c.broker.port, c.pki.ca.clone())),
            ..GatewaySpec::default()
        },
    );
    let mut config = std::fs::read_to_string(&gw.config).unwrap();
    config.push_str(&format!(
        "\n[listeners.coaps]\nbind = \"127.0.0.1:0\"\n{extra}\n"
    ));
    std::fs::write(&gw.config, config).unwrap();
    gw
}

/// Registers `name` with the PSK `psk`; returns its token.
fn add_psk_device(gw: &Gateway, name: &str, psk: &Psk) -> String {
    let out = gw.cli(&[
        "devices",
        "add",
        name,
        "--type",
        "sensor",
        "--psk-identity",
        psk.identity,
        "--psk-key",
        &psk.hex(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The address the coaps listener bound.
/// A started gateway (no cloud) with `dev-a` registered, and its coaps
/// address.
fn started_with_dev_a(dir: &Path) -> (Gateway, String) {
    let mut gw = coaps_gateway(dir, None, "");
    add_psk_device(&gw, "dev-a", &DEV_A);
    gw.start();
    let addr = coaps_addr(&gw);
    (gw, addr)
}

fn coaps_addr(gw: &Gateway) -> String {
    gw.status()["listeners"]["coaps"]
        .as_str()
        .expect("the coaps listener is on")
        .to_owned()
}

fn url(addr: &str, path: &str) -> String {
    format!("coaps://{addr}/api/v1/{path}")
}

/// The `coaps` counters of `sluice status`.
fn coaps(gw: &Gateway) -> Json {
    gw.status()["coaps"].clone()
}

fn counter(gw: &Gateway, name: &str) -> u64 {
    let c = coaps(gw);
    c[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no coaps.{name}: {c}"))
}

/// Runs one libcoap client (`lib`) with `args`, bounded by `timeout`.
fn client(lib: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["60", lib])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{lib} must be installed (libcoap3-bin): {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// POSTs `body` to `uri` as `psk` with `lib`, printing every PDU (`-v 6`).
fn post(lib: &str, psk: &Psk, uri: &str, body: &str) -> Output {
    let mut args = psk.args().to_vec();
    args.extend(["-v", "6", "-m", "post", "-e", body, uri]);
    client(lib, &args)
}

/// Whether a `-v 6` client printed a response with `code`.
fn answered(o: &Output, code: &str) -> bool {
    text(o).contains(&format!(" c:{code} "))
}

fn peek_all(gw: &Gateway) -> Vec<Json> {
    gw.cli_json(&["queue", "peek", "-n", "100000", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

/// Clients that stay up (Observe), killed by pid when dropped.
#[derive(Default)]
struct Clients(Vec<Child>);

impl Clients {
    /// Starts `lib` observing `uri` as `psk` for `secs`, from `local_port`
    /// when given; stdout and stderr go to `out` and `out.err`.
    fn observe(
        &mut self,
        lib: &str,
        psk: &Psk,
        uri: &str,
        secs: u32,
        local_port: Option<u16>,
        out: &Path,
    ) -> u32 {
        let mut cmd = Command::new(lib);
        cmd.args(psk.args());
        if let Some(p) = local_port {
            cmd.args(["-p", &p.to_string()]);
        }
        let child = cmd
            .args(["-m", "get", "-s", &secs.to_string(), uri])
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{lib} must be installed (libcoap3-bin): {e}"));
        let pid = child.id();
        self.0.push(child);
        pid
    }

    /// SIGKILL (no close_notify) and reap the client with `pid`.
    fn kill(&mut self, pid: u32) {
        if let Some(i) = self.0.iter().position(|c| c.id() == pid) {
            let mut c = self.0.swap_remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_all(&mut self) {
        for mut c in self.0.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The daemon's resident set, KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Datagrams the kernel dropped on the IPv4 UDP socket bound to `addr`
/// because its receive queue was full (the `drops` column of
/// /proc/net/udp): hellos the daemon never got to read.
fn udp_drops(addr: &str) -> u64 {
    let sa: SocketAddr = addr.parse().unwrap();
    let std::net::IpAddr::V4(ip) = sa.ip() else {
        panic!("{addr} is not IPv4")
    };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), sa.port());
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str())).then(|| f.last()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no socket {local} in /proc/net/udp"))
}

/// A UDP port free on 127.0.0.1, below Linux's ephemeral range so that no
/// port-0 bind elsewhere takes it in the instant a test leaves it free.
fn free_udp_port() -> u16 {
    let seed = std::process::id() % 997;
    (0..4000u32)
        .map(|k| 28_000 + ((seed + k * 13) % 4000) as u16)
        .find(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free UDP port in 28000-31999")
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// libcoap's log output without what differs between any two runs: the
/// timestamp opening each line (`Nov 26 13:02:08.681`) and socket addresses
/// (`127.0.0.1:57040`, also when glued to gnutls's `***` prefix).
fn normalise(log: &str) -> String {
    let is_timestamp = |t: &[&str]| {
        t.len() >= 3
            && t[0].len() == 3
            && t[0].chars().all(|c| c.is_ascii_alphabetic())
            && t[1].chars().all(|c| c.is_ascii_digit())
            && t[2].matches(':').count() == 2
            && t[2]
                .chars()
                .all(|c| c.is_ascii_digit() || c == ':' || c == '.')
    };
    log.lines()
        .map(|line| {
            let mut tokens: Vec<&str> = line.split_whitespace().collect();
            if is_timestamp(&tokens) {
                tokens.drain(..3);
            }
            tokens
                .iter()
                .map(|t| {
                    let at = t
                        .find(|c: char| c.is_ascii_digit() || c == '[')
                        .unwrap_or(t.len());
                    if t[at..].parse::<SocketAddr>().is_ok() {
                        format!("{}<addr>", &t[..at])
                    } else {
                        (*t).to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn openssl_and_gnutls_devices_post_over_coaps_and_each_reading_names_its_device() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coaps_gateway(tmp.path(), Some(&cloud), "");
    let token_a = add_psk_device(&gw, "dev-a", &DEV_A);
    let token_b = add_psk_device(&gw, "dev-b", &DEV_B);
    gw.start();
    let addr = coaps_addr(&gw);
    let tel = url(&addr, "telemetry");
    for (lib, psk, n) in [
        (OPENSSL, &DEV_A, 1),
        (GNUTLS, &DEV_B, 2),
        (OPENSSL, &DEV_B, 3),
        (GNUTLS, &DEV_A, 4),
    ] {
        let o = post(lib, psk, &tel, &format!(r#"{{"n":{n}}}"#));
        assert!(
            answered(&o, "2.04"),
            "{lib} as {}: {}",
            psk.identity,
            text(&o)
        );
    }
    // A token in the path must be the session's own device's.
    let o = post(
        OPENSSL,
        &DEV_A,
        &url(&addr, &format!("{token_a}/telemetry")),
        r#"{"n":5}"#,
    );
    assert!(answered(&o, "2.04"), "own token: {}", text(&o));
    for (lib, psk, other) in [(OPENSSL, &DEV_A, &token_b), (GNUTLS, &DEV_B, &token_a)] {
        let o = post(
            lib,
            psk,
            &url(&addr, &format!("{other}/telemetry")),
            r#"{"n":6}"#,
        );
        assert!(
            answered(&o, "4.03") && !answered(&o, "2.04"),
            "{lib} as {} with another device's token: {}",
            psk.identity,
            text(&o)
        );
    }
    // Records reach the cloud in sequence order: once this one is there,
    // a stored n=6 would be too.
    let o = post(OPENSSL, &DEV_B, &tel, r#"{"n":7}"#);
    assert!(answered(&o, "2.04"), "{}", text(&o));
    let by_device = || {
        let mut m: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (_, device, r) in cloud.observer.records() {
            m.entry(device)
                .or_default()
                .push(r["values"]["n"].as_i64().unwrap());
        }
        m
    };
    wait_for(
        "the last reading at the cloud",
        Duration::from_secs(20),
        || by_device().get("dev-b").is_some_and(|v| v.contains(&7)),
    );
    let mut seen = by_device();
    seen.values_mut().for_each(|v| v.sort_unstable());
    assert_eq!(
        seen,
        BTreeMap::from([
            ("dev-a".to_owned(), vec![1, 4, 5]),
            ("dev-b".to_owned(), vec![2, 3, 7]),
        ]),
        "each reading under its session's device, none refused stored"
    );
    let st = gw.status();
    assert_eq!(st["coaps"]["handshakes"], 8, "{st}");
    assert_eq!(st["coaps"]["auth_failures"], 0, "{st}");
    assert_eq!(st["ingest"]["messages"]["coap"]["ok"], 6, "{st}");
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_wrong_key_and_an_unknown_identity_fail_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let tel = url(&addr, "telemetry");
    for lib in [OPENSSL, GNUTLS] {
        let before = coaps(&gw);
        let run = |identity: &str, key: &str| {
            client(
                lib,
                &[
                    "-u",
                    identity,
                    "-k",
                    key,
                    "-m",
                    "post",
                    "-e",
                    r#"{"n":1}"#,
                    &tel,
                ],
            )
        };
        // The real identity with a wrong key; an unknown identity with a
        // key that is valid (for another identity).
        let wrong_key = run(DEV_A.identity, "not-the-key");
        let unknown = run("nobody@plant-1", DEV_A.key);
        let after = coaps(&gw);
        let moved = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        assert_eq!(moved("auth_failures"), 2, "{lib}: {before} → {after}");
        assert_eq!(moved("handshakes"), 0, "{lib}: {after}");
        assert_eq!(moved("unbound"), 0, "{lib}: {after}");
        let shown = |o: &Output| {
            format!(
                "stdout:\n{}\nstderr:\n{}",
                normalise(&String::from_utf8_lossy(&o.stdout)),
                normalise(&String::from_utf8_lossy(&o.stderr))
            )
        };
        let (a, b) = (shown(&wrong_key), shown(&unknown));
        eprintln!(
            "{lib}, wrong key, raw:\n{}\n{lib}, unknown identity, raw:\n{}\nboth normalised:\n{a}",
            text(&wrong_key),
            text(&unknown)
        );
        assert!(
            text(&wrong_key).contains("cannot send CoAP pdu"),
            "{lib}: the wrong key failed visibly: {}",
            text(&wrong_key)
        );
        assert_eq!(a, b, "{lib}: a wrong key and an unknown identity differ");
    }
    assert!(peek_all(&gw).is_empty());
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn revoking_a_device_closes_its_live_session_and_refuses_it_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let tel = url(&addr, "telemetry");
    let o = post(OPENSSL, &DEV_A, &tel, r#"{"n":1}"#);
    assert!(answered(&o, "2.04"), "{}", text(&o));
    let mut clients = Clients::default();
    let observer = clients.observe(
        OPENSSL,
        &DEV_A,
        &url(&addr, "attributes/updates"),
        30,
        None,
        &tmp.path().join("observe.out"),
    );
    wait_for("the observing session", Duration::from_secs(10), || {
        counter(&gw, "established") == 1
    });
    let out = gw.cli(&["devices", "revoke", "dev-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    wait_for(
        "the revoked device's session to close",
        Duration::from_secs(3),
        || {
            let c = coaps(&gw);
            c["established"] == 0 && c["revoked"] == 1
        },
    );
    eprintln!(
        "session closed {} ms after `devices revoke` returned",
        revoked_at.elapsed().as_millis()
    );
    let failures = counter(&gw, "auth_failures");
    let o = post(OPENSSL, &DEV_A, &tel, r#"{"n":2}"#);
    assert!(!answered(&o, "2.04"), "revoked but served: {}", text(&o));
    assert!(
        text(&o).contains("cannot send CoAP pdu"),
        "revoked: {}",
        text(&o)
    );
    assert!(counter(&gw, "auth_failures") > failures);
    let stored = peek_all(&gw);
    assert_eq!(stored.len(), 1, "only the reading before the revocation");
    assert_eq!(stored[0]["values"]["n"], 1);
    clients.kill(observer);
    assert_eq!(gw.stop(), Some(0));
}

/// What the flood script printed at its end.
struct Flood {
    report: Json,
    /// When the POST made during each phase got its answer, and how long
    /// it took.
    posts: Vec<(&'static str, Output, Duration, Instant)>,
    ended: Instant,
}

#[test]
fn a_hello_flood_from_one_address_holds_no_state_and_a_real_device_still_gets_in() {
    const FLOOD_S: &str = "5";
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let tel = url(&addr, "telemetry");
    let pid = gw.pid().unwrap();
    // Warm the DTLS and CoAP paths up before the baseline.
    let o = post(OPENSSL, &DEV_A, &tel, r#"{"n":0}"#);
    assert!(answered(&o, "2.04"), "{}", text(&o));
    wait_for(
        "the warm-up session to close",
        Duration::from_secs(5),
        || counter(&gw, "established") == 0,
    );
    let before = coaps(&gw);
    let rss_before = rss_kib(pid);
    let drops_before = udp_drops(&addr);
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/dtls_hello_flood.py"
    );
    let mut flood = Command::new("timeout")
        .args(["60", "python3", script, host, port, FLOOD_S])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = flood.stdout.take().unwrap();
    // While the device handshakes, its own session is half-open.
    let posting = Arc::new(AtomicBool::new(false));
    let posting2 = posting.clone();
    let device = std::thread::spawn(move || {
        let mut posts = Vec::new();
        let mut report = Json::Null;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let (phase, n) = match line.as_str() {
                "phase single" => ("one source port", 1),
                "phase many" => ("64 source ports", 2),
                _ => {
                    report = serde_json::from_str(&line).unwrap_or(Json::Null);
                    continue;
                }
            };
            posting2.store(true, Ordering::SeqCst);
            let t = Instant::now();
            let o = post(OPENSSL, &DEV_A, &tel, &format!(r#"{{"n":{n}}}"#));
            posts.push((phase, o, t.elapsed(), Instant::now()));
            posting2.store(false, Ordering::SeqCst);
        }
        Flood {
            report,
            posts,
            ended: Instant::now(),
        }
    });
    let mut samples = Vec::new();
    while !device.is_finished() {
        let during_post = posting.load(Ordering::SeqCst);
        let c = coaps(&gw);
        let sample = (c["half_open"].as_u64(), c["established"].as_u64());
        samples.push((sample, during_post || posting.load(Ordering::SeqCst)));
        pause(Duration::from_millis(100));
    }
    let flood_status = flood.wait().unwrap();
    let Flood {
        report,
        posts,
        ended,
    } = device.join().unwrap();
    assert!(flood_status.success(), "the flood script failed");
    let rss_after = rss_kib(pid);
    let sent = report["sent"].as_u64().expect("the flood's report");
    // Every hello the daemon read got a HelloVerifyRequest; the rest the
    // kernel dropped from its full receive queue.
    let moved = |c: &Json, k: &str| c[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let mut after = coaps(&gw);
    let mut drops = 0;
    wait_for(
        "the daemon to read every queued hello",
        Duration::from_secs(5),
        || {
            after = coaps(&gw);
            drops = udp_drops(&addr) - drops_before;
            moved(&after, "hello_verify_requests") + drops >= sent
        },
    );
    let hvr = moved(&after, "hello_verify_requests");
    let secs = report["seconds"].as_f64().unwrap();
    eprintln!("flood: {report}");
    eprintln!(
        "flood: {sent} ClientHellos in {secs:.1} s ({:.0}/s) from 127.0.0.1; the daemon answered \
         {hvr} with a HelloVerifyRequest ({:.0}/s, {:.0}%), the kernel dropped {drops} from the \
         full socket queue; the script received {} HelloVerifyRequests",
        sent as f64 / secs,
        hvr as f64 / secs,
        100.0 * hvr as f64 / sent as f64,
        report["hvr"]
    );
    eprintln!(
        "flood: daemon VmRSS {rss_before} KiB before, {rss_after} KiB after ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    for (phase, o, took, at) in &posts {
        eprintln!(
            "flood: POST during the {phase} flood answered in {} ms{}",
            took.as_millis(),
            if *at + Duration::from_millis(300) < ended {
                " (the flood still running)"
            } else {
                " (after the flood ended)"
            }
        );
        assert!(
            answered(o, "2.04"),
            "POST during the {phase} flood: {}",
            text(o)
        );
    }
    assert_eq!(posts.len(), 2, "one POST per flood phase");
    assert!(sent > 1000, "the flood ran: {report}");
    assert!(
        hvr + drops <= sent + 100,
        "more answers than hellos: {hvr} + {drops} vs {sent}"
    );
    assert!(
        hvr > sent / 10,
        "the daemon kept answering: {hvr} of {sent}"
    );
    assert!(report["hvr"].as_u64().unwrap() <= hvr);
    let (quiet, with_device): (Vec<_>, Vec<_>) = samples.iter().partition(|(_, p)| !p);
    let quiet: Vec<_> = quiet.iter().map(|(s, _)| *s).collect();
    let with_device: Vec<_> = with_device.iter().map(|(s, _)| *s).collect();
    eprintln!(
        "flood: (half_open, established) sampled {} times while only the flood ran: {quiet:?}; \
         {} times while the device was in: {with_device:?}",
        quiet.len(),
        with_device.len()
    );
    assert!(quiet.len() >= 5, "sampled during the flood: {samples:?}");
    // Established sessions are the device's: its handshake is half-open
    // for a moment, and a session can outlive its client until the
    // daemon reads the close_notify (or for good, if the flood made the
    // kernel drop that datagram): at most one per POST.
    assert!(
        quiet.iter().all(|&(h, e)| h == Some(0) && e.unwrap() <= 2),
        "the flood held state: {quiet:?}"
    );
    assert!(
        with_device
            .iter()
            .all(|&(h, e)| h.unwrap() <= 1 && e.unwrap() <= 2),
        "the flood held state beside the device: {with_device:?}"
    );
    assert_eq!(moved(&after, "handshakes"), 2, "only the device's: {after}");
    for k in ["refused", "bad_cookies", "malformed", "auth_failures"] {
        assert_eq!(moved(&after, k), 0, "{k}: {after}");
    }
    assert_eq!(after["half_open"], 0, "{after}");
    assert!(
        rss_after < rss_before + 2048,
        "the flood grew the daemon by {} KiB",
        rss_after - rss_before
    );
    let stored: Vec<Json> = peek_all(&gw)
        .iter()
        .map(|r| r["values"]["n"].clone())
        .collect();
    assert_eq!(stored, [json!(0), json!(1), json!(2)]);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_rebooted_device_on_the_same_port_replaces_its_session_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let port = free_udp_port();
    let mut clients = Clients::default();
    let before_reboot = clients.observe(
        OPENSSL,
        &DEV_A,
        &url(&addr, "attributes/updates"),
        30,
        Some(port),
        &tmp.path().join("observe.out"),
    );
    wait_for("the first session", Duration::from_secs(10), || {
        counter(&gw, "established") == 1
    });
    // A reboot: no close_notify, the daemon still holds the old session.
    clients.kill(before_reboot);
    let port_arg = port.to_string();
    let start = Instant::now();
    let mut args = DEV_A.args().to_vec();
    args.extend(["-p", &port_arg, "-v", "6", "-m", "post", "-e", r#"{"n":1}"#]);
    let tel = url(&addr, "telemetry");
    args.push(&tel);
    let o = client(OPENSSL, &args);
    let took = start.elapsed();
    eprintln!(
        "reconnect from the same port {port} after kill -9: client start to exit (2.04 \
         included) in {} ms",
        took.as_millis()
    );
    assert!(answered(&o, "2.04"), "{}", text(&o));
    let c = coaps(&gw);
    assert_eq!(c["replaced"], 1, "{c}");
    assert_eq!(c["handshakes"], 2, "{c}");
    assert_eq!(c["half_open"], 0, "{c}");
    assert!(
        took < Duration::from_millis(1500),
        "the reconnect waited for a retransmission: {took:?}"
    );
    assert_eq!(peek_all(&gw).len(), 1);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn firmware_downloads_block_wise_over_coaps_byte_for_byte() {
    // At the default MTU the blocks asked for; at mtu = 256 a client asking
    // for 1024-byte blocks gets 128-byte ones (RFC 7959 §2.4), which fit a
    // record.
    for (mtu, cases) in [
        (
            "",
            &[(OPENSSL, "1024"), (OPENSSL, "256"), (GNUTLS, "512")][..],
        ),
        ("mtu = 256", &[(OPENSSL, "1024"), (GNUTLS, "1024")][..]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut gw = coaps_gateway(tmp.path(), None, mtu);
        add_psk_device(&gw, "dev-a", &DEV_A);
        let image = ota_image();
        gw.stage_firmware(&image, "fw", "2", "dev-a");
        gw.start();
        let fw = url(&coaps_addr(&gw), "firmware?title=fw&version=2");
        let want = hex_sha256(&image);
        for (lib, size) in cases {
            let dst = tmp.path().join(format!("{lib}-{size}.bin"));
            let start = Instant::now();
            let mut args = DEV_A.args().to_vec();
            args.extend(["-m", "get", "-b", size, "-o", dst.to_str().unwrap(), &fw]);
            let o = client(lib, &args);
            let got = std::fs::read(&dst).unwrap_or_default();
            eprintln!(
                "{mtu:?} {lib} -b {size}: {} bytes in {} ms",
                got.len(),
                start.elapsed().as_millis()
            );
            assert_eq!(
                hex_sha256(&got),
                want,
                "{mtu:?} {lib} -b {size}: {} of {} bytes; {}",
                got.len(),
                image.len(),
                text(&o)
            );
        }
        assert_eq!(counter(&gw, "too_large"), 0);
        assert_eq!(gw.stop(), Some(0));
    }
}

#[test]
fn fifty_concurrent_sessions_cost_little_memory_each() {
    const SESSIONS: u64 = 50;
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let pid = gw.pid().unwrap();
    let updates = url(&addr, "attributes/updates");
    // One session first, so that what every session shares is in the
    // baseline.
    let mut clients = Clients::default();
    let warm = clients.observe(
        OPENSSL,
        &DEV_A,
        &updates,
        20,
        None,
        &tmp.path().join("warm.out"),
    );
    wait_for("the warm-up session", Duration::from_secs(10), || {
        counter(&gw, "established") == 1
    });
    clients.kill(warm);
    let rss_before = rss_kib(pid);
    for i in 0..SESSIONS {
        clients.observe(
            OPENSSL,
            &DEV_A,
            &updates,
            20,
            None,
            &tmp.path().join(format!("obs-{i}.out")),
        );
    }
    wait_for("every observing session", Duration::from_secs(20), || {
        counter(&gw, "established") == SESSIONS + 1
    });
    let rss_after = rss_kib(pid);
    let per_session = (rss_after.saturating_sub(rss_before) * 1024) / SESSIONS;
    eprintln!(
        "{SESSIONS} observing coaps sessions: daemon VmRSS {rss_before} KiB → {rss_after} KiB, \
         {per_session} bytes per session (DTLS session + CoAP observer)"
    );
    assert!(per_session < 64 * 1024, "{per_session} bytes per session");
    let st = gw.status();
    assert_eq!(st["coaps"]["half_open"], 0, "{st}");
    clients.kill_all();
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn handshakes_survive_lost_client_datagrams() {
    // libcoap's `-l N,M` drops the client's Nth and Mth datagrams: 1 the
    // first ClientHello, 2 the one with the cookie, 3 the ClientKeyExchange
    // + Finished flight. The client's retransmission timer must bring each
    // handshake through (the gateway answers repeats; it keeps no timer).
    let tmp = tempfile::tempdir().unwrap();
    let (mut gw, addr) = started_with_dev_a(tmp.path());
    let tel = url(&addr, "telemetry");
    let cases = [
        (OPENSSL, "2,3"),
        (GNUTLS, "1,3"),
        (OPENSSL, "1"),
        (GNUTLS, "2"),
    ];
    for (i, (lib, lost)) in cases.iter().enumerate() {
        let mut args = DEV_A.args().to_vec();
        let body = format!(r#"{{"n":{i}}}"#);
        args.extend(["-v", "6", "-l", lost, "-m", "post", "-e", &body, &tel]);
        let o = client(lib, &args);
        assert!(answered(&o, "2.04"), "{lib} -l {lost}: {}", text(&o));
    }
    let c = coaps(&gw);
    assert_eq!(c["handshakes"], 4, "{c}");
    assert_eq!(c["handshake_errors"], 0, "{c}");
    assert_eq!(peek_all(&gw).len(), 4);
    assert_eq!(gw.stop(), Some(0));
}
