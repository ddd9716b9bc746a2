//! `sluice bench`: the built-in load generator. It loads a *running* gateway
//! and reports throughput and acknowledgement latency.
//!
//! `--protocol http`, `mqtt`, `coap` and `coaps` are built. Before any load the
//! generator connects once to the target (CoAP: one ping; coaps: one
//! ClientHello, answered by a HelloVerifyRequest), so a wrong
//! `--url` is a clear error rather than a report full of failures.
//! Without `--tokens` it registers the devices `bench-0` … `bench-{N-1}` in the
//! config's `state.db` (rotating the token of those that already exist) and
//! asks the running daemon to reload its registry over the admin socket
//! (not with `--protocol mqtt --no-auth`, which loads any MQTT broker, like
//! mosquitto, with anonymous connections).
//!
//! The load: `--concurrency` keep-alive connections, each one task that owns
//! its socket and speaks HTTP/1.1 by hand (no client library: this is an
//! embedded-class binary, and the hand-written exchange keeps the generator's
//! own cost small next to the gateway it measures). Message `i` goes to device
//! `i % N`; each request's latency runs from the write of the request to the
//! last byte of the response. Latencies of acknowledged (200) messages are
//! kept as microseconds and sorted once at the end; `--messages` is capped so
//! that stays bounded.
//!
//! ```text
//! $ sluice --config /etc/sluice/sluice.toml bench --protocol http --devices 10 --messages 200000
//! sluice bench: http to http://127.0.0.1:8080, 10 devices, 64 connections, 100-byte payloads
//! messages  200000 in 2.57 s
//! ok        200000 (77869 msgs/s)
//! errors    none
//! latency   p50 0.76 ms  p99 2.10 ms  max 12.48 ms
//! ```
//!
//! The response parser ([`parse_head`]) is plain code without I/O and is
//! unit-tested on its own.
//!
//! `--protocol mqtt` opens one MQTT 3.1.1 connection per device (username =
//! its token) and publishes to `--topic` at `--qos 0|1` with up to
//! `--inflight` unacknowledged messages per connection; see [`mqtt`].
//!
//! ```text
//! $ sluice bench --protocol mqtt --qos 1 --devices 100 --messages 200000
//! sluice bench: mqtt (QoS 1, 100 in flight) to mqtt://127.0.0.1:1883, 100 devices, 100 connections, 100-byte payloads
//! ```
//!
//! `--protocol coap` sends confirmable POSTs to `coap://HOST:PORT`,
//! `--concurrency` of them in flight, each from its own UDP socket, and
//! retransmits unanswered ones with the same message id; see [`coap`].
//!
//! `--protocol coaps` sends the same POSTs to `coaps://HOST:PORT` inside
//! DTLS 1.2 sessions: it gives each bench device a fresh pre-shared key
//! (identity `bench-i`) before the reload, and each slot handshakes as
//! device `slot % N` first. With `--handshakes` every message is a full
//! handshake from a new port instead; see [`coaps`]. `--tokens` does not
//! apply (the devices authenticate by key, not token).
//!
//! When the daemon of the configuration's admin socket says its `pid` in
//! `status`, the report adds the CPU time it spent during the load
//! (`/proc/PID/stat`, so only for a gateway on this machine) and that time
//! per acknowledged message (per handshake with `--handshakes`).

mod coap;
mod coaps;
mod mqtt;

use crate::admin::{self, AdminError};
use crate::config::Config;
use crate::registry::{self, RegistryDb, RegistryError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most messages one run may send (the latency samples are kept in memory:
/// 4 bytes each).
pub const MAX_MESSAGES: u64 = 50_000_000;
/// Most connections one run may open.
pub const MAX_CONCURRENCY: u64 = 10_000;
/// Most devices one run may use.
pub const MAX_DEVICES: u64 = 100_000;
/// Largest request body one run may send.
pub const MAX_PAYLOAD_BYTES: u64 = 16 << 20;

/// Longest response head (status line and headers) accepted.
const MAX_HEAD_BYTES: usize = 16 << 10;
/// Longest response body accepted (a gateway answers with a few bytes).
const MAX_BODY_BYTES: usize = 1 << 20;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Device type given to the devices the bench registers itself.
const BENCH_DEVICE_TYPE: &str = "bench";

/// The device protocol to load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchProtocol {
    /// ThingsBoard device API over HTTP/1.1.
    Http,
    /// MQTT 3.1.1, one connection per device.
    Mqtt,
    /// CoAP over UDP: confirmable POSTs, one UDP socket per request in
    /// flight.
    Coap,
    /// CoAP over DTLS 1.2 with per-device pre-shared keys: one session per
    /// request in flight.
    Coaps,
}

impl BenchProtocol {
    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Mqtt => "mqtt",
            Self::Coap => "coap",
            Self::Coaps => "coaps",
        }
    }

    /// What one acknowledged message is called in the CPU line.
    fn request_noun(self) -> &'static str {
        match self {
            Self::Mqtt => "message",
            Self::Http | Self::Coap | Self::Coaps => "request",
        }
    }
}

/// Arguments of `sluice bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Device protocol to load.
    #[arg(long, value_enum)]
    pub protocol: BenchProtocol,
    /// Devices to spread the messages over, round-robin [default: 10, or
    /// every token of --tokens].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_DEVICES))]
    pub devices: Option<u64>,
    /// Messages to send in all.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=MAX_MESSAGES))]
    pub messages: u64,
    /// Connections in flight at once (http), requests in flight at once
    /// (coap: one UDP socket each; coaps: one DTLS session each), or
    /// handshakes at once (coaps --handshakes); mqtt opens one connection
    /// per device.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_CONCURRENCY))]
    pub concurrency: u64,
    /// Approximate size of each JSON body in bytes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_PAYLOAD_BYTES))]
    pub payload_bytes: u64,
    /// Gateway to load, like http://127.0.0.1:8080, mqtt://127.0.0.1:1883,
    /// coap://127.0.0.1:5683 or coaps://127.0.0.1:5684 [default:
    /// listeners.http.bind, listeners.mqtt.bind, listeners.coap.bind or
    /// listeners.coaps.bind of the configuration, 0.0.0.0 read as
    /// 127.0.0.1].
    #[arg(long)]
    pub url: Option<String>,
    /// File of device access tokens, one a line ('#' starts a comment line);
    /// without it the bench registers devices bench-0..N-1 itself (not for
    /// coaps, whose devices need keys the bench registers).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Measure DTLS handshakes instead of POSTs (coaps only): each message
    /// is a full handshake from a new UDP port, then close_notify.
    #[arg(long)]
    pub handshakes: bool,
    /// MQTT QoS of the PUBLISHes (mqtt only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Most unacknowledged QoS 1 PUBLISHes per connection (mqtt only).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Topic to publish to (mqtt only).
    #[arg(long, default_value = "v1/devices/me/telemetry")]
    pub topic: String,
    /// Connect without a username and register no device (mqtt only): loads
    /// a plain broker such as mosquitto.
    #[arg(long)]
    pub no_auth: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The protocol's load generator does not exist yet.
    #[error("sluice bench --protocol {0} is not built yet (only http and mqtt are)")]
    NotBuilt(&'static str),
    /// `--tokens` with `--protocol coaps`.
    #[error(
        "--tokens does not apply to --protocol coaps: its devices authenticate with pre-shared keys, which the bench registers itself (bench-0..N-1); leave --tokens out"
    )]
    TokensWithCoaps,
    /// `--handshakes` with a protocol other than coaps.
    #[error("--handshakes measures DTLS handshakes: it needs --protocol coaps, not {0}")]
    HandshakesWithout(&'static str),
    /// An argument is out of range (clap checks these too; this is for callers
    /// that build [`BenchArgs`] themselves).
    #[error("--{flag} {value} is out of range (1..={max})")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: u64,
        /// Its upper bound.
        max: u64,
    },
    /// The URL is not one the generator can use.
    #[error("--url {url:?}: {problem}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No `--url`, and the configuration has no HTTP listener to default to.
    #[error("no --url given and the configuration has no [listeners.http]")]
    NoHttpListener,
    /// No `--url`, and the configuration has no MQTT listener to default to.
    #[error("no --url given and the configuration has no [listeners.mqtt]")]
    NoMqttListener,
    /// No `--url`, and the configuration has no CoAP listener to default to.
    #[error("no --url given and the configuration has no [listeners.coap]")]
    NoCoapListener,
    /// No `--url`, and the configuration has no coaps listener to default
    /// to.
    #[error("no --url given and the configuration has no [listeners.coaps]")]
    NoCoapsListener,
    /// No `--url`, and the configured listener binds an ephemeral port.
    #[error(
        "no --url given and {key} is {addr} (port 0); pass --url with the port `sluice status` shows"
    )]
    EphemeralPort {
        /// The configuration key, like `listeners.http.bind`.
        key: &'static str,
        /// Its value.
        addr: SocketAddr,
    },
    /// The token file cannot be read.
    #[error("--tokens {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A line of the token file is not an access token.
    #[error(
        "--tokens {path}, line {line}: not an access token (1-128 printable ASCII characters without whitespace, '/', '?', '#', '+', '%')"
    )]
    BadToken {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The token file holds fewer tokens than devices asked for.
    #[error("--tokens {path} holds {found} tokens; --devices asks for {wanted}")]
    TooFewTokens {
        /// The file.
        path: PathBuf,
        /// Tokens in it.
        found: usize,
        /// `--devices`.
        wanted: u64,
    },
    /// The state dir cannot be created.
    #[error("gateway.state_dir {path}: {source}")]
    StateDir {
        /// The state dir.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A bench device could not be registered.
    #[error("registering bench device {device}: {source}")]
    Register {
        /// The device name.
        device: String,
        /// What failed.
        source: RegistryError,
    },
    /// The bench devices are registered but the daemon did not load them.
    #[error(
        "the bench devices are registered, but the daemon did not reload them: {0} (run `sluice run` with the same --config, or pass --tokens)"
    )]
    Reload(#[source] AdminError),
    /// The target does not accept connections.
    #[error("cannot connect to {url} ({addr}): {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The address tried.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The async runtime could not be built.
    #[error("cannot start the load generator's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A connection task ended abnormally.
    #[error("a load generator task failed: {0}")]
    Task(String),
}

impl BenchError {
    /// The process exit code for this failure: 2 for bad usage or input,
    /// 1 when the run itself failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotBuilt(_)
            | Self::TokensWithCoaps
            | Self::HandshakesWithout(_)
            | Self::OutOfRange { .. }
            | Self::BadUrl { .. }
            | Self::NoHttpListener
            | Self::NoMqttListener
            | Self::NoCoapListener
            | Self::NoCoapsListener
            | Self::EphemeralPort { .. }
            | Self::TokenFile { .. }
            | Self::BadToken { .. }
            | Self::TooFewTokens { .. } => 2,
            Self::StateDir { .. }
            | Self::Register { .. }
            | Self::Reload(_)
            | Self::Connect { .. }
            | Self::Runtime(_)
            | Self::Task(_) => 1,
        }
    }
}

/// Acknowledgement latency of the messages answered 200, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// What a bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Protocol loaded.
    pub protocol: BenchProtocol,
    /// Target.
    pub url: String,
    /// Devices the messages were spread over.
    pub devices: u64,
    /// Connections in flight.
    pub concurrency: u64,
    /// MQTT QoS (mqtt only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Most unacknowledged PUBLISHes per connection (mqtt at QoS 1 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight: Option<u16>,
    /// Size of each request body (the smallest body the generator writes is
    /// larger than a tiny `--payload-bytes`).
    pub payload_bytes: u64,
    /// Each message was a DTLS handshake (coaps `--handshakes`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub handshakes: bool,
    /// Messages attempted.
    pub messages: u64,
    /// Messages answered 200 (http), acknowledged by PUBACK (mqtt QoS 1),
    /// written before a PINGRESP (mqtt QoS 0), answered 2.04 (coap,
    /// coaps), or handshakes completed (coaps `--handshakes`).
    pub ok: u64,
    /// Failed messages by cause: an HTTP status (`"503"`), a CoAP code
    /// (`"4.01"`), or `connect`, `io`, `closed` (peer closed mid-exchange),
    /// `timeout`, `bad_response`, `refused` (MQTT CONNACK refused, or ICMP
    /// port unreachable), `reset` (CoAP RST), `handshake_failed` (a DTLS
    /// alert), `handshake_timeout`.
    pub errors: BTreeMap<String, u64>,
    /// What the first failure other than an HTTP status was, if any
    /// (`"connect: Connection refused (os error 111)"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// Wall time of the load, seconds.
    pub elapsed_s: f64,
    /// Messages answered 200 per second.
    pub msgs_per_s: f64,
    /// Latency of the messages answered 200; `None` when there were none.
    pub latency_ms: Option<LatencyMs>,
    /// CPU seconds (user + system) the gateway process spent during the
    /// load, when its pid was known (`sluice status` on the configuration's
    /// admin socket) and `/proc/PID/stat` readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cpu_s: Option<f64>,
    /// `gateway_cpu_s` per acknowledged message (per handshake with
    /// `--handshakes`), microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_per_msg_us: Option<f64>,
}

impl BenchReport {
    /// Prints the report for a person on stdout; a closed stdout (`| head`)
    /// is not an error, as elsewhere in the CLI.
    pub fn print_human(&self) {
        let _ = self.write_human(&mut std::io::stdout().lock());
    }

    /// Writes the report for a person.
    ///
    /// Fails when `out` fails.
    pub fn write_human(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mode = match (self.qos, self.inflight) {
            (Some(qos), Some(inflight)) => format!(" (QoS {qos}, {inflight} in flight)"),
            (Some(qos), None) => format!(" (QoS {qos})"),
            _ if self.handshakes => " handshakes".to_owned(),
            _ => String::new(),
        };
        let payloads = if self.handshakes {
            String::new()
        } else {
            format!(", {}-byte payloads", self.payload_bytes)
        };
        writeln!(
            out,
            "sluice bench: {}{mode} to {}, {} devices, {} connections{payloads}",
            self.protocol.name(),
            self.url,
            self.devices,
            self.concurrency,
        )?;
        let (what, per_s, noun) = if self.handshakes {
            ("handshakes", "handshakes/s", "handshake")
        } else {
            ("messages ", "msgs/s", self.protocol.request_noun())
        };
        writeln!(out, "{what} {} in {:.2} s", self.messages, self.elapsed_s)?;
        writeln!(
            out,
            "ok        {} ({:.0} {per_s})",
            self.ok, self.msgs_per_s
        )?;
        if self.errors.is_empty() {
            writeln!(out, "errors    none")?;
        } else {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            writeln!(out, "errors    {}", errors.join(" "))?;
        }
        if let Some(first) = &self.first_failure {
            writeln!(out, "first     {first}")?;
        }
        match &self.latency_ms {
            Some(l) => writeln!(
                out,
                "latency   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                l.p50, l.p99, l.max
            ),
            None => writeln!(out, "latency   - (no message was acknowledged)"),
        }?;
        if let Some(cpu_s) = self.gateway_cpu_s {
            match self.cpu_per_msg_us {
                Some(us) => writeln!(
                    out,
                    "cpu per {noun} {us:.1} µs (the gateway used {cpu_s:.2} s of CPU)"
                ),
                None => writeln!(out, "cpu       the gateway used {cpu_s:.2} s of CPU"),
            }?;
        }
        Ok(())
    }
}

/// Runs a bench against a running gateway; blocking (it builds its own
/// single-threaded runtime, so the gateway keeps the other cores).
///
/// Fails on a protocol not built yet, a bad URL or token file, when the bench
/// devices cannot be registered or the daemon cannot be told to reload them,
/// or when the target does not accept a first connection. Failed messages
/// after that are counted in the report, not returned as an error.
pub fn run(cfg: &Config, args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let coaps = args.protocol == BenchProtocol::Coaps;
    if args.handshakes && !coaps {
        return Err(BenchError::HandshakesWithout(args.protocol.name()));
    }
    if coaps && args.tokens.is_some() {
        return Err(BenchError::TokensWithCoaps);
    }
    if matches!(args.protocol, BenchProtocol::Coap | BenchProtocol::Coaps) {
        check_range("payload-bytes", args.payload_bytes, coap::MAX_PAYLOAD_BYTES)?;
    }
    check_range("messages", args.messages, MAX_MESSAGES)?;
    check_range("concurrency", args.concurrency, MAX_CONCURRENCY)?;
    check_range("payload-bytes", args.payload_bytes, MAX_PAYLOAD_BYTES)?;
    if let Some(d) = args.devices {
        check_range("devices", d, MAX_DEVICES)?;
    }

    let url = match &args.url {
        Some(u) => u.clone(),
        None => default_url(cfg, args.protocol)?,
    };
    let target = Target::parse(&url, args.protocol).map_err(|problem| BenchError::BadUrl {
        url: url.clone(),
        problem,
    })?;
    let addr = target.resolve().map_err(|problem| BenchError::BadUrl {
        url: url.clone(),
        problem,
    })?;
    let reachable = match args.protocol {
        BenchProtocol::Coap => coap::ping(addr),
        BenchProtocol::Coaps => coaps::ping(addr),
        BenchProtocol::Http | BenchProtocol::Mqtt => {
            std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map(drop)
        }
    };
    reachable.map_err(|source| BenchError::Connect {
        url: url.clone(),
        addr,
        source,
    })?;

    let mqtt_no_auth = args.protocol == BenchProtocol::Mqtt && args.no_auth;
    let Credentials { tokens, psks } = match &args.tokens {
        _ if mqtt_no_auth => Credentials::default(),
        Some(path) => {
            let mut tokens = read_tokens(path)?;
            if let Some(wanted) = args.devices {
                if (tokens.len() as u64) < wanted {
                    return Err(BenchError::TooFewTokens {
                        path: path.clone(),
                        found: tokens.len(),
                        wanted,
                    });
                }
                tokens.truncate(usize::try_from(wanted).unwrap_or(usize::MAX));
            }
            Credentials {
                tokens,
                psks: Vec::new(),
            }
        }
        None => register_devices(cfg, args.devices.unwrap_or(10), coaps)?,
    };

    let payload_bytes = usize::try_from(args.payload_bytes).unwrap_or(usize::MAX);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    // mosquitto's load would be measured against sluice's CPU otherwise.
    let gateway = if mqtt_no_auth { None } else { gateway_pid(cfg) };
    let cpu_before = gateway.and_then(crate::metrics::process::cpu_seconds);
    let (tally, elapsed, devices, connections) = if args.protocol == BenchProtocol::Mqtt {
        let usernames: Vec<Option<String>> = if mqtt_no_auth {
            let n = usize::try_from(args.devices.unwrap_or(10)).unwrap_or(usize::MAX);
            vec![None; n]
        } else {
            tokens.into_iter().map(Some).collect()
        };
        let n = usernames.len() as u64;
        let plan = Arc::new(mqtt::MqttPlan {
            addr,
            usernames,
            topic: args.topic.clone(),
            qos: if args.qos == 0 {
                rumqttc::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::mqttbytes::QoS::AtLeastOnce
            },
            inflight: args.inflight,
            messages: args.messages,
            payload_bytes,
        });
        let (tally, elapsed) = rt.block_on(mqtt::load(plan))?;
        (tally, elapsed, n, n)
    } else if args.protocol == BenchProtocol::Coap {
        let plan = coap::CoapPlan::new(addr, &tokens, args.messages, payload_bytes)
            .map_err(BenchError::Task)?;
        let devices = plan.templates.len() as u64;
        let slots = args.concurrency.min(args.messages);
        let (tally, elapsed) = rt.block_on(coap::load(Arc::new(plan), slots))?;
        (tally, elapsed, devices, slots)
    } else if coaps {
        let plan = coaps::CoapsPlan::new(addr, psks, args.messages, payload_bytes, args.handshakes)
            .map_err(BenchError::Task)?;
        let slots = args.concurrency.min(args.messages);
        let devices = (plan.devices.len() as u64).min(slots);
        let (tally, elapsed) = rt.block_on(coaps::load(Arc::new(plan), slots))?;
        (tally, elapsed, devices, slots)
    } else {
        let plan = Arc::new(Plan {
            addr,
            host_header: target.host_header,
            tokens,
            messages: args.messages,
            payload_bytes,
            next: AtomicU64::new(0),
        });
        let connections = args.concurrency.min(args.messages);
        let (tally, elapsed) = rt.block_on(load(plan.clone(), connections))?;
        (tally, elapsed, plan.tokens.len() as u64, connections)
    };
    let cpu_after = gateway.and_then(crate::metrics::process::cpu_seconds);
    let gateway_cpu_s = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => Some((after - before).max(0.0)),
        _ => None,
    };

    let mut samples = tally.samples_us;
    samples.sort_unstable();
    let ms = |us: u32| f64::from(us) / 1000.0;
    let latency_ms = match (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last(),
    ) {
        (Some(p50), Some(p99), Some(&max)) => Some(LatencyMs {
            p50: ms(p50),
            p99: ms(p99),
            max: ms(max),
        }),
        _ => None,
    };
    let elapsed_s = elapsed.as_secs_f64();
    Ok(BenchReport {
        protocol: args.protocol,
        url,
        devices,
        concurrency: connections,
        qos: (args.protocol == BenchProtocol::Mqtt).then_some(args.qos),
        inflight: (args.protocol == BenchProtocol::Mqtt && args.qos > 0).then_some(args.inflight),
        payload_bytes: write_body(&mut Vec::new(), 0, payload_bytes) as u64,
        handshakes: args.handshakes,
        messages: tally.sent,
        ok: tally.ok,
        errors: tally.errors,
        first_failure: tally.first_failure,
        elapsed_s,
        msgs_per_s: if elapsed_s > 0.0 {
            tally.ok as f64 / elapsed_s
        } else {
            0.0
        },
        latency_ms,
        gateway_cpu_s,
        cpu_per_msg_us: gateway_cpu_s
            .filter(|_| tally.ok > 0)
            .map(|s| s * 1e6 / tally.ok as f64),
    })
}

/// The pid the daemon of `cfg`'s admin socket gives in `status`, if one
/// answers.
fn gateway_pid(cfg: &Config) -> Option<u32> {
    let status = admin::request(&cfg.admin_socket, "status").ok()?;
    status
        .get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
}

fn check_range(flag: &'static str, value: u64, max: u64) -> Result<(), BenchError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(BenchError::OutOfRange { flag, value, max })
    }
}

/// `http://` + the configured HTTP listener (`mqtt://`, `coap://`,
/// `coaps://` + the MQTT, CoAP, coaps one), an unspecified address read as
/// loopback.
fn default_url(cfg: &Config, protocol: BenchProtocol) -> Result<String, BenchError> {
    let (mut addr, key) = match protocol {
        BenchProtocol::Mqtt => (
            cfg.mqtt.as_ref().ok_or(BenchError::NoMqttListener)?.bind,
            "listeners.mqtt.bind",
        ),
        BenchProtocol::Coap => (
            cfg.coap.as_ref().ok_or(BenchError::NoCoapListener)?.bind,
            "listeners.coap.bind",
        ),
        BenchProtocol::Coaps => (
            cfg.coaps
                .as_ref()
                .ok_or(BenchError::NoCoapsListener)?
                .coap
                .bind,
            "listeners.coaps.bind",
        ),
        BenchProtocol::Http => (
            cfg.http.as_ref().ok_or(BenchError::NoHttpListener)?.bind,
            "listeners.http.bind",
        ),
    };
    if addr.port() == 0 {
        return Err(BenchError::EphemeralPort { key, addr });
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("{}://{addr}", protocol.name()))
}

/// Where the load goes.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    host_header: String,
}

impl Target {
    /// Parses `http://host[:port][/]` (`mqtt://`, `coap://`, `coaps://`
    /// for those protocols); the error says what is wrong.
    fn parse(url: &str, protocol: BenchProtocol) -> Result<Self, String> {
        let (want, default_port) = match protocol {
            BenchProtocol::Mqtt => ("mqtt", 1883),
            BenchProtocol::Coap => ("coap", 5683),
            BenchProtocol::Coaps => ("coaps", 5684),
            BenchProtocol::Http => ("http", 80),
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(want) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "scheme {scheme:?} is not supported; use {want}://HOST:PORT"
                ));
            }
            None => return Err(format!("not a URL like {want}://127.0.0.1:{default_port}")),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !path.is_empty() {
            return Err(format!(
                "a path is not supported; give only {want}://HOST:PORT"
            ));
        }
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("expected {want}://HOST:PORT"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "unclosed '[' in the host".to_owned())?;
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err("expected ':' after ']'".into()),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("the host is empty".into());
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p:?} is not 1-65535"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            host_header: authority.to_owned(),
        })
    }

    /// Resolves the host (blocking); the first address wins.
    fn resolve(&self) -> Result<SocketAddr, String> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.host))
    }
}

/// Reads a token file: one token a line, blank lines and `#` lines skipped.
fn read_tokens(path: &Path) -> Result<Vec<String>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !registry::valid_token(line) {
            return Err(BenchError::BadToken {
                path: path.to_owned(),
                line: i + 1,
            });
        }
        tokens.push(line.to_owned());
    }
    if tokens.is_empty() {
        return Err(BenchError::TokenFile {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "holds no token"),
        });
    }
    Ok(tokens)
}

/// What the load authenticates with.
#[derive(Default)]
struct Credentials {
    /// Access tokens, one per device.
    tokens: Vec<String>,
    /// PSK identity and key of each device (coaps).
    psks: Vec<(String, Vec<u8>)>,
}

/// Registers `bench-0..n-1` (rotating the token of those that exist),
/// with `psk` gives each a fresh pre-shared key under its own name as the
/// identity, and tells the running daemon; returns their credentials.
fn register_devices(cfg: &Config, n: u64, psk: bool) -> Result<Credentials, BenchError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| BenchError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let db = RegistryDb::open(&cfg.state_db_path()).map_err(|source| BenchError::Register {
        device: "bench-0".into(),
        source,
    })?;
    let mut creds = Credentials::default();
    for i in 0..n {
        let device = format!("bench-{i}");
        let failed = |source| BenchError::Register {
            device: device.clone(),
            source,
        };
        let token = match db.add(&device, BENCH_DEVICE_TYPE, None) {
            Err(RegistryError::Exists(_)) => db.rotate_token(&device),
            other => other,
        }
        .map_err(failed)?;
        creds.tokens.push(token);
        if psk {
            let key = registry::generate_psk().map_err(failed)?;
            db.set_psk(&device, Some(&device), &key).map_err(failed)?;
            creds.psks.push((device.clone(), key));
        }
    }
    admin::request(&cfg.admin_socket, "reload_devices").map_err(BenchError::Reload)?;
    Ok(creds)
}

/// What every connection task shares.
struct Plan {
    addr: SocketAddr,
    host_header: String,
    tokens: Vec<String>,
    messages: u64,
    payload_bytes: usize,
    /// Index of the next message to send.
    next: AtomicU64,
}

/// What connection tasks counted.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    first_failure: Option<String>,
    samples_us: Vec<u32>,
}

impl Tally {
    fn error(&mut self, cause: impl Into<String>) {
        *self.errors.entry(cause.into()).or_default() += 1;
    }

    /// Counts a failure that is not an HTTP status, keeping the first one's
    /// description for the report.
    fn failure(&mut self, cause: &'static str, describe: impl FnOnce() -> String) {
        self.error(cause);
        if self.first_failure.is_none() {
            self.first_failure = Some(describe());
        }
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.samples_us.extend(other.samples_us);
    }
}

/// Runs `connections` connection tasks until every message is sent.
async fn load(plan: Arc<Plan>, connections: u64) -> Result<(Tally, Duration), BenchError> {
    let messages = plan.messages;
    run_slots(connections, messages, |_| connection(plan.clone())).await
}

/// Runs the tasks `slot(0)` … `slot(n - 1)` (which share `messages`
/// between them) to their end; returns what they counted together and the
/// wall time.
///
/// Fails when a task panicked.
async fn run_slots<F, T>(n: u64, messages: u64, slot: F) -> Result<(Tally, Duration), BenchError>
where
    F: Fn(u64) -> T,
    T: std::future::Future<Output = Tally> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..n {
        tasks.spawn(slot(s));
    }
    let mut total = Tally {
        samples_us: Vec::with_capacity(usize::try_from(messages).unwrap_or(0)),
        ..Tally::default()
    };
    while let Some(done) = tasks.join_next().await {
        total.merge(done.map_err(|e| BenchError::Task(e.to_string()))?);
    }
    Ok((total, started.elapsed()))
}

/// One connection: sends messages until none is left, reconnecting when the
/// server closes or an exchange fails.
async fn connection(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    let mut request = Vec::new();
    let mut body = Vec::new();
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.messages {
            break;
        }
        tally.sent += 1;
        write_request(&mut request, &mut body, &plan, i);
        let mut retried = false;
        loop {
            if conn.is_none() {
                match Conn::open(plan.addr).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        tally.failure("connect", || format!("connect: {e}"));
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let reused = c.answered > 0;
            let started = Instant::now();
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&request)).await;
            match outcome {
                Ok(Ok(head)) => {
                    let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                    if head.status == 200 {
                        tally.ok += 1;
                        tally.samples_us.push(us);
                    } else {
                        tally.error(head.status.to_string());
                    }
                    if head.close {
                        conn = None;
                    } else {
                        c.answered += 1;
                    }
                }
                Ok(Err(e)) => {
                    conn = None;
                    // A keep-alive connection the server dropped while idle:
                    // the request never reached it, so send it again once.
                    if reused && !retried && e.is_stale_connection() {
                        retried = true;
                        continue;
                    }
                    tally.failure(e.cause(), || e.to_string());
                }
                Err(_) => {
                    conn = None;
                    tally.failure("timeout", || {
                        format!("no response within {} s", REQUEST_TIMEOUT.as_secs())
                    });
                }
            }
            break;
        }
    }
    tally
}

/// Writes the JSON body of message `seq`, padded to about `payload_bytes`;
/// returns its length.
fn write_body(out: &mut Vec<u8>, seq: u64, payload_bytes: usize) -> usize {
    out.clear();
    let temperature = seq % 40;
    let _ = write!(
        out,
        "{{\"seq\":{seq},\"temperature\":{temperature}.5,\"pad\":\""
    );
    let closing = b"\"}";
    let pad = payload_bytes.saturating_sub(out.len() + closing.len());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(closing);
    out.len()
}

/// Writes the whole HTTP request of message `i` into `request`.
fn write_request(request: &mut Vec<u8>, body: &mut Vec<u8>, plan: &Plan, i: u64) {
    let n = plan.tokens.len() as u64;
    let token = usize::try_from(i % n.max(1))
        .ok()
        .and_then(|d| plan.tokens.get(d))
        .map_or("", String::as_str);
    let len = write_body(body, i, plan.payload_bytes);
    request.clear();
    let _ = write!(
        request,
        "POST /api/v1/{token}/telemetry HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
        plan.host_header
    );
    request.extend_from_slice(body);
}

/// Why one exchange failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The peer closed; `partial` when some of the response had arrived.
    #[error("the server closed the connection {}", if *partial { "mid-response" } else { "before responding" })]
    Closed { partial: bool },
    #[error("bad response: {0}")]
    Response(ResponseError),
}

impl ExchangeError {
    fn cause(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::Closed { .. } => "closed",
            Self::Response(_) => "bad_response",
        }
    }

    fn is_stale_connection(&self) -> bool {
        match self {
            Self::Closed { partial } => !partial,
            Self::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            ),
            Self::Response(_) => false,
        }
    }
}

/// One keep-alive connection and the bytes read from it but not yet used.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    answered: u64,
}

impl Conn {
    /// Connects.
    ///
    /// Fails when the connection is refused or times out.
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        // Each request is one write; without this a response could wait on
        // a delayed ACK.
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            answered: 0,
        })
    }

    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> Result<(), ExchangeError> {
        self.buf.reserve(READ_CHUNK);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(ExchangeError::Io)?;
        if n == 0 {
            return Err(ExchangeError::Closed {
                partial: !self.buf.is_empty(),
            });
        }
        Ok(())
    }

    /// Sends one request and reads its whole response.
    async fn exchange(&mut self, request: &[u8]) -> Result<ResponseHead, ExchangeError> {
        self.buf.clear();
        self.stream
            .write_all(request)
            .await
            .map_err(ExchangeError::Io)?;
        let mut head = loop {
            if let Some(head) = parse_head(&self.buf).map_err(ExchangeError::Response)? {
                break head;
            }
            self.fill().await?;
        };
        match head.body {
            BodyLength::Fixed(len) => {
                let total = head.head_len + len;
                while self.buf.len() < total {
                    self.fill().await?;
                }
            }
            BodyLength::UntilClose => loop {
                if self.buf.len() > head.head_len + MAX_BODY_BYTES {
                    return Err(ExchangeError::Response(ResponseError::BodyTooLong));
                }
                match self.fill().await {
                    Ok(()) => {}
                    Err(ExchangeError::Closed { .. }) => {
                        head.close = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            },
        }
        Ok(head)
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// `Content-Length` bytes (0 for 204 and 304).
    Fixed(usize),
    /// Up to the end of the connection (no `Content-Length`).
    UntilClose,
}

/// The parsed status line and headers of an HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    /// How the body is delimited.
    pub body: BodyLength,
    /// Whether the server closes the connection after this response.
    pub close: bool,
}

/// Why a response head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The status line is not `HTTP/1.x NNN reason`.
    #[error("bad status line {0:?}")]
    StatusLine(String),
    /// A header line has no colon, or the head is not UTF-8.
    #[error("bad header line {0:?}")]
    Header(String),
    /// The head is longer than the generator accepts.
    #[error("response head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLong,
    /// `Content-Length` is not a number, is repeated with another value, or
    /// is larger than the generator accepts.
    #[error("bad content-length {0:?}")]
    ContentLength(String),
    /// A body without `Content-Length` grew past the limit.
    #[error("response body longer than {MAX_BODY_BYTES} bytes")]
    BodyTooLong,
    /// A transfer coding (chunked or other): not supported.
    #[error("transfer-encoding {0:?} is not supported (only content-length bodies)")]
    TransferEncoding(String),
    /// A 1xx interim response (never asked for).
    #[error("unexpected interim response {0}")]
    Interim(u16),
}

/// Parses the head of an HTTP/1.x response at the start of `buf`.
///
/// Returns `Ok(None)` while the blank line ending the head has not arrived.
/// Fails on a bad status line or header, a head over 16 KiB, a bad or
/// oversized `Content-Length`, any `Transfer-Encoding`, or a 1xx status.
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, ResponseError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD_BYTES {
            Err(ResponseError::HeadTooLong)
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| ResponseError::Header(String::from_utf8_lossy(&buf[..end]).into_owned()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let bad_status = || ResponseError::StatusLine(status_line.to_owned());
    let (version, rest) = status_line.split_once(' ').ok_or_else(bad_status)?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad_status()),
    };
    let code = rest.get(..3).ok_or_else(bad_status)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || !(rest.len() == 3 || rest[3..].starts_with(' '))
    {
        return Err(bad_status());
    }
    let status: u16 = code.parse().map_err(|_| bad_status())?;
    if !(100..=599).contains(&status) {
        return Err(bad_status());
    }
    if status < 200 {
        return Err(ResponseError::Interim(status));
    }

    let mut content_length: Option<usize> = None;
    let mut close = false;
    let mut keep_alive = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ResponseError::Header(line.to_owned()))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_BODY_BYTES)
                .ok_or_else(|| ResponseError::ContentLength(value.to_owned()))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(ResponseError::ContentLength(value.to_owned()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ResponseError::TransferEncoding(value.to_owned()));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    if http10 && !keep_alive {
        close = true;
    }
    let body = if status == 204 || status == 304 {
        BodyLength::Fixed(0)
    } else {
        match content_length {
            Some(n) => BodyLength::Fixed(n),
            None => {
                close = true;
                BodyLength::UntilClose
            }
        }
    };
    Ok(Some(ResponseHead {
        status,
        head_len: end + 4,
        body,
        close,
    }))
}

/// The `p`th percentile (0 < p ≤ 100) of sorted samples, nearest-rank
/// method: the smallest sample with at least p% of the samples at or below
/// it. `None` when there are no samples.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    // The tolerance absorbs binary rounding: 99.9% of 1000 computes as
    // 999.0000000000001, which must not round up to rank 1000.
    let rank = (p / 100.0 * n as f64 - 1e-9).ceil();
    let rank = if rank.is_nan() || rank < 1.0 {
        1
    } else if rank >= n as f64 {
        n
    } else {
        rank as usize
    };
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawCoaps, RawConfig, RawHttp};
    use std::io::{BufRead, BufReader, Read, Write};

    fn head(s: &str) -> Result<Option<ResponseHead>, ResponseError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parser_reads_status_length_and_keep_alive() {
        let text = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let h = head(text).unwrap().unwrap();
        assert_eq!(
            h,
            ResponseHead {
                status: 200,
                head_len: text.len(),
                body: BodyLength::Fixed(0),
                close: false
            }
        );
        let h = head("HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nCONTENT-LENGTH:  42 \r\n\r\n{\"err")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.body), (401, BodyLength::Fixed(42)));
    }

    #[test]
    fn parser_waits_for_the_end_of_the_head() {
        assert_eq!(head(""), Ok(None));
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"), Ok(None));
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r"), Ok(None));
    }

    #[test]
    fn parser_sees_connection_close() {
        let h = head("HTTP/1.1 503 Service Unavailable\r\nConnection: Close\r\nRetry-After: 5\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close);
        assert_eq!((h.status, h.body), (503, BodyLength::Fixed(3)));
        let h = head("HTTP/1.1 200 OK\r\nconnection: upgrade, close\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close, "HTTP/1.0 closes unless keep-alive");
        let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.close);
    }

    #[test]
    fn parser_reads_a_body_without_length_to_the_close() {
        let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.body, h.close), (BodyLength::UntilClose, true));
        let h = head("HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.body, h.close), (BodyLength::Fixed(0), false));
    }

    #[test]
    fn parser_refuses_chunked_and_other_codings() {
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ResponseError::TransferEncoding("chunked".into()))
        );
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Err(ResponseError::TransferEncoding(_))
        ));
    }

    #[test]
    fn parser_refuses_bad_status_lines() {
        for bad in [
            "HTTP/2 200 OK",
            "HTTP/1.1 20 OK",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 abc OK",
            "HTTP/1.1 099 x",
            "HTTP/1.1",
            "SSH-2.0-OpenSSH",
            "",
        ] {
            let r = head(&format!("{bad}\r\ncontent-length: 0\r\n\r\n"));
            assert!(
                matches!(r, Err(ResponseError::StatusLine(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert_eq!(
            head("HTTP/1.1 100 Continue\r\n\r\n"),
            Err(ResponseError::Interim(100))
        );
        assert!(head("HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n").is_ok());
    }

    #[test]
    fn parser_refuses_bad_headers_and_lengths() {
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"),
            Err(ResponseError::Header(_))
        ));
        for bad in ["-1", "ten", "", "1 2", "99999999999999999999999", "2000000"] {
            let r = head(&format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n"));
            assert!(
                matches!(r, Err(ResponseError::ContentLength(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(ResponseError::ContentLength(_))
        ));
        let same = head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(same.unwrap().unwrap().body, BodyLength::Fixed(2));
        let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n".to_vec();
        bytes.extend(vec![0xff; 20]);
        bytes.extend(b"\r\n\r\n");
        assert!(matches!(parse_head(&bytes), Err(ResponseError::Header(_))));
    }

    #[test]
    fn parser_bounds_the_head() {
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(parse_head(&long), Err(ResponseError::HeadTooLong));
        long.truncate(MAX_HEAD_BYTES - 1);
        assert_eq!(parse_head(&long), Ok(None));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        let hundred: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50));
        assert_eq!(percentile(&hundred, 99.0), Some(99));
        assert_eq!(percentile(&hundred, 100.0), Some(100));
        assert_eq!(percentile(&hundred, 0.0), Some(1));
        let ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&ten, 50.0), Some(5));
        assert_eq!(percentile(&ten, 99.0), Some(10));
        let thousand: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99.0), Some(990));
        assert_eq!(percentile(&thousand, 99.9), Some(999));
        assert_eq!(percentile(&[1, 2, 3], f64::NAN), Some(1));
    }

    #[test]
    fn bodies_have_the_asked_size_and_are_telemetry() {
        let device = sluice_cloud_sync::DeviceName::new("d".to_owned());
        let mut body = Vec::new();
        for (seq, size) in [(0, 100), (123_456_789, 100), (7, 1000), (5, 1)] {
            let len = write_body(&mut body, seq, size);
            assert_eq!(len, body.len());
            if size >= 60 {
                assert_eq!(len, size);
            }
            let records = crate::tbjson::decode(&body, &device, 0, true).unwrap();
            assert_eq!(records.len(), 1, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn urls_parse_to_host_port_and_host_header() {
        let t = Target::parse("http://127.0.0.1:18090", BenchProtocol::Http).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 18090));
        assert_eq!(t.host_header, "127.0.0.1:18090");
        let t = Target::parse("HTTP://gw.local/", BenchProtocol::Http).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("gw.local", 80));
        let t = Target::parse("http://[::1]:8080", BenchProtocol::Http).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.host_header.as_str()),
            ("::1", 8080, "[::1]:8080")
        );
        for bad in [
            "127.0.0.1:8080",
            "https://gw:443",
            "mqtt://gw",
            "http://",
            "http://:80",
            "http://gw:0",
            "http://gw:99999",
            "http://gw:x",
            "http://gw:80/api",
            "http://u@gw:80",
            "http://[::1",
        ] {
            assert!(Target::parse(bad, BenchProtocol::Http).is_err(), "{bad}");
        }
        let t = Target::parse("coap://127.0.0.1", BenchProtocol::Coap).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 5683));
        assert!(Target::parse("coaps://gw:5684", BenchProtocol::Coap).is_err());
        let t = Target::parse("coaps://127.0.0.1", BenchProtocol::Coaps).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 5684));
        let t = Target::parse("COAPS://[::1]:15684/", BenchProtocol::Coaps).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 15684));
        for bad in [
            "coap://gw:5683",
            "coaps://gw/api",
            "gw:5684",
            "coaps://gw:0",
        ] {
            assert!(Target::parse(bad, BenchProtocol::Coaps).is_err(), "{bad}");
        }
        let t = Target::parse("mqtt://127.0.0.1", BenchProtocol::Mqtt).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 1883));
        let t = Target::parse("MQTT://gw:18830/", BenchProtocol::Mqtt).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("gw", 18830));
        for bad in ["http://gw:1883", "mqtts://gw", "mqtt://gw/topic", "gw:1883"] {
            assert!(Target::parse(bad, BenchProtocol::Mqtt).is_err(), "{bad}");
        }
    }

    fn test_config(dir: &Path, http: Option<&str>) -> Config {
        test_config_with(dir, http, None)
    }

    fn test_config_with(dir: &Path, http: Option<&str>, coaps: Option<&str>) -> Config {
        let mut raw = RawConfig::default();
        raw.gateway.id = Some("gw-test".into());
        raw.gateway.state_dir = dir.join("state");
        raw.admin.socket = dir.join("admin.sock");
        raw.listeners.http = http.map(|bind| RawHttp {
            bind: bind.into(),
            ..RawHttp::default()
        });
        raw.listeners.coaps = coaps.map(|bind| RawCoaps {
            bind: bind.into(),
            ..RawCoaps::default()
        });
        crate::config::validate(raw).unwrap()
    }

    fn args(url: Option<String>, tokens: Option<PathBuf>) -> BenchArgs {
        BenchArgs {
            protocol: BenchProtocol::Http,
            devices: None,
            messages: 500,
            concurrency: 8,
            payload_bytes: 100,
            url,
            tokens,
            handshakes: false,
            qos: 1,
            inflight: 100,
            topic: "v1/devices/me/telemetry".into(),
            no_auth: false,
            json: false,
        }
    }

    /// A tiny blocking HTTP/1.1 server: 200 for token `good-*`, 401 for any
    /// other; every 7th response on a connection says `Connection: close`
    /// and closes. Returns its URL.
    fn fake_gateway() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || serve_fake(stream));
            }
        });
        url
    }

    fn serve_fake(stream: std::net::TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        for n in 1.. {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let close = n % 7 == 0;
            let reply = if request_line.starts_with("POST /api/v1/good-") {
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_owned()
            } else {
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\n".to_owned()
            };
            let reply = format!(
                "{reply}{}\r\n{}",
                if close { "connection: close\r\n" } else { "" },
                if reply.contains("401") { "nope!" } else { "" }
            );
            writer.write_all(reply.as_bytes()).unwrap();
            if close {
                return;
            }
        }
    }

    #[test]
    fn run_loads_a_server_over_keep_alive_and_reconnects_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let url = fake_gateway();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "# bench tokens\ngood-1\n\ngood-2\r\nbad-3\n").unwrap();
        let cfg = test_config(dir.path(), None);
        let report = run(&cfg, &args(Some(url.clone()), Some(tokens.clone()))).unwrap();
        assert_eq!(report.messages, 500);
        assert_eq!(report.devices, 3);
        // Round-robin: every third message goes to the bad token.
        assert_eq!(report.ok, 334);
        assert_eq!(report.errors, BTreeMap::from([("401".to_owned(), 166)]));
        assert!(report.latency_ms.is_some());
        assert_eq!(report.payload_bytes, 100);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["protocol"], "http");
        assert_eq!(json["errors"]["401"], 166);

        let mut two = args(Some(url), Some(tokens));
        two.devices = Some(2);
        two.concurrency = 1000;
        let report = run(&cfg, &two).unwrap();
        assert_eq!(
            (report.ok, report.devices, report.concurrency),
            (500, 2, 500)
        );
        assert!(report.errors.is_empty());
    }

    #[test]
    fn human_report_names_errors_and_latency() {
        let mut report = BenchReport {
            protocol: BenchProtocol::Http,
            url: "http://127.0.0.1:1".into(),
            devices: 2,
            concurrency: 4,
            qos: None,
            inflight: None,
            payload_bytes: 100,
            handshakes: false,
            messages: 10,
            ok: 7,
            errors: BTreeMap::from([("503".to_owned(), 2), ("io".to_owned(), 1)]),
            first_failure: Some("i/o: reset".into()),
            elapsed_s: 0.5,
            msgs_per_s: 14.0,
            latency_ms: Some(LatencyMs {
                p50: 0.5,
                p99: 1.25,
                max: 3.0,
            }),
            gateway_cpu_s: None,
            cpu_per_msg_us: None,
        };
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("messages  10 in 0.50 s"), "{text}");
        assert!(text.contains("ok        7 (14 msgs/s)"), "{text}");
        assert!(!text.contains("cpu"), "{text}");
        assert!(text.contains("errors    503=2 io=1"), "{text}");
        assert!(text.contains("first     i/o: reset"), "{text}");
        assert!(
            text.contains("p50 0.50 ms  p99 1.25 ms  max 3.00 ms"),
            "{text}"
        );
        report.latency_ms = None;
        report.first_failure = None;
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("first_failure").is_none());
        assert!(json["latency_ms"].is_null());
        assert!(json.get("handshakes").is_none());
        assert!(json.get("gateway_cpu_s").is_none());
    }

    #[test]
    fn human_report_of_coaps_says_handshakes_and_cpu() {
        let mut report = BenchReport {
            protocol: BenchProtocol::Coaps,
            url: "coaps://127.0.0.1:5684".into(),
            devices: 4,
            concurrency: 16,
            qos: None,
            inflight: None,
            payload_bytes: 100,
            handshakes: true,
            messages: 200,
            ok: 200,
            errors: BTreeMap::new(),
            first_failure: None,
            elapsed_s: 0.25,
            msgs_per_s: 800.0,
            latency_ms: None,
            gateway_cpu_s: Some(0.12),
            cpu_per_msg_us: Some(600.0),
        };
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "sluice bench: coaps handshakes to coaps://127.0.0.1:5684, 4 devices, 16 connections\n"
            ),
            "{text}"
        );
        assert!(text.contains("handshakes 200 in 0.25 s"), "{text}");
        assert!(text.contains("ok        200 (800 handshakes/s)"), "{text}");
        assert!(
            text.contains("cpu per handshake 600.0 µs (the gateway used 0.12 s of CPU)"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["handshakes"], true);
        assert_eq!(json["cpu_per_msg_us"], 600.0);

        report.handshakes = false;
        report.cpu_per_msg_us = Some(25.0);
        let mut out = Vec::new();
        report.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("16 connections, 100-byte payloads"), "{text}");
        assert!(text.contains("cpu per request 25.0 µs"), "{text}");
    }

    #[test]
    fn coaps_arguments_are_checked_before_any_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), None);
        let mut http = args(Some("http://127.0.0.1:1".into()), None);
        http.handshakes = true;
        let e = run(&cfg, &http).unwrap_err();
        assert!(matches!(e, BenchError::HandshakesWithout("http")), "{e}");
        assert!(e.to_string().contains("--protocol coaps"), "{e}");
        assert_eq!(e.exit_code(), 2);

        let mut coaps = args(None, Some(dir.path().join("tokens")));
        coaps.protocol = BenchProtocol::Coaps;
        let e = run(&cfg, &coaps).unwrap_err();
        assert!(matches!(e, BenchError::TokensWithCoaps), "{e}");
        assert!(e.to_string().contains("--tokens"), "{e}");
        assert_eq!(e.exit_code(), 2);

        coaps.tokens = None;
        assert!(matches!(
            run(&cfg, &coaps),
            Err(BenchError::NoCoapsListener)
        ));
        coaps.handshakes = true;
        assert!(matches!(
            run(&cfg, &coaps),
            Err(BenchError::NoCoapsListener)
        ));
        coaps.url = Some("coap://127.0.0.1:5683".into());
        assert!(matches!(run(&cfg, &coaps), Err(BenchError::BadUrl { .. })));
        coaps.url = Some("coaps://127.0.0.1:1".into());
        coaps.payload_bytes = 2000;
        assert!(matches!(
            run(&cfg, &coaps),
            Err(BenchError::OutOfRange { .. })
        ));

        let with = test_config_with(dir.path(), None, Some("0.0.0.0:15684"));
        assert_eq!(
            default_url(&with, BenchProtocol::Coaps).unwrap(),
            "coaps://127.0.0.1:15684"
        );
        let ephemeral = test_config_with(dir.path(), None, Some("127.0.0.1:0"));
        assert!(matches!(
            default_url(&ephemeral, BenchProtocol::Coaps),
            Err(BenchError::EphemeralPort {
                key: "listeners.coaps.bind",
                ..
            })
        ));
    }

    #[test]
    fn coaps_registration_gives_each_bench_device_a_key_named_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), None);
        for _ in 0..2 {
            // Registered (keys replaced the second time), then no daemon to
            // reload.
            let e = register_devices(&cfg, 3, true).err().unwrap();
            assert!(
                matches!(e, BenchError::Reload(AdminError::NotRunning { .. })),
                "{e}"
            );
        }
        let devices = RegistryDb::open(&cfg.state_db_path())
            .unwrap()
            .list()
            .unwrap();
        let identities: Vec<(String, Option<String>)> = devices
            .into_iter()
            .map(|d| (d.name, d.psk_identity))
            .collect();
        assert_eq!(
            identities,
            (0..3)
                .map(|i| (format!("bench-{i}"), Some(format!("bench-{i}"))))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), None);
        let mut coap = args(None, None);
        coap.protocol = BenchProtocol::Coap;
        assert!(matches!(run(&cfg, &coap), Err(BenchError::NoCoapListener)));
        coap.url = Some("coap://127.0.0.1:1".into());
        coap.payload_bytes = 2000;
        assert!(matches!(
            run(&cfg, &coap),
            Err(BenchError::OutOfRange { .. })
        ));
        let mut mqtt = args(None, None);
        mqtt.protocol = BenchProtocol::Mqtt;
        assert!(matches!(run(&cfg, &mqtt), Err(BenchError::NoMqttListener)));
        mqtt.url = Some("http://127.0.0.1:1".into());
        assert!(matches!(run(&cfg, &mqtt), Err(BenchError::BadUrl { .. })));
        assert!(matches!(
            run(&cfg, &args(None, None)),
            Err(BenchError::NoHttpListener)
        ));
        let ephemeral = test_config(dir.path(), Some("0.0.0.0:0"));
        assert!(matches!(
            run(&ephemeral, &args(None, None)),
            Err(BenchError::EphemeralPort {
                key: "listeners.http.bind",
                ..
            })
        ));
        let e = run(&cfg, &args(Some("https://x:1".into()), None)).unwrap_err();
        assert!(matches!(e, BenchError::BadUrl { .. }), "{e}");
        assert_eq!(e.exit_code(), 2);

        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = run(
            &cfg,
            &args(Some(format!("http://127.0.0.1:{closed_port}")), None),
        )
        .unwrap_err();
        assert!(matches!(e, BenchError::Connect { .. }), "{e}");
        assert_eq!(e.exit_code(), 1);

        let url = fake_gateway();
        let missing = dir.path().join("missing");
        let e = run(&cfg, &args(Some(url.clone()), Some(missing))).unwrap_err();
        assert!(matches!(e, BenchError::TokenFile { .. }), "{e}");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "good-1\nhas space\n").unwrap();
        let e = run(&cfg, &args(Some(url.clone()), Some(bad))).unwrap_err();
        assert!(matches!(e, BenchError::BadToken { line: 2, .. }), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing\n\n").unwrap();
        let e = run(&cfg, &args(Some(url.clone()), Some(empty))).unwrap_err();
        assert!(e.to_string().contains("holds no token"), "{e}");
        let one = dir.path().join("one");
        std::fs::write(&one, "good-1\n").unwrap();
        let mut more = args(Some(url), Some(one));
        more.devices = Some(2);
        assert!(matches!(
            run(&cfg, &more),
            Err(BenchError::TooFewTokens { .. })
        ));
        let mut zero = args(None, None);
        zero.messages = 0;
        assert!(matches!(
            run(&cfg, &zero),
            Err(BenchError::OutOfRange { .. })
        ));
    }

    #[test]
    fn self_registration_reuses_existing_bench_devices() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path(), None);
        let mut a = args(Some(fake_gateway()), None);
        a.devices = Some(3);
        for _ in 0..2 {
            // No daemon answers the admin socket: the devices are registered
            // (or their tokens rotated), then the reload fails clearly.
            let e = run(&cfg, &a).unwrap_err();
            assert!(
                matches!(e, BenchError::Reload(AdminError::NotRunning { .. })),
                "{e}"
            );
        }
        let names: Vec<String> = RegistryDb::open(&cfg.state_db_path())
            .unwrap()
            .list()
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["bench-0", "bench-1", "bench-2"]);
    }
}
