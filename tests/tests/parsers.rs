//! The fuzz targets' entry points (fuzz/fuzz_targets/*) on stable Rust, for
//! CI: every committed seed (fuzz/seeds/<target>/), every seed with random
//! byte flips, truncations and insertions, and plain random bytes — each
//! must be refused or accepted, never panic, and keep the target's
//! invariants. The long coverage-guided runs are `fuzz/run.sh` (nightly
//! instrumentation); their results are in docs/benchmarks.md.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use sluice_agent::{senml, tbjson};
use sluice_cloud_sync::DeviceName;
use sluice_firmware::manifest::{Manifest, compare_versions};
use std::cmp::Ordering;
use std::path::Path;

/// The fuzz target's body: whatever the bytes, no panic, invariants hold.
fn target(name: &str, data: &[u8]) {
    match name {
        "mqtt_session" => {
            sluice_agent::mqtt::fuzz_mqtt_bytes(data);
        }
        "coap_datagram" => sluice_agent::coap::fuzz_datagram(data),
        "tbjson" | "senml" => {
            let device = DeviceName::new("fuzz-dev");
            let trusted = data.first().is_some_and(|b| b & 1 == 1);
            let decoded = if name == "tbjson" {
                tbjson::decode(data, &device, 1_800_000_000_000, trusted)
            } else {
                senml::decode(data, &device, 1_800_000_000_000, trusted)
            };
            if let Ok(records) = decoded {
                assert!(records.len() <= tbjson::MAX_RECORDS);
            }
        }
        "cert_not_after" => {
            if let Some(t) = sluice_cloud_sync::certificate::not_after(data) {
                assert!((-62_167_219_200..=253_402_300_799).contains(&t), "{t}");
            }
        }
        "manifest" => {
            if let Ok(m) = Manifest::parse(data, 1 << 30) {
                assert!(m.url.starts_with("https://"), "{}", m.url);
                assert!(m.size > 0 && m.size <= 1 << 30);
                assert_eq!(m.sha256.len(), 64);
                assert_eq!(compare_versions(&m.version, &m.version), Ordering::Equal);
                assert!(!m.admits_over(Some(&m.version)));
            }
            let text = String::from_utf8_lossy(data);
            if let Some((a, b)) = text.split_at_checked(text.len() / 2) {
                assert_eq!(compare_versions(a, b), compare_versions(b, a).reverse());
            }
        }
        "record" => {
            // A stored outbox body: decoded or refused; what decodes
            // re-encodes stably (compared as bytes: a stored F64 may be
            // NaN, which is not equal to itself).
            if let Ok(r) = sluice_cloud_sync::Record::decode(data) {
                let mut once = Vec::new();
                r.encode_into(&mut once).unwrap();
                let mut twice = Vec::new();
                sluice_cloud_sync::Record::decode(&once)
                    .unwrap()
                    .encode_into(&mut twice)
                    .unwrap();
                assert_eq!(once, twice);
            }
        }
        "downlink" => {
            // What the cloud sends down, on each topic either profile reads.
            use sluice_cloud_sync::profile::tb;
            let topic = match data.first().map_or(0, |b| b % 8) {
                0 => "p/commands",
                1 => "p/attributes/shared",
                2 => tb::RPC,
                3 => tb::ATTRIBUTES,
                4 => tb::ME_ATTRIBUTES,
                5 => "v1/devices/me/rpc/request/7",
                6 => "v1/devices/me/attributes/response/2",
                _ => "elsewhere",
            };
            let payload = data.get(1..).unwrap_or_default();
            let _ = sluice_cloud_sync::downlink::parse(
                "p/commands",
                "p/attributes/shared",
                topic,
                payload,
            );
            let _ = tb::parse("gw", topic, payload);
            let _ = tb::session_limits(payload);
            let _ = tb::is_own_echo(topic, payload);
        }
        "envelope" => {
            // A signed envelope (fleet configuration, firmware manifest):
            // random bytes never verify against a key nobody holds.
            let key = [7u8; 32];
            assert!(sluice_agent::fleet::open(data, &[key]).is_err());
            assert!(sluice_agent::fleet::verify(data, &[key]).is_err());
        }
        "dtls" => sluice_agent::coaps::fuzz_dtls(data),
        other => panic!("no target {other}"),
    }
}

const TARGETS: [&str; 10] = [
    "mqtt_session",
    "coap_datagram",
    "tbjson",
    "senml",
    "cert_not_after",
    "manifest",
    "record",
    "downlink",
    "envelope",
    "dtls",
];

fn seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds")).join(name);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    // Targets without committed seeds start from a minimal valid input.
    if out.is_empty() {
        out.push(match name {
            "tbjson" => br#"{"ts":1700000000000,"values":{"t":21.5,"on":true,"s":"x"}}"#.to_vec(),
            "senml" => br#"[{"bn":"d/","bt":1.7e9,"n":"t","v":21.5},{"n":"s","vs":"x"}]"#.to_vec(),
            "record" => {
                let r = sluice_cloud_sync::Record {
                    device: DeviceName::new("dev-1"),
                    ts_ms: 1_700_000_000_123,
                    ts_trusted: true,
                    values: vec![
                        ("t".into(), sluice_cloud_sync::Value::F64(21.5)),
                        ("s".into(), sluice_cloud_sync::Value::Str("x".into())),
                    ],
                };
                let mut b = Vec::new();
                r.encode_into(&mut b).unwrap();
                b
            }
            // Topic selector 0 (P/commands), then a command.
            "downlink" => [
                &[0u8][..],
                br#"{"id":"c1","device":"d1","method":"m","params":{"a":1},"expires_ms":500}"#,
            ]
            .concat(),
            "envelope" => {
                br#"{"payload":"eyJ2ZXJzaW9uIjoxfQ==","signature":"AAAA","key_id":"x"}"#.to_vec()
            }
            _ => Vec::new(),
        });
    }
    out
}

#[test]
fn every_committed_seed_is_handled() {
    for name in TARGETS {
        let s = seeds(name);
        assert!(!s.is_empty(), "{name}");
        for data in &s {
            target(name, data);
        }
    }
    // Found by the `record` fuzz target: a stored NaN (the target's own
    // equality check was wrong, not the decoder).
    target(
        "record",
        &[
            1, 1, 0, 0x92, 255, 255, 255, 255, 255, 255, 255, 7, 0, 1, 0, 2, 1, 0, 0, 1, 255, 255,
            255, 255, 7, 0, 1, 0, 2, 1, 0, 0, 1, 0, 0, 0x3d, 1, 0, 0, 255, 0, 0, 0x3d, 1, 0, 0,
            255, 255,
        ],
    );
    // The directories the fuzz targets read exist for the ones with seeds.
    assert!(seeds("mqtt_session").len() >= 10);
    assert!(seeds("coap_datagram").len() >= 8);
    assert!(seeds("dtls").len() >= 8);
}

/// A seed of `name` with `edits` applied: (position, kind, byte).
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for &(pos, kind, byte) in edits {
        let at = if v.is_empty() { 0 } else { pos % (v.len() + 1) };
        match kind % 4 {
            0 if at < v.len() => v[at] ^= byte | 1,
            1 => v.insert(at, byte),
            2 if at < v.len() => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_never_panic(
        which in 0..TARGETS.len(),
        pick in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..12),
    ) {
        let name = TARGETS[which];
        let s = seeds(name);
        let seed = &s[pick % s.len()];
        target(name, &mutate(seed, &edits));
    }

    #[test]
    fn random_bytes_never_panic(
        which in 0..TARGETS.len(),
        data in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        target(TARGETS[which], &data);
    }
}
