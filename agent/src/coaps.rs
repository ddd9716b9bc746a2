//! CoAP over DTLS 1.2 with per-device pre-shared keys (`[listeners.coaps]`,
//! RFC 7252 §9.1): the device is the one whose PSK identity the handshake
//! authenticated.
//!
//! - [`dtls`]: the DTLS engine (PSK only, Sans-I/O).
//! - [`engine`]: the trait the session layer drives, so that the engine
//!   can be swapped.
//! - [`sessions`]: the session table, admission control, cookies,
//!   timeouts, reconnects, revocation.
//!
//! The CoAP inside is served by [`crate::coap`]'s resources
//! ([`crate::coap::serve_dtls`]).

pub mod client;
pub mod dtls;
pub mod engine;
pub mod sessions;

pub use engine::DtlsError;

use crate::registry::Registry;
use sessions::{DtlsStats, Limits, Sessions};
use sluice_cloud_sync::DeviceName;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::UdpSocket;

/// The session table of the coaps listener.
pub type Table = Sessions<Arc<dtls::PskServer>>;

/// The DTLS state the coaps listener shares with status and metrics.
pub struct DtlsSide {
    /// Sessions.
    pub table: Mutex<Table>,
    /// Counters.
    pub stats: Arc<DtlsStats>,
}

impl DtlsSide {
    /// A listener's DTLS side: keys from `registry`'s in-memory snapshot,
    /// datagrams of at most `mtu` bytes, failed handshakes counted per
    /// address in `throttle`.
    ///
    /// Fails when the OS has no randomness.
    pub fn new(
        registry: Arc<Registry>,
        limits: Limits,
        mtu: usize,
        throttle: Arc<crate::throttle::AuthThrottle>,
    ) -> Result<Self, DtlsError> {
        let lookup: dtls::PskLookup =
            Arc::new(move |id: &[u8]| registry.psk_lookup(id).map(|(_, key)| key));
        let server = Arc::new(dtls::PskServer::new(lookup, mtu)?);
        let stats = Arc::new(DtlsStats::default());
        let jar = dtls::CookieJar::new(Instant::now(), 60)?;
        Ok(Self {
            table: Mutex::new(
                Sessions::new(server, jar, limits, stats.clone()).with_throttle(throttle),
            ),
            stats,
        })
    }
}

/// The device an authenticated identity names and the SHA-256 of its key.
pub fn authorize(registry: &Registry, identity: &[u8]) -> Option<(DeviceName, [u8; 32])> {
    let (device, key) = registry.psk_lookup(identity)?;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &key).as_ref());
    Some((device, digest))
}

/// Everything the table wants sent.
pub fn drain(t: &mut Table) -> Vec<(SocketAddr, Vec<u8>)> {
    std::iter::from_fn(|| t.poll_transmit()).collect()
}

/// Sends `out` on `sock`.
pub async fn send_all(sock: &UdpSocket, out: Vec<(SocketAddr, Vec<u8>)>) {
    for (peer, d) in out {
        if let Err(e) = sock.send_to(&d, peer).await {
            tracing::debug!(%peer, error = %e, "coaps send failed");
        }
    }
}

/// Entry point of the `dtls` cargo-fuzz target. `data` is a sequence of
/// datagrams, each `[len_hi, len_lo, bytes…]`; each goes (1) through the
/// session layer from a stranger's address (prefilter, cookie check), (2)
/// to an established session (a real handshake with
/// [`client::PskClient`] first), (3) to a fresh server session as if its
/// cookie were valid ([`dtls::PskServer::accept`]) and, when that works,
/// to that session again. Also sealed by the client as application data,
/// which must come out unchanged. Panics only on a bug.
#[doc(hidden)]
pub fn fuzz_dtls(data: &[u8]) {
    let now = Instant::now();
    let Ok(server) = dtls::PskServer::new(
        Arc::new(|id: &[u8]| (id == b"dev").then(|| b"key".to_vec())),
        1200,
    ) else {
        return;
    };
    let server = Arc::new(server);
    let Ok(jar) = dtls::CookieJar::new(now, 60) else {
        return;
    };
    let limits = Limits {
        max_sessions: 4,
        max_handshakes: 4,
        max_handshakes_per_ip: 2,
        handshake_timeout: std::time::Duration::from_secs(10),
        idle_timeout: std::time::Duration::from_secs(600),
    };
    let mut table = Sessions::new(server.clone(), jar, limits, Arc::new(DtlsStats::default()));
    let mut key_digest = [0u8; 32];
    key_digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b"key").as_ref());
    let auth = |id: &[u8]| (id == b"dev").then(|| (DeviceName::new("d"), key_digest));
    let peer = SocketAddr::from(([192, 0, 2, 1], 5684));
    let stranger = SocketAddr::from(([192, 0, 2, 2], 5684));
    let mut out = Vec::new();
    // A real handshake: `peer` has an established session.
    let Ok(mut client) = client::PskClient::new(b"dev", b"key") else {
        return;
    };
    for _ in 0..4 {
        while let Some(d) = client.poll_transmit() {
            table.datagram(now, peer, &d, &auth, &mut out);
        }
        for (_, d) in drain(&mut table) {
            let _ = client.on_datagram(&d, &mut Vec::new());
        }
    }
    assert!(
        client.established(),
        "the in-memory handshake must complete"
    );
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let d = &rest[2..2 + n];
        rest = &rest[2 + n..];
        table.datagram(now, stranger, d, &auth, &mut out);
        table.datagram(now, peer, d, &auth, &mut out);
        if let Ok(mut s) = server.accept(d) {
            use engine::DtlsSession as _;
            let _ = s.on_datagram(d, &mut Vec::new());
            while s.poll_transmit().is_some() {}
        }
        if client.established() && d.len() <= 1100 {
            out.clear();
            if client.write(d).is_ok()
                && let Some(sealed) = client.poll_transmit()
            {
                table.datagram(now, peer, &sealed, &auth, &mut out);
                if table.device_of(peer).is_some() {
                    assert_eq!(out.len(), 1, "sealed data must be delivered");
                    assert_eq!(out[0].data, d, "and come out unchanged");
                }
            }
        }
        drop(drain(&mut table));
    }
}
