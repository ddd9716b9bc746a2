//! One MQTT client API over rumqttc's 3.1.1 and 5 clients, so the uplink's
//! session logic exists once: requests ([`Client`]) and the events the
//! uplink acts on ([`Ev`]), with the protocol differences settled here —
//! notably that an MQTT 5 PUBACK may carry a failure reason code, which does
//! not acknowledge the records ([`Ev::PubAck::accepted`]).

use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{QoS, Transport};
use std::time::Duration;
use tokio_util::bytes::Bytes;

/// The MQTT protocol version of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// What a connection is made with.
pub struct Settings {
    /// Version.
    pub version: MqttVersion,
    /// Client id.
    pub client_id: String,
    /// Broker.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Most publishes in flight.
    pub inflight: u16,
    /// The will: topic and payload (QoS 1, retained).
    pub will: Option<(String, Vec<u8>)>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// TLS or plain TCP.
    pub transport: Transport,
}

/// A client handle.
pub enum Client {
    /// 3.1.1.
    V4(rumqttc::AsyncClient),
    /// 5.
    V5(rumqttc::v5::AsyncClient),
}

/// An event loop.
pub enum Loop {
    /// 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The events the uplink acts on.
#[derive(Debug)]
pub enum Ev {
    /// The broker accepted the connection.
    ConnAck,
    /// A publish left with this packet id (0 for QoS 0).
    Published(u16),
    /// A PUBACK.
    PubAck {
        /// Its packet id.
        pkid: u16,
        /// Whether the broker took the message (always on 3.1.1; reason
        /// code < 0x80 on 5).
        accepted: bool,
        /// The MQTT 5 reason, for the log.
        reason: String,
    },
    /// A message from the broker.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Bytes,
    },
    /// A SUBACK refusing some filter.
    SubscriptionRefused,
    /// Our DISCONNECT went out.
    Disconnected,
    /// Anything else.
    Other,
}

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A new client and event loop (no network I/O until polled); a clean
/// session either way.
pub fn connect(s: Settings, cap: usize) -> (Client, Loop) {
    match s.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_clean_session(true)
                .set_keep_alive(s.keep_alive)
                .set_inflight(s.inflight)
                .set_max_packet_size(1 << 20, 1 << 28)
                .set_transport(s.transport);
            if let Some((topic, payload)) = s.will {
                o.set_last_will(rumqttc::LastWill::new(
                    topic,
                    payload,
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            let (c, l) = rumqttc::AsyncClient::new(o, cap);
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_clean_start(true)
                .set_keep_alive(s.keep_alive)
                .set_outgoing_inflight_upper_limit(s.inflight)
                .set_max_packet_size(Some(1 << 20))
                .set_transport(s.transport);
            if let Some((topic, payload)) = s.will {
                o.set_last_will(p5::LastWill::new(
                    topic,
                    payload,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                ));
            }
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(o, cap);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
    }
}

impl Client {
    /// Queues a publish.
    ///
    /// Fails when the request channel is full or closed.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .try_publish(topic.into(), qos, retain, payload)
                .map_err(|e| e.to_string()),
            Self::V5(c) => c
                .try_publish(topic.into(), qos5(qos), retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a SUBSCRIBE of `topics` at QoS 1.
    ///
    /// Fails when the request channel is full or closed.
    pub fn try_subscribe_many(&self, topics: &[String]) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
            Self::V5(c) => c
                .try_subscribe_many(
                    topics.iter().map(|t| {
                        p5::Filter::new(t.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    }),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT.
    ///
    /// Fails when the request channel is full or closed.
    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Self::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl Loop {
    /// The next event.
    ///
    /// Fails when the connection is lost or refused (the text says why).
    pub async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            Self::V4(l) => {
                use rumqttc::{ConnectionError, Event, Outgoing, Packet};
                match l.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(Ev::ConnAck),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::Published(pkid)),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(Ev::PubAck {
                        pkid: a.pkid,
                        accepted: true,
                        reason: String::new(),
                    }),
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(Ev::Message {
                        topic: p.topic,
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(a))) => Ok(
                        if a.return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            Ev::SubscriptionRefused
                        } else {
                            Ev::Other
                        },
                    ),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(Ev::Disconnected),
                    Ok(_) => Ok(Ev::Other),
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        Err(format!("broker refused the connection: {code:?}"))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Self::V5(l) => {
                use rumqttc::v5::{ConnectionError, Event};
                use rumqttc::{Outgoing, v5::mqttbytes::v5::Packet};
                match l.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(Ev::ConnAck),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::Published(pkid)),
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let accepted = matches!(
                            a.reason,
                            p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers
                        );
                        Ok(Ev::PubAck {
                            pkid: a.pkid,
                            accepted,
                            reason: format!("{:?}", a.reason),
                        })
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(Ev::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(a))) => Ok(
                        if a.return_codes
                            .iter()
                            .any(|c| !matches!(c, p5::SubscribeReasonCode::Success(_)))
                        {
                            Ev::SubscriptionRefused
                        } else {
                            Ev::Other
                        },
                    ),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(Ev::Disconnected),
                    Ok(_) => Ok(Ev::Other),
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        Err(format!("broker refused the connection: {code:?}"))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}
