//! The session layer in front of the DTLS engine (I/O-free): a table of
//! sessions keyed by peer address, admission control, the stateless
//! cookie exchange, timeouts, and reconnects from the same address.
//!
//! - Only a ClientHello creates state, and only one carrying a cookie we
//!   issued to that address (HelloVerifyRequest, RFC 6347 §4.2.1): a flood
//!   of hellos, spoofed or not, costs one HMAC and one small answer each and
//!   no memory. Anything else from an unknown address is dropped.
//! - Half-open sessions (cookie proven, handshake not finished) are capped
//!   in total and per IP address; sessions in all are capped. A half-open
//!   session that does not finish within `handshake_timeout`, and an
//!   established one silent for `idle_timeout`, is dropped.
//! - A new ClientHello (another client random) from the address of a live
//!   session is a device that rebooted (RFC 6347 §4.2.8): it gets a cookie
//!   exchange, then a candidate session beside the old one; the old one is
//!   replaced only when the candidate's handshake completes, so an
//!   unauthenticated hello never tears a session down.
//! - An established session is bound to the device its PSK identity names
//!   in the registry; when the registry changes (revoked, key rotated) the
//!   session is closed with close_notify.

use super::dtls::{CookieJar, peek_client_hello};
use super::engine::{DtlsAcceptor, DtlsError, DtlsSession};
use serde::Serialize;
use sluice_cloud_sync::DeviceName;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The caps and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions in all (half-open and established).
    pub max_sessions: usize,
    /// Half-open sessions in all.
    pub max_handshakes: usize,
    /// Half-open sessions per IP address.
    pub max_handshakes_per_ip: usize,
    /// A handshake must finish within this.
    pub handshake_timeout: Duration,
    /// An established session silent this long is dropped.
    pub idle_timeout: Duration,
}

/// Counters (in `sluice status` and `/metrics`).
#[derive(Debug, Default, Serialize)]
pub struct DtlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes failed because the key did not match (wrong key or
    /// unknown identity).
    pub auth_failures: AtomicU64,
    /// Handshakes that did not finish in time.
    pub handshake_timeouts: AtomicU64,
    /// Handshakes failed otherwise (no common suite, malformed, alert).
    pub handshake_errors: AtomicU64,
    /// HelloVerifyRequests sent.
    pub hello_verify_requests: AtomicU64,
    /// Hellos with a cookie that was not ours (or expired).
    pub bad_cookies: AtomicU64,
    /// Cookie-proven hellos refused by a cap.
    pub refused: AtomicU64,
    /// Cookie-proven hellos refused because their address failed to
    /// authenticate too often (`auth_fail_limit` per `auth_fail_window`).
    pub throttled: AtomicU64,
    /// Datagrams from addresses without a session that were no hello.
    pub unknown_peer_drops: AtomicU64,
    /// Datagrams that were not DTLS we could read.
    pub malformed: AtomicU64,
    /// Sessions replaced by a new handshake from the same address.
    pub replaced: AtomicU64,
    /// Sessions dropped after `idle_timeout`.
    pub idle_closed: AtomicU64,
    /// Sessions closed because the registry changed.
    pub revoked: AtomicU64,
    /// Sessions closed by the peer.
    pub peer_closed: AtomicU64,
    /// Sessions whose identity names no active device at the end of the
    /// handshake.
    pub unbound: AtomicU64,
    /// Half-open sessions now.
    pub half_open: AtomicU64,
    /// Established sessions now.
    pub established: AtomicU64,
    /// CoAP answers larger than one record within the MTU (not sent).
    pub too_large: AtomicU64,
    /// Records of live sessions dropped: unparseable, not authentic (a
    /// spoofed or corrupted datagram) or replayed.
    pub dropped_records: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Decrypted CoAP from an established session.
#[derive(Debug)]
pub struct Delivery {
    /// The peer.
    pub peer: SocketAddr,
    /// The device its PSK identity names.
    pub device: DeviceName,
    /// One CoAP message.
    pub data: Vec<u8>,
}

/// Maps an authenticated identity to its device and the SHA-256 of its
/// current key; `None` when no active device has it.
pub type Authorize<'a> = &'a dyn Fn(&[u8]) -> Option<(DeviceName, [u8; 32])>;

/// The device `session` may speak for: its identity's device, provided the
/// registry still has the key the handshake used (it may have been rotated
/// while the handshake ran).
fn binding<S: DtlsSession>(
    session: &S,
    authorize: Authorize<'_>,
) -> Option<(DeviceName, [u8; 32])> {
    let bound = session.identity().and_then(authorize)?;
    (Some(bound.1) == session.psk_digest()).then_some(bound)
}

fn count_failure(stats: &DtlsStats, e: &DtlsError) {
    match e {
        DtlsError::AuthFailed => inc(&stats.auth_failures),
        DtlsError::PeerClosed => inc(&stats.peer_closed),
        _ => inc(&stats.handshake_errors),
    }
}

/// Half-open sessions by IP address and in all.
#[derive(Default)]
struct HalfOpen {
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

impl HalfOpen {
    fn opened(&mut self, ip: IpAddr) {
        *self.per_ip.entry(ip).or_insert(0) += 1;
        self.total += 1;
    }

    fn closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        self.total = self.total.saturating_sub(1);
    }
}

struct Half<S> {
    session: S,
    deadline: Instant,
}

struct Entry<S> {
    /// The live session: half-open until `bound` is set.
    session: S,
    /// Handshake deadline (half-open) or the idle deadline.
    deadline: Instant,
    bound: Option<(DeviceName, [u8; 32])>,
    /// A new handshake from the same address (RFC 6347 §4.2.8).
    candidate: Option<Box<Half<S>>>,
}

/// The session table.
pub struct Sessions<A: DtlsAcceptor> {
    acceptor: A,
    jar: CookieJar,
    limits: Limits,
    table: HashMap<SocketAddr, Entry<A::Session>>,
    half: HalfOpen,
    /// Established (bound) entries.
    bound: usize,
    /// Peers whose established session ended or was replaced since the
    /// last [`Sessions::take_ended`].
    ended: Vec<SocketAddr>,
    tx: VecDeque<(SocketAddr, Vec<u8>)>,
    stats: std::sync::Arc<DtlsStats>,
    throttle: Option<std::sync::Arc<crate::throttle::AuthThrottle>>,
}

impl<A: DtlsAcceptor> Sessions<A> {
    /// An empty table.
    pub fn new(
        acceptor: A,
        jar: CookieJar,
        limits: Limits,
        stats: std::sync::Arc<DtlsStats>,
    ) -> Self {
        Self {
            acceptor,
            jar,
            limits,
            table: HashMap::new(),
            half: HalfOpen::default(),
            bound: 0,
            ended: Vec::new(),
            tx: VecDeque::new(),
            stats,
            throttle: None,
        }
    }

    /// Counts failed authentications per source address in `throttle`
    /// and refuses new handshakes from an address over its limit.
    #[must_use]
    pub fn with_throttle(
        mut self,
        throttle: std::sync::Arc<crate::throttle::AuthThrottle>,
    ) -> Self {
        self.throttle = Some(throttle);
        self
    }

    fn auth_failed(&self, e: &DtlsError, ip: IpAddr, now: Instant) {
        if *e == DtlsError::AuthFailed
            && let Some(t) = &self.throttle
        {
            t.failed(ip, now);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.tx.pop_front()
    }

    /// Peers in the table (each with a session, established or half-open,
    /// and perhaps a reconnect candidate, which the half-open caps bound).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The device of `peer`'s established session.
    pub fn device_of(&self, peer: SocketAddr) -> Option<&DeviceName> {
        self.table.get(&peer)?.bound.as_ref().map(|(d, _)| d)
    }

    fn drain(tx: &mut VecDeque<(SocketAddr, Vec<u8>)>, peer: SocketAddr, s: &mut A::Session) {
        while let Some(d) = s.poll_transmit() {
            tx.push_back((peer, d));
        }
    }

    fn admit(&self, ip: IpAddr, replacing_half: bool) -> bool {
        let per_ip = self.half.per_ip.get(&ip).copied().unwrap_or(0);
        let adjust = usize::from(replacing_half);
        self.half.total.saturating_sub(adjust) < self.limits.max_handshakes
            && per_ip.saturating_sub(adjust) < self.limits.max_handshakes_per_ip
            && (replacing_half || self.len() < self.limits.max_sessions)
    }

    fn gauges(&self) {
        self.stats
            .established
            .store(self.bound as u64, Ordering::Relaxed);
        self.stats
            .half_open
            .store(self.half.total as u64, Ordering::Relaxed);
    }

    /// One datagram from `peer`; decrypted CoAP goes to `out`.
    pub fn datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        bytes: &[u8],
        authorize: Authorize<'_>,
        out: &mut Vec<Delivery>,
    ) {
        self.datagram_inner(now, peer, bytes, authorize, out);
        self.gauges();
    }

    fn datagram_inner(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        bytes: &[u8],
        authorize: Authorize<'_>,
        out: &mut Vec<Delivery>,
    ) {
        let hello = match peek_client_hello(bytes) {
            Some(Ok(h)) => Some(h),
            Some(Err(_)) => {
                inc(&self.stats.malformed);
                return;
            }
            None => None,
        };
        // A hello that starts something new needs our cookie first.
        if let Some(h) = &hello {
            let new = match self.table.get(&peer) {
                None => true,
                Some(e) => {
                    !e.session.same_hello(&h.hello)
                        && !e
                            .candidate
                            .as_ref()
                            .is_some_and(|c| c.session.same_hello(&h.hello))
                }
            };
            if new {
                if !self.jar.verify(now, peer, &h.hello) {
                    if !h.hello.cookie.is_empty() {
                        inc(&self.stats.bad_cookies);
                    }
                    inc(&self.stats.hello_verify_requests);
                    let hvr = self.jar.hello_verify_request(now, peer, h);
                    self.tx.push_back((peer, hvr));
                    return;
                }
                self.start(now, peer, bytes);
                return;
            }
        }
        let Some(entry) = self.table.get_mut(&peer) else {
            inc(&self.stats.unknown_peer_drops);
            return;
        };
        // While a reconnect's handshake runs, its datagrams go to it.
        if let Some(mut cand) = entry.candidate.take() {
            let mut app = Vec::new();
            let r = cand.session.on_datagram(bytes, &mut app);
            self.stats
                .dropped_records
                .fetch_add(cand.session.take_dropped(), Ordering::Relaxed);
            Self::drain(&mut self.tx, peer, &mut cand.session);
            match r {
                Err(e) => {
                    count_failure(&self.stats, &e);
                    if e == DtlsError::AuthFailed
                        && let Some(t) = &self.throttle
                    {
                        t.failed(peer.ip(), now);
                    }
                    self.half.closed(peer.ip());
                }
                Ok(()) if cand.session.established() => {
                    self.half.closed(peer.ip());
                    inc(&self.stats.replaced);
                    inc(&self.stats.handshakes);
                    let Some(bound) = binding(&cand.session, authorize) else {
                        // Nobody to attribute it to: drop both.
                        inc(&self.stats.unbound);
                        cand.session.close();
                        Self::drain(&mut self.tx, peer, &mut cand.session);
                        self.table.remove(&peer);
                        self.bound -= 1;
                        self.ended.push(peer);
                        return;
                    };
                    tracing::info!(%peer, device = %bound.0, suite = cand.session.suite(),
                        "coaps session replaced by a new handshake from the same address");
                    entry.session = cand.session;
                    self.ended.push(peer);
                    entry.bound = Some(bound);
                    entry.deadline = now + self.limits.idle_timeout;
                    return;
                }
                Ok(()) => entry.candidate = Some(cand),
            }
            // Until it completes or fails, the peer is the new client: the
            // old one rebooted (the cookie proved the address).
            return;
        }
        let Some(entry) = self.table.get_mut(&peer) else {
            return;
        };
        let was_established = entry.session.established();
        let mut app = Vec::new();
        let r = entry.session.on_datagram(bytes, &mut app);
        self.stats
            .dropped_records
            .fetch_add(entry.session.take_dropped(), Ordering::Relaxed);
        Self::drain(&mut self.tx, peer, &mut entry.session);
        if let Err(e) = r {
            if entry.bound.is_some() {
                self.bound -= 1;
                self.ended.push(peer);
            }
            if !was_established {
                self.half.closed(peer.ip());
            }
            if let Some(c) = entry.candidate.take() {
                drop(c);
                self.half.closed(peer.ip());
            }
            count_failure(&self.stats, &e);
            self.auth_failed(&e, peer.ip(), now);
            tracing::debug!(%peer, error = %e, "coaps session ended");
            self.table.remove(&peer);
            return;
        }
        if !was_established && entry.session.established() {
            self.half.closed(peer.ip());
            inc(&self.stats.handshakes);
            let Some(entry) = self.table.get_mut(&peer) else {
                return;
            };
            match binding(&entry.session, authorize) {
                Some(bound) => {
                    tracing::debug!(%peer, device = %bound.0, suite = entry.session.suite(),
                        "coaps session established");
                    entry.bound = Some(bound);
                    self.bound += 1;
                }
                None => {
                    inc(&self.stats.unbound);
                    entry.session.close();
                    Self::drain(&mut self.tx, peer, &mut entry.session);
                    self.table.remove(&peer);
                    return;
                }
            }
        }
        let Some(entry) = self.table.get_mut(&peer) else {
            return;
        };
        if let Some((device, _)) = &entry.bound {
            entry.deadline = now + self.limits.idle_timeout;
            for data in app {
                out.push(Delivery {
                    peer,
                    device: device.clone(),
                    data,
                });
            }
        }
    }

    /// A cookie-proven hello from `peer`: a new session, a restarted
    /// handshake, or a reconnect candidate beside an established session.
    fn start(&mut self, now: Instant, peer: SocketAddr, bytes: &[u8]) {
        let ip = peer.ip();
        let existing = self
            .table
            .get(&peer)
            .map(|e| (e.bound.is_some(), e.candidate.is_some()));
        // Replacing a half-open session (or a candidate) frees its slot.
        let replacing_half = matches!(existing, Some((false, _)) | Some((true, true)));
        if self.throttle.as_ref().is_some_and(|t| !t.allowed(ip, now)) {
            inc(&self.stats.throttled);
            return;
        }
        if !self.admit(ip, replacing_half) {
            inc(&self.stats.refused);
            return;
        }
        let mut session = match self.acceptor.accept(bytes) {
            Ok(s) => s,
            Err(e) => {
                count_failure(&self.stats, &e);
                return;
            }
        };
        Self::drain(&mut self.tx, peer, &mut session);
        let deadline = now + self.limits.handshake_timeout;
        match existing {
            None => {
                self.half.opened(ip);
                self.table.insert(
                    peer,
                    Entry {
                        session,
                        deadline,
                        bound: None,
                        candidate: None,
                    },
                );
            }
            Some((false, _)) => {
                // The client restarted its handshake: the new one wins.
                if let Some(e) = self.table.get_mut(&peer) {
                    e.session = session;
                    e.deadline = deadline;
                }
            }
            Some((true, had_candidate)) => {
                if !had_candidate {
                    self.half.opened(ip);
                }
                if let Some(e) = self.table.get_mut(&peer) {
                    e.candidate = Some(Box::new(Half { session, deadline }));
                }
            }
        }
    }

    /// The peers whose established session ended or was replaced since
    /// the last call: their CoAP state (Observe registrations) belonged to
    /// that session (RFC 7252 §9.1: the DTLS session is the endpoint).
    pub fn take_ended(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.ended)
    }

    /// Protects a CoAP message for `peer`'s established session.
    ///
    /// Fails when there is none or the message is too large.
    pub fn write(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), DtlsError> {
        let entry = self.table.get_mut(&peer).ok_or(DtlsError::Closed)?;
        if entry.bound.is_none() {
            return Err(DtlsError::NotEstablished);
        }
        entry.session.write(data)?;
        Self::drain(&mut self.tx, peer, &mut entry.session);
        Ok(())
    }

    /// Drops half-open sessions past their deadline and established ones
    /// idle too long.
    pub fn tick(&mut self, now: Instant) {
        let mut expired_half = Vec::new();
        let mut idle = Vec::new();
        for (peer, e) in &mut self.table {
            if e.candidate.as_ref().is_some_and(|c| c.deadline <= now) {
                e.candidate = None;
                expired_half.push(peer.ip());
            }
            if e.deadline <= now {
                if e.bound.is_some() {
                    idle.push(*peer);
                } else {
                    expired_half.push(peer.ip());
                    idle.push(*peer);
                }
            }
        }
        for ip in expired_half {
            inc(&self.stats.handshake_timeouts);
            self.half.closed(ip);
        }
        for peer in idle {
            if let Some(mut e) = self.table.remove(&peer) {
                if e.bound.is_some() {
                    self.bound -= 1;
                    self.ended.push(peer);
                    inc(&self.stats.idle_closed);
                    e.session.close();
                    Self::drain(&mut self.tx, peer, &mut e.session);
                }
                if e.candidate.is_some() {
                    self.half.closed(peer.ip());
                }
            }
        }
        self.gauges();
    }

    /// Closes (close_notify) every established session whose identity no
    /// longer maps to the same device and key; returns the peers closed.
    pub fn recheck(&mut self, authorize: Authorize<'_>) -> Vec<(SocketAddr, DeviceName)> {
        let mut gone = Vec::new();
        for (peer, e) in &self.table {
            let Some(bound) = &e.bound else { continue };
            let now = binding(&e.session, authorize);
            if now.as_ref() != Some(bound) {
                gone.push((*peer, bound.0.clone()));
            }
        }
        for (peer, _) in &gone {
            if let Some(mut e) = self.table.remove(peer) {
                self.bound -= 1;
                self.ended.push(*peer);
                inc(&self.stats.revoked);
                e.session.close();
                Self::drain(&mut self.tx, *peer, &mut e.session);
                if e.candidate.is_some() {
                    self.half.closed(peer.ip());
                }
            }
        }
        self.gauges();
        gone
    }

    /// Closes every session (close_notify to the established ones).
    pub fn close_all(&mut self) {
        for (peer, mut e) in std::mem::take(&mut self.table) {
            if e.bound.is_some() {
                self.ended.push(peer);
            }
            e.session.close();
            Self::drain(&mut self.tx, peer, &mut e.session);
        }
        self.half = HalfOpen::default();
        self.bound = 0;
        self.gauges();
    }
}

#[cfg(test)]
mod tests;
