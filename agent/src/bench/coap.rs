//! The CoAP side of `sluice bench`: confirmable POSTs of JSON telemetry to
//! `/api/v1/{token}/telemetry`.
//!
//! `--concurrency` is the number of requests in flight, each *slot* one task
//! that owns one UDP socket and has one request outstanding at a time, as a
//! constrained device does (RFC 7252 §4.7, NSTART = 1). Slots take messages
//! from a shared counter; message `i` goes to device `i % N`. A request
//! unanswered after ACK_TIMEOUT × [1, 1.5) is sent again with the *same*
//! message id (the gateway deduplicates on it), the timeout doubling, at
//! most MAX_RETRANSMIT times; an empty ACK (a separate response follows)
//! ends the retransmissions, and the response CON is acknowledged. A
//! message's latency runs from its first transmission to its response;
//! 2.04 counts as acknowledged, any other code as an error under its name
//! (`"5.03"`).
//!
//! Message ids go up by one per socket from a random start, so an id comes
//! back on a socket only after 65 536 requests from it: at 1 024 slots and
//! 50 000 req/s, after 22 minutes, well past EXCHANGE_LIFETIME.
//!
//! Requests are encoded with coap-lite once per device (a template with an
//! empty payload); each message patches the message id and token into the
//! template and appends the payload. [`request_template`],
//! [`write_request`] and the exchange state machine ([`Exchange`]) are
//! plain code without I/O, tested on their own; [`exchange`] drives one
//! request over any [`Datagrams`], so `--protocol coaps` ([`super::coaps`])
//! runs the same exchanges through a DTLS session.

use super::{CONNECT_TIMEOUT, REQUEST_TIMEOUT, Tally, write_body};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Largest `--payload-bytes` for CoAP: one request must fit one datagram
/// without Block1 (RFC 7252 §4.6 sizes messages for one IP packet).
pub const MAX_PAYLOAD_BYTES: u64 = 1024;
/// RFC 7252 ACK_TIMEOUT.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 MAX_RETRANSMIT.
const MAX_RETRANSMIT: u32 = 4;
/// Token length: the slot's request counter, big-endian.
const TOKEN_LEN: usize = 4;
/// Largest answer read (the gateway answers a POST with a few bytes).
pub(super) const MAX_ANSWER: usize = 2048;
/// Content-Format application/json.
const CF_JSON: u8 = 50;

/// What every slot shares.
pub(super) struct CoapPlan {
    pub addr: SocketAddr,
    /// One encoded request per device, its payload empty ([`request_template`]).
    pub templates: Vec<Vec<u8>>,
    pub messages: u64,
    pub payload_bytes: usize,
    /// Index of the next message to send.
    pub next: AtomicU64,
}

impl CoapPlan {
    /// A plan for the devices of `tokens`.
    ///
    /// Fails when a token makes a request coap-lite cannot encode.
    pub fn new(
        addr: SocketAddr,
        tokens: &[String],
        messages: u64,
        payload_bytes: usize,
    ) -> Result<Self, String> {
        let templates = tokens
            .iter()
            .map(|t| request_template(Some(t)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            addr,
            templates,
            messages,
            payload_bytes,
            next: AtomicU64::new(0),
        })
    }
}

/// The CON POST of telemetry with message id 0, a zero token of
/// [`TOKEN_LEN`] bytes and no payload: to `/api/v1/{token}/telemetry` for
/// the device of an access token, or to `/api/v1/telemetry` without one
/// (over coaps, where the DTLS session names the device).
///
/// Fails when coap-lite cannot encode it (a token too long for an option).
pub fn request_template(token: Option<&str>) -> Result<Vec<u8>, String> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.set_token(vec![0; TOKEN_LEN]);
    for seg in ["api", "v1"].into_iter().chain(token).chain(["telemetry"]) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.add_option(CoapOption::ContentFormat, vec![CF_JSON]);
    p.to_bytes()
        .map_err(|e| format!("cannot encode a request for token {token:?}: {e}"))
}

/// Writes the request of `template` with message id `mid`, token `token`
/// and `payload` into `out`.
pub fn write_request(
    out: &mut Vec<u8>,
    template: &[u8],
    mid: u16,
    token: [u8; TOKEN_LEN],
    payload: &[u8],
) {
    out.clear();
    out.extend_from_slice(template);
    if out.len() >= 4 + TOKEN_LEN {
        out[2..4].copy_from_slice(&mid.to_be_bytes());
        out[4..4 + TOKEN_LEN].copy_from_slice(&token);
    }
    if !payload.is_empty() {
        out.push(0xFF);
        out.extend_from_slice(payload);
    }
}

/// Checks that a CoAP endpoint answers at `addr`: a CoAP ping (an empty
/// CON) must come back as RST (or any CoAP message with its id) within
/// the connect timeout. Blocking.
///
/// Fails when nothing answers in time (`TimedOut`), the port is closed
/// (`ConnectionRefused`), or the answer is not CoAP (`InvalidData`).
pub(super) fn ping(addr: SocketAddr) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind(unspecified(addr))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mid = first_mid();
    let [hi, lo] = mid.to_be_bytes();
    sock.send(&[0x40, 0x00, hi, lo])?;
    let mut buf = [0u8; MAX_ANSWER];
    let n = sock.recv(&mut buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => std::io::Error::from(std::io::ErrorKind::TimedOut),
        _ => e,
    })?;
    match Packet::from_bytes(&buf[..n]) {
        Ok(p) if p.header.message_id == mid => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer to a CoAP ping is not CoAP",
        )),
    }
}

/// The unspecified address of `peer`'s family, port 0: what a slot binds.
pub(super) fn unspecified(peer: SocketAddr) -> SocketAddr {
    let ip = match peer.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// A random first message id.
pub(super) fn first_mid() -> u16 {
    let mut b = [0u8; 2];
    // A fixed start is still correct, only less like a device.
    let _ = getrandom::fill(&mut b);
    u16::from_be_bytes(b)
}

/// Runs `slots` slot tasks until every message is answered or given up.
pub(super) async fn load(
    plan: Arc<CoapPlan>,
    slots: u64,
) -> Result<(Tally, Duration), super::BenchError> {
    let messages = plan.messages;
    super::run_slots(slots, messages, |s| slot(plan.clone(), s)).await
}

/// One slot: one socket, one request in flight, until no message is left.
async fn slot(plan: Arc<CoapPlan>, s: u64) -> Tally {
    let mut tally = Tally::default();
    let mut link: Option<Plain> = None;
    let mut mid = first_mid();
    let mut jitter = Jitter::new(mid, s);
    let mut request = Vec::new();
    let mut body = Vec::new();
    let devices = plan.templates.len() as u64;
    for n in 0u32.. {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.messages {
            break;
        }
        tally.sent += 1;
        if link.is_none() {
            match open(plan.addr).await {
                Ok(sock) => {
                    link = Some(Plain {
                        sock,
                        buf: vec![0u8; MAX_ANSWER],
                    });
                }
                Err(e) => {
                    tally.failure("io", || format!("cannot open a UDP socket: {e}"));
                    continue;
                }
            }
        }
        let Some(l) = link.as_mut() else { continue };
        let template = usize::try_from(i % devices.max(1))
            .ok()
            .and_then(|d| plan.templates.get(d))
            .map_or(&[][..], Vec::as_slice);
        write_body(&mut body, i, plan.payload_bytes);
        mid = mid.wrapping_add(1);
        let token = n.to_be_bytes();
        write_request(&mut request, template, mid, token, &body);
        let now = Instant::now();
        let x = Exchange::new(mid, token, now, jitter.next());
        // The socket is kept whatever happens, as a device would keep its
        // own.
        exchange(l, &request, x, now, &mut tally).await;
    }
    tally
}

/// Where a slot's CoAP messages travel: a plain UDP socket here, a DTLS
/// session for coaps.
pub(super) trait Datagrams {
    /// Sends one CoAP message.
    async fn send(&mut self, msg: &[u8]) -> std::io::Result<()>;
    /// The next CoAP message to arrive, or `None` when `deadline` passes
    /// first. A peer that closed the transport is `ConnectionAborted`.
    async fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<&[u8]>>;
}

/// A connected UDP socket and its receive buffer.
struct Plain {
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl Datagrams for Plain {
    async fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        self.sock.send(msg).await.map(drop)
    }

    async fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<&[u8]>> {
        match tokio::time::timeout_at(deadline, self.sock.recv(&mut self.buf)).await {
            Ok(Ok(len)) => Ok(self.buf.get(..len)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }
}

/// Runs the exchange `x` of `request` (first sent at `sent_at`) over
/// `link` until it is answered or given up, and counts its outcome in
/// `tally`. Returns whether the link failed or went silent (the caller may
/// replace it: a DTLS session the gateway dropped answers nothing).
pub(super) async fn exchange(
    link: &mut impl Datagrams,
    request: &[u8],
    mut x: Exchange,
    sent_at: Instant,
    tally: &mut Tally,
) -> bool {
    let mut step = match link.send(request).await {
        Ok(()) => Step::Wait,
        Err(e) => Step::Failed(e),
    };
    loop {
        match step {
            Step::Wait => {}
            Step::Resend => {
                if let Err(e) = link.send(request).await {
                    step = Step::Failed(e);
                    continue;
                }
            }
            Step::Ack(their_mid) => {
                let [hi, lo] = their_mid.to_be_bytes();
                let _ = link.send(&[0x60, 0x00, hi, lo]).await;
            }
            Step::Answered { code, ack } => {
                if let Some(their_mid) = ack {
                    let [hi, lo] = their_mid.to_be_bytes();
                    let _ = link.send(&[0x60, 0x00, hi, lo]).await;
                }
                if code == MessageClass::Response(ResponseType::Changed) {
                    tally.ok += 1;
                    let us = sent_at.elapsed().as_micros();
                    tally.samples_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                } else {
                    tally.error(code.to_string());
                }
                return false;
            }
            Step::Reset => {
                tally.failure("reset", || "the gateway reset a request (RST)".into());
                return false;
            }
            Step::GiveUp => {
                tally.failure("timeout", || {
                    format!("no answer after {MAX_RETRANSMIT} retransmissions")
                });
                return true;
            }
            Step::Failed(e) => {
                let cause = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "refused",
                    std::io::ErrorKind::ConnectionAborted => "closed",
                    _ => "io",
                };
                tally.failure(cause, || format!("i/o: {e}"));
                return true;
            }
        }
        step = match link.recv(x.deadline()).await {
            Ok(Some(d)) => x.on_datagram(d, Instant::now()),
            Ok(None) => x.on_timeout(Instant::now()),
            Err(e) => Step::Failed(e),
        };
    }
}

/// A UDP socket on an ephemeral port, connected to `addr`.
pub(super) async fn open(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(unspecified(addr)).await?;
    s.connect(addr).await?;
    Ok(s)
}

/// xorshift for retransmission jitter; not for secrets.
pub(super) struct Jitter(u64);

impl Jitter {
    /// A sequence seeded by a slot's first message id and its number.
    pub(super) fn new(mid: u16, slot: u64) -> Self {
        Self(u64::from(mid) << 16 | (slot & 0xFFFF) | 1)
    }

    /// The next value in 0..1.
    pub(super) fn next(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % 1000) as f64 / 1000.0
    }
}

/// What the slot does next for its request.
#[derive(Debug)]
pub enum Step {
    /// Keep waiting until [`Exchange::deadline`].
    Wait,
    /// Send the request again (same message id).
    Resend,
    /// Acknowledge a confirmable response of another exchange (its ACK was
    /// lost and the gateway sent it again), then keep waiting.
    Ack(u16),
    /// The response came; acknowledge it with an empty ACK of `ack` when it
    /// was a separate CON.
    Answered {
        /// Its code.
        code: MessageClass,
        /// Message id to acknowledge.
        ack: Option<u16>,
    },
    /// The gateway reset the request.
    Reset,
    /// No answer after MAX_RETRANSMIT retransmissions, or no separate
    /// response within the request timeout after its empty ACK.
    GiveUp,
    /// The socket failed.
    Failed(std::io::Error),
}

/// One confirmable request's exchange (RFC 7252 §4.2, §5.2.2), without I/O.
#[derive(Debug)]
pub struct Exchange {
    mid: u16,
    token: [u8; TOKEN_LEN],
    retransmissions: u32,
    timeout: Duration,
    deadline: Instant,
    /// An empty ACK came: no more retransmissions, the response is a CON
    /// of its own.
    separate: bool,
}

impl Exchange {
    /// A request first sent at `now`; `jitter` in 0..=1 picks its first
    /// timeout in ACK_TIMEOUT × [1, 1.5].
    pub fn new(mid: u16, token: [u8; TOKEN_LEN], now: Instant, jitter: f64) -> Self {
        let timeout = ACK_TIMEOUT.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0);
        Self {
            mid,
            token,
            retransmissions: 0,
            timeout,
            deadline: now + timeout,
            separate: false,
        }
    }

    /// When [`Exchange::on_timeout`] is due.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The deadline passed.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        if now < self.deadline {
            return Step::Wait;
        }
        if self.separate || self.retransmissions >= MAX_RETRANSMIT {
            return Step::GiveUp;
        }
        self.retransmissions += 1;
        self.timeout *= 2;
        self.deadline = now + self.timeout;
        Step::Resend
    }

    /// A datagram arrived at `now`.
    pub fn on_datagram(&mut self, bytes: &[u8], now: Instant) -> Step {
        let Ok(p) = Packet::from_bytes(bytes) else {
            return Step::Wait;
        };
        let ours = p.get_token() == self.token;
        let response = matches!(p.header.code, MessageClass::Response(_));
        match p.header.get_type() {
            MessageType::Acknowledgement if p.header.message_id == self.mid => {
                if p.header.code == MessageClass::Empty {
                    if !self.separate {
                        self.separate = true;
                        // The response may take as long as a request may.
                        self.deadline = now + REQUEST_TIMEOUT;
                    }
                    Step::Wait
                } else if ours {
                    Step::Answered {
                        code: p.header.code,
                        ack: None,
                    }
                } else {
                    Step::Wait
                }
            }
            MessageType::Reset if p.header.message_id == self.mid => Step::Reset,
            MessageType::Confirmable if response && ours => Step::Answered {
                code: p.header.code,
                ack: Some(p.header.message_id),
            },
            MessageType::NonConfirmable if response && ours => Step::Answered {
                code: p.header.code,
                ack: None,
            },
            MessageType::Confirmable => Step::Ack(p.header.message_id),
            _ => Step::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(mtype: MessageType, code: MessageClass, mid: u16, token: &[u8]) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(mtype);
        p.header.code = code;
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        p.to_bytes().unwrap()
    }

    const CHANGED: MessageClass = MessageClass::Response(ResponseType::Changed);

    #[test]
    fn requests_patch_the_template_as_coap_lite_would_encode_them() {
        let template = request_template(Some("tok-1")).unwrap();
        let mut body = Vec::new();
        write_body(&mut body, 42, 100);
        let mut wire = Vec::new();
        write_request(&mut wire, &template, 0xBEEF, [1, 2, 3, 4], &body);

        let mut want = Packet::new();
        want.header.set_version(1);
        want.header.set_type(MessageType::Confirmable);
        want.header.code = MessageClass::Request(RequestType::Post);
        want.header.message_id = 0xBEEF;
        want.set_token(vec![1, 2, 3, 4]);
        for seg in ["api", "v1", "tok-1", "telemetry"] {
            want.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        want.add_option(CoapOption::ContentFormat, vec![50]);
        want.payload = body.clone();
        assert_eq!(wire, want.to_bytes().unwrap());

        let p = Packet::from_bytes(&wire).unwrap();
        let path: Vec<String> = p
            .get_option(CoapOption::UriPath)
            .unwrap()
            .iter()
            .map(|s| String::from_utf8(s.clone()).unwrap())
            .collect();
        assert_eq!(path, ["api", "v1", "tok-1", "telemetry"]);
        assert_eq!(p.payload, body);
        // The buffer is reused: the next message leaves nothing behind.
        write_request(&mut wire, &template, 1, [0; 4], b"{}");
        assert_eq!(Packet::from_bytes(&wire).unwrap().payload, b"{}");
        assert_eq!(wire.len(), template.len() + 3);
    }

    #[test]
    fn a_piggybacked_answer_ends_the_exchange_and_others_are_ignored() {
        let t = Instant::now();
        let mut x = Exchange::new(7, [0, 0, 0, 9], t, 0.0);
        // Another exchange's ACK, a wrong token, garbage: keep waiting.
        assert!(matches!(
            x.on_datagram(
                &answer(MessageType::Acknowledgement, CHANGED, 6, &[0, 0, 0, 8]),
                t
            ),
            Step::Wait
        ));
        assert!(matches!(
            x.on_datagram(&answer(MessageType::Acknowledgement, CHANGED, 7, &[1]), t),
            Step::Wait
        ));
        assert!(matches!(x.on_datagram(&[0xFF, 0], t), Step::Wait));
        let code = MessageClass::Response(ResponseType::ServiceUnavailable);
        match x.on_datagram(
            &answer(MessageType::Acknowledgement, code, 7, &[0, 0, 0, 9]),
            t,
        ) {
            Step::Answered { code: c, ack: None } => assert_eq!(c.to_string(), "5.03"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            x.on_datagram(&answer(MessageType::Reset, MessageClass::Empty, 7, &[]), t),
            Step::Reset
        ));
    }

    #[test]
    fn unanswered_requests_are_resent_with_doubling_timeouts_then_given_up() {
        let t = Instant::now();
        let mut x = Exchange::new(7, [0; 4], t, 1.0);
        assert_eq!(x.deadline(), t + ACK_TIMEOUT.mul_f64(1.5));
        assert!(matches!(
            x.on_timeout(t + Duration::from_secs(1)),
            Step::Wait
        ));
        let mut at = x.deadline();
        let mut gaps = Vec::new();
        loop {
            match x.on_timeout(at) {
                Step::Resend => {
                    gaps.push(x.deadline() - at);
                    at = x.deadline();
                }
                Step::GiveUp => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(gaps.len(), MAX_RETRANSMIT as usize);
        assert_eq!(
            gaps,
            [6, 12, 24, 48].map(Duration::from_secs),
            "3 s (ACK_TIMEOUT × 1.5) before the first, doubling after each"
        );
    }

    #[test]
    fn an_empty_ack_stops_retransmission_and_the_separate_response_is_acked() {
        let t = Instant::now();
        let mut x = Exchange::new(7, [0, 0, 0, 9], t, 0.0);
        assert!(matches!(
            x.on_datagram(
                &answer(MessageType::Acknowledgement, MessageClass::Empty, 7, &[]),
                t
            ),
            Step::Wait
        ));
        assert!(
            x.deadline() >= t + REQUEST_TIMEOUT,
            "waits a request timeout"
        );
        // A stale separate response of an earlier exchange is acknowledged.
        assert!(matches!(
            x.on_datagram(
                &answer(MessageType::Confirmable, CHANGED, 500, &[0, 0, 0, 8]),
                t
            ),
            Step::Ack(500)
        ));
        match x.on_datagram(
            &answer(MessageType::Confirmable, CHANGED, 501, &[0, 0, 0, 9]),
            t,
        ) {
            Step::Answered { code, ack } => assert_eq!((code, ack), (CHANGED, Some(501))),
            other => panic!("{other:?}"),
        }
        let deadline = x.deadline();
        assert!(
            matches!(x.on_timeout(deadline), Step::GiveUp),
            "no retransmission after an empty ACK"
        );
    }

    /// A fake gateway on a thread: 2.04 for tokens `good-*` (4.01 for
    /// others), deduplicating on (endpoint, message id), and dropping the
    /// first transmission of every `drop_every`th request. Returns its
    /// address and a handle giving (stored, duplicates, requests seen).
    fn fake_gateway(drop_every: u64) -> (SocketAddr, Arc<std::sync::Mutex<(u64, u64)>>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let counts = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
        let c = counts.clone();
        std::thread::spawn(move || {
            let mut seen: std::collections::HashMap<(SocketAddr, u16), Vec<u8>> =
                std::collections::HashMap::new();
            let mut dropped = std::collections::HashSet::new();
            let mut n = 0u64;
            let mut buf = [0u8; 2048];
            loop {
                let Ok((len, peer)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let p = Packet::from_bytes(&buf[..len]).unwrap();
                if p.header.code == MessageClass::Empty {
                    let rst = answer(
                        MessageType::Reset,
                        MessageClass::Empty,
                        p.header.message_id,
                        &[],
                    );
                    let _ = sock.send_to(&rst, peer);
                    continue;
                }
                let key = (peer, p.header.message_id);
                if let Some(bytes) = seen.get(&key) {
                    c.lock().unwrap().1 += 1;
                    let _ = sock.send_to(bytes, peer);
                    continue;
                }
                n += 1;
                // Lost on the way in, the first time only.
                if n.is_multiple_of(drop_every) && dropped.insert(key) {
                    continue;
                }
                let path = p.get_option(CoapOption::UriPath).unwrap();
                let good = path.iter().any(|s| s.starts_with(b"good-"));
                let code = if good {
                    c.lock().unwrap().0 += 1;
                    CHANGED
                } else {
                    MessageClass::Response(ResponseType::Unauthorized)
                };
                let bytes = answer(
                    MessageType::Acknowledgement,
                    code,
                    p.header.message_id,
                    p.get_token(),
                );
                let _ = sock.send_to(&bytes, peer);
                seen.insert(key, bytes);
            }
        });
        (addr, counts)
    }

    #[test]
    fn load_retransmits_lost_requests_with_their_message_id_and_counts_codes() {
        let (addr, counts) = fake_gateway(25);
        ping(addr).unwrap();
        let tokens = ["good-1", "good-2", "bad-3"].map(String::from);
        let plan = Arc::new(CoapPlan::new(addr, &tokens, 300, 100).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tally, _) = rt.block_on(load(plan, 8)).unwrap();
        assert_eq!(tally.sent, 300);
        assert_eq!(tally.ok, 200, "{tally:?}");
        assert_eq!(
            tally.errors,
            std::collections::BTreeMap::from([("4.01".to_owned(), 100)])
        );
        assert_eq!(tally.samples_us.len(), 200);
        let (stored, duplicates) = *counts.lock().unwrap();
        assert_eq!(stored, 200, "every 2.04 stored once");
        assert_eq!(duplicates, 0, "only lost requests were sent again");
        assert!(
            tally.samples_us.iter().any(|us| *us >= 2_000_000),
            "some waited for a retransmission"
        );
    }

    #[test]
    fn ping_says_when_nothing_answers() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = ping(addr).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut j = Jitter(12345);
        for _ in 0..1000 {
            let v = j.next();
            assert!((0.0..1.0).contains(&v), "{v}");
        }
    }
}
