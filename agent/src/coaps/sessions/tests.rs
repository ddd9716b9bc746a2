//! The session layer driven by [`crate::coaps::client::PskClient`]s, all in
//! memory: no sockets, the clock passed in.

use super::*;
use crate::coaps::client::PskClient;
use crate::coaps::dtls::{CookieJar, PskServer};
use std::sync::Arc;

const KEY: &[u8] = b"secretPSK";

fn limits() -> Limits {
    Limits {
        max_sessions: 100,
        max_handshakes: 20,
        max_handshakes_per_ip: 5,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(600),
    }
}

struct World {
    t: Sessions<Arc<PskServer>>,
    stats: Arc<DtlsStats>,
    now: Instant,
    /// identity -> (device, key); `revoked` removes from it.
    devices: HashMap<Vec<u8>, (DeviceName, Vec<u8>)>,
}

fn digest(k: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, k).as_ref());
    d
}

impl World {
    fn new(limits: Limits) -> Self {
        Self::build(limits, None)
    }

    fn build(limits: Limits, throttle: Option<Arc<crate::throttle::AuthThrottle>>) -> Self {
        let mut devices = HashMap::new();
        devices.insert(b"dev-one".to_vec(), (DeviceName::new("d1"), KEY.to_vec()));
        devices.insert(
            b"dev-two".to_vec(),
            (DeviceName::new("d2"), b"other".to_vec()),
        );
        let keys: HashMap<Vec<u8>, Vec<u8>> = devices
            .iter()
            .map(|(i, (_, k))| (i.clone(), k.clone()))
            .collect();
        let server = Arc::new(
            PskServer::new(Arc::new(move |id: &[u8]| keys.get(id).cloned()), 1200).unwrap(),
        );
        let now = Instant::now();
        let stats = Arc::new(DtlsStats::default());
        let mut t = Sessions::new(
            server,
            CookieJar::new(now, 60).unwrap(),
            limits,
            stats.clone(),
        );
        if let Some(throttle) = throttle {
            t = t.with_throttle(throttle);
        }
        Self {
            t,
            stats,
            now,
            devices,
        }
    }

    fn feed(&mut self, peer: SocketAddr, d: &[u8]) -> Vec<Delivery> {
        let devices = self.devices.clone();
        let auth = move |id: &[u8]| devices.get(id).map(|(d, k)| (d.clone(), digest(k)));
        let mut out = Vec::new();
        self.t.datagram(self.now, peer, d, &auth, &mut out);
        out
    }

    /// Datagrams the table sends to `peer` (others are dropped).
    fn sent_to(&mut self, peer: SocketAddr) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.t.poll_transmit())
            .filter(|(p, _)| *p == peer)
            .map(|(_, d)| d)
            .collect()
    }

    /// Runs `c` against the table until it is established or gives up;
    /// returns whether it got there.
    fn handshake(&mut self, peer: SocketAddr, c: &mut PskClient) -> bool {
        for _ in 0..6 {
            let out: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
            for d in out {
                self.feed(peer, &d);
            }
            for d in self.sent_to(peer) {
                if c.on_datagram(&d, &mut Vec::new()).is_err() {
                    return false;
                }
            }
            if c.established() {
                return true;
            }
        }
        false
    }

    fn count(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

#[test]
fn a_device_handshakes_after_a_cookie_and_its_coap_is_attributed_to_it() {
    let mut w = World::new(limits());
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    let hello = c.poll_transmit().unwrap();
    w.feed(addr(1), &hello);
    assert!(w.t.is_empty(), "the first hello creates no state");
    assert_eq!(w.count(&w.stats.hello_verify_requests), 1);
    let hvr = w.sent_to(addr(1));
    assert_eq!(hvr.len(), 1);
    c.on_datagram(&hvr[0], &mut Vec::new()).unwrap();
    assert!(w.handshake(addr(1), &mut c));
    assert_eq!(c.suite(), crate::coaps::dtls::Suite::PskAes128Ccm8);
    assert_eq!(w.t.device_of(addr(1)), Some(&DeviceName::new("d1")));
    assert_eq!(w.count(&w.stats.handshakes), 1);
    assert_eq!(w.count(&w.stats.established), 1);
    assert_eq!(w.count(&w.stats.half_open), 0);

    c.write(b"coap request").unwrap();
    let d = c.poll_transmit().unwrap();
    let got = w.feed(addr(1), &d);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].device, DeviceName::new("d1"));
    assert_eq!(got[0].data, b"coap request");
    // The same record again (a replay) is not delivered twice.
    assert!(w.feed(addr(1), &d).is_empty());
    // A record with one bit flipped is dropped; the session lives on.
    let mut bad = d.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(w.feed(addr(1), &bad).is_empty());
    assert_eq!(w.t.device_of(addr(1)), Some(&DeviceName::new("d1")));
    assert_eq!(
        w.count(&w.stats.dropped_records),
        2,
        "the replay and the forgery"
    );

    w.t.write(addr(1), b"coap answer").unwrap();
    let mut app = Vec::new();
    for d in w.sent_to(addr(1)) {
        c.on_datagram(&d, &mut app).unwrap();
    }
    assert_eq!(app, vec![b"coap answer".to_vec()]);
    assert_eq!(
        w.t.write(addr(9), b"x"),
        Err(DtlsError::Closed),
        "no session, nothing sent"
    );
}

#[test]
fn a_wrong_key_and_an_unknown_identity_fail_alike() {
    let mut outcomes = Vec::new();
    for (identity, key) in [
        (&b"dev-one"[..], &b"wrong"[..]),
        (&b"nobody"[..], &b"wrong"[..]),
    ] {
        let mut w = World::new(limits());
        let mut c = PskClient::new(identity, key).unwrap();
        // Drive by hand to see what the server sends at the end.
        let mut last = Vec::new();
        for _ in 0..4 {
            let out: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
            for d in out {
                w.feed(addr(1), &d);
            }
            let sent = w.sent_to(addr(1));
            for d in &sent {
                let _ = c.on_datagram(d, &mut Vec::new());
            }
            if !sent.is_empty() {
                last = sent;
            }
        }
        assert!(!c.established());
        assert!(w.t.is_empty());
        assert_eq!(w.count(&w.stats.auth_failures), 1);
        // What the client saw last: one datagram, a fatal alert in clear;
        // the shapes are equal (the record numbers may differ).
        assert_eq!(last.len(), 1);
        let rec = crate::coaps::dtls::records(&last[0]).unwrap()[0];
        outcomes.push((rec.content_type, rec.epoch, rec.body.to_vec()));
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(outcomes[0].0, 21, "an alert");
    assert_eq!(outcomes[0].2, vec![2, 20], "fatal bad_record_mac");
}

#[test]
fn a_hello_flood_from_one_address_costs_no_state_and_does_not_lock_out_a_device() {
    let mut w = World::new(limits());
    for i in 0..10_000u32 {
        let mut flood = PskClient::new(b"x", b"y").unwrap();
        let hello = flood.poll_transmit().unwrap();
        // From many ports and from the device's own port.
        let port = if i % 2 == 0 {
            7
        } else {
            1000 + (i % 5000) as u16
        };
        w.feed(addr(port), &hello);
        let _ = w.sent_to(addr(port));
        if i == 5000 {
            // The device handshakes in the middle of it.
            let mut c = PskClient::new(b"dev-one", KEY).unwrap();
            assert!(w.handshake(addr(7), &mut c));
        }
    }
    assert_eq!(w.t.len(), 1, "only the device's session");
    assert_eq!(w.count(&w.stats.hello_verify_requests), 10_001);
    assert_eq!(w.t.device_of(addr(7)), Some(&DeviceName::new("d1")));
}

#[test]
fn half_open_sessions_are_capped_per_address_and_expire() {
    let mut w = World::new(limits());
    // Cookie-proven hellos that never finish (a client that answers the
    // HelloVerifyRequest and then stops).
    let mut stalled = Vec::new();
    for port in 1..=8u16 {
        let mut c = PskClient::new(b"dev-one", KEY).unwrap();
        w.feed(addr(port), &c.poll_transmit().unwrap());
        for d in w.sent_to(addr(port)) {
            c.on_datagram(&d, &mut Vec::new()).unwrap();
        }
        w.feed(addr(port), &c.poll_transmit().unwrap());
        let _ = w.sent_to(addr(port));
        stalled.push(c);
    }
    assert_eq!(w.count(&w.stats.half_open), 5, "per-IP cap");
    assert_eq!(w.count(&w.stats.refused), 3);
    // Another address is not affected.
    let other = SocketAddr::from(([192, 0, 2, 2], 1));
    let mut c = PskClient::new(b"dev-two", b"other").unwrap();
    assert!(w.handshake(other, &mut c));
    // After the handshake timeout the slots are free again.
    w.now += Duration::from_secs(11);
    w.t.tick(w.now);
    assert_eq!(w.count(&w.stats.half_open), 0);
    assert_eq!(w.count(&w.stats.handshake_timeouts), 5);
    assert_eq!(w.t.len(), 1);
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(addr(1), &mut c));
}

#[test]
fn a_device_reconnecting_from_the_same_address_replaces_its_session_once_proven() {
    let mut w = World::new(limits());
    let mut old = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(addr(1), &mut old));
    // A hello from the same address with a cookie for another address
    // (unproven) does not touch the session.
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    let hello = c.poll_transmit().unwrap();
    w.feed(addr(1), &hello);
    let hvr = w.sent_to(addr(1));
    assert_eq!(hvr.len(), 1, "a HelloVerifyRequest, nothing else");
    old.write(b"still here").unwrap();
    let got = w.feed(addr(1), &old.poll_transmit().unwrap());
    assert_eq!(got.len(), 1, "the old session still works");
    // The rebooted device proves the address and completes: replaced.
    c.on_datagram(&hvr[0], &mut Vec::new()).unwrap();
    assert!(w.handshake(addr(1), &mut c));
    assert_eq!(w.count(&w.stats.replaced), 1);
    assert_eq!(w.count(&w.stats.established), 1);
    c.write(b"new").unwrap();
    let got = w.feed(addr(1), &c.poll_transmit().unwrap());
    assert_eq!(got[0].data, b"new");
    old.write(b"old").unwrap();
    assert!(w.feed(addr(1), &old.poll_transmit().unwrap()).is_empty());
}

#[test]
fn a_lost_server_flight_is_sent_again_when_the_client_repeats_itself() {
    let mut w = World::new(limits());
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    w.feed(addr(1), &c.poll_transmit().unwrap());
    for d in w.sent_to(addr(1)) {
        c.on_datagram(&d, &mut Vec::new()).unwrap();
    }
    let hello2 = c.poll_transmit().unwrap();
    w.feed(addr(1), &hello2);
    let first = w.sent_to(addr(1));
    // Lost; the client repeats its hello: the same flight comes again.
    w.feed(addr(1), &hello2);
    assert_eq!(w.sent_to(addr(1)), first);
    assert_eq!(w.t.len(), 1);
    for d in first {
        c.on_datagram(&d, &mut Vec::new()).unwrap();
    }
    assert!(w.handshake(addr(1), &mut c));
}

#[test]
fn revoked_or_rekeyed_devices_lose_their_sessions_and_idle_ones_expire() {
    let mut w = World::new(limits());
    let mut one = PskClient::new(b"dev-one", KEY).unwrap();
    let mut two = PskClient::new(b"dev-two", b"other").unwrap();
    assert!(w.handshake(addr(1), &mut one));
    assert!(w.handshake(addr(2), &mut two));
    // dev-one's key rotated: its session is closed with close_notify.
    let gone = w.t.recheck(&|id: &[u8]| {
        (id == b"dev-one")
            .then(|| (DeviceName::new("d1"), digest(b"new key")))
            .or_else(|| (id == b"dev-two").then(|| (DeviceName::new("d2"), digest(b"other"))))
    });
    assert_eq!(gone, vec![(addr(1), DeviceName::new("d1"))]);
    let notes = w.sent_to(addr(1));
    assert_eq!(notes.len(), 1);
    assert_eq!(
        one.on_datagram(&notes[0], &mut Vec::new()),
        Err(DtlsError::PeerClosed)
    );
    assert_eq!(w.count(&w.stats.revoked), 1);
    assert!(w.t.device_of(addr(2)).is_some());
    // dev-two goes silent past the idle timeout.
    w.now += Duration::from_secs(601);
    w.t.tick(w.now);
    assert!(w.t.is_empty());
    assert_eq!(w.count(&w.stats.idle_closed), 1);
}

#[test]
fn a_peer_close_notify_ends_the_session() {
    let mut w = World::new(limits());
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(addr(1), &mut c));
    c.close();
    w.feed(addr(1), &c.poll_transmit().unwrap());
    assert!(w.t.is_empty());
    assert_eq!(w.count(&w.stats.peer_closed), 1);
}

#[test]
fn garbage_and_non_hellos_from_strangers_are_dropped() {
    let mut w = World::new(limits());
    for d in [
        &b""[..],
        &[22, 0xfe, 0xfd, 0, 0][..],
        &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 3, 1, 2, 3][..],
        &[
            22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 13, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0,
        ][..],
    ] {
        w.feed(addr(1), d);
    }
    assert!(w.t.is_empty());
    assert!(w.sent_to(addr(1)).is_empty());
}

#[test]
fn an_address_that_keeps_failing_to_authenticate_is_throttled() {
    let throttle = crate::throttle::AuthThrottle::new(3, Duration::from_secs(60));
    let mut w = World::build(limits(), Some(Arc::new(throttle)));
    for port in 1..=3u16 {
        let mut c = PskClient::new(b"dev-one", b"guess").unwrap();
        assert!(!w.handshake(addr(port), &mut c));
    }
    assert_eq!(w.count(&w.stats.auth_failures), 3);
    // The right key from the same address now waits out the window…
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(!w.handshake(addr(9), &mut c));
    assert_eq!(w.count(&w.stats.throttled), 1);
    // …another address is not affected.
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(SocketAddr::from(([192, 0, 2, 2], 9)), &mut c));
}

/// Resident memory per established session, for docs/benchmarks.md:
/// `cargo test -p sluice-agent --release --lib per_session_memory -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn per_session_memory() {
    fn rss_kb() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
    let n = 20_000u16;
    let mut l = limits();
    l.max_sessions = 100_000;
    l.max_handshakes_per_ip = 100_000;
    l.max_handshakes = 100_000;
    let mut w = World::new(l);
    // Each client is dropped after its handshake: its memory is reused by
    // the next one, so the growth is the server's sessions and table.
    let before = rss_kb();
    for port in 1..=n {
        let mut c = PskClient::new(b"dev-one", KEY).unwrap();
        assert!(w.handshake(addr(port), &mut c));
    }
    let after = rss_kb();
    assert_eq!(w.t.len(), usize::from(n));
    println!(
        "{n} established sessions: +{} kB RSS, {} bytes per session",
        after - before,
        (after - before) * 1024 / u64::from(n)
    );
}

#[test]
fn a_lost_last_flight_is_sent_again_when_the_client_repeats_its_finished() {
    let mut w = World::new(limits());
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    // Hello, HelloVerifyRequest, hello with cookie, ServerHello flight.
    for _ in 0..2 {
        let d = c.poll_transmit().unwrap();
        w.feed(addr(1), &d);
        for d in w.sent_to(addr(1)) {
            c.on_datagram(&d, &mut Vec::new()).unwrap();
        }
    }
    // Key exchange + Finished: the server is established, its
    // ChangeCipherSpec + Finished is lost.
    w.feed(addr(1), &c.poll_transmit().unwrap());
    assert_eq!(w.t.device_of(addr(1)), Some(&DeviceName::new("d1")));
    assert_eq!(w.sent_to(addr(1)).len(), 1, "the last flight (lost)");
    assert!(!c.established());
    // The client's timer fires: the same flight, new record numbers.
    c.retransmit();
    w.feed(addr(1), &c.poll_transmit().unwrap());
    let again = w.sent_to(addr(1));
    assert_eq!(again.len(), 1, "the last flight again");
    c.on_datagram(&again[0], &mut Vec::new()).unwrap();
    assert!(c.established());
    assert_eq!(w.count(&w.stats.handshakes), 1);
}

#[test]
fn a_key_rotated_during_the_handshake_does_not_bind_the_session() {
    let mut w = World::new(limits());
    let mut c = PskClient::new(b"dev-one", KEY).unwrap();
    for _ in 0..2 {
        let d = c.poll_transmit().unwrap();
        w.feed(addr(1), &d);
        for d in w.sent_to(addr(1)) {
            c.on_datagram(&d, &mut Vec::new()).unwrap();
        }
    }
    // The registry now has another key for dev-one (rotate-psk ran); the
    // handshake on the old key completes but binds to nobody.
    w.devices.insert(
        b"dev-one".to_vec(),
        (DeviceName::new("d1"), b"rotated".to_vec()),
    );
    w.feed(addr(1), &c.poll_transmit().unwrap());
    assert!(w.t.is_empty());
    assert_eq!(w.count(&w.stats.unbound), 1);
    assert_eq!(w.count(&w.stats.established), 0);
}

#[test]
fn ended_and_replaced_sessions_are_reported_for_their_coap_state() {
    let mut w = World::new(limits());
    let mut one = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(addr(1), &mut one));
    assert!(w.t.take_ended().is_empty());
    // A reboot from the same address: the old session's state goes.
    let mut again = PskClient::new(b"dev-one", KEY).unwrap();
    assert!(w.handshake(addr(1), &mut again));
    assert_eq!(w.t.take_ended(), vec![addr(1)]);
    // The peer closes; then nothing more to report.
    again.close();
    w.feed(addr(1), &again.poll_transmit().unwrap());
    assert_eq!(w.t.take_ended(), vec![addr(1)]);
    assert!(w.t.take_ended().is_empty());
}
