//! Real peers for the end-to-end tests: an openssl-made PKI, a mosquitto
//! broker with a TLS 1.3 listener and password auth, a `mosquitto_sub`
//! observer, curl as the device HTTP client, and the sluice binary itself.
//! Everything binds 127.0.0.1; every wait polls a condition with a deadline.

// A failed set-up step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The sluice binary under test.
pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice-under-test");

/// Polls `cond` every 20 ms until it holds or `limit` passes; panics with
/// `what` on timeout.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return;
        }
        pause(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Sleeps the test thread (tests are not async; this is not a wait for a
/// result, only a pacing step).
#[allow(clippy::disallowed_methods)]
pub fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// A port that was free a moment ago.
/// Picked below Linux's ephemeral range (32768–60999), so a port the test
/// reserves for a peer it starts later (a broker brought up mid-test) is not
/// handed to some other process's port-0 bind in the meantime.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id() % 500 * 23;
    loop {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed + k * 7) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A new P-256 key in `key` and a certificate request for `/CN=cn` in `csr`
/// (openssl), for a CA to sign.
pub fn key_and_csr(cn: &str, key: &Path, csr: &Path) {
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", &format!("/CN={cn}"), "-keyout"])
            .arg(key)
            .arg("-out")
            .arg(csr),
    );
}

/// A CA and a server certificate for 127.0.0.1/localhost, made with openssl.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Self {
        let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args([
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=sluice test CA",
                    "-keyout",
                ])
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
        );
        let pki = Self {
            ca,
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        let (cert, key) = pki.issue("localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost");
        Self { cert, key, ..pki }
    }

    /// A client certificate with common name `cn`, signed by this CA.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(cn, "extendedKeyUsage=clientAuth")
    }

    /// A P-256 key and a certificate for `cn` signed by this CA, with the
    /// X.509 v3 extension `ext` (rustls accepts only v3 certificates).
    fn issue(&self, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        let dir = self.ca.parent().unwrap();
        let path = |suffix: &str| dir.join(format!("{cn}.{suffix}"));
        std::fs::write(path("ext"), format!("{ext}\n")).unwrap();
        key_and_csr(cn, &path("key"), &path("csr"));
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
                .arg(path("csr"))
                .arg("-CA")
                .arg(&self.ca)
                .arg("-CAkey")
                .arg(dir.join("ca.key"))
                .arg("-extfile")
                .arg(path("ext"))
                .arg("-out")
                .arg(path("crt")),
        );
        (path("crt"), path("key"))
    }
}

fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// The stand-in cloud: mosquitto with one TLS 1.3 listener, password auth and
/// persistence (so a SIGTERM restart keeps queued messages).
pub struct Broker {
    pub port: u16,
    /// A second TLS listener that requires a client certificate and takes
    /// the certificate's CN as the username (no password).
    pub mtls_port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub const GW_USER: (&str, &str) = ("gw", "gw-secret");
pub const OBS_USER: (&str, &str) = ("observer", "obs-secret");

impl Broker {
    /// Writes the broker's files; `start` runs it.
    pub fn new(dir: &Path, pki: &Pki, port: u16) -> Self {
        Self::with_mtls_ca(dir, pki, port, &pki.ca)
    }

    /// As `new`, but the mTLS listener accepts only client certificates
    /// signed by the CA in `mtls_ca`.
    pub fn with_mtls_ca(dir: &Path, pki: &Pki, port: u16, mtls_ca: &Path) -> Self {
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "").unwrap();
        for (u, p) in [GW_USER, OBS_USER] {
            run_ok(
                Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg(&passwd)
                    .arg(u)
                    .arg(p),
            );
        }
        let persist = dir.join("mosq-data");
        std::fs::create_dir_all(&persist).unwrap();
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\n\
             persistence true\npersistence_location {}/\nmax_queued_messages 100000\n\
             log_type error\nlog_type warning\nlog_type notice\n\
             listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.3\n",
            passwd.display(),
            persist.display(),
            pki.ca.display(),
            pki.cert.display(),
            pki.key.display()
        );
        let mtls_port = free_port();
        text.push_str(&format!(
            "listener {mtls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\n",
            mtls_ca.display(),
            pki.cert.display(),
            pki.key.display()
        ));
        if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n")
        {
            text.push_str("user root\n");
        }
        std::fs::write(&conf, text).unwrap();
        Self {
            port,
            mtls_port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto must be installed (see README)");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// What mosquitto logged (notices include each client's protocol
    /// version: `p2` = 3.1.1, `p5` = 5).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (mosquitto saves its persistence) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal to one process by pid (never by name).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// One message seen by the observer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Json,
}

/// A `mosquitto_sub` with a persistent session, re-run whenever it exits (the
/// broker restarts in some tests), collecting every message under `sluice/#`.
pub struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    pub fn start(broker: &Broker, pki: &Pki, id: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let (port, ca, id) = (broker.port, pki.ca.clone(), id.to_owned());
        let (seen2, stop2, child2) = (seen.clone(), stop.clone(), child.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let spawned = Command::new("mosquitto_sub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
                    .arg(&ca)
                    .args([
                        "-u", OBS_USER.0, "-P", OBS_USER.1, "-q", "1", "-c", "-i", &id,
                    ])
                    .args(["-t", "sluice/#", "-v"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn();
                let Ok(mut c) = spawned else {
                    pause(Duration::from_millis(200));
                    continue;
                };
                let out = c.stdout.take().unwrap();
                *child2.lock().unwrap() = Some(c);
                use std::io::BufRead;
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let Some((topic, payload)) = line.split_once(' ') else {
                        continue;
                    };
                    let payload =
                        serde_json::from_str(payload).unwrap_or(Json::String(payload.into()));
                    seen2.lock().unwrap().push(Seen {
                        topic: topic.to_owned(),
                        payload,
                    });
                }
                if let Some(mut c) = child2.lock().unwrap().take() {
                    let _ = c.wait();
                }
                pause(Duration::from_millis(100));
            }
        });
        let obs = Self {
            seen,
            stop,
            child,
            thread: Some(thread),
        };
        // Prove the subscription is live before anything is published.
        let probe_topic = format!("sluice/probe-{}/telemetry", broker.port);
        wait_for(
            "the observer to see a probe",
            Duration::from_secs(15),
            || {
                let _ = Command::new("mosquitto_pub")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &broker.port.to_string(),
                        "--cafile",
                    ])
                    .arg(&pki.ca)
                    .args([
                        "-u",
                        OBS_USER.0,
                        "-P",
                        OBS_USER.1,
                        "-q",
                        "1",
                        "-t",
                        &probe_topic,
                        "-m",
                        "{\"probe\":true}",
                    ])
                    .status();
                obs.seen
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|s| s.topic == probe_topic)
            },
        );
        obs
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Every telemetry record seen, in arrival order, as (seq, device, payload record).
    pub fn records(&self) -> Vec<(u64, String, Json)> {
        let mut out = Vec::new();
        for s in self.seen() {
            if !s.topic.ends_with("/telemetry") || s.payload.get("records").is_none() {
                continue;
            }
            for r in s.payload["records"].as_array().unwrap() {
                out.push((
                    r["seq"].as_u64().unwrap(),
                    r["device"].as_str().unwrap().to_owned(),
                    r.clone(),
                ));
            }
        }
        out
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sluice daemon run from the built binary, with its own state dir.
pub struct Gateway {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    pub http: Option<String>,
    /// The MQTT listener's bound address, when `GatewaySpec::mqtt`.
    pub mqtt: Option<String>,
    /// The CoAP listener's bound address, when `GatewaySpec::coap`.
    pub coap: Option<String>,
    /// Extra environment for `run`.
    pub env: Vec<(String, String)>,
}

/// Settings a test varies.
#[derive(Clone)]
pub struct GatewaySpec {
    pub http_port: u16,
    pub max_bytes: String,
    pub when_full: &'static str,
    /// (broker port, CA file) or None for offline mode.
    pub cloud: Option<(u16, PathBuf)>,
    /// Authenticate to the broker with this certificate and key instead of
    /// a password.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// More `[cloud]` lines.
    pub cloud_extra: String,
    /// Turn on `[listeners.mqtt]` on 127.0.0.1, port 0.
    pub mqtt: bool,
    /// Turn on `[listeners.coap]` on 127.0.0.1, port 0, with these extra
    /// lines.
    pub coap: Option<String>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            http_port: 0,
            max_bytes: "64MiB".into(),
            when_full: "drop_oldest",
            cloud: None,
            client_cert: None,
            cloud_extra: String::new(),
            mqtt: false,
            coap: None,
        }
    }
}

impl Gateway {
    /// Writes the config (the state dir is `dir/state`); `start` runs it.
    pub fn new(dir: &Path, spec: &GatewaySpec) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let state = dir.join("state");
        let mut text = format!(
            "[gateway]\nid = \"gw-test\"\nstate_dir = \"{}\"\n\n\
             [listeners.http]\nbind = \"127.0.0.1:{}\"\n\n\
             [outbox]\nmax_bytes = \"{}\"\nwhen_full = \"{}\"\n\n\
             [admin]\nsocket = \"{}\"\n",
            state.display(),
            spec.http_port,
            spec.max_bytes,
            spec.when_full,
            dir.join("admin.sock").display()
        );
        if spec.mqtt {
            text.push_str("\n[listeners.mqtt]\nbind = \"127.0.0.1:0\"\n");
        }
        if let Some(extra) = &spec.coap {
            text.push_str(&format!(
                "\n[listeners.coap]\nbind = \"127.0.0.1:0\"\n{extra}\n"
            ));
        }
        if let Some((port, ca)) = &spec.cloud {
            text.push_str(&format!(
                "\n[cloud]\nurl = \"mqtts://127.0.0.1:{port}\"\nca_file = \"{}\"\n\
                 keep_alive = \"5s\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n\
                 batch_max_records = 50\nbatch_max_bytes = \"2KiB\"\n",
                ca.display()
            ));
            text.push_str(&spec.cloud_extra);
            match &spec.client_cert {
                Some((cert, key)) => text.push_str(&format!(
                    "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                    cert.display(),
                    key.display()
                )),
                None => {
                    let pw = dir.join("cloud-password");
                    std::fs::write(&pw, format!("{}\n", GW_USER.1)).unwrap();
                    text.push_str(&format!(
                        "username = \"{}\"\npassword_file = \"{}\"\n",
                        GW_USER.0,
                        pw.display()
                    ));
                }
            }
        }
        let config = dir.join("sluice.toml");
        std::fs::write(&config, text).unwrap();
        Self {
            dir: dir.to_owned(),
            config,
            child: None,
            http: None,
            mqtt: None,
            coap: None,
            env: Vec::new(),
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(SLUICE)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("SLUICE_CONFIG")
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed and print JSON; returns it.
    pub fn cli_json(&self, args: &[&str]) -> Json {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sluice {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Registers a device through the CLI; returns its token.
    pub fn add_device(&self, name: &str) -> String {
        let out = self.cli(&["devices", "add", name, "--type", "sensor"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sluice.log"))
            .unwrap();
        let child = Command::new(SLUICE)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("SLUICE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = self.try_status() {
                break st;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > end {
                panic!(
                    "sluice did not come up ({exited:?}); its log:\n{}",
                    std::fs::read_to_string(self.dir.join("sluice.log")).unwrap_or_default()
                );
            }
            pause(Duration::from_millis(20));
        };
        self.http = status["listeners"]["http"].as_str().map(str::to_owned);
        self.mqtt = status["listeners"]["mqtt"].as_str().map(str::to_owned);
        self.coap = status["listeners"]["coap"].as_str().map(str::to_owned);
    }

    pub fn try_status(&self) -> Option<Json> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn status(&self) -> Json {
        self.try_status().expect("sluice status --json failed")
    }

    /// Stages `image` (written to a file in the gateway's dir) as firmware
    /// `title`/`version` for `device` with `sluice firmware stage`; returns
    /// the file.
    pub fn stage_firmware(
        &self,
        image: &[u8],
        title: &str,
        version: &str,
        device: &str,
    ) -> PathBuf {
        let file = self.dir.join(format!("{title}-{version}.src"));
        std::fs::write(&file, image).unwrap();
        let out = self.cli(&[
            "firmware",
            "stage",
            file.to_str().unwrap(),
            "--title",
            title,
            "--version",
            version,
            "--device",
            device,
        ]);
        assert!(
            out.status.success(),
            "firmware stage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        file
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() >= end {
                // Do not leave the hung daemon behind.
                let _ = c.kill();
                let _ = c.wait();
                panic!("sluice did not stop within 30 s of SIGTERM");
            }
            pause(Duration::from_millis(20));
        }
    }

    pub fn url(&self, token: &str) -> String {
        format!(
            "http://{}/api/v1/{token}/telemetry",
            self.http.as_ref().unwrap()
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("sluice.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of the gateway's log ({}):",
                self.dir.display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs `mosquitto_pub` against the gateway's MQTT listener with `args`
/// (`-V`, `-q`, `-u`, `-t`, `-m`/`-l` …); `stdin` feeds `-l`.
pub fn mosquitto_pub(gw: &Gateway, args: &[&str], stdin: &str) -> Output {
    let addr = gw.mqtt.as_ref().expect("the MQTT listener is on");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub must be installed (mosquitto-clients)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs one curl process that POSTs `bodies` in order on one keep-alive
/// connection; returns the HTTP status of each (0 when no answer).
pub fn curl_posts(url: &str, bodies: &[String]) -> Child {
    let mut cfg = String::new();
    for b in bodies {
        let escaped = b.replace('\\', "\\\\").replace('"', "\\\"");
        cfg.push_str(&format!(
            "url = \"{url}\"\ndata = \"{escaped}\"\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\nsilent\nmax-time = 10\nnext\n"
        ));
    }
    let mut child = Command::new("curl")
        .args(["-K", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cfg.as_bytes())
        .unwrap();
    child
}

/// The status codes a `curl_posts` child printed, one per body.
pub fn curl_codes(child: Child) -> Vec<u16> {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// One curl request; returns (status, headers+body text).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Groups telemetry records by device as (seq, n) pairs in arrival order.
pub fn by_device(records: &[(u64, String, Json)]) -> BTreeMap<String, Vec<(u64, i64)>> {
    let mut m: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    for (seq, dev, r) in records {
        m.entry(dev.clone())
            .or_default()
            .push((*seq, r["values"]["n"].as_i64().unwrap()));
    }
    m
}

/// A TCP relay between sluice and the broker that the test can break: while
/// black-holed it swallows bytes in both directions (publishes in flight
/// vanish, as on a dead radio link), and `cut` then resets every relayed
/// connection. Not a fake peer: the TLS session and MQTT run end to end
/// through it.
pub struct FaultyLink {
    pub port: u16,
    blackhole: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl FaultyLink {
    pub fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (bh, cs, st) = (blackhole.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    pause(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let bh = bh.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if !bh.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                let mut g = cs.lock().unwrap();
                g.push(client);
                g.push(server);
            }
        });
        Self {
            port,
            blackhole,
            conns,
            stop,
        }
    }

    /// Swallow everything from now on.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Reset every relayed connection and forward normally again.
    pub fn cut_and_heal(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.blackhole.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut_and_heal();
    }
}

/// The `generic` profile's topic prefix of the test gateways (`gw-test`).
pub const PREFIX: &str = "sluice/gw-test";

pub struct Cloud {
    _tmp: tempfile::TempDir,
    pub pki: Pki,
    pub broker: Broker,
    pub observer: Observer,
}

/// A TLS mosquitto as the cloud, with an observer on `sluice/#`.
pub fn cloud() -> Cloud {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(tmp.path());
    let mut broker = Broker::new(tmp.path(), &pki, free_port());
    broker.start();
    let observer = Observer::start(&broker, &pki, &format!("obs-{}", broker.port));
    Cloud {
        _tmp: tmp,
        pki,
        broker,
        observer,
    }
}

impl Cloud {
    /// Publishes `payload` on `topic` as the cloud side (QoS 1).
    pub fn publish(&self, topic: &str, payload: &Json) {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.broker.port.to_string()])
            .arg("--cafile")
            .arg(&self.pki.ca)
            .args(["-u", OBS_USER.0, "-P", OBS_USER.1, "-q", "1", "-t", topic])
            .args(["-m", &payload.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Payloads the observer saw on `topic`.
    pub fn seen_on(&self, topic: &str) -> Vec<Json> {
        self.observer
            .seen()
            .into_iter()
            .filter(|s| s.topic == topic)
            .map(|s| s.payload)
            .collect()
    }

    /// A gateway with the MQTT listener, pointed at this cloud.
    pub fn gateway(&self, dir: &Path, extra: &str) -> Gateway {
        Gateway::new(
            dir,
            &GatewaySpec {
                mqtt: true,
                cloud: Some((self.broker.port, self.pki.ca.clone())),
                cloud_extra: extra.into(),
                ..GatewaySpec::default()
            },
        )
    }
}

/// `sluice fleet keygen DIR/NAME`: (private key file, public key).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(SLUICE)
        .args(["fleet", "keygen"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        key,
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
    )
}

/// `sluice fleet sign --key KEY` of `payload`: the signed envelope.
pub fn sign(dir: &Path, key: &Path, payload: &Json) -> Json {
    let file = dir.join("payload.json");
    std::fs::write(&file, payload.to_string()).unwrap();
    let out = Command::new(SLUICE)
        .args(["fleet", "sign", "--key"])
        .arg(key)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The 200 KiB image the OTA tests of all three protocols (tb-mqtt-client,
/// the ThingsBoard HTTP SDK, libcoap's `-b`) fetch: the same bytes, so
/// their sha256 checks compare against one value.
pub fn ota_image() -> Vec<u8> {
    (0..204_800u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Whether python3 can import `module`; prints SKIPPED when not, and fails
/// under CI (tests/run-all.sh installs every module the tests use).
pub fn has_python_module(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python module {module} is missing under CI (tests/run-all.sh installs it)"
        );
        eprintln!("SKIPPED: python3 module {module} is not installed (see tests/run-all.sh)");
    }
    ok
}
