//! The coaps side of `sluice bench`: the CoAP load of [`super::coap`]
//! inside DTLS 1.2 sessions authenticated by per-device pre-shared keys.
//!
//! `--concurrency` slots, each one task that owns one UDP socket. Slot `s`
//! is device `s % N` (a session belongs to one device); it handshakes with
//! [`PskClient`] (identity `bench-i`, the key the bench registered), then
//! sends its share of the confirmable POSTs to `/api/v1/telemetry` (no
//! access token: the session names the device) through the session, one in
//! flight, with [`super::coap::exchange`]: the same template, message-id
//! retransmission and latency as plain CoAP, the CoAP bytes as application
//! data. A slot whose session fails (the gateway closed it, or a request
//! went unanswered through every retransmission) handshakes again on a new
//! socket. At the end each slot sends close_notify.
//!
//! With `--handshakes` each message is instead a full handshake from a new
//! socket (a new ephemeral port, so the gateway sees a new peer), followed
//! by close_notify; its latency runs from the first ClientHello to the
//! server's Finished.
//!
//! The handshake's retransmission timer ([`FlightTimer`]) is plain code:
//! the last flight goes out again after [`HANDSHAKE_RETRY`] without an
//! answer, and the handshake is given up after
//! [`MAX_HANDSHAKE_RETRANSMIT`] retransmissions.

use super::coap::{
    Datagrams, Exchange, Jitter, MAX_ANSWER, exchange, first_mid, open, request_template,
    unspecified, write_request,
};
use super::{CONNECT_TIMEOUT, Tally, write_body};
use crate::coaps::DtlsError;
use crate::coaps::client::PskClient;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// How long a handshake flight waits for an answer before it is sent again
/// (RFC 6347 §4.2.4.1's initial timer, kept fixed).
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Retransmissions of a handshake's flights before it is given up.
pub const MAX_HANDSHAKE_RETRANSMIT: u32 = 4;
/// The PSK identity of the reachability check's ClientHello (it never gets
/// as far as the key).
const PING_IDENTITY: &[u8] = b"sluice-bench-ping";

/// What every slot shares.
pub(super) struct CoapsPlan {
    pub addr: SocketAddr,
    /// PSK identity and key of each device.
    pub devices: Vec<(String, Vec<u8>)>,
    /// The request every message patches ([`request_template`] without a
    /// token).
    pub template: Vec<u8>,
    pub messages: u64,
    pub payload_bytes: usize,
    /// Each message is a handshake, not a POST.
    pub handshakes: bool,
    /// Index of the next message to send.
    pub next: AtomicU64,
}

impl CoapsPlan {
    /// A plan for `devices` (identity, key).
    ///
    /// Fails when coap-lite cannot encode the request.
    pub fn new(
        addr: SocketAddr,
        devices: Vec<(String, Vec<u8>)>,
        messages: u64,
        payload_bytes: usize,
        handshakes: bool,
    ) -> Result<Self, String> {
        Ok(Self {
            addr,
            devices,
            template: request_template(None)?,
            messages,
            payload_bytes,
            handshakes,
            next: AtomicU64::new(0),
        })
    }

    /// The identity and key of slot `s`'s device.
    fn device(&self, s: u64) -> (&[u8], &[u8]) {
        let n = self.devices.len() as u64;
        usize::try_from(s % n.max(1))
            .ok()
            .and_then(|d| self.devices.get(d))
            .map_or((&[][..], &[][..]), |(id, key)| {
                (id.as_bytes(), key.as_slice())
            })
    }
}

/// Checks that a DTLS endpoint answers at `addr`: a ClientHello without a
/// cookie must come back as a HelloVerifyRequest (which costs the gateway
/// no state) within the connect timeout. Blocking.
///
/// Fails when nothing answers in time (`TimedOut`), the port is closed
/// (`ConnectionRefused`), or the answer is not a HelloVerifyRequest
/// (`InvalidData`).
pub(super) fn ping(addr: SocketAddr) -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind(unspecified(addr))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut client = PskClient::new(PING_IDENTITY, &[0]).map_err(std::io::Error::other)?;
    let hello = client
        .poll_transmit()
        .ok_or_else(|| std::io::Error::other("the DTLS client queued no ClientHello"))?;
    sock.send(&hello)?;
    let mut buf = [0u8; MAX_ANSWER];
    let n = sock.recv(&mut buf).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock => std::io::Error::from(ErrorKind::TimedOut),
        _ => e,
    })?;
    // A HelloVerifyRequest makes the client send its hello again, with
    // the cookie.
    let verified = buf
        .get(..n)
        .is_some_and(|d| client.on_datagram(d, &mut Vec::new()).is_ok())
        && client.poll_transmit().is_some();
    if verified {
        Ok(())
    } else {
        Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "the answer to a DTLS ClientHello is not a HelloVerifyRequest",
        ))
    }
}

/// Runs `slots` slot tasks until every message is answered or given up.
pub(super) async fn load(
    plan: Arc<CoapsPlan>,
    slots: u64,
) -> Result<(Tally, Duration), super::BenchError> {
    let messages = plan.messages;
    super::run_slots(slots, messages, |s| {
        let plan = plan.clone();
        async move {
            if plan.handshakes {
                handshakes(plan, s).await
            } else {
                requests(plan, s).await
            }
        }
    })
    .await
}

/// One POST slot: a session for its device, one request in flight, until
/// no message is left.
async fn requests(plan: Arc<CoapsPlan>, s: u64) -> Tally {
    let mut tally = Tally::default();
    let (identity, key) = plan.device(s);
    let mut session: Option<Session> = None;
    let mut mid = first_mid();
    let mut jitter = Jitter::new(mid, s);
    let mut request = Vec::new();
    let mut body = Vec::new();
    for n in 0u32.. {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.messages {
            break;
        }
        tally.sent += 1;
        if session.is_none() {
            match Session::open(plan.addr, identity, key).await {
                Ok(new) => session = Some(new),
                Err(e) => {
                    tally.failure(e.cause(), || e.to_string());
                    continue;
                }
            }
        }
        let Some(link) = session.as_mut() else {
            continue;
        };
        write_body(&mut body, i, plan.payload_bytes);
        mid = mid.wrapping_add(1);
        let token = n.to_be_bytes();
        write_request(&mut request, &plan.template, mid, token, &body);
        let now = Instant::now();
        let x = Exchange::new(mid, token, now, jitter.next());
        if exchange(link, &request, x, now, &mut tally).await {
            session = None;
        }
    }
    if let Some(done) = session {
        done.close().await;
    }
    tally
}

/// One handshake slot: a full handshake from a new socket per message,
/// then close_notify, until no message is left.
async fn handshakes(plan: Arc<CoapsPlan>, s: u64) -> Tally {
    let mut tally = Tally::default();
    let (identity, key) = plan.device(s);
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.messages {
            break;
        }
        tally.sent += 1;
        let started = Instant::now();
        match Session::open(plan.addr, identity, key).await {
            Ok(session) => {
                let us = started.elapsed().as_micros();
                tally.ok += 1;
                tally.samples_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                session.close().await;
            }
            Err(e) => tally.failure(e.cause(), || e.to_string()),
        }
    }
    tally
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The gateway refused the handshake (an alert: wrong key, unknown
    /// identity) or answered with something the client cannot use.
    #[error("DTLS handshake failed: {0}")]
    Dtls(DtlsError),
    /// No answer to a flight after every retransmission.
    #[error("no answer to the DTLS handshake after {MAX_HANDSHAKE_RETRANSMIT} retransmissions")]
    Timeout,
}

impl HandshakeError {
    /// The report's error key.
    fn cause(&self) -> &'static str {
        match self {
            Self::Io(e) if e.kind() == ErrorKind::ConnectionRefused => "refused",
            Self::Io(_) => "io",
            Self::Dtls(_) => "handshake_failed",
            Self::Timeout => "handshake_timeout",
        }
    }
}

/// The retransmission timer of a handshake (RFC 6347 §4.2.4, with a fixed
/// timeout): when the last flight is sent again, and when to give up.
#[derive(Debug)]
pub struct FlightTimer {
    deadline: Instant,
    retransmissions: u32,
}

impl FlightTimer {
    /// A timer for a first flight sent at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            deadline: now + HANDSHAKE_RETRY,
            retransmissions: 0,
        }
    }

    /// When [`FlightTimer::expired`] is due.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// A new flight went out at `now` (the peer answered the last one).
    pub fn restart(&mut self, now: Instant) {
        self.deadline = now + HANDSHAKE_RETRY;
    }

    /// The deadline passed at `now`: whether to send the last flight again
    /// (`true`) or give up (`false`, after [`MAX_HANDSHAKE_RETRANSMIT`]
    /// retransmissions in the whole handshake).
    pub fn expired(&mut self, now: Instant) -> bool {
        if self.retransmissions >= MAX_HANDSHAKE_RETRANSMIT {
            return false;
        }
        self.retransmissions += 1;
        self.deadline = now + HANDSHAKE_RETRY;
        true
    }
}

/// An established DTLS session on its own connected UDP socket.
struct Session {
    sock: UdpSocket,
    client: PskClient,
    /// Application data received and not yet taken.
    app: Vec<Vec<u8>>,
    /// The message [`Datagrams::recv`] returned last.
    current: Vec<u8>,
    buf: Vec<u8>,
}

impl Session {
    /// Handshakes with `addr` as `identity`/`key` from a new socket.
    ///
    /// Fails when the socket fails, the gateway refuses the handshake, or
    /// a flight stays unanswered after [`MAX_HANDSHAKE_RETRANSMIT`]
    /// retransmissions.
    async fn open(addr: SocketAddr, identity: &[u8], key: &[u8]) -> Result<Self, HandshakeError> {
        let sock = open(addr).await.map_err(HandshakeError::Io)?;
        let client = PskClient::new(identity, key).map_err(HandshakeError::Dtls)?;
        let mut s = Self {
            sock,
            client,
            app: Vec::new(),
            current: Vec::new(),
            buf: vec![0u8; MAX_ANSWER],
        };
        s.flush().await.map_err(HandshakeError::Io)?;
        let mut timer = FlightTimer::new(Instant::now());
        while !s.client.established() {
            match tokio::time::timeout_at(timer.deadline(), s.sock.recv(&mut s.buf)).await {
                Ok(Ok(n)) => {
                    let d = s.buf.get(..n).unwrap_or_default();
                    s.client
                        .on_datagram(d, &mut s.app)
                        .map_err(HandshakeError::Dtls)?;
                    if s.flush().await.map_err(HandshakeError::Io)? > 0 {
                        timer.restart(Instant::now());
                    }
                }
                Ok(Err(e)) => return Err(HandshakeError::Io(e)),
                Err(_) => {
                    if !timer.expired(Instant::now()) {
                        return Err(HandshakeError::Timeout);
                    }
                    s.client.retransmit();
                    s.flush().await.map_err(HandshakeError::Io)?;
                }
            }
        }
        Ok(s)
    }

    /// Sends what the client queued; returns how many datagrams.
    async fn flush(&mut self) -> std::io::Result<usize> {
        let mut sent = 0;
        while let Some(d) = self.client.poll_transmit() {
            self.sock.send(&d).await?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Sends close_notify and drops the socket.
    async fn close(mut self) {
        self.client.close();
        let _ = self.flush().await;
    }
}

/// A session's failure as the exchange sees it: the gateway closing the
/// session is `ConnectionAborted`.
fn session_error(e: DtlsError) -> std::io::Error {
    let kind = match e {
        DtlsError::PeerClosed | DtlsError::PeerAlert(_) | DtlsError::Closed => {
            ErrorKind::ConnectionAborted
        }
        _ => ErrorKind::InvalidData,
    };
    std::io::Error::new(kind, format!("DTLS session: {e}"))
}

impl Datagrams for Session {
    async fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        self.client.write(msg).map_err(session_error)?;
        self.flush().await.map(drop)
    }

    async fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<&[u8]>> {
        loop {
            if !self.app.is_empty() {
                self.current = self.app.remove(0);
                return Ok(Some(&self.current));
            }
            let n = match tokio::time::timeout_at(deadline, self.sock.recv(&mut self.buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(None),
            };
            let d = self.buf.get(..n).unwrap_or_default();
            self.client
                .on_datagram(d, &mut self.app)
                .map_err(session_error)?;
            // A retransmitted server Finished makes the client answer.
            self.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coaps::dtls::{CookieJar, PskServer};
    use crate::coaps::sessions::{DtlsStats, Limits, Sessions};
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
    use sluice_cloud_sync::DeviceName;
    use std::collections::{BTreeMap, HashMap, HashSet};

    #[test]
    fn a_flight_is_sent_again_every_second_then_given_up() {
        let t = Instant::now();
        let mut timer = FlightTimer::new(t);
        assert_eq!(timer.deadline(), t + HANDSHAKE_RETRY);
        let mut at = timer.deadline();
        for _ in 0..2 {
            assert!(timer.expired(at));
            assert_eq!(timer.deadline(), at + HANDSHAKE_RETRY);
            at = timer.deadline();
        }
        // An answer moves the deadline but does not refill the tries.
        timer.restart(at);
        assert_eq!(timer.deadline(), at + HANDSHAKE_RETRY);
        let mut resent = 2;
        while timer.expired(timer.deadline()) {
            resent += 1;
        }
        assert_eq!(resent, MAX_HANDSHAKE_RETRANSMIT);
        assert!(!timer.expired(timer.deadline()), "given up stays given up");
    }

    #[test]
    fn the_template_has_no_token_in_its_path() {
        let p = Packet::from_bytes(&request_template(None).unwrap()).unwrap();
        let path: Vec<&[u8]> = p
            .get_option(CoapOption::UriPath)
            .unwrap()
            .iter()
            .map(Vec::as_slice)
            .collect();
        assert_eq!(path, [&b"api"[..], b"v1", b"telemetry"]);
    }

    /// What the fake gateway saw.
    #[derive(Debug, Default)]
    struct Seen {
        /// POSTs answered 2.04, per device.
        stored: BTreeMap<String, u64>,
        /// Requests seen again (same session, same message id).
        duplicates: u64,
        handshakes: u64,
        closed: u64,
    }

    /// A coaps gateway on a thread, built from the real session layer:
    /// `bench-0` and `bench-1` with key `k0`/`k1`. It drops the first
    /// transmission of every `drop_every`th datagram it receives (hellos,
    /// flights and requests alike; not alerts), answers POSTs 2.04 piggybacked and
    /// deduplicates on (peer, message id).
    fn fake_gateway(drop_every: u64) -> (SocketAddr, Arc<std::sync::Mutex<Seen>>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let out = seen.clone();
        std::thread::spawn(move || {
            let keys: HashMap<Vec<u8>, Vec<u8>> = [
                (b"bench-0".to_vec(), b"k0".to_vec()),
                (b"bench-1".to_vec(), b"k1".to_vec()),
            ]
            .into();
            let lookup_keys = keys.clone();
            let server = Arc::new(
                PskServer::new(
                    Arc::new(move |id: &[u8]| lookup_keys.get(id).cloned()),
                    1200,
                )
                .unwrap(),
            );
            let stats = Arc::new(DtlsStats::default());
            let limits = Limits {
                max_sessions: 1000,
                max_handshakes: 1000,
                max_handshakes_per_ip: 1000,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(600),
            };
            let start = std::time::Instant::now();
            let mut t = Sessions::new(
                server,
                CookieJar::new(start, 60).unwrap(),
                limits,
                stats.clone(),
            );
            let auth = move |id: &[u8]| {
                keys.get(id).map(|k| {
                    let mut d = [0u8; 32];
                    d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, k).as_ref());
                    (DeviceName::new(String::from_utf8_lossy(id).into_owned()), d)
                })
            };
            let mut answers: HashMap<(SocketAddr, u16), Vec<u8>> = HashMap::new();
            let mut dropped = HashSet::new();
            let mut n = 0u64;
            let mut buf = [0u8; 2048];
            loop {
                let Ok((len, peer)) = sock.recv_from(&mut buf) else {
                    return;
                };
                n += 1;
                // Alerts (close_notify) always get through, so the test
                // can count them.
                let alert = buf[0] == 21;
                if !alert && n.is_multiple_of(drop_every) && dropped.insert(buf[..len].to_vec()) {
                    continue;
                }
                let mut deliveries = Vec::new();
                t.datagram(
                    std::time::Instant::now(),
                    peer,
                    &buf[..len],
                    &auth,
                    &mut deliveries,
                );
                for d in deliveries {
                    let p = Packet::from_bytes(&d.data).unwrap();
                    if p.header.code == MessageClass::Empty {
                        continue;
                    }
                    let key = (peer, p.header.message_id);
                    if let Some(a) = answers.get(&key) {
                        out.lock().unwrap().duplicates += 1;
                        t.write(peer, a).unwrap();
                        continue;
                    }
                    let mut a = Packet::new();
                    a.header.set_version(1);
                    a.header.set_type(MessageType::Acknowledgement);
                    a.header.code = MessageClass::Response(ResponseType::Changed);
                    a.header.message_id = p.header.message_id;
                    a.set_token(p.get_token().to_vec());
                    let a = a.to_bytes().unwrap();
                    t.write(peer, &a).unwrap();
                    answers.insert(key, a);
                    *out.lock()
                        .unwrap()
                        .stored
                        .entry(d.device.to_string())
                        .or_default() += 1;
                }
                while let Some((to, d)) = t.poll_transmit() {
                    let _ = sock.send_to(&d, to);
                }
                let mut o = out.lock().unwrap();
                o.handshakes = stats.handshakes.load(Ordering::Relaxed);
                o.closed = stats.peer_closed.load(Ordering::Relaxed);
            }
        });
        (addr, seen)
    }

    fn devices() -> Vec<(String, Vec<u8>)> {
        vec![
            ("bench-0".into(), b"k0".to_vec()),
            ("bench-1".into(), b"k1".to_vec()),
        ]
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn posts_go_through_one_session_per_slot_and_lost_datagrams_are_resent() {
        let (addr, seen) = fake_gateway(40);
        ping(addr).unwrap();
        let plan = CoapsPlan::new(addr, devices(), 300, 100, false).unwrap();
        let (tally, _) = block_on(load(Arc::new(plan), 4)).unwrap();
        assert_eq!((tally.sent, tally.ok), (300, 300), "{tally:?}");
        assert!(tally.errors.is_empty(), "{tally:?}");
        let s = seen.lock().unwrap();
        assert_eq!(s.stored.values().sum::<u64>(), 300, "each stored once");
        assert_eq!(
            s.stored.len(),
            2,
            "slots 0 and 2 are bench-0, 1 and 3 bench-1"
        );
        assert_eq!(s.handshakes, 4, "one session per slot");
        assert_eq!(s.duplicates, 0, "only lost requests were sent again");
        assert!(
            tally.samples_us.iter().any(|us| *us >= 2_000_000),
            "some waited for a CoAP retransmission"
        );
    }

    #[test]
    fn handshake_mode_handshakes_from_a_new_port_each_time_and_closes() {
        let (addr, seen) = fake_gateway(7);
        let plan = CoapsPlan::new(addr, devices(), 20, 100, true).unwrap();
        let (tally, _) = block_on(load(Arc::new(plan), 3)).unwrap();
        assert_eq!((tally.sent, tally.ok), (20, 20), "{tally:?}");
        assert_eq!(tally.samples_us.len(), 20);
        assert!(
            tally.samples_us.iter().any(|us| *us >= 1_000_000),
            "some flight was lost and sent again after 1 s"
        );
        // The last close_notify may still be on its way.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().closed < 20 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let s = seen.lock().unwrap();
        assert_eq!((s.handshakes, s.closed), (20, 20));
        assert!(s.stored.is_empty());
    }

    #[test]
    fn a_wrong_key_fails_each_handshake_clearly() {
        let (addr, _) = fake_gateway(u64::MAX);
        let plan = CoapsPlan::new(
            addr,
            vec![("bench-0".into(), b"bad".to_vec())],
            3,
            100,
            false,
        )
        .unwrap();
        let (tally, _) = block_on(load(Arc::new(plan), 1)).unwrap();
        assert_eq!((tally.sent, tally.ok), (3, 0));
        assert_eq!(
            tally.errors,
            BTreeMap::from([("handshake_failed".to_owned(), 3)])
        );
        let first = tally.first_failure.unwrap();
        assert!(first.contains("DTLS handshake failed"), "{first}");
    }

    #[test]
    fn ping_wants_a_hello_verify_request() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(ping(addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
        // A plain CoAP endpoint answers a hello with nothing DTLS.
        let coap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = coap.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            if let Ok((_, peer)) = coap.recv_from(&mut buf) {
                let _ = coap.send_to(&[0x70, 0x00, 0x12, 0x34], peer);
            }
        });
        assert_eq!(ping(addr).unwrap_err().kind(), ErrorKind::InvalidData);
    }
}
