//! Criterion benchmarks of the coaps DTLS layer (issue 10): a full PSK
//! handshake through the session layer (cookie exchange included), with
//! only the *server's* calls timed, and record protection (seal + open) of
//! a 100-byte CoAP message under each suite.
//!
//! ```sh
//! nice cargo bench -p sluice-agent --bench dtls
//! nice cargo bench -p sluice-agent --bench dtls -- --quick   # smoke run
//! ```

// A benchmark that cannot set up has nothing to report: panicking is the
// right answer, so unwrap/expect are allowed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_agent::coaps::client::PskClient;
use sluice_agent::coaps::dtls::{CookieJar, PskServer, Suite, bench_seal_open};
use sluice_agent::coaps::sessions::{DtlsStats, Limits, Sessions};
use sluice_cloud_sync::DeviceName;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn table() -> Sessions<Arc<PskServer>> {
    let server = PskServer::new(
        Arc::new(|id: &[u8]| (id == b"dev-one").then(|| b"secretPSK".to_vec())),
        1200,
    )
    .unwrap();
    let limits = Limits {
        max_sessions: 1 << 20,
        max_handshakes: 1 << 20,
        max_handshakes_per_ip: 1 << 20,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(600),
    };
    Sessions::new(
        Arc::new(server),
        CookieJar::new(Instant::now(), 60).unwrap(),
        limits,
        Arc::new(DtlsStats::default()),
    )
}

fn dtls(c: &mut Criterion) {
    let mut g = c.benchmark_group("dtls");
    g.throughput(Throughput::Elements(1));
    // The registry's view: the device and the digest of the key in use.
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b"secretPSK").as_ref());
    let auth = |_: &[u8]| Some((DeviceName::new("d1"), digest));
    g.bench_function("server_handshake", |b| {
        b.iter_custom(|iters| {
            let mut t = table();
            let mut server_time = Duration::ZERO;
            let mut out = Vec::new();
            for i in 0..iters {
                let peer =
                    SocketAddr::from(([10, 0, (i >> 16) as u8, (i >> 8) as u8], i as u16 | 1));
                let mut client = PskClient::new(b"dev-one", b"secretPSK").unwrap();
                for _ in 0..4 {
                    while let Some(d) = client.poll_transmit() {
                        let start = Instant::now();
                        t.datagram(Instant::now(), peer, &d, &auth, &mut out);
                        server_time += start.elapsed();
                    }
                    while let Some((_, d)) = t.poll_transmit() {
                        client.on_datagram(&d, &mut Vec::new()).unwrap();
                    }
                }
                assert!(client.established());
            }
            server_time
        });
    });
    for (name, suite) in [
        ("seal_open_ccm8_100b", Suite::PskAes128Ccm8),
        ("seal_open_ccm_100b", Suite::PskAes128Ccm),
        ("seal_open_gcm_100b", Suite::PskAes128GcmSha256),
    ] {
        let payload = [0x42u8; 100];
        g.bench_function(name, |b| {
            b.iter(|| bench_seal_open(suite, black_box(&payload)))
        });
    }
    g.finish();
}

criterion_group!(benches, dtls);
criterion_main!(benches);
