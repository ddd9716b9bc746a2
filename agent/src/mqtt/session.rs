//! One device's MQTT session as a state machine without I/O: it takes
//! decoded packets ([`Inbound`], the same for 3.1.1 and 5) and commit
//! results, and returns [`Action`]s for the connection task to carry out.
//!
//! Ordering: every answer that must follow a PUBLISH (its PUBACK, a refusal,
//! a client-side RPC response, a close) is queued behind the PUBLISHes that
//! arrived before it and released only when those are settled, so PUBACKs
//! leave in the order the PUBLISHes arrived (MQTT 4.6) and a PUBACK is sent
//! only after its records are committed (DESIGN.md invariant 1). PINGRESP,
//! SUBACK and UNSUBACK are not publishes and go out at once.

use crate::stats::{IngestResult, ProtocolError};
use crate::tbjson;
use serde_json::{Map, Value as Json};
use sluice_cloud_sync::{DeviceName, Record, Stamp};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::bytes::Bytes;

/// Telemetry topic of the ThingsBoard device API.
pub const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";
/// Prefix of client-side RPC requests; the suffix is the request id.
pub const RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";
/// Prefix of RPC responses: to the device for its client-side RPCs, from
/// the device for server-side RPCs (commands).
pub const RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";
/// Client attributes up; shared-attribute pushes down.
pub const ATTRIBUTES_TOPIC: &str = "v1/devices/me/attributes";
/// Prefix of attribute requests from the device; the suffix is its id.
pub const ATTRIBUTES_REQUEST_PREFIX: &str = "v1/devices/me/attributes/request/";
/// Prefix of attribute responses to the device.
pub const ATTRIBUTES_RESPONSE_PREFIX: &str = "v1/devices/me/attributes/response/";
/// Prefix of firmware chunk requests: `v2/fw/request/{r}/chunk/{k}`.
pub const FW_REQUEST_PREFIX: &str = "v2/fw/request/";
/// Longest attribute-request payload honoured, bytes.
const MAX_ATTRIBUTE_REQUEST: usize = 16 * 1024;
/// The topics the gateway publishes to a device (`*` = one level). A
/// SUBSCRIBE filter is granted (at QoS 1 at most) when every topic it can
/// match is one of these, e.g. `v1/devices/me/rpc/request/+` or
/// `v1/devices/me/attributes/response/7`; anything wider or elsewhere
/// (`#`, `v1/devices/me/telemetry`) is refused.
pub const DEVICE_TOPICS: [&str; 5] = [
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/*",
    "v1/devices/me/rpc/request/*",
    "v1/devices/me/rpc/response/*",
    "v2/fw/response/*/chunk/*",
];
/// Firmware filters the ThingsBoard SDK uses, granted although `+` cannot
/// match the chunk topics (chunks are delivered whatever was subscribed).
const FIRMWARE_FILTERS: [&str; 2] = ["v2/fw/response/+", "v2/fw/response/#"];

/// Whether every topic `filter` matches also matches `pattern` (levels
/// equal, `+` only where the pattern has `*`, no `#`).
fn filter_within(filter: &str, pattern: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let p: Vec<&str> = pattern.split('/').collect();
    f.len() == p.len()
        && f.iter().zip(&p).all(|(f, p)| match (*f, *p) {
            (_, "*") => *f == "+" || (!f.is_empty() && !f.contains(['+', '#'])),
            (f, p) => f == p,
        })
}

/// Whether a SUBSCRIBE filter is granted.
pub fn grantable(filter: &str) -> bool {
    FIRMWARE_FILTERS.contains(&filter) || DEVICE_TOPICS.iter().any(|p| filter_within(filter, p))
}

/// MQTT topic matching (`+` one level, `#` the rest, including none).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Protocol version, from the CONNECT's protocol level byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (level 4).
    V4,
    /// MQTT 5 (level 5).
    V5,
}

/// A packet from the device, decoded by either codec.
#[derive(Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT (the password is not kept: it is ignored).
    Connect {
        /// Protocol version.
        version: Version,
        /// Client identifier; may be empty.
        client_id: String,
        /// User name = access token.
        username: Option<String>,
        /// Clean session / clean start.
        clean: bool,
        /// Keep-alive in seconds (0 = off).
        keep_alive_s: u16,
    },
    /// PUBLISH.
    Publish {
        /// Topic; `None` when it is not UTF-8.
        topic: Option<String>,
        /// QoS 0, 1 or 2.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Payload.
        payload: Bytes,
    },
    /// SUBSCRIBE: filters with their requested QoS.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// (filter, requested QoS).
        filters: Vec<(String, u8)>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// The filters.
        filters: Vec<String>,
    },
    /// PUBACK from the device (we publish at QoS 0, so nothing to match).
    PubAck,
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
    /// A packet a client must not send to a server, or one this server does
    /// not handle (PUBREL without QoS 2, AUTH): a protocol error.
    Unexpected(&'static str),
}

// Hand-written so that no future field can leak a secret through `{:?}`.
impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { version, .. } => write!(f, "Connect({version:?})"),
            Self::Publish {
                topic, qos, pkid, ..
            } => write!(f, "Publish({topic:?}, qos {qos}, pkid {pkid})"),
            Self::Subscribe { pkid, .. } => write!(f, "Subscribe({pkid})"),
            Self::Unsubscribe { pkid, .. } => write!(f, "Unsubscribe({pkid})"),
            Self::PubAck => write!(f, "PubAck"),
            Self::PingReq => write!(f, "PingReq"),
            Self::Disconnect => write!(f, "Disconnect"),
            Self::Unexpected(what) => write!(f, "Unexpected({what})"),
        }
    }
}

/// CONNACK results (mapped to each version's code by the connection task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    /// Accepted.
    Accepted,
    /// 3.1.1: 0x02 identifier rejected; 5: 0x85 client identifier not valid.
    BadClientId,
    /// 3.1.1: 0x04 bad user name or password; 5: 0x86.
    BadCredentials,
    /// 3.1.1: 0x05 not authorized; 5: 0x87 (too many failed
    /// authentications from this address: credentials not even checked).
    NotAuthorized,
}

/// Why a QoS 1 PUBLISH was not simply accepted (MQTT 5 reason codes; 3.1.1
/// has no negative PUBACK, so there the session closes instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    /// 0x00.
    Success,
    /// 0x80 (the commit failed or the outbox is closing).
    Unspecified,
    /// 0x87: a topic outside the device API.
    NotAuthorized,
    /// 0x97: the outbox is full (`when_full = "reject"`).
    QuotaExceeded,
    /// 0x99: the payload is not ThingsBoard JSON.
    PayloadFormatInvalid,
}

/// MQTT 5 DISCONNECT reasons the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// 0x8B.
    ServerShuttingDown,
    /// 0x8D.
    KeepAliveTimeout,
    /// 0x8E.
    SessionTakenOver,
    /// 0x87.
    NotAuthorized,
    /// 0x97.
    QuotaExceeded,
    /// 0x99.
    PayloadFormatInvalid,
    /// 0x9B.
    QoSNotSupported,
    /// 0x82.
    ProtocolError,
    /// 0x98: the device was revoked or its credential replaced.
    AdministrativeAction,
}

/// A packet for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// CONNACK; MQTT 5 adds the limits and, for an empty client id, the
    /// assigned one.
    ConnAck {
        /// Result.
        code: ConnAckCode,
        /// Assigned Client Identifier (MQTT 5 only).
        assigned_client_id: Option<String>,
    },
    /// PUBACK.
    PubAck {
        /// Packet id.
        pkid: u16,
        /// Reason (always `Success` on 3.1.1).
        reason: AckReason,
    },
    /// SUBACK: granted QoS per filter, `None` = failure (3.1.1 0x80, 5 0x87).
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        granted: Vec<Option<u8>>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// Number of filters.
        count: usize,
    },
    /// A QoS 0 PUBLISH to the device.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only; dropped on 3.1.1).
    Disconnect(DisconnectReason),
}

/// What the connection task must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this packet.
    Send(Outbound),
    /// Append these records to the outbox, then report with
    /// [`Session::stored`] and this ticket. Tickets are submitted, and must
    /// be reported, in the order they were issued.
    Store {
        /// Identifies the append.
        ticket: u64,
        /// The records.
        records: Vec<Record>,
    },
    /// As [`Action::Store`], to the outbox's `attributes` stream (client
    /// attributes); same ticket sequence.
    StoreAttributes {
        /// Identifies the append.
        ticket: u64,
        /// The records.
        records: Vec<Record>,
    },
    /// Read `len` bytes at `offset` of the firmware image `path` and send
    /// them as a QoS 0 PUBLISH on `topic` (the read is I/O, so the
    /// connection task does it).
    SendFirmware {
        /// `v2/fw/response/{r}/chunk/{k}`.
        topic: String,
        /// The image file.
        path: PathBuf,
        /// First byte.
        offset: u64,
        /// Bytes (0 = an empty answer past the end).
        len: u64,
    },
    /// The device authenticated: register the session (a previous session
    /// of the same device is taken over).
    Authenticated(DeviceName),
    /// Flush what was sent and close the connection.
    Close,
}

/// How an append ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Committed.
    Ok,
    /// The outbox is full under the `reject` policy.
    Full,
    /// The commit failed or the outbox is closing.
    Failed,
}

/// What the session needs from the gateway.
pub trait Env {
    /// The device owning this access token, if registered and not revoked.
    fn authenticate(&self, token: &str) -> Option<DeviceName>;
    /// The device registered for the verified TLS client certificate this
    /// connection presented, if any; it wins over the username.
    fn authenticate_certificate(&self) -> Option<DeviceName> {
        None
    }
    /// Whether this connection's source address may try to authenticate
    /// (not throttled after failed attempts). Default: always.
    fn auth_allowed(&self) -> bool {
        true
    }
    /// Counts a failed authentication against this connection's address.
    fn auth_failed(&self) {}
    /// The gateway clock.
    fn now(&self) -> Stamp;
    /// Counts one ingested message.
    fn count(&self, result: IngestResult);
    /// Counts stored records.
    fn count_records(&self, n: usize);
    /// Remembers client attributes `device` reported (called when the
    /// PUBLISH is accepted, before its commit). Default: not kept.
    fn set_client_attributes(&self, _device: &DeviceName, _values: &Map<String, Json>) {}
    /// The answer to an attribute request (`None` = no keys of that scope
    /// named): `{"client":{…},"shared":{…}}`. Default: nothing known.
    fn attributes(
        &self,
        _device: &DeviceName,
        _client_keys: Option<&[String]>,
        _shared_keys: Option<&[String]>,
    ) -> Json {
        Json::Object(Map::new())
    }
    /// A device's answer to server-side RPC `id` (a command); `false` when
    /// no command with that id awaits an answer. Default: none does.
    fn rpc_reply(&self, _device: &DeviceName, _id: u32, _payload: &[u8]) -> bool {
        false
    }
    /// Records for a publish on a legacy topic (`[[mqtt.mappings]]`);
    /// `None` when no mapping matches. Default: no mappings.
    fn map_topic(
        &self,
        _device: &DeviceName,
        _topic: &str,
        _payload: &[u8],
    ) -> Option<Result<Vec<Record>, super::mapping::MapRefusal>> {
        None
    }
    /// The firmware image `device` may fetch (file, size). Default: none.
    fn firmware(&self, _device: &DeviceName) -> Option<(PathBuf, u64)> {
        None
    }
    /// Counts a connection closed for breaking the protocol.
    fn protocol_error(&self, reason: ProtocolError);
}

/// Something the gateway pushes to a connected device.
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    /// Shared attributes changed: the payload of `v1/devices/me/attributes`
    /// (`{"k":v}`, or `{"deleted":["k"]}` for removed keys).
    Attributes(Json),
    /// A command: `v1/devices/me/rpc/request/{id}` with
    /// `{"method":…,"params":…}`.
    Rpc {
        /// The device-facing request id.
        id: u32,
        /// The payload.
        body: Json,
    },
}

/// The device filters a session holds that pushes go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// `v1/devices/me/attributes` (shared-attribute pushes).
    pub attributes: bool,
    /// `v1/devices/me/rpc/request/+` (commands).
    pub rpc: bool,
}

/// Limits announced to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet accepted, bytes.
    pub max_packet_size: usize,
    /// Most unsettled PUBLISHes per connection (MQTT 5 Receive Maximum;
    /// also the read back-pressure point for 3.1.1).
    pub receive_maximum: u16,
}

#[derive(Debug)]
enum Slot {
    /// Waiting for the commit of `ticket`.
    Storing { ticket: u64, qos: u8, pkid: u16 },
    /// Settled; these actions go out when the slot reaches the head.
    Done(Vec<Action>),
}

#[derive(Debug)]
enum State {
    AwaitingConnect,
    Connected {
        version: Version,
        device: DeviceName,
    },
    Closed,
}

/// One connection's session.
#[derive(Debug)]
pub struct Session {
    limits: Limits,
    state: State,
    /// Known from the CONNECT on, also after a refusal closed the session.
    version: Option<Version>,
    keep_alive: Option<Duration>,
    queue: VecDeque<Slot>,
    next_ticket: u64,
    /// A close is queued: read nothing more.
    closing: bool,
    /// Granted filters, in subscription order.
    filters: Vec<String>,
}

impl Session {
    /// A session waiting for its CONNECT.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::AwaitingConnect,
            version: None,
            keep_alive: None,
            queue: VecDeque::new(),
            next_ticket: 0,
            closing: false,
            filters: Vec::new(),
        }
    }

    /// Whether the session holds filters for pushes (for the router).
    pub fn subscriptions(&self) -> Subscriptions {
        let any = |t: &str| self.filters.iter().any(|f| topic_matches(f, t));
        Subscriptions {
            attributes: any(ATTRIBUTES_TOPIC),
            rpc: self.filters.iter().any(|f| {
                topic_matches(f, "v1/devices/me/rpc/request/1") || f.starts_with(RPC_REQUEST_PREFIX)
            }),
        }
    }

    /// A push from the gateway: a QoS 0 PUBLISH when the device subscribed
    /// to its topic (MQTT delivers only to matching subscriptions), else
    /// nothing. Pushes are not answers to the device's PUBLISHes, so they
    /// do not wait behind unsettled ones.
    pub fn push(&mut self, push: Push) -> Vec<Action> {
        if self.closing || !matches!(self.state, State::Connected { .. }) {
            return Vec::new();
        }
        let (topic, payload) = match push {
            Push::Attributes(body) => (ATTRIBUTES_TOPIC.to_owned(), body.to_string()),
            Push::Rpc { id, body } => (format!("{RPC_REQUEST_PREFIX}{id}"), body.to_string()),
        };
        if !self.filters.iter().any(|f| topic_matches(f, &topic)) {
            return Vec::new();
        }
        vec![Action::Send(Outbound::Publish {
            topic,
            payload: payload.into_bytes(),
        })]
    }

    /// The version of the CONNECT, once one arrived.
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// The authenticated device, once connected.
    pub fn device(&self) -> Option<&DeviceName> {
        match &self.state {
            State::Connected { device, .. } => Some(device),
            _ => None,
        }
    }

    /// How long the device may stay silent: 1.5 × its keep-alive (MQTT
    /// 3.1.2.10); `None` when keep-alive is off or before CONNECT.
    pub fn keep_alive_limit(&self) -> Option<Duration> {
        self.keep_alive
    }

    /// Whether more packets may be read now: not closing, and fewer than
    /// Receive Maximum PUBLISHes unsettled.
    pub fn wants_input(&self) -> bool {
        !self.closing
            && !matches!(self.state, State::Closed)
            && self.queue.len() < usize::from(self.limits.receive_maximum)
    }

    /// Whether no PUBLISH awaits its commit or its answer.
    pub fn settled(&self) -> bool {
        self.queue.is_empty()
    }

    /// Handles one packet from the device.
    pub fn handle(&mut self, packet: Inbound, env: &impl Env) -> Vec<Action> {
        if self.closing {
            return Vec::new();
        }
        match &self.state {
            State::Closed => Vec::new(),
            State::AwaitingConnect => self.on_connect(packet, env),
            State::Connected { version, device } => {
                let (version, device) = (*version, device.clone());
                self.on_packet(packet, version, &device, env)
            }
        }
    }

    fn close_now(&mut self) -> Vec<Action> {
        self.state = State::Closed;
        self.queue.clear();
        vec![Action::Close]
    }

    fn on_connect(&mut self, packet: Inbound, env: &impl Env) -> Vec<Action> {
        let Inbound::Connect {
            version,
            client_id,
            username,
            clean,
            keep_alive_s,
        } = packet
        else {
            env.protocol_error(ProtocolError::NotConnectFirst);
            tracing::debug!(packet = ?packet, "first packet is not CONNECT; closing");
            return self.close_now();
        };
        self.version = Some(version);
        let refuse = |s: &mut Self, code| {
            let mut a = vec![Action::Send(Outbound::ConnAck {
                code,
                assigned_client_id: None,
            })];
            a.extend(s.close_now());
            a
        };
        if !env.auth_allowed() {
            env.count(IngestResult::Unauthorized);
            tracing::debug!("MQTT CONNECT from an address over its failed-authentication limit");
            return refuse(self, ConnAckCode::NotAuthorized);
        }
        let device = env.authenticate_certificate().or_else(|| {
            username
                .as_deref()
                .filter(|u| !u.is_empty())
                .and_then(|u| env.authenticate(u))
        });
        let Some(device) = device else {
            env.count(IngestResult::Unauthorized);
            env.auth_failed();
            tracing::debug!("MQTT CONNECT with an unknown or revoked token");
            return refuse(self, ConnAckCode::BadCredentials);
        };
        if client_id.is_empty() && version == Version::V4 && !clean {
            tracing::debug!(%device, "empty client id without clean session");
            return refuse(self, ConnAckCode::BadClientId);
        }
        let assigned_client_id =
            (client_id.is_empty() && version == Version::V5).then(|| format!("sluice-{device}"));
        self.keep_alive =
            (keep_alive_s > 0).then(|| Duration::from_millis(u64::from(keep_alive_s) * 1500));
        self.state = State::Connected {
            version,
            device: device.clone(),
        };
        vec![
            Action::Send(Outbound::ConnAck {
                code: ConnAckCode::Accepted,
                assigned_client_id,
            }),
            Action::Authenticated(device),
        ]
    }

    fn on_packet(
        &mut self,
        packet: Inbound,
        version: Version,
        device: &DeviceName,
        env: &impl Env,
    ) -> Vec<Action> {
        match packet {
            Inbound::Publish {
                topic,
                qos,
                pkid,
                payload,
            } => self.on_publish(topic, qos, pkid, &payload, version, device, env),
            Inbound::Subscribe { pkid, filters } => {
                let granted = filters
                    .iter()
                    .map(|(f, q)| grantable(f).then(|| (*q).min(1)))
                    .collect();
                for (f, _) in &filters {
                    if grantable(f) && !self.filters.contains(f) {
                        self.filters.push(f.clone());
                    }
                }
                vec![Action::Send(Outbound::SubAck { pkid, granted })]
            }
            Inbound::Unsubscribe { pkid, filters } => {
                self.filters.retain(|f| !filters.contains(f));
                vec![Action::Send(Outbound::UnsubAck {
                    pkid,
                    count: filters.len(),
                })]
            }
            Inbound::PubAck => Vec::new(),
            Inbound::PingReq => vec![Action::Send(Outbound::PingResp)],
            Inbound::Disconnect => self.close_now(),
            Inbound::Connect { .. } => {
                env.protocol_error(ProtocolError::ProtocolViolation);
                tracing::debug!(%device, "second CONNECT; closing");
                self.refuse_now(version, DisconnectReason::ProtocolError)
            }
            Inbound::Unexpected(what) => {
                env.protocol_error(ProtocolError::ProtocolViolation);
                tracing::debug!(%device, packet = what, "unexpected packet; closing");
                self.refuse_now(version, DisconnectReason::ProtocolError)
            }
        }
    }

    fn refuse_now(&mut self, version: Version, why: DisconnectReason) -> Vec<Action> {
        let mut a = Vec::new();
        if version == Version::V5 {
            a.push(Action::Send(Outbound::Disconnect(why)));
        }
        a.extend(self.close_now());
        a
    }

    /// Queues `actions` behind the unsettled PUBLISHes and releases what
    /// can go.
    fn settle_in_order(&mut self, actions: Vec<Action>) -> Vec<Action> {
        if actions.contains(&Action::Close) {
            self.closing = true;
        }
        self.queue.push_back(Slot::Done(actions));
        self.release()
    }

    /// Closes after the earlier PUBLISHes are settled; MQTT 5 says why.
    fn close_in_order(&mut self, version: Version, why: DisconnectReason) -> Vec<Action> {
        let mut a = Vec::new();
        if version == Version::V5 {
            a.push(Action::Send(Outbound::Disconnect(why)));
        }
        a.push(Action::Close);
        self.settle_in_order(a)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_publish(
        &mut self,
        topic: Option<String>,
        qos: u8,
        pkid: u16,
        payload: &[u8],
        version: Version,
        device: &DeviceName,
        env: &impl Env,
    ) -> Vec<Action> {
        if qos > 1 {
            // Maximum QoS 1 is announced in the MQTT 5 CONNACK; MQTT 5 3.3.1.2
            // then asks for DISCONNECT 0x9B, and 3.1.1 has only the close.
            tracing::debug!(%device, "QoS 2 PUBLISH refused");
            return self.close_in_order(version, DisconnectReason::QoSNotSupported);
        }
        let Some(topic) = topic else {
            env.protocol_error(ProtocolError::Malformed);
            tracing::debug!(%device, "PUBLISH topic is not UTF-8; closing");
            return self.refuse_now(version, DisconnectReason::ProtocolError);
        };
        let refuse = |s: &mut Self, reason: AckReason, why: DisconnectReason| match (version, qos) {
            (Version::V5, 1) => {
                s.settle_in_order(vec![Action::Send(Outbound::PubAck { pkid, reason })])
            }
            // MQTT 5 QoS 0 has no answer to carry a refusal: it is counted
            // and logged only.
            (Version::V5, _) => Vec::new(),
            (Version::V4, _) => s.close_in_order(version, why),
        };
        if topic == TELEMETRY_TOPIC || topic == ATTRIBUTES_TOPIC {
            let attributes = topic == ATTRIBUTES_TOPIC;
            let now = env.now();
            // Client attributes take the same decoder, limits and refusals as
            // telemetry, and the receive time (they have no `ts` of their own).
            return match tbjson::decode(payload, device, now.wall_ms, now.trusted) {
                Err(e) => {
                    env.count(IngestResult::BadPayload);
                    tracing::debug!(%device, %topic, error = %e, "refused MQTT payload");
                    refuse(
                        self,
                        AckReason::PayloadFormatInvalid,
                        DisconnectReason::PayloadFormatInvalid,
                    )
                }
                Ok(records) if records.is_empty() => {
                    env.count(IngestResult::Ok);
                    self.ack_in_order(qos, pkid)
                }
                Ok(records) => {
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.queue.push_back(Slot::Storing { ticket, qos, pkid });
                    if attributes {
                        if let Ok(Json::Object(values)) = serde_json::from_slice::<Json>(payload) {
                            env.set_client_attributes(device, &values);
                        }
                        vec![Action::StoreAttributes { ticket, records }]
                    } else {
                        vec![Action::Store { ticket, records }]
                    }
                }
            };
        }
        if let Some(id) = topic.strip_prefix(ATTRIBUTES_REQUEST_PREFIX)
            && valid_id(id)
        {
            let answer = match attribute_keys(payload) {
                Some((client, shared)) => {
                    env.attributes(device, client.as_deref(), shared.as_deref())
                }
                None => {
                    tracing::debug!(%device, "attribute request is not {{\"clientKeys\",\"sharedKeys\"}}");
                    serde_json::json!({"error": "expected {\"clientKeys\":\"a,b\",\"sharedKeys\":\"c\"}"})
                }
            };
            let mut a = self.puback(qos, pkid);
            a.push(Action::Send(Outbound::Publish {
                topic: format!("{ATTRIBUTES_RESPONSE_PREFIX}{id}"),
                payload: answer.to_string().into_bytes(),
            }));
            return self.settle_in_order(a);
        }
        if let Some(id) = topic.strip_prefix(RPC_RESPONSE_PREFIX)
            && valid_id(id)
        {
            let routed = id
                .parse::<u32>()
                .is_ok_and(|id| env.rpc_reply(device, id, payload));
            if !routed {
                tracing::debug!(%device, %id, "RPC response for no pending command; dropped");
            }
            let a = self.puback(qos, pkid);
            return self.settle_in_order(a);
        }
        if let Some(rest) = topic.strip_prefix(FW_REQUEST_PREFIX)
            && let Some((request, chunk)) = rest.split_once("/chunk/")
            && valid_id(request)
            && let Ok(chunk) = chunk.parse::<u64>()
        {
            let Some((path, size)) = env.firmware(device) else {
                // Not targeted by a campaign: refused (MQTT 5 PUBACK 0x87;
                // 3.1.1 has no reason code, the request just goes
                // unanswered). The session stays up.
                tracing::debug!(%device, "firmware chunk requested, but the device is not targeted by a campaign");
                let a = if qos == 1 {
                    vec![Action::Send(Outbound::PubAck {
                        pkid,
                        reason: AckReason::NotAuthorized,
                    })]
                } else {
                    Vec::new()
                };
                return self.settle_in_order(a);
            };
            let mut a = self.puback(qos, pkid);
            match chunk_size(payload) {
                Some(chunk_size) => {
                    let (offset, len) = sluice_firmware::chunk_range(size, chunk_size, chunk);
                    a.push(Action::SendFirmware {
                        topic: format!("v2/fw/response/{request}/chunk/{chunk}"),
                        path,
                        offset,
                        len,
                    });
                }
                None => {
                    tracing::debug!(%device, "firmware chunk request payload is not a chunk size");
                }
            }
            return self.settle_in_order(a);
        }
        if let Some(id) = topic.strip_prefix(RPC_REQUEST_PREFIX)
            && !id.is_empty()
            && !id.contains(['/', '+', '#'])
        {
            let mut a = Vec::new();
            if qos == 1 {
                a.push(Action::Send(Outbound::PubAck {
                    pkid,
                    reason: AckReason::Success,
                }));
            }
            a.push(Action::Send(Outbound::Publish {
                topic: format!("{RPC_RESPONSE_PREFIX}{id}"),
                payload: self.rpc_answer(payload, env).into_bytes(),
            }));
            return self.settle_in_order(a);
        }
        match env.map_topic(device, &topic, payload) {
            None => {}
            Some(Ok(records)) if records.is_empty() => {
                env.count(IngestResult::Ok);
                return self.ack_in_order(qos, pkid);
            }
            Some(Ok(records)) => {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.queue.push_back(Slot::Storing { ticket, qos, pkid });
                return vec![Action::Store { ticket, records }];
            }
            Some(Err(super::mapping::MapRefusal::Payload(e))) => {
                env.count(IngestResult::BadPayload);
                tracing::debug!(%device, %topic, error = %e, "refused a mapped publish");
                return refuse(
                    self,
                    AckReason::PayloadFormatInvalid,
                    DisconnectReason::PayloadFormatInvalid,
                );
            }
            Some(Err(e)) => {
                env.count(IngestResult::Unauthorized);
                tracing::info!(%device, %topic, error = %e, "refused a mapped publish");
                return refuse(
                    self,
                    AckReason::NotAuthorized,
                    DisconnectReason::NotAuthorized,
                );
            }
        }
        tracing::debug!(%device, %topic, "PUBLISH outside the device API refused");
        refuse(
            self,
            AckReason::NotAuthorized,
            DisconnectReason::NotAuthorized,
        )
    }

    /// The PUBACK of an accepted QoS 1 PUBLISH (none for QoS 0).
    fn puback(&self, qos: u8, pkid: u16) -> Vec<Action> {
        if qos == 1 {
            vec![Action::Send(Outbound::PubAck {
                pkid,
                reason: AckReason::Success,
            })]
        } else {
            Vec::new()
        }
    }

    fn ack_in_order(&mut self, qos: u8, pkid: u16) -> Vec<Action> {
        if qos == 0 {
            return self.release();
        }
        self.settle_in_order(vec![Action::Send(Outbound::PubAck {
            pkid,
            reason: AckReason::Success,
        })])
    }

    /// The answer to a client-side RPC request.
    fn rpc_answer(&self, payload: &[u8], env: &impl Env) -> String {
        let method = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(str::to_owned));
        let answer = match method.as_deref() {
            Some("getSessionLimits") => serde_json::json!({
                "maxPayloadSize": self.limits.max_packet_size,
                "maxInflightMessages": self.limits.receive_maximum,
                // Rate limits are off: empty strings mean "no limit" to the
                // ThingsBoard SDK.
                "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
            }),
            Some("getCurrentTime") => serde_json::json!({ "currentTime": env.now().wall_ms }),
            _ => serde_json::json!({ "error": "unsupported method" }),
        };
        answer.to_string()
    }

    /// Reports how the append of `ticket` ended.
    pub fn stored(
        &mut self,
        ticket: u64,
        result: Stored,
        records: usize,
        env: &impl Env,
    ) -> Vec<Action> {
        let State::Connected { version, .. } = self.state else {
            return Vec::new();
        };
        let Some(slot) = self
            .queue
            .iter_mut()
            .find(|s| matches!(s, Slot::Storing { ticket: t, .. } if *t == ticket))
        else {
            return Vec::new();
        };
        let Slot::Storing { qos, pkid, .. } = *slot else {
            return Vec::new();
        };
        let ack = |reason| Action::Send(Outbound::PubAck { pkid, reason });
        let actions = match result {
            Stored::Ok => {
                env.count(IngestResult::Ok);
                env.count_records(records);
                if qos == 1 {
                    vec![ack(AckReason::Success)]
                } else {
                    Vec::new()
                }
            }
            Stored::Full | Stored::Failed => {
                env.count(IngestResult::Rejected);
                let (reason, why) = if result == Stored::Full {
                    (AckReason::QuotaExceeded, DisconnectReason::QuotaExceeded)
                } else {
                    (AckReason::Unspecified, DisconnectReason::ServerShuttingDown)
                };
                match (version, qos) {
                    (Version::V5, 1) => vec![ack(reason)],
                    // No way to refuse a QoS 0 message or to NAK on 3.1.1:
                    // withhold the PUBACK and close, so the device knows.
                    (Version::V5, _) => {
                        vec![Action::Send(Outbound::Disconnect(why)), Action::Close]
                    }
                    (Version::V4, _) => vec![Action::Close],
                }
            }
        };
        if actions.contains(&Action::Close) {
            self.closing = true;
        }
        *slot = Slot::Done(actions);
        self.release()
    }

    fn release(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(Slot::Done(_)) = self.queue.front() {
            let Some(Slot::Done(actions)) = self.queue.pop_front() else {
                break;
            };
            let close = actions.contains(&Action::Close);
            out.extend(actions);
            if close {
                self.state = State::Closed;
                self.queue.clear();
                break;
            }
        }
        out
    }
}

/// A request id in a topic: non-empty, one level, no wildcards.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && !id.contains(['/', '+', '#'])
}

/// The keys of an attribute request: `{"clientKeys":"a,b","sharedKeys":"c"}`
/// (comma-separated strings, as the ThingsBoard SDK sends; arrays of
/// strings also accepted). An empty payload or `{}` asks for everything.
/// `None` when the payload is not of that shape.
#[allow(clippy::type_complexity)]
fn attribute_keys(payload: &[u8]) -> Option<(Option<Vec<String>>, Option<Vec<String>>)> {
    if payload.len() > MAX_ATTRIBUTE_REQUEST {
        return None;
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Some((None, None));
    }
    let Json::Object(m) = serde_json::from_slice::<Json>(payload).ok()? else {
        return None;
    };
    let keys = |name: &str| -> Result<Option<Vec<String>>, ()> {
        match m.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
            Some(Json::Array(a)) => a
                .iter()
                .map(|k| k.as_str().map(str::to_owned).ok_or(()))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(()),
        }
    };
    Some((keys("clientKeys").ok()?, keys("sharedKeys").ok()?))
}

/// A firmware chunk request's payload: the chunk size in ASCII decimal, or
/// empty for the whole image (`Some(None)`); `None` when it is neither.
fn chunk_size(payload: &[u8]) -> Option<Option<u64>> {
    let s = std::str::from_utf8(payload).ok()?.trim();
    if s.is_empty() {
        return Some(None);
    }
    s.parse::<u64>().ok().map(Some)
}

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod tests;
