//! Criterion micro-benchmarks of the outbox hot paths, against a plain
//! `fdatasync`ed file as the yardstick (issue 3: durable outbox append should
//! reach ≥ 0.7× the raw file at the same batch size).
//!
//! Every benchmark opens its own temp dir with a real `outbox.db` / `state.db`
//! (or the raw file) on the same filesystem, `durability = Power`.
//!
//! On the development machine one `fdatasync` costs ≈ 0.9 ms median
//! (bimodal 0.15 ms / 4 ms, see shared/notes/real-clients.md), so anything
//! that commits once per record tops out near 1 000 records/s: the batch sizes
//! show how far group commit amortises that. (In quiet runs the fast mode
//! dominates: `raw_fdatasync/batch_1` measured 0.12–0.23 ms.)
//!
//! The database grows for as long as a benchmark runs (appends are not
//! acked), as a backlog does; only `lease_ack` deletes.
//!
//! ```sh
//! nice cargo bench -p sluice-cloud-sync --bench outbox
//! nice cargo bench -p sluice-cloud-sync --bench outbox -- --quick   # smoke run
//! ```

// A benchmark that cannot set up or store has nothing to report: panicking is
// the right answer, so unwrap/expect are allowed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_cloud_sync::{
    Clock, ClockMode, DeviceName, Durability, Outbox, OutboxConfig, Record, Seq, Value,
};
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::runtime::Runtime;

const BATCHES: [usize; 3] = [1, 100, 1000];
const CONCURRENT_TASKS: usize = 64;
const LEASE_BATCH: usize = 500;
/// Devices behind the gateway: a batch of N records comes from
/// min(N, DEVICES) distinct devices. Append cost depends on it (the writer
/// keeps a per-device record count: one upsert per device per commit), so
/// `append_devices` measures 1 and 1000 devices as well.
const DEVICES: u64 = 100;

/// The one place a benchmark record is built (adapt only this if `Record`
/// grows a field): record `i` of a gateway with `devices` devices. Three
/// values, 107 bytes once encoded.
fn record(i: u64, devices: u64) -> Record {
    Record {
        device: DeviceName::new(format!("greenhouse-7/sensor-{:04}", i % devices)),
        ts_ms: 1_700_000_000_000 + i as i64,
        ts_trusted: true,
        values: vec![
            (
                "temperature_c".into(),
                Value::F64(21.5 + (i % 100) as f64 / 10.0),
            ),
            ("relative_humidity_pct".into(), Value::F64(48.25)),
            ("status".into(), Value::Str("ok-nominal".into())),
        ],
    }
}

fn records(n: usize, devices: u64) -> Vec<Record> {
    (0..n as u64).map(|i| record(i, devices)).collect()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh outbox in its own temp dir; the dir must outlive the outbox.
fn fresh_outbox() -> (TempDir, Outbox) {
    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = Outbox::open(
        &dir.path().join("outbox.db"),
        &dir.path().join("state.db"),
        OutboxConfig {
            durability: Durability::Power,
            // Large enough that no benchmark ever evicts: eviction is not what
            // is measured here.
            max_bytes: 8 << 30,
            ..OutboxConfig::default()
        },
        Arc::new(Clock::new(ClockMode::Trusted)),
    )
    .expect("open outbox");
    (dir, outbox)
}

fn append(c: &mut Criterion) {
    let body_len = record(0, DEVICES).encode().unwrap().len();
    eprintln!("benchmark record: {body_len} B encoded (Record::encode)");
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    for n in BATCHES {
        let batch = records(n, DEVICES);
        let (_dir, outbox) = fresh_outbox();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| rt.block_on(outbox.append(black_box(&batch))).unwrap());
        });
        rt.block_on(outbox.close());
    }

    // 64 callers with one record each, in flight at once: what group commit
    // is for (the writer takes whatever is queued into one transaction).
    let (_dir, outbox) = fresh_outbox();
    let singles: Vec<[Record; 1]> = (0..CONCURRENT_TASKS as u64)
        .map(|i| [record(i, DEVICES)])
        .collect();
    group.throughput(Throughput::Elements(CONCURRENT_TASKS as u64));
    group.bench_function(format!("concurrent_{CONCURRENT_TASKS}x1"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for one in &singles {
                    let outbox = outbox.clone();
                    let one = one.clone();
                    tasks.spawn(async move { outbox.append(&one).await.unwrap() });
                }
                while let Some(r) = tasks.join_next().await {
                    black_box(r.unwrap());
                }
            });
        });
    });
    rt.block_on(outbox.close());
    group.finish();
}

/// One append of 1000 records from 1 and from 1000 distinct devices (the main
/// `append/batch_1000` has 100).
fn append_devices(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_devices");
    for devices in [1, 1000] {
        let batch = records(1000, devices);
        let (_dir, outbox) = fresh_outbox();
        group.throughput(Throughput::Elements(1000));
        group.bench_function(format!("batch_1000_from_{devices}"), |b| {
            b.iter(|| rt.block_on(outbox.append(black_box(&batch))).unwrap());
        });
        rt.block_on(outbox.close());
    }
    group.finish();
}

/// The uplink's drain path: lease 500 committed records, ack them all, then
/// wait for the deletes to commit. Only that is timed; the append that
/// refills the outbox before each iteration is not (see `append/batch_*`).
fn lease_ack(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("lease_ack");
    let batch = records(LEASE_BATCH, DEVICES);
    let (_dir, outbox) = fresh_outbox();
    group.throughput(Throughput::Elements(LEASE_BATCH as u64));
    group.bench_function(BenchmarkId::from_parameter(LEASE_BATCH), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    outbox.append(&batch).await.unwrap();
                    let start = Instant::now();
                    let leased = outbox
                        .lease_after(Seq(0), LEASE_BATCH, u64::MAX)
                        .await
                        .unwrap();
                    assert_eq!(leased.len(), LEASE_BATCH);
                    outbox
                        .ack(leased.iter().map(|l| l.seq).collect())
                        .await
                        .unwrap();
                    // `ack` only queues the deletes; an empty append is a
                    // round trip through the writer, after their commit.
                    outbox.append(&[]).await.unwrap();
                    timed += start.elapsed();
                }
                timed
            })
        });
    });
    rt.block_on(outbox.close());
    group.finish();
}

/// The yardstick: the same encoded bodies, length-prefixed, appended to a
/// plain file and made durable with one `fdatasync` per batch.
fn raw_fdatasync(c: &mut Criterion) {
    let mut group = c.benchmark_group("raw_fdatasync");
    for n in BATCHES {
        let batch = records(n, DEVICES);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("raw.log"))
            .expect("open raw file");
        let mut buf = Vec::with_capacity(n * 128);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| {
                buf.clear();
                for r in black_box(&batch) {
                    let body = r.encode().unwrap();
                    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    buf.extend_from_slice(&body);
                }
                file.write_all(&buf).unwrap();
                file.sync_data().unwrap();
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the whole suite should take under ~3 minutes on 2 cores.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = append, append_devices, lease_ack, raw_fdatasync
}
criterion_main!(benches);
