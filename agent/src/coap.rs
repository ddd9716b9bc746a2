//! The CoAP device listener (`[listeners.coap]`, RFC 7252 over UDP) with
//! the ThingsBoard device API under `/api/v1/{token}/…`.
//!
//! One task owns the socket and all exchange state: the message layer
//! ([`exchange::MessageLayer`]: deduplication over EXCHANGE_LIFETIME,
//! retransmission of our CONs), Block1 reassembly ([`block`]), Observe
//! registrations ([`Observers`]) and the commits in flight. Messages are
//! encoded and decoded with coap-lite's `Packet`.
//!
//! Resources (token in the path; the device is the token's):
//! - `POST telemetry`, `POST attributes`: JSON (content-format 50, also
//!   when none is given) or, for telemetry, SenML JSON (110); anything else
//!   4.15. Answered 2.04 after the durable commit: piggybacked on the ACK
//!   of a CON, as a NON to a NON; when a commit takes longer than
//!   `separate_after`, an empty ACK goes first and 2.04 follows as a
//!   separate CON (retransmitted until acknowledged). Bodies larger than one
//!   datagram arrive with Block1 (2.31 Continue per block; 4.13 with Size1
//!   past `max_body`; 4.08 on a gap). A duplicate (same endpoint and message
//!   id within EXCHANGE_LIFETIME) gets the same answer and stores nothing.
//! - `GET attributes?clientKeys=a,b&sharedKeys=c` (also `client_keys` /
//!   `shared_keys`): `{"client":{…},"shared":{…}}`.
//! - `GET attributes/updates` and `GET rpc` with Observe (RFC 7641):
//!   registration (Observe 0) answers with the current shared attributes /
//!   an empty body; every change or command is a CON notification with the
//!   next sequence number; a notification the device resets or never
//!   acknowledges ends its registration, as does Observe 1. Commands arrive
//!   as `{"id":N,"method":…,"params":…}`; the device answers with
//!   `POST rpc/{N}`.
//! - `POST rpc`: client-side RPC (`getCurrentTime`, `getSessionLimits`).
//! - `GET firmware?title=T&version=V[&size=S&chunk=K]`: the image staged
//!   for this device, Block2 by offset from the file (the client's block
//!   size honoured up to 1024, `block_size` otherwise; Size2 given).
//!
//! Refusals: unknown token 4.01 (counted; failures per source address
//! throttled: 4.29 with Max-Age while over `auth_fail_limit`); bad payload
//! 4.00 with the reason as text; unknown path 4.04; wrong method 4.05; an
//! unrecognised critical option 4.02; outbox full (`reject`) 5.03 with
//! Max-Age; over a rate limit 4.29 with Max-Age. Malformed datagrams: a CON
//! whose header is readable gets RST, anything else is dropped; all counted.
//!
//! Plain CoAP has no transport security: the token travels in clear. Use it
//! on trusted networks only, or coaps ([`serve_dtls`], [`crate::coaps`]):
//! the same resources behind a DTLS session that names the device.

pub mod block;
pub mod exchange;

use crate::downlink::{DeviceChannel, Router};
use crate::mqtt::PushError;
use crate::mqtt::session::{Push, Subscriptions};
use crate::registry::Registry;
use crate::stats::{IngestResult, IngestStats, Protocol};
use crate::tbjson;
use crate::throttle::AuthThrottle;
use block::{Block, Block1Assembler, Block1Error, Block1Step};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use exchange::{Duplicate, ExchangeKey, MessageLayer, Unacked};
use serde::Serialize;
use serde_json::{Value as Json, json};
use sluice_cloud_sync::{AppendError, Clock, DeviceName, Outbox, PendingAppend, Record};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest datagram read.
const MAX_DATAGRAM: usize = 65_535;
/// How often timers (separate responses, retransmissions) are checked.
const TICK: Duration = Duration::from_millis(50);
/// Max-Age on 5.03 when the outbox is full, seconds.
const FULL_MAX_AGE: u32 = 5;
/// Observe registrations per device.
const MAX_OBSERVERS_PER_DEVICE: usize = 8;
/// Block1 bodies assembled at once.
const MAX_ASSEMBLIES: usize = 1024;
/// Pushes queued for the listener task.
const PUSH_QUEUE: usize = 1024;
/// Datagrams read per wake-up before the requests' records are submitted
/// together (one outbox command per stream) and the loop yields.
const RECV_BATCH: usize = 64;
/// First path segments after `/api/v1/` that name a resource (on a DTLS
/// session the token may be left out).
const RESOURCES: [&str; 4] = ["telemetry", "attributes", "rpc", "firmware"];
/// CoAP content formats.
const CF_TEXT: u32 = 0;
const CF_OCTETS: u32 = 42;
const CF_JSON: u32 = 50;
const CF_SENML_JSON: u32 = 110;

/// What the listener shares.
pub struct CoapContext {
    /// Device registry.
    pub registry: Arc<Registry>,
    /// The outbox.
    pub outbox: Outbox,
    /// Rules between decoding and the outbox.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// Ingest counters.
    pub stats: Arc<IngestStats>,
    /// The gateway clock.
    pub clock: Arc<Clock>,
    /// Attributes, commands, firmware.
    pub router: Arc<Router>,
    /// Observe registrations (a delivery channel of the router).
    pub observers: Arc<Observers>,
    /// Failed-authentication throttle.
    pub throttle: Arc<AuthThrottle>,
    /// The listener's settings.
    pub config: crate::config::CoapListenerConfig,
    /// CoAP-specific counters.
    pub counters: Arc<CoapStats>,
}

/// CoAP-specific counters (in `sluice status`).
#[derive(Debug, Default, Serialize)]
pub struct CoapStats {
    /// Datagrams that were not CoAP requests we could parse.
    pub malformed: AtomicU64,
    /// Duplicate requests answered from the cache (or ignored in progress).
    pub duplicates: AtomicU64,
    /// Dedup entries evicted before EXCHANGE_LIFETIME.
    pub early_evictions: AtomicU64,
    /// Separate responses (commit slower than `separate_after`).
    pub separate_responses: AtomicU64,
    /// Our CONs retransmitted.
    pub retransmissions: AtomicU64,
    /// Our CONs never acknowledged (the observer is dropped).
    pub timeouts: AtomicU64,
    /// RSTs received.
    pub resets: AtomicU64,
    /// Observe notifications sent.
    pub notifications: AtomicU64,
    /// Requests refused by a rate limit.
    pub rate_limited: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    AttributeUpdates,
    Rpc,
}

#[derive(Debug, Clone)]
struct Observer {
    peer: SocketAddr,
    token: Vec<u8>,
    resource: Resource,
    seq: u32,
}

/// Observe registrations by device; the router's CoAP delivery channel.
#[derive(Default)]
pub struct Observers {
    by_device: Mutex<HashMap<DeviceName, Vec<Observer>>>,
    tx: Mutex<Option<mpsc::Sender<(DeviceName, Push)>>>,
}

impl Observers {
    /// Devices with at least one registration.
    pub fn devices(&self) -> usize {
        self.by_device.lock().map_or(0, |g| g.len())
    }

    /// Registrations in all.
    pub fn count(&self) -> usize {
        self.by_device
            .lock()
            .map_or(0, |g| g.values().map(Vec::len).sum())
    }

    fn attach(&self, tx: mpsc::Sender<(DeviceName, Push)>) {
        if let Ok(mut g) = self.tx.lock() {
            *g = Some(tx);
        }
    }

    /// Registers (or renews) `peer`/`token` for `resource`; returns the
    /// sequence number for the registration response.
    fn register(
        &self,
        device: &DeviceName,
        peer: SocketAddr,
        token: &[u8],
        resource: Resource,
    ) -> u32 {
        let Ok(mut g) = self.by_device.lock() else {
            return 0;
        };
        let list = g.entry(device.clone()).or_default();
        if let Some(o) = list.iter_mut().find(|o| o.peer == peer && o.token == token) {
            o.resource = resource;
            o.seq = (o.seq + 1) & 0xFF_FFFF;
            return o.seq;
        }
        if list.len() >= MAX_OBSERVERS_PER_DEVICE {
            list.remove(0);
        }
        list.push(Observer {
            peer,
            token: token.to_vec(),
            resource,
            seq: 0,
        });
        0
    }

    /// Drops every registration of `peer` (its DTLS session ended: the
    /// next session is a new endpoint and must register again).
    fn forget_peer(&self, peer: SocketAddr) {
        if let Ok(mut g) = self.by_device.lock() {
            g.retain(|_, list| {
                list.retain(|o| o.peer != peer);
                !list.is_empty()
            });
        }
    }

    fn deregister(&self, device: &DeviceName, peer: SocketAddr, token: &[u8]) {
        if let Ok(mut g) = self.by_device.lock()
            && let Some(list) = g.get_mut(device)
        {
            list.retain(|o| !(o.peer == peer && o.token == token));
            if list.is_empty() {
                g.remove(device);
            }
        }
    }

    /// The observers of `device` for `resource`, each with its next
    /// sequence number (taken).
    fn next_for(&self, device: &DeviceName, resource: Resource) -> Vec<Observer> {
        let Ok(mut g) = self.by_device.lock() else {
            return Vec::new();
        };
        let Some(list) = g.get_mut(device) else {
            return Vec::new();
        };
        list.iter_mut()
            .filter(|o| o.resource == resource)
            .map(|o| {
                o.seq = (o.seq + 1) & 0xFF_FFFF;
                o.clone()
            })
            .collect()
    }
}

impl DeviceChannel for Observers {
    fn subscriptions(&self, device: &DeviceName) -> Option<Subscriptions> {
        let g = self.by_device.lock().ok()?;
        let list = g.get(device)?;
        Some(Subscriptions {
            attributes: list
                .iter()
                .any(|o| o.resource == Resource::AttributeUpdates),
            rpc: list.iter().any(|o| o.resource == Resource::Rpc),
        })
    }

    fn push(&self, device: &DeviceName, push: Push) -> Result<(), PushError> {
        if self.subscriptions(device).is_none() {
            return Err(PushError::NoSession);
        }
        let tx = self
            .tx
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .ok_or(PushError::NoSession)?;
        tx.try_send((device.clone(), push))
            .map_err(|_| PushError::NotReading)
    }
}

/// Tags of our confirmable messages.
#[derive(Debug)]
enum Tag {
    Separate,
    Notify {
        device: DeviceName,
        peer: SocketAddr,
        token: Vec<u8>,
    },
}

/// A token bucket (requests per second, burst = one second's worth).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token; `Err(seconds until one is there)` when empty.
    fn take(&mut self, rate: f64, now: Instant) -> Result<(), u32> {
        let burst = rate.max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / rate).ceil().max(1.0) as u32)
        }
    }
}

/// A request as the resources see it.
struct Request {
    peer: SocketAddr,
    key: ExchangeKey,
    con: bool,
    method: RequestType,
    token: Vec<u8>,
    path: Vec<String>,
    query: Vec<(String, String)>,
    content_format: Option<u32>,
    observe: Option<u32>,
    block1: Option<Block>,
    block2: Option<Block>,
    payload: Vec<u8>,
    /// The device a DTLS session authenticated (coaps); `None` on plain CoAP.
    session_device: Option<DeviceName>,
}

impl Request {
    fn query(&self, names: &[&str]) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer, before it is framed for the request's message type.
struct Answer {
    code: ResponseType,
    options: Vec<(CoapOption, Vec<u8>)>,
    payload: Vec<u8>,
}

impl Answer {
    fn new(code: ResponseType) -> Self {
        Self {
            code,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }
    fn text(code: ResponseType, text: &str) -> Self {
        let mut a = Self::new(code);
        a.options.push((CoapOption::ContentFormat, uint(CF_TEXT)));
        a.payload = text.as_bytes().to_vec();
        a
    }
    fn json(code: ResponseType, body: &Json) -> Self {
        let mut a = Self::new(code);
        a.options.push((CoapOption::ContentFormat, uint(CF_JSON)));
        a.payload = body.to_string().into_bytes();
        a
    }
    fn with(mut self, option: CoapOption, value: Vec<u8>) -> Self {
        self.options.push((option, value));
        self
    }
}

/// Minimal big-endian unsigned option value (0 = empty).
fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

fn read_uint(v: &[u8]) -> Option<u32> {
    (v.len() <= 4).then(|| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

/// Options we understand; an unknown critical (odd) option gets 4.02.
fn known_option(n: u16) -> bool {
    matches!(
        n,
        3 | 4 | 6 | 7 | 11 | 12 | 14 | 15 | 17 | 23 | 27 | 28 | 60 | 258
    )
}

/// What a new in-flight commit answers with when it lands.
struct Waiting {
    req_peer: SocketAddr,
    key: ExchangeKey,
    con: bool,
    token: Vec<u8>,
    started: Instant,
    empty_acked: bool,
    records: usize,
    block1: Option<Block>,
    /// The commit awaited; `None`: the same commit as the request before
    /// it in `waiting` (requests read in one batch share one append).
    pending: Option<Result<PendingAppend, AppendError>>,
}

/// The copy of a commit's result for the other requests that shared it.
fn shared_result(r: &Result<(), AppendError>) -> Result<(), AppendError> {
    match r {
        Ok(()) => Ok(()),
        Err(AppendError::Full) => Err(AppendError::Full),
        Err(AppendError::Closed) => Err(AppendError::Closed),
        Err(e) => Err(AppendError::Storage(e.to_string())),
    }
}

/// Receive buffer asked for the listener's socket, bytes. Every device's
/// request waits there while the task is busy; the default (≈ 208 KiB on
/// Linux, ≈ 1 000 small datagrams counting the kernel's overhead) drops
/// bursts of a thousand devices, and each drop costs its device an
/// ACK_TIMEOUT (2–3 s). The kernel caps it at `net.core.rmem_max`.
pub const RECV_BUFFER_BYTES: usize = 4 << 20;

/// Asks for a [`RECV_BUFFER_BYTES`] receive buffer on the listener's socket
/// (the kernel may give less); returns the size it got.
///
/// Fails when the socket cannot be handed between tokio and socket2.
pub fn enlarge_receive_buffer(sock: UdpSocket) -> std::io::Result<(UdpSocket, usize)> {
    let s = socket2::Socket::from(sock.into_std()?);
    if let Err(e) = s.set_recv_buffer_size(RECV_BUFFER_BYTES) {
        tracing::warn!(error = %e, "cannot enlarge the CoAP socket's receive buffer");
    }
    let got = s.recv_buffer_size().unwrap_or(0);
    Ok((UdpSocket::from_std(s.into())?, got))
}

/// Runs the listener on `sock` until `cancel`, then answers the commits in
/// flight and returns.
pub async fn serve(sock: UdpSocket, ctx: Arc<CoapContext>, cancel: CancellationToken) {
    run(sock, ctx, None, cancel).await;
}

/// Runs the coaps listener (`[listeners.coaps]`) on `sock` until `cancel`:
/// datagrams go through the DTLS session layer `dtls`, the CoAP inside them
/// through the same resources as plain CoAP, attributed to the device the
/// session authenticated. Registry changes close the sessions of devices
/// that were revoked or got a new key; shutdown sends close_notify.
pub async fn serve_dtls(
    sock: UdpSocket,
    ctx: Arc<CoapContext>,
    dtls: Arc<crate::coaps::DtlsSide>,
    cancel: CancellationToken,
) {
    run(sock, ctx, Some(dtls), cancel).await;
}

/// The listener loop of both: one task, one socket.
async fn run(
    sock: UdpSocket,
    ctx: Arc<CoapContext>,
    dtls: Option<Arc<crate::coaps::DtlsSide>>,
    cancel: CancellationToken,
) {
    let (tx, mut pushes) = mpsc::channel(PUSH_QUEUE);
    ctx.observers.attach(tx);
    let mut registry_changes = ctx.registry.subscribe();
    let transport = match &dtls {
        None => Transport::Plain(&sock),
        Some(d) => Transport::Dtls {
            sock: &sock,
            sessions: &d.table,
            stats: &d.stats,
        },
    };
    let mut server = Server::new(transport, &ctx);
    let authorize = |id: &[u8]| crate::coaps::authorize(&ctx.registry, id);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    let mut deliveries = Vec::new();
    loop {
        if draining && server.waiting.is_empty() {
            break;
        }
        let separate_at = server.next_separate();
        tokio::select! {
            r = sock.recv_from(&mut buf), if !draining => {
                match &dtls {
                    None => {
                        match r {
                            Ok((n, peer)) => server.datagram(&buf[..n], peer, None).await,
                            Err(e) => tracing::debug!(error = %e, "CoAP receive failed"),
                        }
                        // Whatever else has arrived, up to a batch, then one
                        // submit per stream for all of it.
                        for _ in 1..RECV_BATCH {
                            match sock.try_recv_from(&mut buf) {
                                Ok((n, peer)) => server.datagram(&buf[..n], peer, None).await,
                                Err(_) => break,
                            }
                        }
                    }
                    Some(d) => {
                        // Decrypt the batch under the table's lock, then
                        // serve the CoAP inside without it.
                        let now = Instant::now();
                        let (out, ended) = {
                            let Ok(mut t) = d.table.lock() else { break };
                            if let Ok((n, peer)) = r {
                                t.datagram(now, peer, &buf[..n], &authorize, &mut deliveries);
                            }
                            for _ in 1..RECV_BATCH {
                                match sock.try_recv_from(&mut buf) {
                                    Ok((n, peer)) => {
                                        t.datagram(now, peer, &buf[..n], &authorize, &mut deliveries);
                                    }
                                    Err(_) => break,
                                }
                            }
                            (crate::coaps::drain(&mut t), t.take_ended())
                        };
                        for peer in ended {
                            ctx.observers.forget_peer(peer);
                        }
                        crate::coaps::send_all(&sock, out).await;
                        for m in deliveries.drain(..) {
                            server.datagram(&m.data, m.peer, Some(m.device)).await;
                        }
                    }
                }
                server.flush().await;
            },
            result = front_commit(&mut server.waiting) => server.settle(result).await,
            Some((device, push)) = pushes.recv() => server.notify(&device, push).await,
            changed = registry_changes.changed(), if dtls.is_some() => {
                let Some(d) = &dtls else { continue };
                if changed.is_err() {
                    // The registry is gone: the daemon is stopping.
                    draining = true;
                    continue;
                }
                let (out, gone) = {
                    let Ok(mut t) = d.table.lock() else { break };
                    let gone = t.recheck(&authorize);
                    drop(t.take_ended());
                    (crate::coaps::drain(&mut t), gone)
                };
                for (peer, device) in gone {
                    ctx.observers.forget_peer(peer);
                    tracing::info!(%peer, %device, "coaps session closed: device revoked or its key changed");
                }
                crate::coaps::send_all(&sock, out).await;
            },
            _ = tick.tick() => {
                if let Some(d) = &dtls {
                    let (out, ended) = {
                        let Ok(mut t) = d.table.lock() else { break };
                        t.tick(Instant::now());
                        (crate::coaps::drain(&mut t), t.take_ended())
                    };
                    for peer in ended {
                        ctx.observers.forget_peer(peer);
                    }
                    crate::coaps::send_all(&sock, out).await;
                }
                server.tick().await;
            },
            () = sleep_until_opt(separate_at) => server.tick().await,
            () = cancel.cancelled(), if !draining => draining = true,
        }
    }
    if let Some(d) = &dtls {
        let out = match d.table.lock() {
            Ok(mut t) => {
                t.close_all();
                crate::coaps::drain(&mut t)
            }
            Err(_) => Vec::new(),
        };
        crate::coaps::send_all(&sock, out).await;
    }
}

impl<'a> Server<'a> {
    fn new(transport: Transport<'a>, ctx: &'a CoapContext) -> Self {
        let mut first_mid = [0u8; 2];
        let _ = getrandom::fill(&mut first_mid);
        Server {
            transport,
            ctx,
            layer: MessageLayer::new(
                ctx.config.dedup_per_endpoint,
                ctx.config.dedup_max,
                u16::from_be_bytes(first_mid),
            ),
            blocks: Block1Assembler::new(
                ctx.config.max_body,
                MAX_ASSEMBLIES,
                exchange::EXCHANGE_LIFETIME,
            ),
            waiting: VecDeque::new(),
            staged: Vec::new(),
            device_buckets: HashMap::new(),
            global_bucket: Bucket {
                tokens: ctx.config.rate_limit_global.max(1.0),
                at: Instant::now(),
            },
            jitter_state: u64::from(u16::from_be_bytes(first_mid)) | 1,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// The result of the oldest commit in flight; never resolves when none is.
async fn front_commit(waiting: &mut VecDeque<Waiting>) -> Result<(), AppendError> {
    match waiting.front_mut() {
        None => std::future::pending().await,
        Some(w) => match &mut w.pending {
            Some(Ok(p)) => p.await.map(|_| ()),
            Some(Err(_)) | None => Err(AppendError::Closed),
        },
    }
}

/// What a datagram is, before any state is consulted.
enum Datagram {
    /// Not CoAP we can read; `reset` = the message id of a CON to RST.
    Malformed { why: String, reset: Option<u16> },
    /// ACK of one of our CONs.
    Ack(u16),
    /// RST of one of our CONs.
    Reset(u16),
    /// An empty CON (CoAP ping).
    Ping(u16),
    /// Nothing to do (an empty NON).
    Ignore,
    /// A request, with the first unrecognised critical option if any.
    Request(Box<Request>, Option<u16>),
}

/// Parses one datagram from `peer` (no I/O, no state: the fuzz target's
/// entry as well).
fn classify(bytes: &[u8], peer: SocketAddr) -> Datagram {
    let con_mid = (bytes.len() >= 4 && bytes[0] >> 6 == 1 && (bytes[0] >> 4) & 0x3 == 0)
        .then(|| u16::from_be_bytes([bytes[2], bytes[3]]));
    let packet = match Packet::from_bytes(bytes) {
        Ok(p) => p,
        // A CON whose header we can read is rejected with RST (RFC 7252
        // §4.2); anything else is dropped silently.
        Err(e) => {
            return Datagram::Malformed {
                why: e.to_string(),
                reset: con_mid,
            };
        }
    };
    if packet.header.get_version() != 1 {
        return Datagram::Malformed {
            why: "version is not 1".into(),
            reset: None,
        };
    }
    let mid = packet.header.message_id;
    let mtype = packet.header.get_type();
    let method = match (mtype, packet.header.code) {
        (MessageType::Acknowledgement, _) => return Datagram::Ack(mid),
        (MessageType::Reset, _) => return Datagram::Reset(mid),
        (MessageType::Confirmable, MessageClass::Empty) => return Datagram::Ping(mid),
        (MessageType::NonConfirmable, MessageClass::Empty) => return Datagram::Ignore,
        (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(m))
            if m != RequestType::UnKnown =>
        {
            m
        }
        (MessageType::Confirmable, _) => {
            return Datagram::Malformed {
                why: "a CON that is neither a request nor empty".into(),
                reset: Some(mid),
            };
        }
        _ => {
            return Datagram::Malformed {
                why: "a NON that is not a request".into(),
                reset: None,
            };
        }
    };
    let mut req = Request {
        peer,
        key: (peer, mid),
        con: mtype == MessageType::Confirmable,
        method,
        token: packet.get_token().to_vec(),
        path: Vec::new(),
        query: Vec::new(),
        content_format: None,
        observe: None,
        block1: None,
        block2: None,
        payload: Vec::new(),
        session_device: None,
    };
    let mut bad_option = None;
    for (num, values) in packet.options() {
        if !known_option(*num) && num % 2 == 1 && bad_option.is_none() {
            bad_option = Some(*num);
        }
        for v in values {
            match CoapOption::from(*num) {
                CoapOption::UriPath => req.path.push(String::from_utf8_lossy(v).into_owned()),
                CoapOption::UriQuery => {
                    let q = String::from_utf8_lossy(v);
                    let (k, val) = q.split_once('=').unwrap_or((&q, ""));
                    req.query.push((k.to_owned(), val.to_owned()));
                }
                CoapOption::ContentFormat => req.content_format = read_uint(v),
                CoapOption::Observe => req.observe = read_uint(v),
                CoapOption::Block1 => req.block1 = Block::decode(v),
                CoapOption::Block2 => req.block2 = Block::decode(v),
                _ => {}
            }
        }
    }
    req.payload = packet.payload;
    Datagram::Request(Box::new(req), bad_option)
}

/// Entry point of the `coap_datagram` cargo-fuzz target: `data` goes
/// through [`classify`], and a request's Block1 option and body through
/// the reassembler and the message layer, as the listener does. Panics
/// only on a bug.
#[doc(hidden)]
pub fn fuzz_datagram(data: &[u8]) {
    let peer = SocketAddr::from(([127, 0, 0, 1], 5683));
    let now = Instant::now();
    let mut layer: MessageLayer<()> = MessageLayer::new(4, 16, 0);
    let mut blocks = Block1Assembler::new(1024, 4, Duration::from_secs(60));
    if let Datagram::Request(req, _) = classify(data, peer) {
        let _ = layer.check(req.key, now);
        layer.answered(req.key, &req.payload);
        let _ = layer.check(req.key, now);
        if let Some(b) = req.block1 {
            let _ = blocks.take(peer, &req.path.join("/"), b, &req.payload, now);
        }
        if let Some(b) = req.block2 {
            let _ =
                block::block2_range(u64::try_from(req.payload.len()).unwrap_or(0), b.num, b.szx);
        }
        let answer = Answer::text(
            ResponseType::Content,
            &String::from_utf8_lossy(&req.payload),
        );
        let bytes = frame(MessageType::Acknowledgement, req.key.1, &req.token, answer);
        assert!(
            Packet::from_bytes(&bytes).is_ok(),
            "our own answer must parse"
        );
    }
}

/// Where the listener's datagrams go: straight to the socket, or through
/// the peer's DTLS session.
enum Transport<'a> {
    Plain(&'a UdpSocket),
    Dtls {
        sock: &'a UdpSocket,
        sessions: &'a Mutex<crate::coaps::Table>,
        stats: &'a crate::coaps::sessions::DtlsStats,
    },
}

struct Server<'a> {
    transport: Transport<'a>,
    ctx: &'a CoapContext,
    layer: MessageLayer<Tag>,
    blocks: Block1Assembler,
    waiting: VecDeque<Waiting>,
    /// Requests read in this batch, by stream, not yet submitted.
    staged: Vec<(&'static str, Vec<Record>, Vec<Waiting>)>,
    device_buckets: HashMap<DeviceName, Bucket>,
    global_bucket: Bucket,
    jitter_state: u64,
}

impl Server<'_> {
    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        match &self.transport {
            Transport::Plain(sock) => {
                if let Err(e) = sock.send_to(bytes, peer).await {
                    tracing::debug!(%peer, error = %e, "CoAP send failed");
                }
            }
            Transport::Dtls {
                sock,
                sessions,
                stats,
            } => {
                let out = {
                    let Ok(mut t) = sessions.lock() else { return };
                    if let Err(e) = t.write(peer, bytes) {
                        if e == crate::coaps::DtlsError::TooLarge {
                            stats.too_large.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(%peer, error = %e, "coaps answer not sent");
                    }
                    crate::coaps::drain(&mut t)
                };
                crate::coaps::send_all(sock, out).await;
            }
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift: spreads retransmission timers; not for secrets.
        let mut x = self.jitter_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_state = x;
        (x % 1000) as f64 / 1000.0
    }

    fn malformed(&self, why: &str, peer: SocketAddr) {
        self.ctx.counters.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, why, "malformed CoAP datagram");
    }

    /// One datagram from `peer` (`device`: the one its DTLS session
    /// authenticated).
    async fn datagram(&mut self, bytes: &[u8], peer: SocketAddr, device: Option<DeviceName>) {
        match classify(bytes, peer) {
            Datagram::Malformed { why, reset } => {
                self.malformed(&why, peer);
                if let Some(mid) = reset {
                    self.send(&empty(MessageType::Reset, mid), peer).await;
                }
            }
            Datagram::Ack(mid) => {
                // Acknowledges one of our CONs (notification or separate
                // response); nothing else to do.
                let _ = self.layer.acked(peer, mid);
            }
            Datagram::Reset(mid) => {
                self.ctx.counters.resets.fetch_add(1, Ordering::Relaxed);
                if let Some(Unacked::Reset(Tag::Notify {
                    device,
                    peer,
                    token,
                })) = self.layer.reset(peer, mid)
                {
                    self.ctx.observers.deregister(&device, peer, &token);
                }
            }
            // CoAP ping: RST.
            Datagram::Ping(mid) => self.send(&empty(MessageType::Reset, mid), peer).await,
            Datagram::Ignore => {}
            Datagram::Request(mut req, bad_option) => {
                req.session_device = device;
                self.request(*req, bad_option).await;
            }
        }
    }

    async fn request(&mut self, mut req: Request, bad_option: Option<u16>) {
        let now = Instant::now();
        let (peer, key) = (req.peer, req.key);
        // GET is safe and idempotent: a duplicate is simply served again
        // (RFC 7252 §4.5), which keeps large answers out of the cache.
        if req.method != RequestType::Get {
            match self.layer.check(key, now) {
                Duplicate::New => {}
                Duplicate::InProgress | Duplicate::Forgotten => {
                    self.count_layer();
                    return;
                }
                Duplicate::ResendEmptyAck => {
                    self.count_layer();
                    return self
                        .send(&empty(MessageType::Acknowledgement, key.1), peer)
                        .await;
                }
                Duplicate::Resend(bytes) => {
                    self.count_layer();
                    return self.send(&bytes, peer).await;
                }
            }
        }
        let answer = if let Some(n) = bad_option {
            Some(Answer::text(
                ResponseType::BadOption,
                &format!("unsupported critical option {n}"),
            ))
        } else {
            self.route(&mut req, now).await
        };
        if let Some(a) = answer {
            self.answer(&req, a).await;
        }
    }

    /// Frames and sends `answer` to `req` (piggybacked on the ACK of a CON,
    /// or as a NON), remembering it for duplicates.
    async fn answer(&mut self, req: &Request, answer: Answer) {
        let (mtype, mid) = if req.con {
            (MessageType::Acknowledgement, req.key.1)
        } else {
            (MessageType::NonConfirmable, self.layer.next_message_id())
        };
        let bytes = frame(mtype, mid, &req.token, answer);
        if req.method != RequestType::Get {
            self.layer.answered(req.key, &bytes);
        }
        self.send(&bytes, req.peer).await;
    }

    fn count_layer(&self) {
        let s = self.layer.stats;
        let c = &self.ctx.counters;
        c.duplicates.store(s.duplicates, Ordering::Relaxed);
        c.early_evictions
            .store(s.early_evictions, Ordering::Relaxed);
        c.retransmissions
            .store(s.retransmissions, Ordering::Relaxed);
        c.timeouts.store(s.timeouts, Ordering::Relaxed);
    }

    fn count(&self, r: IngestResult) {
        self.ctx.stats.count(Protocol::Coap, r);
    }

    /// The device and resource path of a request on a DTLS session: the
    /// session's device; `/api/v1/{resource}` or, with a token,
    /// `/api/v1/{token}/{resource}` when the token is that device's.
    fn session_path(
        &self,
        req: &Request,
        device: DeviceName,
    ) -> Result<(DeviceName, Vec<String>), Answer> {
        let segs: Vec<&str> = req.path.iter().map(String::as_str).collect();
        match segs.as_slice() {
            ["api", "v1", first, ..] if RESOURCES.contains(first) => {
                Ok((device, req.path[2..].to_vec()))
            }
            ["api", "v1", token, rest @ ..] if !rest.is_empty() => {
                if self.ctx.registry.authenticate(token).as_ref() == Some(&device) {
                    Ok((device, req.path[3..].to_vec()))
                } else {
                    self.count(IngestResult::Unauthorized);
                    Err(Answer::text(
                        ResponseType::Forbidden,
                        "the token in the path is not the DTLS session's device",
                    ))
                }
            }
            _ => Err(Answer::text(ResponseType::NotFound, "no such resource")),
        }
    }

    /// The device and resource path of a plain CoAP request: the token in
    /// `/api/v1/{token}/…` names the device.
    fn token_path(&self, req: &Request, now: Instant) -> Result<(DeviceName, Vec<String>), Answer> {
        let segs: Vec<&str> = req.path.iter().map(String::as_str).collect();
        let (token, rest) = match segs.as_slice() {
            ["api", "v1", token, rest @ ..] if !rest.is_empty() => {
                ((*token).to_owned(), rest.to_vec())
            }
            _ => return Err(Answer::text(ResponseType::NotFound, "no such resource")),
        };
        let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
        let ip = req.peer.ip();
        if !self.ctx.throttle.allowed(ip, now) {
            self.count(IngestResult::Unauthorized);
            return Err(Answer::text(
                ResponseType::TooManyRequests,
                "too many failed authentications from this address",
            )
            .with(
                CoapOption::MaxAge,
                uint(
                    self.ctx
                        .config
                        .auth_fail_window
                        .as_secs()
                        .try_into()
                        .unwrap_or(u32::MAX),
                ),
            ));
        }
        let Some(device) = self.ctx.registry.authenticate(&token) else {
            self.count(IngestResult::Unauthorized);
            self.ctx.throttle.failed(ip, now);
            return Err(Answer::text(
                ResponseType::Unauthorized,
                "unknown or revoked access token",
            ));
        };
        Ok((device, rest))
    }

    /// Routes a request; `None` when the answer comes later (a commit).
    async fn route(&mut self, req: &mut Request, now: Instant) -> Option<Answer> {
        let (device, rest) = match req.session_device.clone() {
            Some(device) => match self.session_path(req, device) {
                Ok(x) => x,
                Err(answer) => return Some(answer),
            },
            None => match self.token_path(req, now) {
                Ok(x) => x,
                Err(answer) => return Some(answer),
            },
        };
        if let Some(wait) = self.rate_limited(&device, now) {
            self.ctx
                .counters
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            self.count(IngestResult::Rejected);
            return Some(
                Answer::text(ResponseType::TooManyRequests, "rate limit")
                    .with(CoapOption::MaxAge, uint(wait)),
            );
        }
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        match (req.method, rest.as_slice()) {
            (RequestType::Post, ["telemetry"]) => self.ingest(req, &device, "telemetry", now).await,
            (RequestType::Post, ["attributes"]) => {
                self.ingest(req, &device, "attributes", now).await
            }
            (RequestType::Get, ["attributes"]) => {
                let keys = |names: &[&str]| {
                    req.query(names).map(|v| {
                        v.split(',')
                            .map(str::trim)
                            .filter(|k| !k.is_empty())
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                    })
                };
                let client = keys(&["clientKeys", "client_keys"]);
                let shared = keys(&["sharedKeys", "shared_keys"]);
                let body = self.ctx.router.attributes().request(
                    &device,
                    client.as_deref(),
                    shared.as_deref(),
                );
                Some(Answer::json(ResponseType::Content, &body))
            }
            (RequestType::Get, ["attributes", "updates"]) => {
                let all = self.ctx.router.attributes().request(&device, None, None);
                let body = all.get("shared").cloned().unwrap_or_else(|| json!({}));
                Some(self.observe(
                    req,
                    &device,
                    Resource::AttributeUpdates,
                    Answer::json(ResponseType::Content, &body),
                ))
            }
            (RequestType::Get, ["rpc"]) => Some(self.observe(
                req,
                &device,
                Resource::Rpc,
                Answer::new(ResponseType::Content),
            )),
            (RequestType::Post, ["rpc"]) => Some(self.client_rpc(req)),
            (RequestType::Post, ["rpc", id]) => {
                let routed = id
                    .parse::<u32>()
                    .is_ok_and(|id| self.ctx.router.device_reply(&device, id, &req.payload));
                Some(if routed {
                    Answer::new(ResponseType::Changed)
                } else {
                    Answer::text(ResponseType::NotFound, "no pending command with that id")
                })
            }
            (RequestType::Get, ["firmware"]) => Some(self.firmware(req, &device)),
            (_, ["telemetry" | "attributes" | "rpc" | "firmware"])
            | (_, ["attributes", "updates"])
            | (_, ["rpc", _]) => Some(Answer::text(
                ResponseType::MethodNotAllowed,
                "method not allowed on this resource",
            )),
            _ => Some(Answer::text(ResponseType::NotFound, "no such resource")),
        }
    }

    fn rate_limited(&mut self, device: &DeviceName, now: Instant) -> Option<u32> {
        let (per_device, global) = (
            self.ctx.config.rate_limit_per_device,
            self.ctx.config.rate_limit_global,
        );
        if global > 0.0
            && let Err(wait) = self.global_bucket.take(global, now)
        {
            return Some(wait);
        }
        if per_device > 0.0 {
            if self.device_buckets.len() > 100_000 {
                self.device_buckets.clear();
            }
            let b = self.device_buckets.entry(device.clone()).or_insert(Bucket {
                tokens: per_device.max(1.0),
                at: now,
            });
            if let Err(wait) = b.take(per_device, now) {
                return Some(wait);
            }
        }
        None
    }

    fn observe(
        &mut self,
        req: &Request,
        device: &DeviceName,
        resource: Resource,
        answer: Answer,
    ) -> Answer {
        match req.observe {
            Some(0) => {
                let seq = self
                    .ctx
                    .observers
                    .register(device, req.peer, &req.token, resource);
                answer.with(CoapOption::Observe, uint(seq))
            }
            Some(1) => {
                self.ctx.observers.deregister(device, req.peer, &req.token);
                answer
            }
            _ => answer,
        }
    }

    fn client_rpc(&self, req: &Request) -> Answer {
        let method = serde_json::from_slice::<Json>(&req.payload)
            .ok()
            .and_then(|v| v.get("method").and_then(Json::as_str).map(str::to_owned));
        let body = match method.as_deref() {
            Some("getCurrentTime") => json!({"currentTime": self.ctx.clock.now().wall_ms}),
            Some("getSessionLimits") => json!({
                "maxPayloadSize": self.ctx.config.max_body,
                "maxInflightMessages": 1,
                "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
            }),
            _ => json!({"error": "unsupported method"}),
        };
        Answer::json(ResponseType::Content, &body)
    }

    fn firmware(&self, req: &Request, device: &DeviceName) -> Answer {
        let Some(img) = self.ctx.router.attributes().firmware_for(device) else {
            return Answer::text(
                ResponseType::Forbidden,
                "this device is not targeted by a firmware campaign",
            );
        };
        if req.query(&["title"]).is_some_and(|t| t != img.title)
            || req.query(&["version"]).is_some_and(|v| v != img.version)
        {
            return Answer::text(
                ResponseType::NotFound,
                "that title/version is not staged for this device",
            );
        }
        let chunk_size = req
            .query(&["size"])
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0);
        let chunk = req
            .query(&["chunk"])
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let (base, len) = sluice_firmware::chunk_range(img.size, chunk_size, chunk);
        let default_szx = self.ctx.config.block_szx;
        let max = self.ctx.config.max_block_szx;
        let (num, szx) = match req.block2 {
            // Smaller blocks than asked, at the same offset (RFC 7959 §2.4).
            Some(b) if b.szx.min(6) > max => (b.num << (b.szx.min(6) - max), max),
            Some(b) => (b.num, b.szx.min(6)),
            None => (0, default_szx),
        };
        let Some((off, n, more)) = block::block2_range(len, num, szx) else {
            return Answer::text(
                ResponseType::BadRequest,
                "block number past the end of the image",
            );
        };
        let bytes = match sluice_firmware::read_range(&img.path, base + off, n) {
            Ok(b) => {
                self.ctx
                    .router
                    .stats
                    .firmware_bytes_served
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                b
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a firmware block");
                return Answer::text(ResponseType::InternalServerError, "cannot read the image");
            }
        };
        let mut a =
            Answer::new(ResponseType::Content).with(CoapOption::ContentFormat, uint(CF_OCTETS));
        // A body that fits in one block and was not asked for block-wise
        // goes plain; otherwise Block2 (and Size2 for the whole body).
        if req.block2.is_some() || more || num > 0 {
            a = a
                .with(CoapOption::Block2, Block { num, more, szx }.encode())
                .with(
                    CoapOption::Size2,
                    uint(u32::try_from(len).unwrap_or(u32::MAX)),
                );
        }
        a.payload = bytes;
        a
    }

    /// POST telemetry/attributes: Block1, decode, submit.
    async fn ingest(
        &mut self,
        req: &mut Request,
        device: &DeviceName,
        stream: &'static str,
        now: Instant,
    ) -> Option<Answer> {
        let max = self.ctx.config.max_body;
        let mut final_block1 = None;
        if let Some(b) = req.block1 {
            let path = req.path.join("/");
            match self.blocks.take(req.peer, &path, b, &req.payload, now) {
                Ok(Block1Step::Continue) => {
                    return Some(
                        Answer::new(ResponseType::Continue)
                            .with(CoapOption::Block1, Block { more: true, ..b }.encode()),
                    );
                }
                Ok(Block1Step::Complete(body)) => {
                    req.payload = body;
                    final_block1 = Some(Block { more: false, ..b });
                }
                Err(Block1Error::TooLarge) => {
                    self.count(IngestResult::TooLarge);
                    return Some(
                        Answer::text(
                            ResponseType::RequestEntityTooLarge,
                            "body over listeners.coap.max_body",
                        )
                        .with(
                            CoapOption::Size1,
                            uint(u32::try_from(max).unwrap_or(u32::MAX)),
                        ),
                    );
                }
                Err(Block1Error::Incomplete) => {
                    return Some(Answer::text(
                        ResponseType::RequestEntityIncomplete,
                        "block out of sequence or without block 0",
                    ));
                }
            }
        }
        if req.payload.len() > max {
            self.count(IngestResult::TooLarge);
            return Some(
                Answer::text(
                    ResponseType::RequestEntityTooLarge,
                    "body over listeners.coap.max_body",
                )
                .with(
                    CoapOption::Size1,
                    uint(u32::try_from(max).unwrap_or(u32::MAX)),
                ),
            );
        }
        let stamp = self.ctx.clock.now();
        let decoded: Result<Vec<Record>, tbjson::PayloadError> = match (req.content_format, stream)
        {
            (None | Some(CF_JSON), _) => {
                tbjson::decode(&req.payload, device, stamp.wall_ms, stamp.trusted)
            }
            (Some(CF_SENML_JSON), "telemetry") => {
                crate::senml::decode(&req.payload, device, stamp.wall_ms, stamp.trusted)
            }
            (Some(cf), _) => {
                self.count(IngestResult::BadPayload);
                return Some(Answer::text(
                    ResponseType::UnsupportedContentFormat,
                    &format!(
                        "content-format {cf} is not accepted here (50 JSON{})",
                        if stream == "telemetry" {
                            ", 110 SenML JSON"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        };
        let records = match decoded {
            Ok(r) => r,
            Err(e) => {
                self.count(IngestResult::BadPayload);
                return Some(Answer::text(ResponseType::BadRequest, &e.to_string()));
            }
        };
        if stream == "attributes"
            && let Ok(Json::Object(m)) = serde_json::from_slice::<Json>(&req.payload)
        {
            self.ctx.router.attributes().set_client(device, &m);
        }
        if records.is_empty() {
            self.count(IngestResult::Ok);
            let a = Answer::new(ResponseType::Changed);
            return Some(match final_block1 {
                Some(b) => a.with(CoapOption::Block1, b.encode()),
                None => a,
            });
        }
        let w = Waiting {
            req_peer: req.peer,
            key: req.key,
            con: req.con,
            token: req.token.clone(),
            started: now,
            empty_acked: false,
            records: records.len(),
            block1: final_block1,
            pending: None,
        };
        match self.staged.iter_mut().find(|(s, _, _)| *s == stream) {
            Some((_, staged, requests)) => {
                staged.extend(records);
                requests.push(w);
            }
            None => self.staged.push((stream, records, vec![w])),
        }
        None
    }

    /// Submits the records of the requests read since the last flush: one
    /// outbox command per stream, its requests sharing the commit.
    async fn flush(&mut self) {
        for (stream, records, requests) in std::mem::take(&mut self.staged) {
            let pending = self.ctx.pipeline.submit(stream, records).await;
            if let Err(AppendError::Full) = pending {
                for w in requests {
                    self.committed(w, Err(AppendError::Full)).await;
                }
                continue;
            }
            let mut pending = Some(pending);
            for mut w in requests {
                w.pending = pending.take();
                self.waiting.push_back(w);
            }
        }
    }

    /// The oldest commit landed with `result`: answers its requests, and
    /// those of the commits after it that have landed too.
    async fn settle(&mut self, mut result: Result<(), AppendError>) {
        while let Some(w) = self.waiting.pop_front() {
            let shared = shared_result(&result);
            self.committed(w, result).await;
            while self.waiting.front().is_some_and(|w| w.pending.is_none()) {
                if let Some(w) = self.waiting.pop_front() {
                    self.committed(w, shared_result(&shared)).await;
                }
            }
            result = match self.waiting.front_mut().and_then(|w| w.pending.as_mut()) {
                Some(Ok(p)) => match p.try_result() {
                    Some(r) => r.map(|_| ()),
                    None => return,
                },
                Some(Err(_)) => Err(AppendError::Closed),
                None => return,
            };
        }
    }

    /// A commit landed: answer its request.
    async fn committed(&mut self, w: Waiting, result: Result<(), AppendError>) {
        self.ctx
            .stats
            .commit_seconds
            .observe(w.started.elapsed().as_secs_f64());
        let answer = match result {
            Ok(()) => {
                self.count(IngestResult::Ok);
                self.ctx.stats.count_records(w.records);
                let a = Answer::new(ResponseType::Changed);
                match w.block1 {
                    Some(b) => a.with(CoapOption::Block1, b.encode()),
                    None => a,
                }
            }
            Err(AppendError::Full) => {
                self.count(IngestResult::Rejected);
                Answer::text(ResponseType::ServiceUnavailable, "outbox full")
                    .with(CoapOption::MaxAge, uint(FULL_MAX_AGE))
            }
            Err(e) => {
                self.count(IngestResult::Rejected);
                tracing::error!(error = %e, "CoAP append failed");
                Answer::text(
                    ResponseType::InternalServerError,
                    "could not store the reading",
                )
            }
        };
        if w.empty_acked {
            // The separate response: a CON of its own, retransmitted until
            // the device acknowledges it.
            let mid = self.layer.next_message_id();
            let bytes = frame(MessageType::Confirmable, mid, &w.token, answer);
            self.send(&bytes, w.req_peer).await;
            let j = self.jitter();
            self.layer
                .sent_confirmable(w.req_peer, mid, bytes, Tag::Separate, Instant::now(), j);
            self.ctx
                .counters
                .separate_responses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (mtype, mid) = if w.con {
            (MessageType::Acknowledgement, w.key.1)
        } else {
            (MessageType::NonConfirmable, self.layer.next_message_id())
        };
        let bytes = frame(mtype, mid, &w.token, answer);
        self.layer.answered(w.key, &bytes);
        self.send(&bytes, w.req_peer).await;
    }

    /// Sends a notification to every observer of `device` for the push.
    async fn notify(&mut self, device: &DeviceName, push: Push) {
        let (resource, body) = match push {
            Push::Attributes(b) => (Resource::AttributeUpdates, b),
            Push::Rpc { id, body } => {
                let mut b = body;
                if let Json::Object(m) = &mut b {
                    m.insert("id".into(), json!(id));
                }
                (Resource::Rpc, b)
            }
        };
        for o in self.ctx.observers.next_for(device, resource) {
            let mid = self.layer.next_message_id();
            let a =
                Answer::json(ResponseType::Content, &body).with(CoapOption::Observe, uint(o.seq));
            let bytes = frame(MessageType::Confirmable, mid, &o.token, a);
            self.send(&bytes, o.peer).await;
            let j = self.jitter();
            self.layer.sent_confirmable(
                o.peer,
                mid,
                bytes,
                Tag::Notify {
                    device: device.clone(),
                    peer: o.peer,
                    token: o.token.clone(),
                },
                Instant::now(),
                j,
            );
            self.ctx
                .counters
                .notifications
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When the oldest CON still waiting for its commit is due an empty ACK.
    fn next_separate(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .find(|w| w.con && !w.empty_acked)
            .map(|w| w.started + self.ctx.config.separate_after)
    }

    /// Timers: empty ACKs for slow commits, retransmissions, lost observers.
    async fn tick(&mut self) {
        let now = Instant::now();
        let after = self.ctx.config.separate_after;
        let mut acks = Vec::new();
        for w in &mut self.waiting {
            if w.con && !w.empty_acked && now.duration_since(w.started) >= after {
                w.empty_acked = true;
                acks.push((w.key, w.req_peer));
            }
        }
        for (key, peer) in acks {
            self.layer.empty_acked(key);
            self.send(&empty(MessageType::Acknowledgement, key.1), peer)
                .await;
        }
        let (resend, gone) = self.layer.tick(now);
        for (peer, bytes) in resend {
            self.send(&bytes, peer).await;
        }
        for g in gone {
            if let Unacked::TimedOut(Tag::Notify {
                device,
                peer,
                token,
            }) = g
            {
                tracing::debug!(%device, %peer, "notification never acknowledged; observer dropped");
                self.ctx.observers.deregister(&device, peer, &token);
            }
        }
        self.count_layer();
    }
}

/// An empty message (ACK or RST) for `mid`.
fn empty(mtype: MessageType, mid: u16) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(mtype);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p.to_bytes_unlimited().unwrap_or_default()
}

/// Frames `answer` as a message of `mtype` with `mid` and `token`.
fn frame(mtype: MessageType, mid: u16, token: &[u8], answer: Answer) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(mtype);
    p.header.code = MessageClass::Response(answer.code);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    for (opt, value) in answer.options {
        p.add_option(opt, value);
    }
    p.payload = answer.payload;
    match p.to_bytes_unlimited() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = ?e, "cannot encode a CoAP answer");
            empty(MessageType::Reset, mid)
        }
    }
}

#[cfg(test)]
mod tests;
