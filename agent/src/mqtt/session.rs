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

use crate::stats::IngestResult;
use crate::tbjson;
use sluice_cloud_sync::{DeviceName, Record, Stamp};
use std::collections::VecDeque;
use std::time::Duration;
use tokio_util::bytes::Bytes;

/// Telemetry topic of the ThingsBoard device API.
pub const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";
/// Prefix of client-side RPC requests; the suffix is the request id.
pub const RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";
/// Prefix of RPC responses sent to the device.
pub const RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";
/// Filters a device may subscribe to (granted at QoS 1 at most).
pub const GRANTED_FILTERS: [&str; 5] = [
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
    "v2/fw/response/+",
];

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
        /// Number of filters.
        count: usize,
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
    /// The gateway clock.
    fn now(&self) -> Stamp;
    /// Counts one ingested message.
    fn count(&self, result: IngestResult);
    /// Counts stored records.
    fn count_records(&self, n: usize);
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
        }
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
        let device = env.authenticate_certificate().or_else(|| {
            username
                .as_deref()
                .filter(|u| !u.is_empty())
                .and_then(|u| env.authenticate(u))
        });
        let Some(device) = device else {
            env.count(IngestResult::Unauthorized);
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
                    .map(|(f, q)| GRANTED_FILTERS.contains(&f.as_str()).then(|| (*q).min(1)))
                    .collect();
                vec![Action::Send(Outbound::SubAck { pkid, granted })]
            }
            Inbound::Unsubscribe { pkid, count } => {
                vec![Action::Send(Outbound::UnsubAck { pkid, count })]
            }
            Inbound::PubAck => Vec::new(),
            Inbound::PingReq => vec![Action::Send(Outbound::PingResp)],
            Inbound::Disconnect => self.close_now(),
            Inbound::Connect { .. } => {
                tracing::debug!(%device, "second CONNECT; closing");
                self.refuse_now(version, DisconnectReason::ProtocolError)
            }
            Inbound::Unexpected(what) => {
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
        if topic == TELEMETRY_TOPIC {
            let now = env.now();
            return match tbjson::decode(payload, device, now.wall_ms, now.trusted) {
                Err(e) => {
                    env.count(IngestResult::BadPayload);
                    tracing::debug!(%device, error = %e, "refused MQTT payload");
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
                    vec![Action::Store { ticket, records }]
                }
            };
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
        tracing::debug!(%device, %topic, "PUBLISH outside the device API refused");
        refuse(
            self,
            AckReason::NotAuthorized,
            DisconnectReason::NotAuthorized,
        )
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

#[cfg(test)]
mod tests;
