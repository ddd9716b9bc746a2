//! The MQTT device listeners (`[listeners.mqtt]` over TCP and
//! `[listeners.mqtts]` over TLS, MQTT 3.1.1 and 5): the ThingsBoard device
//! API's core.
//!
//! One task per connection owns the socket (a TCP or TLS stream: the
//! connection code is generic over it); the protocol logic is the
//! I/O-free [`session::Session`]. Frames are read with our own fixed-header
//! check, so a frame over `max_packet_size` closes the connection before
//! anything is allocated for it; the codec (`rumqttc::mqttbytes::v4` or
//! `rumqttc::v5::mqttbytes::v5`) is chosen from the CONNECT's protocol level
//! byte. Anything but CONNECT first closes the connection; so does silence
//! past `connect_timeout` or past 1.5 × the keep-alive. Connections over
//! `max_connections` are closed at accept. A close for a protocol error (an
//! undecodable or oversized frame, a non-UTF-8 topic, invalid QoS bits,
//! anything but CONNECT first, a second CONNECT, either timeout) is counted
//! once by reason in `sluice_mqtt_protocol_errors_total`
//! ([`crate::stats::ProtocolError`]).
//!
//! Built in this step:
//! - auth by username = access token (password ignored; an empty client id
//!   gets an Assigned Client Identifier on MQTT 5); refusals are CONNACK 0x04
//!   (3.1.1) / 0x86 (5), counted as unauthorized;
//! - TLS 1.3/1.2 (rustls, ring) on `listeners.mqtts`; with `client_ca_file`
//!   client certificates are verified against that CA (optional, so token
//!   devices still connect), and a verified certificate whose SHA-256 (of the
//!   DER leaf) is registered to an active device authenticates the session as
//!   that device whatever the username; otherwise the username token is used;
//! - revocation: after every registry reload (`sluice devices revoke` /
//!   `rotate-token` trigger one) each live session re-checks the credential
//!   it connected with and, if it no longer authenticates as the same
//!   device, is closed at once (MQTT 5: DISCONNECT 0x98 first);
//! - telemetry on `v1/devices/me/telemetry` at QoS 0 and 1, appended to the
//!   outbox, PUBACK only after the commit and in arrival order, up to
//!   Receive Maximum ([`RECEIVE_MAXIMUM`]) unsettled per connection (past
//!   that the socket is not read: back-pressure);
//! - client-side RPC `getSessionLimits` / `getCurrentTime` on
//!   `v1/devices/me/rpc/request/{n}`, answered (QoS 0) on
//!   `…/rpc/response/{n}` to the requesting session only, whatever it
//!   subscribed;
//! - client attributes on `v1/devices/me/attributes` (same decoder and
//!   PUBACK rules as telemetry, stored in the outbox's `attributes` stream,
//!   remembered for attribute requests); attribute requests
//!   `v1/devices/me/attributes/request/{n}` answered on `…/response/{n}`
//!   behind the earlier PUBACKs; shared-attribute pushes and commands
//!   (server-side RPC) from the [`crate::downlink::Router`], delivered as
//!   QoS 0 PUBLISHes when a granted filter matches; command answers on
//!   `v1/devices/me/rpc/response/{n}` routed back; firmware chunks
//!   `v2/fw/request/{r}/chunk/{k}` answered on `v2/fw/response/{r}/chunk/{k}`
//!   from the image the device's own `fw_*` shared attributes name, whatever
//!   it subscribed (the ThingsBoard SDK's `v2/fw/response/+` cannot match);
//! - SUBSCRIBE grants filters inside the device API's downlink topics at
//!   QoS ≤ 1 and refuses the rest; a second connection of a device takes
//!   over its session;
//! - failed logins are throttled per source address
//!   (`auth_fail_limit` per `auth_fail_window`; refused with 0x05 / 0x87
//!   without checking credentials).
//!
//! Refusals: MQTT 5 answers with PUBACK reasons (0x99 payload format
//! invalid, 0x97 quota exceeded when the outbox is full, 0x87 for topics
//! outside the API); MQTT 3.1.1 has no negative PUBACK, so the connection is
//! closed after the earlier PUBLISHes are acknowledged, and the refused one
//! is never acknowledged. QoS 2 is not supported: MQTT 5 CONNACK announces
//! Maximum QoS 1 and a QoS 2 PUBLISH gets DISCONNECT 0x9B; 3.1.1 is closed.
//! SUBSCRIBE at QoS 2 is granted QoS 1. The retain flag is ignored.

pub mod mapping;
pub mod session;

use crate::registry::{Registry, cert_fingerprint};
use crate::stats::{IngestResult, IngestStats, Protocol, ProtocolError};
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;
use session::{
    AckReason, Action, ConnAckCode, DisconnectReason, Env, Inbound, Limits, Outbound, Push,
    Session, Stored, Subscriptions, Version,
};
use sluice_cloud_sync::{
    AppendError, Clock, DEFAULT_STREAM, DeviceName, Outbox, PendingAppend, Record, Stamp,
};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::bytes::BytesMut;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Most unsettled PUBLISHes per connection (MQTT 5 Receive Maximum, and
/// `maxInflightMessages` in the `getSessionLimits` answer).
pub const RECEIVE_MAXIMUM: u16 = 100;

/// What the listener shares.
pub struct MqttContext {
    /// Device registry.
    pub registry: Arc<Registry>,
    /// The outbox.
    pub outbox: Outbox,
    /// Counters.
    pub stats: Arc<IngestStats>,
    /// The gateway clock.
    pub clock: Arc<Clock>,
    /// Live sessions.
    pub sessions: Arc<Sessions>,
    /// Largest packet accepted, bytes.
    pub max_packet_size: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Time allowed between accept and CONNECT.
    pub connect_timeout: Duration,
    /// Attributes, commands and firmware for devices.
    pub router: Arc<crate::downlink::Router>,
    /// Failed-authentication throttle per source address.
    pub throttle: Arc<crate::throttle::AuthThrottle>,
    /// Legacy topic mappings (`[[mqtt.mappings]]`).
    pub mappings: Arc<Vec<mapping::Mapping>>,
    /// Rules between decoding and the outbox.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
}

/// Pushes queued per session before the router treats it as not reading.
const PUSH_QUEUE: usize = 64;

impl crate::downlink::DeviceChannel for Sessions {
    fn subscriptions(&self, device: &DeviceName) -> Option<Subscriptions> {
        Sessions::subscriptions(self, device)
    }
    fn push(&self, device: &DeviceName, push: Push) -> Result<(), PushError> {
        Sessions::push(self, device, push)
    }
}

/// Why a push could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The device has no live session.
    #[error("the device has no live MQTT session")]
    NoSession,
    /// Its session's queue is full or closed.
    #[error("the device's MQTT session is not reading")]
    NotReading,
}

/// One live session as the rest of the gateway sees it.
struct Live {
    id: u64,
    takeover: CancellationToken,
    push: tokio::sync::mpsc::Sender<Push>,
    subs: Arc<Mutex<Subscriptions>>,
}

/// What a connection gets when its session registers.
struct Claim {
    id: u64,
    takeover: CancellationToken,
    pushes: tokio::sync::mpsc::Receiver<Push>,
    subs: Arc<Mutex<Subscriptions>>,
}

/// The authenticated sessions, one per device; a newer one takes over.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<DeviceName, Live>>,
    next_id: AtomicU64,
}

impl Sessions {
    /// Devices with a live MQTT session.
    pub fn connected(&self) -> usize {
        self.live.lock().map_or(0, |g| g.len())
    }

    /// The filters `device`'s live session holds; `None` when it has none.
    pub fn subscriptions(&self, device: &DeviceName) -> Option<Subscriptions> {
        let g = self.live.lock().ok()?;
        let live = g.get(device)?;
        live.subs.lock().ok().map(|s| *s)
    }

    /// Queues `push` for `device`'s live session.
    ///
    /// Fails when it has none, or its queue is full or closed (the
    /// connection is not reading or just ended).
    pub fn push(&self, device: &DeviceName, push: Push) -> Result<(), PushError> {
        let tx = {
            let g = self.live.lock().map_err(|_| PushError::NoSession)?;
            g.get(device).ok_or(PushError::NoSession)?.push.clone()
        };
        tx.try_send(push).map_err(|_| PushError::NotReading)
    }

    /// Registers a session of `device`, ending the previous one.
    fn claim(&self, device: &DeviceName) -> Claim {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let takeover = CancellationToken::new();
        let (push, pushes) = tokio::sync::mpsc::channel(PUSH_QUEUE);
        let subs = Arc::new(Mutex::new(Subscriptions::default()));
        let live = Live {
            id,
            takeover: takeover.clone(),
            push,
            subs: subs.clone(),
        };
        if let Ok(mut g) = self.live.lock()
            && let Some(old) = g.insert(device.clone(), live)
        {
            old.takeover.cancel();
        }
        Claim {
            id,
            takeover,
            pushes,
            subs,
        }
    }

    fn release(&self, device: &DeviceName, id: u64) {
        if let Ok(mut g) = self.live.lock()
            && g.get(device).is_some_and(|l| l.id == id)
        {
            g.remove(device);
        }
    }
}

/// The listener's side of the session: the registry, and the fingerprint of
/// the verified client certificate when the connection presented one.
struct ListenerEnv<'a> {
    ctx: &'a MqttContext,
    cert: Option<[u8; 32]>,
    peer: std::net::IpAddr,
}

impl Env for ListenerEnv<'_> {
    fn authenticate(&self, token: &str) -> Option<DeviceName> {
        self.ctx.registry.authenticate(token)
    }
    fn authenticate_certificate(&self) -> Option<DeviceName> {
        self.ctx.registry.authenticate_cert(self.cert.as_ref()?)
    }
    fn auth_allowed(&self) -> bool {
        self.ctx
            .throttle
            .allowed(self.peer, std::time::Instant::now())
    }
    fn auth_failed(&self) {
        self.ctx
            .throttle
            .failed(self.peer, std::time::Instant::now());
    }
    fn now(&self) -> Stamp {
        self.ctx.clock.now()
    }
    fn count(&self, result: IngestResult) {
        self.ctx.stats.count(Protocol::Mqtt, result);
    }
    fn count_records(&self, n: usize) {
        self.ctx.stats.count_records(n);
    }
    fn set_client_attributes(
        &self,
        device: &DeviceName,
        values: &serde_json::Map<String, serde_json::Value>,
    ) {
        self.ctx.router.attributes().set_client(device, values);
    }
    fn attributes(
        &self,
        device: &DeviceName,
        client_keys: Option<&[String]>,
        shared_keys: Option<&[String]>,
    ) -> serde_json::Value {
        self.ctx
            .router
            .attributes()
            .request(device, client_keys, shared_keys)
    }
    fn rpc_reply(&self, device: &DeviceName, id: u32, payload: &[u8]) -> bool {
        self.ctx.router.device_reply(device, id, payload)
    }
    fn map_topic(
        &self,
        device: &DeviceName,
        topic: &str,
        payload: &[u8],
    ) -> Option<Result<Vec<sluice_cloud_sync::Record>, mapping::MapRefusal>> {
        let now = self.ctx.clock.now();
        mapping::map(
            &self.ctx.mappings,
            device,
            topic,
            payload,
            (now.wall_ms, now.trusted),
            |target| self.ctx.registry.may_speak_for(device, target),
        )
    }
    fn firmware(&self, device: &DeviceName) -> Option<(std::path::PathBuf, u64)> {
        let img = self.ctx.router.attributes().firmware_for(device)?;
        Some((img.path, img.size))
    }
    fn protocol_error(&self, reason: ProtocolError) {
        self.ctx.stats.count_protocol_error(reason);
    }
}

/// Accepts connections until `cancel`, then lets each connection settle its
/// PUBLISHes (their commits complete and are acknowledged) and close. With
/// `tls` every connection is a TLS server session first (the handshake must
/// finish within `connect_timeout`).
pub async fn serve(
    tcp: TcpListener,
    ctx: Arc<MqttContext>,
    tls: Option<TlsAcceptor>,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(ctx.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (sock, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = tcp.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = ctx.max_connections, "MQTT connection limit reached; closing");
            continue;
        };
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        let tls = tls.clone();
        let span = tracing::debug_span!("mqtt", %peer, tls = tls.is_some());
        tracker.spawn(
            async move {
                let _permit = permit;
                let _ = sock.set_nodelay(true);
                let Some(acceptor) = tls else {
                    connection(sock, None, peer, &ctx, cancel).await;
                    return;
                };
                let handshake = tokio::time::timeout(ctx.connect_timeout, acceptor.accept(sock));
                let stream = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    },
                };
                // rustls hands out peer certificates only after its verifier
                // accepted them.
                let cert = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| cert_fingerprint(leaf));
                connection(stream, cert, peer, &ctx, cancel).await;
            }
            .instrument(span),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// Why reading a frame failed (the connection closes).
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {0} bytes is over listeners.mqtt.max_packet_size")]
    TooLarge(usize),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol {0:?}")]
    Protocol(Vec<u8>),
    #[error("cannot decode packet: {0}")]
    Decode(String),
}

impl FrameError {
    fn reason(&self) -> ProtocolError {
        match self {
            Self::BadLength | Self::Decode(_) => ProtocolError::Malformed,
            Self::TooLarge(_) => ProtocolError::TooLarge,
            Self::NotConnect | Self::Protocol(_) => ProtocolError::NotConnectFirst,
        }
    }
}

/// The length of the next frame, once its fixed header is buffered:
/// `Ok(None)` while more bytes are needed.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 1 + (i + 1) + remaining;
            if total > max {
                return Err(FrameError::TooLarge(total));
            }
            return Ok(Some(total));
        }
    }
    Err(FrameError::BadLength)
}

/// The protocol version of a whole buffered CONNECT frame.
fn connect_version(frame: &[u8]) -> Result<Version, FrameError> {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Err(FrameError::NotConnect);
    }
    let header = 1 + frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    let name = frame.get(header..header + 7).unwrap_or_default();
    match name {
        [0, 4, b'M', b'Q', b'T', b'T', 4] => Ok(Version::V4),
        [0, 4, b'M', b'Q', b'T', b'T', 5] => Ok(Version::V5),
        other => Err(FrameError::Protocol(other.to_vec())),
    }
}

fn qos4(q: QoS4) -> u8 {
    q as u8
}

fn qos5(q: QoS5) -> u8 {
    q as u8
}

/// Decodes the whole frame at the head of `buf` with the version's codec.
fn decode(buf: &mut BytesMut, version: Version, max: usize) -> Result<Inbound, FrameError> {
    let err = |e: &dyn std::fmt::Display| FrameError::Decode(e.to_string());
    Ok(match version {
        Version::V4 => match v4::Packet::read(buf, max).map_err(|e| err(&e))? {
            v4::Packet::Connect(c) => Inbound::Connect {
                version,
                client_id: c.client_id,
                username: c.login.map(|l| l.username),
                clean: c.clean_session,
                keep_alive_s: c.keep_alive,
            },
            v4::Packet::Publish(p) => Inbound::Publish {
                topic: Some(p.topic),
                qos: qos4(p.qos),
                pkid: p.pkid,
                payload: p.payload,
            },
            v4::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, qos4(f.qos)))
                    .collect(),
            },
            v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            },
            v4::Packet::PubAck(_) => Inbound::PubAck,
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect,
            _ => Inbound::Unexpected("server-to-client or QoS 2 packet"),
        },
        Version::V5 => {
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            match v5::Packet::read(buf, Some(max)).map_err(|e| err(&e))? {
                v5::Packet::Connect(c, _will, login) => Inbound::Connect {
                    version,
                    client_id: c.client_id,
                    username: login.map(|l| l.username),
                    clean: c.clean_start,
                    keep_alive_s: c.keep_alive,
                },
                v5::Packet::Publish(p) => Inbound::Publish {
                    topic: String::from_utf8(p.topic.to_vec()).ok(),
                    qos: qos5(p.qos),
                    pkid: p.pkid,
                    payload: p.payload,
                },
                v5::Packet::Subscribe(s) => Inbound::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, qos5(f.qos)))
                        .collect(),
                },
                v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.filters,
                },
                v5::Packet::PubAck(_) => Inbound::PubAck,
                v5::Packet::PingReq(_) => Inbound::PingReq,
                v5::Packet::Disconnect(_) => Inbound::Disconnect,
                _ => Inbound::Unexpected("server-to-client, AUTH or QoS 2 packet"),
            }
        }
    })
}

/// Encodes `out` for `version` into `buf`; MQTT 5-only packets are skipped
/// on 3.1.1.
fn encode(out: Outbound, version: Version, limits: Limits, buf: &mut BytesMut) {
    let written = match version {
        Version::V4 => {
            let p = match out {
                Outbound::ConnAck { code, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
                    match code {
                        ConnAckCode::Accepted => v4::ConnectReturnCode::Success,
                        ConnAckCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                        ConnAckCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                        ConnAckCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                    },
                    false,
                )),
                Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    pkid,
                    granted
                        .into_iter()
                        .map(|g| match g {
                            Some(0) => v4::SubscribeReasonCode::Success(QoS4::AtMostOnce),
                            Some(_) => v4::SubscribeReasonCode::Success(QoS4::AtLeastOnce),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
                Outbound::Publish { topic, payload } => {
                    v4::Packet::Publish(v4::Publish::new(topic, QoS4::AtMostOnce, payload))
                }
                Outbound::PingResp => v4::Packet::PingResp,
                Outbound::Disconnect(_) => return,
            };
            p.write(buf, usize::MAX).map_err(|e| e.to_string())
        }
        Version::V5 => {
            let p = match out {
                Outbound::ConnAck {
                    code,
                    assigned_client_id,
                } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: match code {
                        ConnAckCode::Accepted => v5::ConnectReturnCode::Success,
                        ConnAckCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                        ConnAckCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                        ConnAckCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                    },
                    properties: (code == ConnAckCode::Accepted).then(|| v5::ConnAckProperties {
                        receive_max: Some(limits.receive_maximum),
                        max_qos: Some(1),
                        retain_available: Some(0),
                        max_packet_size: Some(
                            u32::try_from(limits.max_packet_size).unwrap_or(u32::MAX),
                        ),
                        assigned_client_identifier: assigned_client_id,
                        topic_alias_max: Some(0),
                        shared_subscription_available: Some(0),
                        subscription_identifiers_available: Some(0),
                        session_expiry_interval: None,
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: None,
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
                Outbound::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
                    pkid,
                    reason: match reason {
                        AckReason::Success => v5::PubAckReason::Success,
                        AckReason::Unspecified => v5::PubAckReason::UnspecifiedError,
                        AckReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
                        AckReason::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                        AckReason::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                    },
                    properties: None,
                }),
                Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: granted
                        .into_iter()
                        .map(|g| match g {
                            Some(0) => v5::SubscribeReasonCode::Success(QoS5::AtMostOnce),
                            Some(_) => v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
                            None => v5::SubscribeReasonCode::NotAuthorized,
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                }),
                Outbound::Publish { topic, payload } => {
                    v5::Packet::Publish(v5::Publish::new(topic, QoS5::AtMostOnce, payload, None))
                }
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outbound::Disconnect(why) => v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: match why {
                        DisconnectReason::ServerShuttingDown => {
                            v5::DisconnectReasonCode::ServerShuttingDown
                        }
                        DisconnectReason::KeepAliveTimeout => {
                            v5::DisconnectReasonCode::KeepAliveTimeout
                        }
                        DisconnectReason::SessionTakenOver => {
                            v5::DisconnectReasonCode::SessionTakenOver
                        }
                        DisconnectReason::NotAuthorized => v5::DisconnectReasonCode::NotAuthorized,
                        DisconnectReason::QuotaExceeded => v5::DisconnectReasonCode::QuotaExceeded,
                        DisconnectReason::PayloadFormatInvalid => {
                            v5::DisconnectReasonCode::PayloadFormatInvalid
                        }
                        DisconnectReason::QoSNotSupported => {
                            v5::DisconnectReasonCode::QoSNotSupported
                        }
                        DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                        DisconnectReason::AdministrativeAction => {
                            v5::DisconnectReasonCode::AdministrativeAction
                        }
                    },
                    properties: None,
                }),
            };
            p.write(buf, None).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot encode an MQTT packet");
    }
}

/// One outbox append carrying the records of one or more PUBLISHes (their
/// tickets and record counts, in order), or the reason it could not be
/// handed over, and when it was submitted (for `sluice_ingest_commit_seconds`).
type InFlight = (
    Vec<(u64, usize)>,
    Result<PendingAppend, Stored>,
    std::time::Instant,
);

fn stored(r: Result<sluice_cloud_sync::AppendReceipt, AppendError>) -> Stored {
    match r {
        Ok(_) => Stored::Ok,
        Err(AppendError::Full) => Stored::Full,
        Err(AppendError::Closed) => Stored::Failed,
        Err(e) => {
            tracing::error!(error = %e, "append failed");
            Stored::Failed
        }
    }
}

/// The next commit result, in submission order; never resolves while
/// nothing is in flight.
async fn next_commit(pending: &mut VecDeque<InFlight>) -> Stored {
    match pending.front_mut() {
        None => std::future::pending().await,
        Some((_, Ok(p), _)) => stored(p.await),
        Some((_, Err(s), _)) => *s,
    }
}

/// The head's commit result if it is already known.
fn ready_commit(pending: &mut VecDeque<InFlight>) -> Option<Stored> {
    match pending.front_mut()? {
        (_, Ok(p), _) => p.try_result().map(stored),
        (_, Err(s), _) => Some(*s),
    }
}

fn limits(ctx: &MqttContext) -> Limits {
    Limits {
        max_packet_size: ctx.max_packet_size,
        receive_maximum: RECEIVE_MAXIMUM,
    }
}

/// The connection's side effects: what to write, the appends in flight and
/// the session registration.
struct Conn<'a> {
    ctx: &'a MqttContext,
    out: BytesMut,
    pending: VecDeque<InFlight>,
    /// Records of consecutive stores to one stream not yet handed to the
    /// outbox, with their tickets and record counts.
    staged: Vec<Record>,
    staged_tickets: Vec<(u64, usize)>,
    staged_stream: &'static str,
    registered: Option<(DeviceName, u64)>,
    takeover: CancellationToken,
    /// The CONNECT's username, to re-check after a registry reload.
    username: Option<String>,
    /// Pushes from the router, once registered.
    pushes: Option<tokio::sync::mpsc::Receiver<Push>>,
    /// The session's filters as the router sees them.
    subs: Option<Arc<Mutex<Subscriptions>>>,
}

impl Conn<'_> {
    /// Carries out `actions`; `false` when the connection must close.
    async fn execute(&mut self, actions: Vec<Action>, version: Option<Version>) -> bool {
        let limits = limits(self.ctx);
        for a in actions {
            match a {
                Action::Send(p) => {
                    if let Some(v) = version {
                        encode(p, v, limits, &mut self.out);
                    }
                }
                Action::Store { ticket, records } => {
                    self.stage(DEFAULT_STREAM, ticket, records).await;
                }
                Action::StoreAttributes { ticket, records } => {
                    self.stage("attributes", ticket, records).await;
                }
                Action::SendFirmware {
                    topic,
                    path,
                    offset,
                    len,
                } => {
                    let read = tokio::task::spawn_blocking(move || {
                        sluice_firmware::read_range(&path, offset, len)
                    })
                    .await;
                    match read {
                        Ok(Ok(payload)) => {
                            self.ctx
                                .router
                                .stats
                                .firmware_bytes_served
                                .fetch_add(payload.len() as u64, Ordering::Relaxed);
                            if let Some(v) = version {
                                encode(
                                    Outbound::Publish { topic, payload },
                                    v,
                                    limits,
                                    &mut self.out,
                                );
                            }
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read a firmware chunk"),
                        Err(e) => tracing::warn!(error = %e, "firmware read task failed"),
                    }
                }
                Action::Authenticated(device) => {
                    let claim = self.ctx.sessions.claim(&device);
                    tracing::debug!(%device, "MQTT session up");
                    self.registered = Some((device, claim.id));
                    self.takeover = claim.takeover;
                    self.pushes = Some(claim.pushes);
                    self.subs = Some(claim.subs);
                }
                Action::Close => {
                    self.submit_staged().await;
                    return false;
                }
            }
        }
        true
    }

    /// Stages a store to `stream`, to be submitted with the stores that
    /// follow it in this read: one outbox command per read, not per
    /// PUBLISH. A store to another stream submits what is staged first.
    async fn stage(&mut self, stream: &'static str, ticket: u64, records: Vec<Record>) {
        if stream != self.staged_stream {
            self.submit_staged().await;
            self.staged_stream = stream;
        }
        self.staged_tickets.push((ticket, records.len()));
        self.staged.extend(records);
    }

    /// Hands the staged records to the outbox as one append. Submitting in
    /// ticket order keeps the device's records in order in the outbox;
    /// awaiting the queueing (not the commit) is where a busy writer slows
    /// this device down.
    async fn submit_staged(&mut self) {
        if self.staged_tickets.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let submitted = self
            .ctx
            .pipeline
            .submit(self.staged_stream, std::mem::take(&mut self.staged))
            .await;
        self.pending.push_back((
            std::mem::take(&mut self.staged_tickets),
            submitted.map_err(|e| stored(Err(e))),
            started,
        ));
    }

    /// Publishes the session's current filters to the router.
    fn share_subscriptions(&self, now: Subscriptions) {
        if let Some(subs) = &self.subs
            && let Ok(mut g) = subs.lock()
        {
            *g = now;
        }
    }
}

/// The next push for this session; never resolves before registration.
async fn next_push(pushes: &mut Option<tokio::sync::mpsc::Receiver<Push>>) -> Option<Push> {
    match pushes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `bytes` and pushes them through a TLS layer to the socket.
async fn send<S: AsyncWrite + Unpin>(sock: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    sock.write_all(bytes).await?;
    sock.flush().await
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    sock: S,
    cert: Option<[u8; 32]>,
    peer: SocketAddr,
    ctx: &MqttContext,
    cancel: CancellationToken,
) {
    let mut conn = Conn {
        ctx,
        out: BytesMut::with_capacity(256),
        pending: VecDeque::new(),
        staged: Vec::new(),
        staged_tickets: Vec::new(),
        staged_stream: DEFAULT_STREAM,
        registered: None,
        takeover: CancellationToken::new(),
        username: None,
        pushes: None,
        subs: None,
    };
    let env = ListenerEnv {
        ctx,
        cert,
        peer: peer.ip(),
    };
    let why = run_connection(sock, &mut conn, &env, cancel).await;
    tracing::debug!(%peer, reason = why, "MQTT connection closed");
    if let Some((device, id)) = &conn.registered {
        ctx.sessions.release(device, *id);
    }
}

/// Whether the credential the session connected with still authenticates
/// as `device` (checked after a registry reload).
fn still_authenticates(env: &ListenerEnv<'_>, username: Option<&str>, device: &DeviceName) -> bool {
    let now = env.authenticate_certificate().or_else(|| {
        username
            .filter(|u| !u.is_empty())
            .and_then(|u| env.authenticate(u))
    });
    now.as_ref() == Some(device)
}

/// Serves one connection; returns why it ended.
async fn run_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    conn: &mut Conn<'_>,
    env: &ListenerEnv<'_>,
    cancel: CancellationToken,
) -> &'static str {
    let ctx = conn.ctx;
    let mut session = Session::new(limits(ctx));
    let mut buf = BytesMut::with_capacity(4096);
    let mut deadline = Instant::now() + ctx.connect_timeout;
    let mut draining = false;
    let mut generation: watch::Receiver<u64> = ctx.registry.subscribe();
    let mut registry_open = true;
    loop {
        // Decode what is buffered, as far as the session wants input.
        let mut open = true;
        while open && session.wants_input() && !draining {
            let len = match frame_len(&buf, ctx.max_packet_size) {
                Ok(Some(n)) if buf.len() >= n => n,
                Ok(Some(n)) => {
                    buf.reserve(n - buf.len());
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    if matches!(e, FrameError::TooLarge(_)) {
                        env.count(IngestResult::TooLarge);
                    }
                    env.protocol_error(e.reason());
                    tracing::debug!(error = %e, "bad MQTT frame; closing");
                    return "bad frame";
                }
            };
            let version = match session.version() {
                Some(v) => v,
                None => match connect_version(&buf[..len]) {
                    Ok(v) => v,
                    Err(e) => {
                        env.protocol_error(e.reason());
                        tracing::debug!(error = %e, "refused CONNECT; closing");
                        return "refused CONNECT";
                    }
                },
            };
            let packet = match decode(&mut buf, version, ctx.max_packet_size) {
                Ok(p) => p,
                Err(e) => {
                    env.protocol_error(e.reason());
                    tracing::debug!(error = %e, "undecodable MQTT packet; closing");
                    return "undecodable packet";
                }
            };
            if let Inbound::Connect { username, .. } = &packet {
                conn.username.clone_from(username);
            }
            let actions = session.handle(packet, env);
            if let Some(ka) = session.keep_alive_limit() {
                deadline = Instant::now() + ka;
            } else if session.version().is_some() {
                deadline = Instant::now() + Duration::from_secs(365 * 86_400);
            }
            open = conn.execute(actions, session.version()).await;
            conn.share_subscriptions(session.subscriptions());
        }
        conn.submit_staged().await;
        if !conn.out.is_empty() {
            if send(&mut sock, &conn.out).await.is_err() {
                return "write failed";
            }
            conn.out.clear();
        }
        if !open {
            return "closed by the session";
        }
        if draining && session.settled() {
            if session.version() == Some(Version::V5) && session.device().is_some() {
                encode(
                    Outbound::Disconnect(DisconnectReason::ServerShuttingDown),
                    Version::V5,
                    limits(ctx),
                    &mut conn.out,
                );
                let _ = send(&mut sock, &conn.out).await;
            }
            return "shutting down";
        }
        let can_read = session.wants_input() && !draining;
        tokio::select! {
            r = sock.read_buf(&mut buf), if can_read => match r {
                Ok(0) | Err(_) => return "peer closed",
                Ok(_) => {}
            },
            result = next_commit(&mut conn.pending) => {
                // Every commit already known is settled before the next
                // write, so their PUBACKs leave together.
                let mut result = Some(result);
                while let Some(r) = result {
                    let (tickets, waited) = conn
                        .pending
                        .pop_front()
                        .map(|(t, _, started)| (t, started.elapsed().as_secs_f64()))
                        .unwrap_or_default();
                    for (ticket, n) in tickets {
                        ctx.stats.commit_seconds.observe(waited);
                        let actions = session.stored(ticket, r, n, env);
                        if !conn.execute(actions, session.version()).await {
                            let _ = send(&mut sock, &conn.out).await;
                            return "closed by the session";
                        }
                    }
                    result = ready_commit(&mut conn.pending);
                }
            }
            () = tokio::time::sleep_until(deadline), if !draining => {
                if session.version() == Some(Version::V5) && session.device().is_some() {
                    encode(Outbound::Disconnect(DisconnectReason::KeepAliveTimeout), Version::V5, limits(ctx), &mut conn.out);
                    let _ = send(&mut sock, &conn.out).await;
                }
                if session.device().is_some() {
                    env.protocol_error(ProtocolError::KeepaliveTimeout);
                    return "keep-alive timeout";
                }
                env.protocol_error(ProtocolError::ConnectTimeout);
                return "CONNECT timeout";
            }
            () = cancel.cancelled(), if !draining => draining = true,
            r = generation.changed(), if registry_open && session.device().is_some() => {
                registry_open = r.is_ok();
                if let Some(device) = session.device()
                    && !still_authenticates(env, conn.username.as_deref(), device)
                {
                    tracing::info!(%device, "device revoked or its credential replaced; closing its MQTT session");
                    if session.version() == Some(Version::V5) {
                        encode(Outbound::Disconnect(DisconnectReason::AdministrativeAction), Version::V5, limits(ctx), &mut conn.out);
                        let _ = send(&mut sock, &conn.out).await;
                    }
                    return "revoked";
                }
            }
            Some(push) = next_push(&mut conn.pushes), if !draining => {
                let actions = session.push(push);
                if !conn.execute(actions, session.version()).await {
                    return "closed by the session";
                }
            }
            () = conn.takeover.cancelled() => {
                if session.version() == Some(Version::V5) {
                    encode(Outbound::Disconnect(DisconnectReason::SessionTakenOver), Version::V5, limits(ctx), &mut conn.out);
                    let _ = send(&mut sock, &conn.out).await;
                }
                return "session taken over";
            }
        }
    }
}

/// The access token [`fuzz_mqtt_bytes`] authenticates (as device `fuzz-dev`).
#[doc(hidden)]
pub const FUZZ_TOKEN: &str = "fuzz-token";

/// The fuzz targets' environment: one registered token, a fixed clock, no
/// counters.
struct FuzzEnv;

impl Env for FuzzEnv {
    fn authenticate(&self, token: &str) -> Option<DeviceName> {
        (token == FUZZ_TOKEN).then(|| DeviceName::new("fuzz-dev"))
    }
    fn now(&self) -> Stamp {
        Stamp {
            wall_ms: 1_800_000_000_000,
            trusted: true,
            boot: 1,
            mono_ms: 5,
        }
    }
    fn count(&self, _: IngestResult) {}
    fn count_records(&self, _: usize) {}
    fn protocol_error(&self, _: ProtocolError) {}
}

/// Entry point of the `mqtt_session` cargo-fuzz target (`fuzz/`): `data` is
/// what a device sends on one connection. It goes through the functions
/// [`run_connection`] uses, in its order: [`frame_len`], [`connect_version`]
/// for the first frame, [`decode`], [`Session::handle`], [`encode`] of what
/// the session sends, and [`Session::stored`] for its appends, reported in
/// order (stores are held while the session wants input, like commits
/// still in flight, so answers queue behind them; every eighth is `Full`
/// and every eighth `Failed`). Panics only on a bug: a decoder or the
/// session panicking, a frame over the limit getting through, or the
/// decoder reading a different frame than the length check measured.
/// Returns how many appends were reported to the session.
#[doc(hidden)]
pub fn fuzz_mqtt_bytes(data: &[u8]) -> u64 {
    const MAX: usize = 4096;
    let limits = Limits {
        max_packet_size: MAX,
        receive_maximum: 4,
    };
    let env = FuzzEnv;
    let mut session = Session::new(limits);
    let mut buf = BytesMut::from(data);
    let mut out = BytesMut::new();
    let mut pending: VecDeque<(u64, usize)> = VecDeque::new();
    let mut next_ticket = 0u64;
    let mut reported = 0u64;
    let stored_as = |ticket: u64| match ticket % 8 {
        3 => Stored::Full,
        6 => Stored::Failed,
        _ => Stored::Ok,
    };
    // Carries out `actions` like `Conn::execute`; `false` on Close.
    let mut execute = |actions: Vec<Action>,
                       version: Option<Version>,
                       pending: &mut VecDeque<(u64, usize)>|
     -> bool {
        for a in actions {
            match a {
                Action::Send(p) => {
                    if let Some(v) = version {
                        encode(p, v, limits, &mut out);
                    }
                }
                Action::Store { ticket, records } | Action::StoreAttributes { ticket, records } => {
                    assert_eq!(ticket, next_ticket, "tickets are issued in order");
                    next_ticket += 1;
                    pending.push_back((ticket, records.len()));
                }
                Action::SendFirmware { .. } | Action::Authenticated(_) => {}
                Action::Close => return false,
            }
        }
        out.clear();
        true
    };
    loop {
        if !session.wants_input() {
            // Back-pressure: nothing is read until a commit comes back.
            let Some((ticket, n)) = pending.pop_front() else {
                return reported;
            };
            let actions = session.stored(ticket, stored_as(ticket), n, &env);
            reported += 1;
            if !execute(actions, session.version(), &mut pending) {
                return reported;
            }
            continue;
        }
        let len = match frame_len(&buf, MAX) {
            Ok(Some(n)) if buf.len() >= n => n,
            _ => break,
        };
        assert!(
            len <= MAX,
            "a frame of {len} bytes passed a {MAX}-byte limit"
        );
        let version = match session.version() {
            Some(v) => v,
            None => match connect_version(&buf[..len]) {
                Ok(v) => v,
                Err(_) => return reported,
            },
        };
        let before = buf.len();
        let Ok(packet) = decode(&mut buf, version, MAX) else {
            return reported;
        };
        assert_eq!(
            before - buf.len(),
            len,
            "the decoder read another frame than the length check measured"
        );
        let actions = session.handle(packet, &env);
        if !execute(actions, session.version(), &mut pending) {
            return reported;
        }
    }
    // The input ended (the peer closed): the commits in flight come back.
    while let Some((ticket, n)) = pending.pop_front() {
        let actions = session.stored(ticket, stored_as(ticket), n, &env);
        reported += 1;
        if !execute(actions, session.version(), &mut pending) {
            return reported;
        }
    }
    assert!(
        session.settled(),
        "every PUBLISH is answered once its commit is back"
    );
    reported
}

#[cfg(test)]
mod fuzz {
    //! Property tests run with every `cargo test`, beside the cargo-fuzz
    //! targets in `fuzz/` (see `fuzz/README.md`): arbitrary bytes through
    //! the framing and the decoders of both protocol versions never panic,
    //! a frame the length check accepts is never longer than the limit, and
    //! [`fuzz_mqtt_bytes`] (the `mqtt_session` target) survives arbitrary
    //! packets after a valid CONNECT.
    use super::*;
    use proptest::prelude::*;

    fn run(bytes: &[u8], version: Version) {
        let max = 4096;
        let mut buf = BytesMut::from(bytes);
        for _ in 0..64 {
            match frame_len(&buf, max) {
                Ok(Some(n)) if n <= buf.len() => {
                    assert!(n <= max, "a frame of {n} bytes passed a {max}-byte limit");
                    let mut frame = buf.split_to(n);
                    let _ = decode(&mut frame, version, max);
                }
                _ => return,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic_the_framing_or_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            run(&bytes, Version::V4);
            run(&bytes, Version::V5);
        }

        /// Valid packet types with arbitrary bodies reach deeper into the decoders.
        #[test]
        fn plausible_headers_with_arbitrary_bodies_never_panic(
            kind in prop::sample::select(vec![0x10u8, 0x30, 0x32, 0x34, 0x40, 0x62, 0x82, 0xa2, 0xc0, 0xe0]),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = vec![kind];
            let mut len = body.len();
            loop {
                let mut b = (len % 128) as u8;
                len /= 128;
                if len > 0 {
                    b |= 0x80;
                }
                bytes.push(b);
                if len == 0 {
                    break;
                }
            }
            bytes.extend_from_slice(&body);
            run(&bytes, Version::V4);
            run(&bytes, Version::V5);
        }

        /// The `mqtt_session` fuzz target's path, past authentication.
        #[test]
        fn arbitrary_packets_after_a_valid_connect_never_panic_the_session(
            v5 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = connect_frame(v5);
            bytes.extend_from_slice(&tail);
            let _ = fuzz_mqtt_bytes(&bytes);
        }
    }

    /// A CONNECT with username [`FUZZ_TOKEN`], keep-alive 60 s, clean.
    fn connect_frame(v5: bool) -> Vec<u8> {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            if v5 { 5 } else { 4 },
            0x82,
            0,
            60,
        ];
        if v5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&[0, 1, b'c']);
        body.extend_from_slice(&[0, FUZZ_TOKEN.len() as u8]);
        body.extend_from_slice(FUZZ_TOKEN.as_bytes());
        let mut frame = vec![0x10, body.len() as u8];
        frame.extend_from_slice(&body);
        frame
    }

    fn publish_frame(v5: bool, qos: u8, topic: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = vec![0, topic.len() as u8];
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&[0, 1]);
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        let mut frame = vec![0x30 | (qos << 1), body.len() as u8];
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn the_fuzz_entry_point_reaches_stores_and_their_answers() {
        for v5 in [false, true] {
            let mut bytes = connect_frame(v5);
            for n in 0..20 {
                bytes.extend(publish_frame(
                    v5,
                    1,
                    b"v1/devices/me/telemetry",
                    format!("{{\"n\":{n}}}").as_bytes(),
                ));
            }
            fuzz_mqtt_bytes(&bytes);
        }
    }

    #[test]
    fn the_five_issue_4_cases_are_refused_by_framing_or_decode() {
        let env = FuzzEnv;
        // Length overflow: four continuation bytes.
        assert!(matches!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff], 4096),
            Err(FrameError::BadLength)
        ));
        // PUBLISH before CONNECT.
        let publish = publish_frame(false, 0, b"v1/devices/me/telemetry", b"{}");
        assert!(matches!(
            connect_version(&publish),
            Err(FrameError::NotConnect)
        ));
        for v5 in [false, true] {
            let version = if v5 { Version::V5 } else { Version::V4 };
            // QoS bits 11.
            let mut bad_qos = publish_frame(v5, 1, b"t", b"{}");
            bad_qos[0] = 0x36;
            let err = decode(&mut BytesMut::from(&bad_qos[..]), version, 4096);
            assert!(
                matches!(&err, Err(e) if e.reason() == ProtocolError::Malformed),
                "{version:?}: {err:?}"
            );
            // A non-UTF-8 topic: refused by the 3.1.1 decoder, by the
            // session on MQTT 5.
            let bad_topic = publish_frame(v5, 0, b"v1/\xff\xfe", b"{}");
            match decode(&mut BytesMut::from(&bad_topic[..]), version, 4096) {
                Err(e) => {
                    assert!(!v5, "{e}");
                    assert_eq!(e.reason(), ProtocolError::Malformed);
                }
                Ok(p) => {
                    assert!(v5);
                    assert!(matches!(p, Inbound::Publish { topic: None, .. }));
                }
            }
            // CONNECT twice: the session refuses the second.
            let mut s = Session::new(Limits {
                max_packet_size: 4096,
                receive_maximum: 4,
            });
            for (i, frame) in [connect_frame(v5), connect_frame(v5)].iter().enumerate() {
                let p =
                    decode(&mut BytesMut::from(&frame[..]), version, 4096).expect("valid CONNECT");
                let a = s.handle(p, &env);
                assert_eq!(
                    a.last() == Some(&Action::Close),
                    i == 1,
                    "{version:?} CONNECT {i}"
                );
            }
        }
    }
}
