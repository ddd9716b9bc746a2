//! The firmware download against a real HTTPS peer: Python's http.server
//! with TLS (`scripts/range_server.py`), serving byte ranges with the
//! harness's CA-signed certificate for 127.0.0.1. The server is throttled so
//! a test can kill it — or abort the downloader — mid-transfer, restarted
//! on the same port, told to corrupt a byte, to fail with 503, to ignore
//! `Range`, or to send chunked bodies behind a redirect. Every test checks
//! the bytes that reach `ready/` against their SHA-256, and the server's
//! request log for what went over the wire.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::{Pki, signal, wait_for};
use sha2::{Digest, Sha256};
use sluice_firmware::download::{self, DownloadError, Request};
use sluice_firmware::lwm2m::UpdateResult;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/range_server.py");
/// 2 MiB: several sync intervals, long enough to interrupt.
const SIZE: usize = 2 * 1024 * 1024;
const KIB_256: u64 = 256 * 1024;

/// `scripts/range_server.py` as a child process, killed on drop.
struct RangeServer {
    child: Child,
    port: u16,
}

impl RangeServer {
    /// Serves `fx.www` on `port` (0 = any) with `extra` options; returns once
    /// it listens.
    fn start(fx: &Fixture, port: u16, extra: &[&str]) -> Self {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(fx.dir().join("server.err"))
            .unwrap();
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg("--cert")
            .arg(&fx.pki.cert)
            .arg("--key")
            .arg(&fx.pki.key)
            .arg("--dir")
            .arg(&fx.www)
            .arg("--log")
            .arg(&fx.log)
            .args(["--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("python3 must be installed");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(port) = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "range_server.py did not start ({line:?}): {}",
                std::fs::read_to_string(fx.dir().join("server.err")).unwrap_or_default()
            );
        };
        Self { child, port }
    }

    /// SIGKILL by pid, and reap it.
    fn kill(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = self.child.wait();
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir with a PKI, an image to serve in `www/`, and a firmware root.
struct Fixture {
    tmp: tempfile::TempDir,
    pki: Pki,
    www: PathBuf,
    root: PathBuf,
    log: PathBuf,
    image: Vec<u8>,
    sha: String,
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::generate(tmp.path());
        let www = tmp.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        // Pseudo-random bytes (xorshift), so a shifted or repeated range
        // never hashes right by accident.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let image: Vec<u8> = (0..SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(www.join("fw.bin"), &image).unwrap();
        let sha = hex_sha256(&image);
        Self {
            root: tmp.path().join("firmware"),
            log: tmp.path().join("requests.log"),
            tmp,
            pki,
            www,
            image,
            sha,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn job(&self, url: String) -> Job {
        Job {
            url,
            size: SIZE as u64,
            sha: self.sha.clone(),
            root: self.root.clone(),
            tls: download::client_config(&self.pki.ca).unwrap(),
            attempts: 6,
            free_bytes: u64::MAX,
            margin: 0,
        }
    }

    /// The server's request log, one entry per request.
    fn requests(&self) -> Vec<Logged> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(Logged::parse)
            .collect()
    }

    /// The request log once `settled` holds for it (the server writes a
    /// line after its response, so the client may finish first).
    fn requests_when(&self, what: &str, settled: impl Fn(&[Logged]) -> bool) -> Vec<Logged> {
        wait_for(what, Duration::from_secs(10), || settled(&self.requests()));
        self.requests()
    }

    /// The request log once it has `n` lines.
    fn n_requests(&self, n: usize) -> Vec<Logged> {
        let requests =
            self.requests_when(&format!("{n} requests in the server log"), |r| r.len() >= n);
        assert_eq!(requests.len(), n, "{requests:#?}");
        requests
    }

    fn ready_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.join("ready"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    fn part(&self) -> PathBuf {
        self.root.join("staging").join(format!("{}.part", self.sha))
    }

    /// The image in `ready/` is the served one, byte for byte.
    fn assert_ready(&self, path: &Path) {
        assert_eq!(
            path,
            self.root.join("ready").join(format!("{}.bin", self.sha))
        );
        let got = std::fs::read(path).unwrap();
        assert_eq!(hex_sha256(&got), self.sha);
        assert!(got == self.image, "the bytes differ from the served image");
        assert!(
            !self.part().exists(),
            "the part file was renamed into ready/"
        );
    }
}

/// One line of the server's log: `GET /path range=R status=S bytes=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Logged {
    line: String,
    path: String,
    range: String,
    status: u16,
    bytes: u64,
}

impl Logged {
    fn parse(line: &str) -> Self {
        let f: Vec<&str> = line.split_whitespace().collect();
        let field = |i: usize, key: &str| f[i].strip_prefix(key).unwrap().to_owned();
        Self {
            line: line.to_owned(),
            path: f[1].to_owned(),
            range: field(2, "range="),
            status: field(3, "status=").parse().unwrap(),
            bytes: field(4, "bytes=").parse().unwrap(),
        }
    }

    /// N of `range=bytes=N-`.
    fn range_start(&self) -> Option<u64> {
        self.range
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse()
            .ok()
    }
}

/// What a download needs, owned, so it can run in a spawned task.
#[derive(Clone)]
struct Job {
    url: String,
    size: u64,
    sha: String,
    root: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    attempts: u32,
    free_bytes: u64,
    margin: u64,
}

impl Job {
    /// Runs `download`, storing each progress report in `on_disk`.
    async fn run(self, on_disk: Arc<AtomicU64>) -> Result<PathBuf, DownloadError> {
        let req = Request {
            url: &self.url,
            size: self.size,
            sha256: &self.sha,
            root: &self.root,
            tls: self.tls.clone(),
            attempts: self.attempts,
            idle_timeout: Duration::from_secs(2),
            free_bytes: self.free_bytes,
            margin: self.margin,
        };
        let mut progress = move |n: u64| on_disk.store(n, Ordering::SeqCst);
        download::download(&req, &mut progress).await
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `job` to its end (at most 60 s).
fn run(rt: &tokio::runtime::Runtime, job: Job) -> Result<PathBuf, DownloadError> {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), job.run(Arc::default()))
            .await
            .expect("the download did not end within 60 s")
    })
}

#[test]
fn an_interrupted_download_resumes_with_range_after_the_server_is_killed() {
    let fx = Fixture::new();
    // 512 KiB/s: the image takes 4 s, so the kill lands mid-transfer.
    let mut server = RangeServer::start(&fx, 0, &["--rate", "524288"]);
    let port = server.port;
    let rt = runtime();
    let on_disk = Arc::new(AtomicU64::new(0));
    let task = rt.spawn(fx.job(server.url("/fw.bin")).run(on_disk.clone()));

    wait_for("256 KiB on disk", Duration::from_secs(30), || {
        on_disk.load(Ordering::SeqCst) >= KIB_256
    });
    server.kill();
    let at_kill = on_disk.load(Ordering::SeqCst);
    assert!(
        at_kill < SIZE as u64,
        "the server was killed before the end ({at_kill})"
    );
    // While it is down the downloader retries (connection refused), then the
    // server comes back on the same port, unthrottled.
    let _server = RangeServer::start(&fx, port, &[]);

    let path = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), task).await })
        .expect("the download did not end within 60 s")
        .unwrap()
        .unwrap();
    fx.assert_ready(&path);

    // The killed request never got logged; the restarted server saw one
    // ranged request that carried exactly the rest of the image.
    let requests = fx.requests_when("a 206 in the server log", |r| {
        r.iter().any(|r| r.status == 206)
    });
    let resumed = requests.iter().find(|r| r.status == 206).unwrap();
    let from = resumed.range_start().unwrap();
    assert!(
        from >= at_kill,
        "resumed from {from}, but {at_kill} were on disk at the kill"
    );
    assert_eq!(resumed.bytes, SIZE as u64 - from);
    assert!(
        requests.iter().all(|r| r.range_start().is_some()),
        "every request after the restart asked for a range: {requests:#?}"
    );
    eprintln!(
        "killed the server with {at_kill} bytes on disk; resumed with `{}`",
        resumed.line
    );
}

#[test]
fn a_download_resumes_after_a_restart_of_the_downloader() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &["--rate", "1048576"]);
    let rt = runtime();
    let task = rt.spawn(fx.job(server.url("/fw.bin")).run(Arc::default()));
    wait_for("256 KiB in the part file", Duration::from_secs(30), || {
        download::partial_len(&fx.root, &fx.sha) >= KIB_256
    });
    task.abort();
    let aborted = rt.block_on(task).unwrap_err();
    assert!(aborted.is_cancelled());
    let staged = download::partial_len(&fx.root, &fx.sha);
    assert!(
        (KIB_256..SIZE as u64).contains(&staged),
        "the part file survives the abort: {staged} bytes"
    );
    assert!(fx.ready_files().is_empty());

    // A new downloader (as after a daemon restart) starts from the part.
    let path = run(&rt, fx.job(server.url("/fw.bin"))).unwrap();
    fx.assert_ready(&path);

    let requests = fx.requests_when("a 206 in the server log", |r| {
        r.iter().any(|r| r.status == 206)
    });
    let resumed = requests.iter().find(|r| r.status == 206).unwrap();
    let from = resumed.range_start().unwrap();
    assert!(from >= staged, "resumed from {from}, {staged} were staged");
    assert_eq!(resumed.bytes, SIZE as u64 - from);
    eprintln!(
        "aborted with {staged} bytes staged; the new download sent `{}`",
        resumed.line
    );
}

#[test]
fn a_corrupted_image_is_rejected_and_never_reaches_ready() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &["--corrupt"]);
    let rt = runtime();
    let err = run(&rt, fx.job(server.url("/fw.bin"))).unwrap_err();
    let mut corrupted = fx.image.clone();
    corrupted[SIZE / 2] ^= 0xFF;
    match &err {
        DownloadError::Integrity { expected, actual } => {
            assert_eq!(expected, &fx.sha);
            assert_eq!(
                actual,
                &hex_sha256(&corrupted),
                "the hash of what was served"
            );
        }
        other => panic!("expected an integrity failure, got {other}"),
    }
    assert_eq!(err.result(), UpdateResult::IntegrityFailure);
    assert_eq!(err.result().code(), 5);
    assert!(fx.ready_files().is_empty(), "nothing in ready/");
    assert!(!fx.part().exists(), "the part file was removed");
    assert_eq!(download::partial_len(&fx.root, &fx.sha), 0);
    let requests = fx.n_requests(1);
    assert_eq!((requests[0].status, requests[0].bytes), (200, SIZE as u64));
}

#[test]
fn not_enough_space_is_refused_before_any_request() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &[]);
    let rt = runtime();
    let mut job = fx.job(server.url("/fw.bin"));
    job.free_bytes = SIZE as u64 - 1;
    let err = run(&rt, job.clone()).unwrap_err();
    assert!(
        matches!(err, DownloadError::NoSpace { need, available } if need == SIZE as u64 && available == SIZE as u64 - 1),
        "{err}"
    );
    assert_eq!(err.result(), UpdateResult::NotEnoughStorage);
    // The margin counts too.
    job.free_bytes = SIZE as u64 + 4096;
    job.margin = 8192;
    let err = run(&rt, job.clone()).unwrap_err();
    assert!(
        matches!(err, DownloadError::NoSpace { need, .. } if need == SIZE as u64 + 8192),
        "{err}"
    );
    assert!(fx.requests().is_empty(), "no request reached the server");
    assert!(!fx.part().exists(), "no part file was created");

    // The same server logs a request as soon as there is room, so the empty
    // log above means something.
    job.margin = 4096;
    let path = run(&rt, job).unwrap();
    fx.assert_ready(&path);
    fx.n_requests(1);
}

#[test]
fn an_http_url_and_a_server_error_are_reported_with_their_result_codes() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &[]);
    let rt = runtime();

    let http = format!("http://127.0.0.1:{}/fw.bin", server.port);
    let err = run(&rt, fx.job(http)).unwrap_err();
    assert!(matches!(err, DownloadError::UnsupportedScheme(_)), "{err}");
    assert_eq!(
        (err.result(), err.result().code()),
        (UpdateResult::UnsupportedProtocol, 9)
    );

    let err = run(&rt, fx.job(server.url("/missing.bin"))).unwrap_err();
    assert!(
        matches!(err, DownloadError::Http { status: 404, .. }),
        "{err}"
    );
    assert_eq!(
        (err.result(), err.result().code()),
        (UpdateResult::InvalidUri, 7)
    );

    // Not retried: one request only.
    let requests = fx.n_requests(1);
    assert_eq!(
        (requests[0].path.as_str(), requests[0].status),
        ("/missing.bin", 404)
    );
    assert!(fx.ready_files().is_empty());
}

#[test]
fn server_errors_are_retried_until_the_attempts_run_out() {
    let fx = Fixture::new();
    let rt = runtime();
    // Two 503s, then the image: three attempts suffice.
    let server = RangeServer::start(&fx, 0, &["--fail", "2"]);
    let mut job = fx.job(server.url("/fw.bin"));
    job.attempts = 3;
    let path = run(&rt, job).unwrap();
    fx.assert_ready(&path);
    let statuses: Vec<u16> = fx.n_requests(3).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    drop(server);

    // Five 503s against two attempts: connection lost, with the last error.
    std::fs::remove_file(&fx.log).unwrap();
    std::fs::remove_file(&path).unwrap();
    let server = RangeServer::start(&fx, 0, &["--fail", "5"]);
    let mut job = fx.job(server.url("/fw.bin"));
    job.attempts = 2;
    let err = run(&rt, job).unwrap_err();
    match &err {
        DownloadError::ConnectionLost { attempts, last, .. } => {
            assert_eq!(*attempts, 2);
            assert!(last.contains("503"), "{last}");
        }
        other => panic!("expected connection lost, got {other}"),
    }
    assert_eq!(
        (err.result(), err.result().code()),
        (UpdateResult::ConnectionLost, 4)
    );
    fx.n_requests(2);
}

#[test]
fn a_redirected_chunked_download_resumes_from_a_staged_part() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &["--chunked"]);
    // As if an earlier run had stopped after 1000 bytes.
    std::fs::create_dir_all(fx.part().parent().unwrap()).unwrap();
    std::fs::write(fx.part(), &fx.image[..1000]).unwrap();
    let rt = runtime();
    let path = run(&rt, fx.job(server.url("/r/fw.bin"))).unwrap();
    fx.assert_ready(&path);
    let requests = fx.n_requests(2);
    let seen: Vec<(&str, &str, u16)> = requests
        .iter()
        .map(|r| (r.path.as_str(), r.range.as_str(), r.status))
        .collect();
    assert_eq!(
        seen,
        [
            ("/r/fw.bin", "bytes=1000-", 302),
            ("/fw.bin", "bytes=1000-", 206)
        ]
    );
    assert_eq!(requests[1].bytes, SIZE as u64 - 1000);
}

#[test]
fn a_server_that_ignores_range_makes_the_download_start_over() {
    let fx = Fixture::new();
    let server = RangeServer::start(&fx, 0, &["--ignore-range"]);
    // A part whose bytes are wrong: only a full restart can produce the
    // right hash.
    std::fs::create_dir_all(fx.part().parent().unwrap()).unwrap();
    std::fs::write(fx.part(), vec![0xAAu8; 5000]).unwrap();
    let rt = runtime();
    let path = run(&rt, fx.job(server.url("/fw.bin"))).unwrap();
    fx.assert_ready(&path);
    let requests = fx.n_requests(1);
    assert_eq!(
        (
            requests[0].range.as_str(),
            requests[0].status,
            requests[0].bytes
        ),
        ("bytes=5000-", 200, SIZE as u64)
    );
}
