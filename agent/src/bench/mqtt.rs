//! The MQTT side of `sluice bench`: one small MQTT 3.1.1 client per device.
//!
//! Each connection is one task that owns its socket. It sends CONNECT (the
//! username is the device's access token, none with `--no-auth`), waits for
//! CONNACK, then publishes its share of the messages to `--topic`:
//! - QoS 1: up to `--inflight` unacknowledged PUBLISHes at a time; each
//!   batch of PUBLISHes the window allows is one write, and a message's
//!   latency runs from that write to its PUBACK;
//! - QoS 0: every PUBLISH is written as fast as the socket takes it, then one
//!   PINGREQ/PINGRESP round trip proves the server has read them all; there
//!   is no per-message latency.
//!
//! A connection that fails is not reopened: its unsent and unacknowledged
//! messages are counted under the failure's cause. Packets are encoded and
//! decoded with rumqttc's public v4 codec; the framing of the byte stream
//! ([`next_packet`]) and the in-flight window ([`Window`]) are plain code
//! without I/O, tested on their own.

use super::{CONNECT_TIMEOUT, REQUEST_TIMEOUT, Tally, write_body};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::bytes::{Bytes, BytesMut};

/// Largest packet the client accepts from the server.
const MAX_INCOMING_PACKET: usize = 1 << 20;
/// Largest packet the client writes (a PUBLISH of the largest payload).
const MAX_OUTGOING_PACKET: usize = (16 << 20) + (64 << 10);
/// Keep-alive announced in CONNECT: longer than any pause of the load.
const KEEP_ALIVE_S: u16 = 60;
/// Bytes of QoS 0 PUBLISHes gathered before one write.
const QOS0_BATCH_BYTES: usize = 64 << 10;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 << 10;

/// What every MQTT connection task shares.
pub(super) struct MqttPlan {
    pub addr: SocketAddr,
    /// One entry per connection: the username (access token), `None` for
    /// `--no-auth`.
    pub usernames: Vec<Option<String>>,
    pub topic: String,
    pub qos: QoS,
    pub inflight: u16,
    pub messages: u64,
    pub payload_bytes: usize,
}

impl MqttPlan {
    /// Messages connection `c` publishes: an even share, the first
    /// `messages % connections` one more.
    fn share(&self, c: u64) -> u64 {
        let n = (self.usernames.len() as u64).max(1);
        self.messages / n + u64::from(c < self.messages % n)
    }
}

/// Runs one task per connection until each has published its share.
pub(super) async fn load(plan: Arc<MqttPlan>) -> Result<(Tally, Duration), super::BenchError> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..plan.usernames.len() as u64 {
        tasks.spawn(connection(plan.clone(), c));
    }
    let mut total = Tally {
        samples_us: Vec::with_capacity(usize::try_from(plan.messages).unwrap_or(0)),
        ..Tally::default()
    };
    while let Some(done) = tasks.join_next().await {
        total.merge(done.map_err(|e| super::BenchError::Task(e.to_string()))?);
    }
    Ok((total, started.elapsed()))
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("CONNACK refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("no answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("bad packet from the server: {0}")]
    Packet(String),
}

impl ClientError {
    fn cause(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Refused(_) => "refused",
            Self::Io(_) => "io",
            Self::Closed => "closed",
            Self::Timeout => "timeout",
            Self::Packet(_) => "bad_response",
        }
    }
}

/// One connection: publishes its share, counting into a tally.
async fn connection(plan: Arc<MqttPlan>, c: u64) -> Tally {
    let share = plan.share(c);
    let mut tally = Tally {
        sent: share,
        ..Tally::default()
    };
    let mut client = Client {
        plan: &plan,
        c,
        share,
        next: 0,
        window: Window::new(plan.inflight),
        tally: &mut tally,
    };
    if let Err(e) = client.run().await {
        // Whatever was not acknowledged (QoS 1), or the whole share (QoS 0:
        // no PINGRESP proves anything was read), failed with the connection.
        let lost = share - client.tally.ok;
        for _ in 0..lost {
            tally.error(e.cause());
        }
        if lost > 0 && tally.first_failure.is_none() {
            tally.first_failure = Some(e.to_string());
        }
    }
    tally
}

struct Client<'a> {
    plan: &'a MqttPlan,
    c: u64,
    share: u64,
    /// Messages of the share written so far.
    next: u64,
    window: Window,
    tally: &'a mut Tally,
}

impl Client<'_> {
    async fn run(&mut self) -> Result<(), ClientError> {
        let plan = self.plan;
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(plan.addr))
            .await
            .map_err(|_| ClientError::Connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(ClientError::Connect)?;
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::with_capacity(QOS0_BATCH_BYTES + 1024);
        let mut inbuf = BytesMut::with_capacity(READ_CHUNK);

        let mut connect = Connect::new(format!("sluice-bench-{}", self.c));
        connect.keep_alive = KEEP_ALIVE_S;
        let username = usize::try_from(self.c)
            .ok()
            .and_then(|c| plan.usernames.get(c))
            .and_then(Option::as_ref);
        if let Some(user) = username {
            connect.set_login(user.clone(), String::new());
        }
        encode(&Packet::Connect(connect), &mut out)?;
        stream.write_all(&out).await.map_err(ClientError::Io)?;
        out.clear();
        match read_packet(&mut stream, &mut inbuf).await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => {}
            Packet::ConnAck(ConnAck { code, .. }) => return Err(ClientError::Refused(code)),
            other => return Err(ClientError::Packet(format!("{other:?} before CONNACK"))),
        }

        let mut publish = Publish::from_bytes(plan.topic.as_str(), plan.qos, Bytes::new());
        let mut body = Vec::new();
        let per_message = self.plan.messages.max(1);
        if plan.qos == QoS::AtMostOnce {
            while self.next < self.share {
                while self.next < self.share && out.len() < QOS0_BATCH_BYTES {
                    write_body(&mut body, self.seq(per_message), plan.payload_bytes);
                    publish.payload = Bytes::copy_from_slice(&body);
                    encode(&Packet::Publish(publish.clone()), &mut out)?;
                    self.next += 1;
                }
                let written = stream.write_all(&out).await;
                out.clear();
                if let Err(e) = written {
                    return Err(ClientError::Io(e));
                }
            }
            encode(&Packet::PingReq, &mut out)?;
            stream.write_all(&out).await.map_err(ClientError::Io)?;
            loop {
                match read_packet(&mut stream, &mut inbuf).await? {
                    Packet::PingResp => {
                        self.tally.ok = self.next;
                        return Ok(());
                    }
                    Packet::Disconnect => return Err(ClientError::Closed),
                    _ => {}
                }
            }
        }

        let mut ids = PacketIds::default();
        while self.next < self.share || !self.window.is_empty() {
            let now = Instant::now();
            while self.next < self.share && !self.window.is_full() {
                write_body(&mut body, self.seq(per_message), plan.payload_bytes);
                publish.payload = Bytes::copy_from_slice(&body);
                publish.pkid = ids.next_id();
                encode(&Packet::Publish(publish.clone()), &mut out)?;
                self.window.sent(publish.pkid, now);
                self.next += 1;
            }
            if !out.is_empty() {
                let written = stream.write_all(&out).await;
                out.clear();
                written.map_err(ClientError::Io)?;
            }
            // Read at least one packet, then whatever else has arrived.
            let mut packet = Some(read_packet(&mut stream, &mut inbuf).await?);
            while let Some(p) = packet {
                match p {
                    Packet::PubAck(ack) => {
                        let Some(sent) = self.window.acked(ack.pkid) else {
                            return Err(ClientError::Packet(format!(
                                "PUBACK for packet id {} not in flight",
                                ack.pkid
                            )));
                        };
                        self.tally.ok += 1;
                        self.tally
                            .samples_us
                            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Packet::Disconnect => return Err(ClientError::Closed),
                    _ => {}
                }
                packet = next_packet(&mut inbuf).map_err(|e| ClientError::Packet(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The sequence number written into the current message's body:
    /// unique across connections.
    fn seq(&self, messages: u64) -> u64 {
        self.c * messages + self.next
    }
}

/// Appends `packet` to `out`.
fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), ClientError> {
    packet
        .write(out, MAX_OUTGOING_PACKET)
        .map(|_| ())
        .map_err(|e| ClientError::Packet(format!("cannot encode: {e}")))
}

/// Reads until one whole packet is in `inbuf`, and returns it.
async fn read_packet(stream: &mut TcpStream, inbuf: &mut BytesMut) -> Result<Packet, ClientError> {
    loop {
        if let Some(p) = next_packet(inbuf).map_err(|e| ClientError::Packet(e.to_string()))? {
            return Ok(p);
        }
        inbuf.reserve(READ_CHUNK);
        let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read_buf(inbuf))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// Takes the first whole packet off the front of `buf`.
///
/// Returns `Ok(None)` while the packet has not fully arrived (nothing is
/// consumed). Fails on a malformed packet or one larger than 1 MiB.
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
    match Packet::read(buf, MAX_INCOMING_PACKET) {
        Ok(p) => Ok(Some(p)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Packet identifiers 1, 2, … 65535, 1, … (0 is not a valid identifier).
#[derive(Debug, Default)]
pub struct PacketIds {
    last: u16,
}

impl PacketIds {
    /// The next identifier.
    pub fn next_id(&mut self) -> u16 {
        self.last = self.last.checked_add(1).unwrap_or(1);
        self.last
    }
}

/// The QoS 1 PUBLISHes written and not yet acknowledged, oldest first, with
/// the time each was written.
#[derive(Debug)]
pub struct Window {
    limit: usize,
    in_flight: VecDeque<(u16, Instant)>,
}

impl Window {
    /// An empty window of at most `limit` messages (at least 1).
    pub fn new(limit: u16) -> Self {
        let limit = usize::from(limit.max(1));
        Self {
            limit,
            in_flight: VecDeque::with_capacity(limit),
        }
    }

    /// Whether no message is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Whether another message must wait for an acknowledgement.
    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.limit
    }

    /// Records a PUBLISH written at `at`.
    pub fn sent(&mut self, pkid: u16, at: Instant) {
        self.in_flight.push_back((pkid, at));
    }

    /// Settles the PUBLISH `pkid` and returns when it was written; `None`
    /// when it is not in flight. PUBACKs come in order (MQTT 4.6), so the
    /// oldest is checked first, but any order is accepted.
    pub fn acked(&mut self, pkid: u16) -> Option<Instant> {
        let i = self.in_flight.iter().position(|(id, _)| *id == pkid)?;
        self.in_flight.remove(i).map(|(_, at)| at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::PubAck;

    #[test]
    fn framing_waits_for_a_whole_packet_and_leaves_the_rest() {
        let mut wire = BytesMut::new();
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
            .write(&mut wire, 1024)
            .unwrap();
        Packet::PubAck(PubAck::new(7))
            .write(&mut wire, 1024)
            .unwrap();
        Packet::PingResp.write(&mut wire, 1024).unwrap();
        assert_eq!(wire.len(), 4 + 4 + 2);

        // Byte by byte: nothing comes out until a packet is whole.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(p) = next_packet(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(
            got,
            [
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
                Packet::PubAck(PubAck::new(7)),
                Packet::PingResp,
            ]
        );
        assert!(buf.is_empty());
        assert_eq!(next_packet(&mut buf).unwrap(), None);
    }

    #[test]
    fn framing_refuses_malformed_and_oversized_packets() {
        // Packet type 0 is reserved.
        let mut bad = BytesMut::from(&[0x00, 0x00][..]);
        assert!(next_packet(&mut bad).is_err());
        // A PUBLISH announcing 2 MiB: refused from the header alone.
        let mut huge = BytesMut::from(&[0x30, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            next_packet(&mut huge),
            Err(CodecError::PayloadSizeLimitExceeded(_))
        ));
    }

    #[test]
    fn publishes_encode_with_topic_id_and_payload() {
        let mut publish =
            Publish::from_bytes("v1/devices/me/telemetry", QoS::AtLeastOnce, Bytes::new());
        let mut body = Vec::new();
        write_body(&mut body, 42, 100);
        publish.payload = Bytes::copy_from_slice(&body);
        publish.pkid = 513;
        let mut wire = BytesMut::new();
        encode(&Packet::Publish(publish.clone()), &mut wire).unwrap();
        // Fixed header (2) + topic (2 + 23) + packet id (2) + payload.
        assert_eq!(wire.len(), 2 + 2 + 23 + 2 + 100);
        assert_eq!(wire[0], 0x32, "PUBLISH, QoS 1");
        assert_eq!(
            next_packet(&mut wire).unwrap(),
            Some(Packet::Publish(publish))
        );
    }

    #[test]
    fn packet_ids_skip_zero_when_they_wrap() {
        let mut ids = PacketIds::default();
        assert_eq!(ids.next_id(), 1);
        ids.last = u16::MAX - 1;
        assert_eq!(ids.next_id(), u16::MAX);
        assert_eq!(ids.next_id(), 1);
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_settles_any_order() {
        let t0 = Instant::now();
        let mut w = Window::new(3);
        assert!(w.is_empty() && !w.is_full());
        for (id, ms) in [(1, 0), (2, 1), (3, 2)] {
            w.sent(id, t0 + Duration::from_millis(ms));
        }
        assert!(w.is_full());
        assert_eq!(w.acked(1), Some(t0));
        assert!(!w.is_full());
        assert_eq!(w.acked(1), None, "already settled");
        assert_eq!(w.acked(3), Some(t0 + Duration::from_millis(2)));
        assert_eq!(w.acked(9), None);
        assert_eq!(w.acked(2), Some(t0 + Duration::from_millis(1)));
        assert!(w.is_empty());
        assert!(!Window::new(0).is_full(), "a zero limit means one");
    }

    #[test]
    fn shares_add_up_to_the_messages() {
        let plan = MqttPlan {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            usernames: vec![None; 7],
            topic: "t".into(),
            qos: QoS::AtLeastOnce,
            inflight: 1,
            messages: 100,
            payload_bytes: 10,
        };
        let shares: Vec<u64> = (0..7).map(|c| plan.share(c)).collect();
        assert_eq!(shares, [15, 15, 14, 14, 14, 14, 14]);
        assert_eq!(shares.iter().sum::<u64>(), 100);
    }
}
