//! Resumable, verified HTTPS download of a firmware image into the store.
//!
//! Design. Layout under the firmware root: `staging/<sha256>.part` is the
//! image as far as it has arrived; `ready/<sha256>.bin` is a complete image
//! whose size and SHA-256 matched the manifest (the same store
//! [`crate::stage`] fills). Order and durability:
//!
//! - Before any network I/O: if `ready/<sha256>.bin` exists it is the answer;
//!   else the part file's length is what we have (a part longer than the
//!   image cannot be a prefix of it and is removed), and the free-space
//!   precondition `size - have + margin <= free_bytes` must hold.
//! - The SHA-256 is streamed: the bytes already in the part file are hashed
//!   first, then every received byte before it is written.
//! - Writes go at explicit offsets (`write_at`: the length we started from,
//!   then onwards), never "append": a write still in flight from a download
//!   future that was dropped lands at its own offset with the same bytes, so
//!   it cannot shift the data. File I/O and hashing run on tokio's blocking
//!   pool, never on a runtime thread.
//! - `sync_data` every [`SYNC_EVERY`] bytes, before each retry and at the
//!   end; a crash loses at most the unsynced tail, and on restart the part
//!   file's length is what counts. (On a file system that can leave a
//!   zero-filled tail after a crash, the final hash catches it: the part is
//!   removed and the next call starts over.)
//! - At `size` bytes: hash mismatch → the part is removed and nothing reaches
//!   `ready/`; match → fsync, rename into `ready/`, fsync `ready/`. So
//!   `ready/` only ever holds verified images, whatever the moment of a
//!   crash.
//! - Eviction is the caller's: [`prune`] removes old images from `ready/`.
//!
//! One download per image at a time: the caller must not run two calls for
//! the same SHA-256 concurrently (there is no lock file).
//!
//! The HTTP/1.1 client is minimal and written here (binary budget: no
//! hyper/reqwest): one `GET` per connection (`Connection: close`), `Range:
//! bytes=N-` when resuming, responses delimited by `Content-Length`, chunked
//! coding or EOF, up to [`MAX_REDIRECTS`] redirects (absolute https or
//! relative locations). A 200 to a ranged request means the server ignored
//! the range: the part is truncated and the download starts over; a 206
//! must say `bytes HAVE-END/SIZE`. Network failures (connect, TLS, reset,
//! no byte for `idle_timeout`, 5xx, 408, 429, a truncated body) are retried
//! with capped, jittered exponential backoff, each retry resuming from what
//! is on disk; other 4xx are final.

mod chunked;
mod http;

use crate::lwm2m::UpdateResult;
use crate::url::{HttpsUrl, UrlError};
use chunked::Chunked;
use http::{ContentRange, Framing, ResponseHead};
use ring::digest::{Context as Sha256, SHA256};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

/// Redirects followed per attempt.
pub const MAX_REDIRECTS: usize = 5;
/// Bytes written between two `sync_data` calls.
pub const SYNC_EVERY: u64 = 1 << 20;
/// Size of the one read buffer (the image is never held in memory).
const BUF_SIZE: usize = 64 * 1024;
/// First retry delay; doubled per failure up to [`BACKOFF_MAX`], ±50 %.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What to download, where to, and how hard to try.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `https://host[:port]/path[?query]`.
    pub url: &'a str,
    /// The image size from the manifest.
    pub size: u64,
    /// The image SHA-256 from the manifest (64 hex digits, either case).
    pub sha256: &'a str,
    /// The firmware root: `staging/` and `ready/` are under it.
    pub root: &'a Path,
    /// TLS client configuration (see [`client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// Attempts in total, counting the first (0 counts as 1); a response
    /// that ends early after delivering bytes does not use one up.
    pub attempts: u32,
    /// Longest wait for the next byte (and for connect and the TLS
    /// handshake).
    pub idle_timeout: Duration,
    /// Free bytes on `root`'s file system, measured by the caller.
    pub free_bytes: u64,
    /// Bytes that must stay free once the image is complete.
    pub margin: u64,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The request's `sha256` is not 64 hex digits.
    #[error("sha256 {0:?} must be 64 hex digits")]
    BadSha256(String),
    /// The URL (or a redirect's location) is malformed.
    #[error("{0}")]
    InvalidUrl(UrlError),
    /// The URL (or a redirect's location) is not https.
    #[error("{0}")]
    UnsupportedScheme(UrlError),
    /// Not enough free space for the rest of the image plus the margin;
    /// checked before any request.
    #[error(
        "not enough free space: the image needs {need} more bytes (with the margin), {available} are free"
    )]
    NoSpace {
        /// Bytes still to download plus the margin.
        need: u64,
        /// Free bytes reported by the caller.
        available: u64,
    },
    /// The server sent more bytes than the manifest's size (the part file
    /// was removed).
    #[error(
        "{url}: the server sent more than the manifest's {size} bytes (at least {received}); partial file removed"
    )]
    Oversize {
        /// The URL (query redacted).
        url: String,
        /// The manifest's size.
        size: u64,
        /// Bytes the server had delivered.
        received: u64,
    },
    /// The server's image is not the manifest's size (a 206's total or a
    /// 200's length, or a 416 for a range inside the image).
    #[error("{url}: the server's image is {served} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The URL (query redacted).
        url: String,
        /// The manifest's size.
        expected: u64,
        /// What the server announced.
        served: u64,
    },
    /// The complete image has the wrong SHA-256 (the part file was removed;
    /// nothing reached `ready/`).
    #[error("the image's sha256 is {actual}, the manifest says {expected}; partial file removed")]
    Integrity {
        /// The manifest's SHA-256.
        expected: String,
        /// The downloaded bytes' SHA-256.
        actual: String,
    },
    /// A final HTTP status (4xx other than 408, 416, 429).
    #[error("{url}: HTTP status {status}")]
    Http {
        /// The URL (query redacted).
        url: String,
        /// The status code.
        status: u16,
    },
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects {
        /// The last URL (query redacted).
        url: String,
    },
    /// The server's response is malformed or not what was asked for.
    #[error("{url}: {reason}")]
    Protocol {
        /// The URL (query redacted).
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// Every attempt failed on the network (or with 5xx).
    #[error("{url}: gave up after {attempts} attempts; last error: {last}")]
    ConnectionLost {
        /// The URL (query redacted).
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A file operation in the store failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`write`, `rename` …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The CA file cannot be read or parsed.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The CA file holds no certificate rustls can use.
    #[error("CA file {0}: no usable certificate")]
    NoCaCertificates(PathBuf),
    /// The TLS configuration cannot be built.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
}

impl DownloadError {
    /// The LwM2M Update Result to report for this failure: NoSpace (or a
    /// full disk) → NotEnoughStorage; Integrity, Oversize, SizeMismatch →
    /// IntegrityFailure; a bad URL, a final HTTP status, too many redirects
    /// → InvalidUri; non-https → UnsupportedProtocol; network, protocol →
    /// ConnectionLost; a bad sha256 → UnsupportedPackage; other I/O and TLS
    /// set-up → UpdateFailed.
    pub fn result(&self) -> UpdateResult {
        match self {
            Self::NoSpace { .. } => UpdateResult::NotEnoughStorage,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull => {
                UpdateResult::NotEnoughStorage
            }
            Self::Integrity { .. } | Self::Oversize { .. } | Self::SizeMismatch { .. } => {
                UpdateResult::IntegrityFailure
            }
            Self::InvalidUrl(_) | Self::Http { .. } | Self::TooManyRedirects { .. } => {
                UpdateResult::InvalidUri
            }
            Self::UnsupportedScheme(_) => UpdateResult::UnsupportedProtocol,
            Self::ConnectionLost { .. } | Self::Protocol { .. } => UpdateResult::ConnectionLost,
            Self::BadSha256(_) => UpdateResult::UnsupportedPackage,
            Self::Io { .. } | Self::CaFile { .. } | Self::NoCaCertificates(_) | Self::Tls(_) => {
                UpdateResult::UpdateFailed
            }
        }
    }
}

impl From<UrlError> for DownloadError {
    fn from(e: UrlError) -> Self {
        match e {
            UrlError::UnsupportedScheme { .. } => Self::UnsupportedScheme(e),
            UrlError::Invalid { .. } => Self::InvalidUrl(e),
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DownloadError {
    let path = path.to_owned();
    move |source| DownloadError::Io { op, path, source }
}

/// How one attempt ended badly.
enum Failure {
    /// Worth another attempt (network, 5xx): what happened.
    Retry(String),
    /// Final.
    Fatal(DownloadError),
}

impl From<DownloadError> for Failure {
    fn from(e: DownloadError) -> Self {
        Self::Fatal(e)
    }
}

/// Downloads `req.url` into `req.root/ready/<sha256>.bin`, resuming from
/// `staging/<sha256>.part`, and returns that path. `progress` is called
/// with the bytes on disk whenever they change (they may drop to 0 when a
/// server ignores `Range`).
///
/// Fails (see [`DownloadError`], and [`DownloadError::result`] for the LwM2M
/// code) on a bad request, too little space (before any request), an image
/// of the wrong size or hash (the part file is removed then), a final HTTP
/// status or malformed response, every attempt failing on the network
/// (`ConnectionLost`; the part file stays for the next call), or an I/O
/// error in the store. Dropping the future is safe: the part file stays
/// and the next call resumes from it.
pub async fn download(
    req: &Request<'_>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<PathBuf, DownloadError> {
    let sha256 = crate::sha256_hex(req.sha256)
        .ok_or_else(|| DownloadError::BadSha256(req.sha256.to_owned()))?;
    let url = HttpsUrl::parse(req.url)?;
    let ready = req.root.join("ready").join(format!("{sha256}.bin"));
    let part_path = req.root.join("staging").join(format!("{sha256}.part"));
    let (size, r, p) = (req.size, ready.clone(), part_path.clone());
    let have = match blocking(&part_path, Box::new(move || inspect(&r, &p, size))).await? {
        Staged::Ready => return Ok(ready),
        Staged::Part(have) => have,
    };
    let need = (req.size - have).saturating_add(req.margin);
    if need > req.free_bytes {
        return Err(DownloadError::NoSpace {
            need,
            available: req.free_bytes,
        });
    }
    let p = part_path.clone();
    let opened = blocking(&part_path, Box::new(move || open_part(&p, size))).await?;
    let mut part = Part {
        path: part_path,
        file: Arc::new(opened.file),
        hash: Arc::new(Mutex::new(opened.hash)),
        len: opened.len,
        synced: opened.len,
        size,
        url: url.redacted(),
    };
    progress(part.len);
    let attempts = req.attempts.max(1);
    let mut failures = 0u32;
    while part.len < req.size {
        let before = part.len;
        let outcome = fetch(&url, req, &mut part, progress).await;
        let failure = match outcome {
            Ok(()) if part.len == req.size => break,
            Ok(()) if part.len > before => continue,
            Ok(()) => format!(
                "the response ended at {} of {} bytes without delivering any",
                part.len, req.size
            ),
            Err(Failure::Fatal(e @ DownloadError::Oversize { .. })) => {
                // Whatever it holds, it is not a prefix of this image.
                let path = part.path.clone();
                let _ = blocking(&part.path, Box::new(move || remove(&path))).await;
                return Err(e);
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => e,
        };
        part.sync().await?;
        failures += 1;
        if failures >= attempts {
            return Err(DownloadError::ConnectionLost {
                url: url.redacted(),
                attempts: failures,
                last: failure,
            });
        }
        let delay = backoff(failures, random_u32());
        warn!(
            url = %url.redacted(),
            attempt = failures,
            of = attempts,
            have = part.len,
            error = %failure,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "firmware download failed; retrying"
        );
        tokio::time::sleep(delay).await;
    }
    let (path, file, hash) = (part.path.clone(), part.file.clone(), part.hash.clone());
    let (sha, r) = (sha256.clone(), ready.clone());
    match blocking(
        &part.path,
        Box::new(move || publish(&path, &file, &hash, size, &sha, &r)),
    )
    .await
    {
        Ok(()) => {
            info!(url = %part.url, path = %ready.display(), size, "firmware image downloaded and verified");
            Ok(ready)
        }
        Err(e) => {
            warn!(url = %part.url, error = %e, "firmware image not published");
            Err(e)
        }
    }
}

/// The delay before retry number `failures` (1-based): 500 ms doubling per
/// failure, times a factor in [0.5, 1.5] from `random`, at most 30 s.
fn backoff(failures: u32, random: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX);
    let factor = 0.5 + f64::from(random) / (f64::from(u32::MAX) + 1.0);
    base.mul_f64(factor).min(BACKOFF_MAX)
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => u32::MAX / 2,
    }
}

/// One attempt: request (following redirects) and write the body to the
/// part file.
async fn fetch(
    start: &HttpsUrl,
    req: &Request<'_>,
    part: &mut Part,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), Failure> {
    let mut url = start.clone();
    for hop in 0..=MAX_REDIRECTS {
        let from = part.len;
        let mut conn = Connection::open(&url, req).await?;
        conn.send(&http::request_head(&url, from)).await?;
        let head = conn.read_head().await?;
        let protocol = |reason: String| {
            Failure::Fatal(DownloadError::Protocol {
                url: url.redacted(),
                reason,
            })
        };
        match head.status {
            301 | 302 | 303 | 307 | 308 => {
                if hop == MAX_REDIRECTS {
                    return Err(DownloadError::TooManyRedirects {
                        url: url.redacted(),
                    }
                    .into());
                }
                let location = head.get("location").ok_or_else(|| {
                    protocol(format!("redirect {} without a location", head.status))
                })?;
                url = url.join(location).map_err(DownloadError::from)?;
            }
            200 => {
                let framing = head.framing().map_err(protocol)?;
                if let Framing::Length(n) = framing {
                    check_length(&url, req.size, n)?;
                }
                if from > 0 {
                    // The server ignored Range: start over.
                    part.restart().await?;
                    progress(0);
                }
                return conn.body(framing, part, progress).await;
            }
            206 => {
                if from == 0 {
                    return Err(protocol("206 to a request without Range".to_owned()));
                }
                let range = head
                    .get("content-range")
                    .and_then(ContentRange::parse)
                    .ok_or_else(|| protocol("206 without a valid content-range".to_owned()))?;
                let ContentRange::Bytes { start, end, total } = range else {
                    return Err(protocol("206 with an unsatisfied content-range".to_owned()));
                };
                let Some(total) = total else {
                    return Err(protocol("206 without the image's total size".to_owned()));
                };
                if total != req.size {
                    return Err(size_mismatch(&url, req.size, total));
                }
                if start != from {
                    return Err(protocol(format!(
                        "asked for bytes from {from}, the server sent from {start}"
                    )));
                }
                let framing = head.framing().map_err(protocol)?;
                if let Framing::Length(n) = framing
                    && n != end - start + 1
                {
                    return Err(protocol(format!(
                        "content-length {n} disagrees with content-range {start}-{end}"
                    )));
                }
                return conn.body(framing, part, progress).await;
            }
            416 => {
                if from == req.size {
                    return Ok(());
                }
                return Err(
                    match head.get("content-range").and_then(ContentRange::parse) {
                        Some(ContentRange::Unsatisfied { total }) if total != req.size => {
                            size_mismatch(&url, req.size, total)
                        }
                        _ => protocol(format!("416 for bytes from {from} of {}", req.size)),
                    },
                );
            }
            s @ (408 | 429 | 500..=599) => return Err(Failure::Retry(format!("HTTP status {s}"))),
            s @ 400..=499 => {
                return Err(DownloadError::Http {
                    url: url.redacted(),
                    status: s,
                }
                .into());
            }
            s => return Err(protocol(format!("unexpected HTTP status {s}"))),
        }
    }
    Err(DownloadError::TooManyRedirects {
        url: url.redacted(),
    }
    .into())
}

/// A 200's `Content-Length` against the manifest's size.
fn check_length(url: &HttpsUrl, size: u64, length: u64) -> Result<(), Failure> {
    if length > size {
        Err(DownloadError::Oversize {
            url: url.redacted(),
            size,
            received: length,
        }
        .into())
    } else if length < size {
        Err(size_mismatch(url, size, length))
    } else {
        Ok(())
    }
}

fn size_mismatch(url: &HttpsUrl, expected: u64, served: u64) -> Failure {
    Failure::Fatal(DownloadError::SizeMismatch {
        url: url.redacted(),
        expected,
        served,
    })
}

/// One TLS connection carrying one request, with the read buffer.
struct Connection {
    stream: TlsStream<TcpStream>,
    idle: Duration,
    buf: Vec<u8>,
    /// `buf[start..end]` holds received bytes not yet consumed.
    start: usize,
    end: usize,
}

impl Connection {
    async fn open(url: &HttpsUrl, req: &Request<'_>) -> Result<Self, Failure> {
        let idle = req.idle_timeout;
        let (host, port) = (url.host(), url.port());
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            Failure::Fatal(DownloadError::InvalidUrl(UrlError::Invalid {
                url: url.redacted(),
                reason: "the host is not a valid TLS server name",
            }))
        })?;
        let tcp = match tokio::time::timeout(idle, TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::Retry(format!("connect to {host}:{port}: {e}"))),
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "connect to {host}:{port}: no answer within {idle:?}"
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(req.tls.clone());
        let stream = match tokio::time::timeout(idle, tls.connect(name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::Retry(format!("TLS handshake with {host}: {e}"))),
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "TLS handshake with {host}: no answer within {idle:?}"
                )));
            }
        };
        Ok(Self {
            stream,
            idle,
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
        })
    }

    async fn send(&mut self, head: &str) -> Result<(), Failure> {
        let write = async {
            self.stream.write_all(head.as_bytes()).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.idle, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Retry(format!("sending the request: {e}"))),
            Err(_) => Err(Failure::Retry(format!(
                "sending the request: stalled for {:?}",
                self.idle
            ))),
        }
    }

    /// Reads into `buf[self.end..limit]`: the byte count, 0 at EOF.
    /// An EOF without TLS close_notify counts as EOF: the hash and size
    /// checks catch a truncated image.
    async fn fill(&mut self, limit: usize) -> Result<usize, Failure> {
        let end = self.end;
        match tokio::time::timeout(self.idle, self.stream.read(&mut self.buf[end..limit])).await {
            Ok(Ok(n)) => {
                self.end += n;
                Ok(n)
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Ok(Err(e)) => Err(Failure::Retry(format!("reading the response: {e}"))),
            Err(_) => Err(Failure::Retry(format!(
                "no data from the server for {:?}",
                self.idle
            ))),
        }
    }

    async fn read_head(&mut self) -> Result<ResponseHead, Failure> {
        loop {
            if self.fill(http::MAX_HEAD).await? == 0 {
                return Err(Failure::Retry(
                    "the connection closed before the response head".to_owned(),
                ));
            }
            match ResponseHead::parse(&self.buf[..self.end]) {
                Ok(Some((head, len))) => {
                    self.start = len;
                    return Ok(head);
                }
                Ok(None) => {}
                // A garbled head is as likely a broken link as a broken
                // server; it is retried like one.
                Err(e) => return Err(Failure::Retry(e)),
            }
        }
    }

    /// Refills the buffer from the start once it is consumed; false at EOF.
    async fn more(&mut self) -> Result<bool, Failure> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(self.fill(BUF_SIZE).await? > 0)
    }

    /// Writes the body to `part` until its framing says it ended.
    async fn body(
        &mut self,
        framing: Framing,
        part: &mut Part,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), Failure> {
        match framing {
            Framing::Length(total) => {
                let mut left = total;
                while left > 0 {
                    if self.start == self.end && !self.more().await? {
                        return Err(Failure::Retry(format!(
                            "the body ended after {} of {total} bytes",
                            total - left
                        )));
                    }
                    let avail = &self.buf[self.start..self.end];
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(avail.len());
                    part.write(&avail[..n]).await?;
                    progress(part.len);
                    self.start += n;
                    left -= n as u64;
                }
                Ok(())
            }
            Framing::Chunked(mut chunked) => self.chunked(&mut chunked, part, progress).await,
            Framing::Eof => loop {
                if self.start < self.end {
                    part.write(&self.buf[self.start..self.end]).await?;
                    progress(part.len);
                    self.start = self.end;
                }
                if !self.more().await? {
                    return Ok(());
                }
            },
        }
    }

    async fn chunked(
        &mut self,
        chunked: &mut Chunked,
        part: &mut Part,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), Failure> {
        loop {
            while self.start < self.end && !chunked.is_done() {
                let (n, data) = chunked
                    .decode(&self.buf[self.start..self.end])
                    .map_err(|e| {
                        Failure::Fatal(DownloadError::Protocol {
                            url: part.url.clone(),
                            reason: e.to_string(),
                        })
                    })?;
                if !data.is_empty() {
                    part.write(data).await?;
                    progress(part.len);
                }
                self.start += n;
            }
            if chunked.is_done() {
                return Ok(());
            }
            if !self.more().await? {
                return Err(Failure::Retry(
                    "the chunked body ended before its last chunk".to_owned(),
                ));
            }
        }
    }
}

/// Runs a store operation on tokio's blocking pool (file I/O and hashing
/// never run on a runtime thread). The operation is boxed so the
/// blocking-task machinery is instantiated once per result type, not once
/// per call site: binary size.
async fn blocking<T: Send + 'static>(
    path: &Path,
    op: Box<dyn FnOnce() -> Result<T, DownloadError> + Send>,
) -> Result<T, DownloadError> {
    match tokio::task::spawn_blocking(op).await {
        Ok(r) => r,
        Err(e) => Err(DownloadError::Io {
            op: "run a file operation on",
            path: path.to_owned(),
            source: io::Error::other(e),
        }),
    }
}

/// What the store holds for an image before any request.
enum Staged {
    /// `ready/<sha256>.bin` exists.
    Ready,
    /// This many bytes are in the part file (0 when there is none).
    Part(u64),
}

fn inspect(ready: &Path, part: &Path, size: u64) -> Result<Staged, DownloadError> {
    if std::fs::metadata(ready).is_ok_and(|m| m.is_file()) {
        return Ok(Staged::Ready);
    }
    let have = std::fs::metadata(part).map_or(0, |m| m.len());
    if have > size {
        // Longer than the image: not a prefix of it.
        remove(part)?;
        return Ok(Staged::Part(0));
    }
    Ok(Staged::Part(have))
}

fn remove(path: &Path) -> Result<(), DownloadError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), DownloadError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// The part file, opened, with the hash of the bytes in it.
struct Opened {
    file: File,
    hash: Sha256,
    len: u64,
}

/// Creates `staging/` and `ready/` and opens (creating) the part file;
/// hashes the bytes already in it (at most `size`).
fn open_part(path: &Path, size: u64) -> Result<Opened, DownloadError> {
    let staging = path.parent().unwrap_or(Path::new("."));
    let ready = staging.with_file_name("ready");
    for dir in [staging, &ready] {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let created = !path.exists();
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open", path))?;
    if created {
        // The part must survive a crash, so its directory entry must too.
        sync_dir(staging)?;
    }
    let mut hash = Sha256::new(&SHA256);
    let mut buf = vec![0u8; BUF_SIZE];
    let mut len = 0u64;
    let mut reader = (&file).take(size);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hash.update(&buf[..n]);
        len += n as u64;
    }
    Ok(Opened { file, hash, len })
}

fn lock(hash: &Mutex<Sha256>) -> MutexGuard<'_, Sha256> {
    hash.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks the hash of the complete image; on a match makes it durable and
/// renames it to `ready`, on a mismatch removes it.
fn publish(
    path: &Path,
    file: &File,
    hash: &Mutex<Sha256>,
    size: u64,
    expected: &str,
    ready: &Path,
) -> Result<(), DownloadError> {
    let actual = crate::hex(lock(hash).clone().finish().as_ref());
    if actual != expected {
        remove(path)?;
        return Err(DownloadError::Integrity {
            expected: expected.to_owned(),
            actual,
        });
    }
    // A late write of a dropped download lands inside the image; the length
    // must be exactly the image's.
    file.set_len(size).map_err(io_err("truncate", path))?;
    file.sync_all().map_err(io_err("sync", path))?;
    std::fs::rename(path, ready).map_err(io_err("rename", ready))?;
    sync_dir(ready.parent().unwrap_or(Path::new(".")))
}

/// The part file being written, with the hash of its bytes so far. Writes
/// go at explicit offsets (`write_at`), see the module doc.
struct Part {
    path: PathBuf,
    file: Arc<File>,
    hash: Arc<Mutex<Sha256>>,
    /// Bytes written (and hashed) so far.
    len: u64,
    /// `len` at the last `sync_data`.
    synced: u64,
    size: u64,
    /// For error messages (query redacted).
    url: String,
}

impl Part {
    /// Starts over from an empty file (the server ignored `Range`).
    async fn restart(&mut self) -> Result<(), DownloadError> {
        let (file, path) = (self.file.clone(), self.path.clone());
        blocking(
            &self.path,
            Box::new(move || file.set_len(0).map_err(io_err("truncate", &path))),
        )
        .await?;
        *lock(&self.hash) = Sha256::new(&SHA256);
        self.len = 0;
        self.synced = 0;
        Ok(())
    }

    /// Hashes and writes `data` after what is there (syncing every
    /// [`SYNC_EVERY`] bytes); fails when it would exceed the image size.
    async fn write(&mut self, data: &[u8]) -> Result<(), DownloadError> {
        let received = self.len + data.len() as u64;
        if received > self.size {
            return Err(DownloadError::Oversize {
                url: self.url.clone(),
                size: self.size,
                received,
            });
        }
        let sync = received - self.synced >= SYNC_EVERY;
        let (file, hash, path) = (self.file.clone(), self.hash.clone(), self.path.clone());
        let (data, at) = (data.to_vec(), self.len);
        blocking(
            &self.path,
            Box::new(move || {
                lock(&hash).update(&data);
                file.write_all_at(&data, at)
                    .map_err(io_err("write", &path))?;
                if sync {
                    file.sync_data().map_err(io_err("sync", &path))?;
                }
                Ok(())
            }),
        )
        .await?;
        self.len = received;
        if sync {
            self.synced = received;
        }
        Ok(())
    }

    /// Makes what was written durable.
    async fn sync(&mut self) -> Result<(), DownloadError> {
        if self.synced != self.len {
            let (file, path) = (self.file.clone(), self.path.clone());
            blocking(
                &self.path,
                Box::new(move || file.sync_data().map_err(io_err("sync", &path))),
            )
            .await?;
            self.synced = self.len;
        }
        Ok(())
    }
}

/// Bytes of the image with this SHA-256 already in `root/staging/` (0 when
/// none, or when `sha256` is not 64 hex digits). For status reports.
pub fn partial_len(root: &Path, sha256: &str) -> u64 {
    crate::sha256_hex(sha256)
        .and_then(|sha| std::fs::metadata(root.join("staging").join(format!("{sha}.part"))).ok())
        .map_or(0, |m| m.len())
}

/// Removes images from `root/ready/` beyond the `keep` newest (by
/// modification time), sparing those whose SHA-256 is in `in_use` (either
/// case); returns what it removed, in no particular order. Only `*.bin`
/// files are considered.
/// Blocking: call it from `spawn_blocking`.
///
/// Fails when `ready/` cannot be listed or a file cannot be removed (files
/// removed before that stay removed).
pub fn prune(root: &Path, keep: usize, in_use: &[&str]) -> io::Result<Vec<PathBuf>> {
    let dir = root.join("ready");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() {
            images.push((meta.modified()?, path));
        }
    }
    // Set the `keep` newest aside (equal times: the smaller name), by
    // selection rather than a sort (the list is short; binary size).
    for _ in 0..keep.min(images.len()) {
        let newest = (0..images.len()).max_by(|&i, &j| {
            let (a, b) = (&images[i], &images[j]);
            a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1))
        });
        if let Some(i) = newest {
            images.swap_remove(i);
        }
    }
    let in_use: HashSet<String> = in_use.iter().map(|s| s.to_ascii_lowercase()).collect();
    let mut removed = Vec::new();
    for (_, path) in images {
        let sha = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_ascii_lowercase);
        if sha.is_some_and(|s| in_use.contains(&s)) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !removed.is_empty() {
        File::open(&dir)?.sync_all()?;
    }
    Ok(removed)
}

/// A TLS client configuration (ring provider, TLS 1.2 and 1.3, ALPN
/// `http/1.1`) trusting the CA certificates of the PEM bundle `ca_file`.
/// Reads the file synchronously (call it at start-up or from
/// `spawn_blocking`).
///
/// Fails when the file cannot be read, a PEM section is malformed, or no
/// certificate in it is usable.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, DownloadError> {
    let ca_err = |e: rustls_pki_types::pem::Error| DownloadError::CaFile {
        path: ca_file.to_owned(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(ca_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(ca_err)?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(DownloadError::NoCaCertificates(ca_file.to_owned()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(DownloadError::Tls)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// A TLS config with no roots (never used: these tests fail before any
    /// connection, or connect to a closed port).
    fn tls() -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
    }

    fn request<'a>(root: &'a Path, url: &'a str, size: u64, free: u64) -> Request<'a> {
        Request {
            url,
            size,
            sha256: SHA,
            root,
            tls: tls(),
            attempts: 2,
            idle_timeout: Duration::from_secs(2),
            free_bytes: free,
            margin: 100,
        }
    }

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[test]
    fn the_download_future_can_be_spawned() {
        fn send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "https://h/x", 1, 1);
        let mut progress = |_: u64| {};
        send(&download(&req, &mut progress));
    }

    #[test]
    fn backoff_doubles_from_half_a_second_with_jitter_and_a_cap() {
        let mid = u32::MAX / 2 + 1; // factor 1.0
        assert_eq!(backoff(1, mid), Duration::from_millis(500));
        assert_eq!(backoff(2, mid), Duration::from_secs(1));
        assert_eq!(backoff(4, mid), Duration::from_secs(4));
        assert_eq!(backoff(7, mid), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, mid), Duration::from_secs(30));
        assert_eq!(backoff(1, 0), Duration::from_millis(250));
        let top = backoff(1, u32::MAX);
        assert!(
            top > Duration::from_millis(749) && top <= Duration::from_millis(750),
            "{top:?}"
        );
        assert_eq!(backoff(20, 0), Duration::from_secs(15));
        assert_eq!(backoff(20, u32::MAX), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn too_little_space_is_refused_before_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        // A port that refuses: were it contacted, the error would differ.
        let url = format!("https://127.0.0.1:{}/fw.bin", closed_port());
        let req = request(dir.path(), &url, 1000, 1099);
        let err = download(&req, &mut |_| {}).await.unwrap_err();
        assert!(
            matches!(
                err,
                DownloadError::NoSpace {
                    need: 1100,
                    available: 1099
                }
            ),
            "{err}"
        );
        assert_eq!(err.result(), UpdateResult::NotEnoughStorage);
        assert!(!dir.path().join("staging").exists(), "nothing created");
        // Bytes already staged count: 400 on disk, 600 + 100 to go.
        std::fs::create_dir_all(dir.path().join("staging")).unwrap();
        std::fs::write(dir.path().join(format!("staging/{SHA}.part")), [0u8; 400]).unwrap();
        let req = request(dir.path(), &url, 1000, 699);
        let err = download(&req, &mut |_| {}).await.unwrap_err();
        assert!(
            matches!(
                err,
                DownloadError::NoSpace {
                    need: 700,
                    available: 699
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_image_already_ready_is_returned_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ready")).unwrap();
        let ready = dir.path().join(format!("ready/{SHA}.bin"));
        std::fs::write(&ready, b"test").unwrap();
        let upper = SHA.to_uppercase();
        let mut req = request(dir.path(), "https://127.0.0.1:1/x", 4, 0);
        req.sha256 = &upper;
        assert_eq!(download(&req, &mut |_| {}).await.unwrap(), ready);
    }

    #[tokio::test]
    async fn bad_requests_fail_with_their_result_codes() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &str, UpdateResult); 3] = [
            (
                "http://127.0.0.1/fw.bin",
                SHA,
                UpdateResult::UnsupportedProtocol,
            ),
            ("https://127.0.0.1:0/fw.bin", SHA, UpdateResult::InvalidUri),
            (
                "https://127.0.0.1/fw.bin",
                "abc",
                UpdateResult::UnsupportedPackage,
            ),
        ];
        for (url, sha, want) in cases {
            let mut req = request(dir.path(), url, 10, u64::MAX);
            req.sha256 = sha;
            let err = download(&req, &mut |_| {}).await.unwrap_err();
            assert_eq!(err.result(), want, "{url} {sha}: {err}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_then_reported_as_connection_lost() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("https://127.0.0.1:{}/fw.bin", closed_port());
        let req = request(dir.path(), &url, 10, u64::MAX);
        let mut seen = Vec::new();
        let err = download(&req, &mut |n| seen.push(n)).await.unwrap_err();
        match &err {
            DownloadError::ConnectionLost { attempts, last, .. } => {
                assert_eq!(*attempts, 2);
                assert!(last.contains("connect to 127.0.0.1"), "{last}");
            }
            other => panic!("{other}"),
        }
        assert_eq!(err.result(), UpdateResult::ConnectionLost);
        assert_eq!(seen, [0]);
        assert_eq!(partial_len(dir.path(), SHA), 0);
        assert!(
            dir.path().join(format!("staging/{SHA}.part")).exists(),
            "the part stays for a resume"
        );
    }

    #[tokio::test]
    async fn a_complete_part_is_verified_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("staging")).unwrap();
        // SHA is the SHA-256 of "test".
        std::fs::write(dir.path().join(format!("staging/{SHA}.part")), b"test").unwrap();
        assert_eq!(partial_len(dir.path(), &SHA.to_uppercase()), 4);
        let url = format!("https://127.0.0.1:{}/fw.bin", closed_port());
        let req = request(dir.path(), &url, 4, 1000);
        let path = download(&req, &mut |_| {}).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"test");
        assert_eq!(partial_len(dir.path(), SHA), 0);
        // A complete part with the wrong bytes is removed.
        let other = "0".repeat(64);
        std::fs::write(dir.path().join(format!("staging/{other}.part")), b"tesT").unwrap();
        let mut req = request(dir.path(), &url, 4, 1000);
        req.sha256 = &other;
        let err = download(&req, &mut |_| {}).await.unwrap_err();
        assert!(
            matches!(&err, DownloadError::Integrity { expected, actual } if *expected == other && actual != &other)
        );
        assert_eq!(partial_len(dir.path(), &other), 0);
        assert!(!dir.path().join(format!("ready/{other}.bin")).exists());
    }

    #[test]
    fn partial_len_ignores_names_that_are_not_hashes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(partial_len(dir.path(), "../../etc/passwd"), 0);
        assert_eq!(partial_len(dir.path(), SHA), 0);
    }

    fn touch(dir: &Path, name: &str, age_s: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, name).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        p
    }

    #[test]
    fn prune_keeps_the_newest_and_those_in_use() {
        let root = tempfile::tempdir().unwrap();
        assert!(
            prune(root.path(), 1, &[]).unwrap().is_empty(),
            "no ready/ yet"
        );
        let ready = root.path().join("ready");
        std::fs::create_dir_all(&ready).unwrap();
        let sha = |c: char| c.to_string().repeat(64);
        let a = touch(&ready, &format!("{}.bin", sha('a')), 10);
        let b = touch(&ready, &format!("{}.bin", sha('b')), 20);
        let c = touch(&ready, &format!("{}.bin", sha('c')), 30);
        let d = touch(&ready, &format!("{}.bin", sha('d')), 40);
        let other = touch(&ready, "notes.txt", 50);
        let in_use_upper = sha('c').to_uppercase();
        let removed = prune(root.path(), 2, &[&in_use_upper]).unwrap();
        assert_eq!(removed, vec![d.clone()]);
        for kept in [&a, &b, &c, &other] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(!d.exists());
        let mut removed = prune(root.path(), 0, &[]).unwrap();
        removed.sort();
        assert_eq!(removed, vec![a, b, c]);
        assert!(other.exists(), "only *.bin files are images");
    }

    #[test]
    fn client_config_needs_a_usable_ca() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            client_config(&missing),
            Err(DownloadError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        assert!(matches!(
            client_config(&empty),
            Err(DownloadError::NoCaCertificates(_))
        ));
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = client_config(&junk).unwrap_err();
        assert!(
            matches!(
                err,
                DownloadError::NoCaCertificates(_) | DownloadError::CaFile { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn every_error_maps_to_a_result_code() {
        let url = || "https://h/x".to_owned();
        let table = [
            (
                DownloadError::Oversize {
                    url: url(),
                    size: 1,
                    received: 2,
                },
                UpdateResult::IntegrityFailure,
            ),
            (
                DownloadError::SizeMismatch {
                    url: url(),
                    expected: 1,
                    served: 2,
                },
                UpdateResult::IntegrityFailure,
            ),
            (
                DownloadError::Http {
                    url: url(),
                    status: 404,
                },
                UpdateResult::InvalidUri,
            ),
            (
                DownloadError::TooManyRedirects { url: url() },
                UpdateResult::InvalidUri,
            ),
            (
                DownloadError::Protocol {
                    url: url(),
                    reason: "x".into(),
                },
                UpdateResult::ConnectionLost,
            ),
            (
                DownloadError::Io {
                    op: "write",
                    path: "/x".into(),
                    source: io::ErrorKind::StorageFull.into(),
                },
                UpdateResult::NotEnoughStorage,
            ),
            (
                DownloadError::Io {
                    op: "write",
                    path: "/x".into(),
                    source: io::ErrorKind::PermissionDenied.into(),
                },
                UpdateResult::UpdateFailed,
            ),
        ];
        for (e, want) in table {
            assert_eq!(e.result(), want, "{e}");
        }
    }
}
