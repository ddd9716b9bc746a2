//! Criterion benchmark of the telemetry pipeline before the outbox (issue 6:
//! decode + 5 rules ≥ 1M readings/s on one core): ThingsBoard JSON decode
//! ([`sluice_agent::tbjson::decode`]) then [`sluice_agent::rules::Rules::apply`]
//! with five rules (one per key), each of five actions: range (clamp), scale,
//! rename, deadband, aggregate (10 s windows of min/max/avg).
//!
//! 100 devices take turns; each sends a message every second of its own
//! time (the decoder stamps it), so every 10th reading of a key closes a
//! window and the deadband passes about half the readings. `decode_only` is
//! the decoder alone, for comparison; `decode_rules_dirty` adds
//! `drain_dirty()` every 100 messages (the changed state entries, encoded,
//! as an integrator persisting them would; without the SQLite writes).
//!
//! ```sh
//! nice cargo bench -p sluice-agent --bench rules
//! nice cargo bench -p sluice-agent --bench rules -- --quick   # smoke run
//! ```

// A benchmark that cannot set up has nothing to report: panicking is the
// right answer, so unwrap/expect are allowed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_agent::rules::{self, RawRule, Rules};
use sluice_agent::tbjson;
use sluice_cloud_sync::{DeviceName, OutboxConfig};
use std::hint::black_box;

const DEVICES: usize = 100;
const KEYS: [&str; 5] = ["temperature", "humidity", "pressure", "co2", "voltage"];
/// Distinct bodies per message shape, cycled.
const BODIES: usize = 1000;

fn rules() -> Rules {
    let mut text = String::new();
    for key in KEYS {
        text.push_str(&format!(
            r#"
[[rules]]
name = "{key}"
devices = "sensor-*"
keys = "{key}"
actions = [
  {{ type = "range", min = -1000, max = 100000, action = "clamp" }},
  {{ type = "scale", factor = 1.0, offset = 0.5 }},
  {{ type = "rename", to = "{key}_si" }},
  {{ type = "deadband", abs = 0.5 }},
  {{ type = "aggregate", window = "10s", functions = ["min", "max", "avg"], emit_raw = true }},
]
"#
        ));
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        rules: Vec<RawRule>,
    }
    let doc: Doc = toml::from_str(&text).unwrap();
    Rules::new(rules::validate(&doc.rules, &OutboxConfig::default().effective_streams()).unwrap())
}

/// `BODIES` messages of `n` values; values wander so the deadband passes
/// some and drops some.
fn bodies(n: usize) -> Vec<Vec<u8>> {
    (0..BODIES)
        .map(|i| {
            let fields: Vec<String> = KEYS[..n]
                .iter()
                .enumerate()
                .map(|(k, key)| {
                    let v = 20.0 + k as f64 * 100.0 + (i % 7) as f64 * 0.3;
                    if k == 3 {
                        format!("\"{key}\":{}", 400 + i % 5)
                    } else {
                        format!("\"{key}\":{v:.2}")
                    }
                })
                .collect();
            format!("{{{}}}", fields.join(",")).into_bytes()
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let devices: Vec<DeviceName> = (0..DEVICES)
        .map(|i| DeviceName::new(format!("sensor-{i:03}")))
        .collect();
    let t0: i64 = 1_700_000_000_000;
    let mut g = c.benchmark_group("rules_pipeline");
    for n in [1usize, 5] {
        let bodies = bodies(n);
        g.throughput(Throughput::Elements(n as u64));

        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("decode_only", n), |b| {
            b.iter(|| {
                i += 1;
                // each device's clock advances 1 s per message it sends
                let now = t0 + (i as i64) * (1000 / DEVICES as i64);
                black_box(
                    tbjson::decode(&bodies[i % BODIES], &devices[i % DEVICES], now, true).unwrap(),
                )
            })
        });

        let mut engine = rules();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("decode_rules", n), |b| {
            b.iter(|| {
                i += 1;
                let now = t0 + (i as i64) * (1000 / DEVICES as i64);
                let records =
                    tbjson::decode(&bodies[i % BODIES], &devices[i % DEVICES], now, true).unwrap();
                black_box(engine.apply("sensor", records))
            })
        });

        let mut engine = rules();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("decode_rules_dirty", n), |b| {
            b.iter(|| {
                i += 1;
                let now = t0 + (i as i64) * (1000 / DEVICES as i64);
                let records =
                    tbjson::decode(&bodies[i % BODIES], &devices[i % DEVICES], now, true).unwrap();
                let out = engine.apply("sensor", records);
                if i.is_multiple_of(100) {
                    let mut bytes = 0usize;
                    engine.drain_dirty(|k, v| {
                        bytes += k.device.len() + k.key.len() + v.map_or(0, <[u8]>::len)
                    });
                    black_box(bytes);
                }
                black_box(out)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
