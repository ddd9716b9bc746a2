//! Fills an outbox with N synthetic records, for start-up and space
//! measurements (docs/benchmarks.md).
//!
//! `cargo run --release -p sluice-cloud-sync --example outbox-fill -- STATE_DIR N`
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool: fail loudly

use sluice_cloud_sync::{Clock, ClockMode, DeviceName, Outbox, OutboxConfig, Record, Value};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("STATE_DIR"));
    let n: u64 = args.next().expect("N").parse().expect("N is a number");
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let outbox = Outbox::open(
            &dir.join("outbox.db"),
            &dir.join("state.db"),
            OutboxConfig {
                max_bytes: 64 << 30,
                ..OutboxConfig::default()
            },
            Arc::new(Clock::new(ClockMode::Trusted)),
        )
        .unwrap();
        let t0 = Instant::now();
        let batch = 10_000u64;
        let mut done = 0u64;
        while done < n {
            let k = batch.min(n - done);
            let recs: Vec<Record> = (0..k)
                .map(|i| Record {
                    device: DeviceName::new(format!("dev-{}", (done + i) % 100)),
                    ts_ms: 1_795_000_000_000 + (done + i) as i64,
                    ts_trusted: true,
                    values: vec![
                        ("temperature".into(), Value::F64(21.5)),
                        ("humidity".into(), Value::I64(40)),
                    ],
                })
                .collect();
            outbox.append(&recs).await.unwrap();
            done += k;
        }
        outbox.close().await;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{n} records in {secs:.1} s ({:.0} records/s)",
            n as f64 / secs
        );
    });
}
