use super::*;
use crate::clock::Clock;
use crate::record::{DeviceName, Value};
use proptest::prelude::*;
use std::collections::VecDeque;

fn config(max_bytes: u64, when_full: WhenFull) -> OutboxConfig {
    OutboxConfig {
        max_bytes,
        max_age: Duration::from_secs(3600),
        when_full,
        durability: Durability::Process,
        streams: Vec::new(),
    }
}

fn clock() -> Arc<Clock> {
    Arc::new(Clock::fixed(true, 1))
}

fn rec(device: &str, n: i64) -> Record {
    Record {
        device: DeviceName::new(device),
        ts_ms: n,
        ts_trusted: true,
        values: vec![("n".into(), Value::I64(n))],
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn open(&self, cfg: OutboxConfig) -> Outbox {
        self.open_with(cfg, clock())
    }
    fn open_with(&self, cfg: OutboxConfig, clock: Arc<Clock>) -> Outbox {
        Outbox::open(
            &self.dir.path().join("outbox.db"),
            &self.dir.path().join("state.db"),
            cfg,
            clock,
        )
        .unwrap()
    }
}

async fn all(o: &Outbox) -> Vec<Leased> {
    o.lease_after(Seq(0), usize::MAX >> 1, u64::MAX)
        .await
        .unwrap()
}

#[test]
fn appended_records_lease_in_order_and_acks_delete_them() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        let r1 = o.append(&[rec("a", 1), rec("b", 2)]).await.unwrap();
        let r2 = o.append(&[rec("a", 3)]).await.unwrap();
        assert_eq!(r1.last.0 + 1, r2.first.0);
        let got = all(&o).await;
        assert_eq!(
            got.iter().map(|l| l.record.ts_ms).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(*o.committed().borrow(), r2.last);
        o.ack(vec![got[0].seq, got[1].seq]).await.unwrap();
        o.append(&[]).await.unwrap(); // a round trip through the writer
        let st = o.stats().await.unwrap();
        assert_eq!(st.records, 1);
        assert_eq!(st.records_acked, 2);
        assert_eq!(st.bytes, got[2].len);
        o.close().await;
    });
}

#[test]
fn lease_respects_the_byte_bound_but_returns_at_least_one() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        o.append(&[rec("a", 1), rec("a", 2), rec("a", 3)])
            .await
            .unwrap();
        assert_eq!(o.lease_after(Seq(0), 10, 1).await.unwrap().len(), 1);
        let one = all(&o).await[0].len;
        assert_eq!(o.lease_after(Seq(0), 10, 2 * one).await.unwrap().len(), 2);
        o.close().await;
    });
}

#[test]
fn seq_never_repeats_when_the_outbox_file_is_replaced() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        let first = o.append(&[rec("a", 1)]).await.unwrap();
        o.close().await;
        drop(o);
        for f in ["outbox.db", "outbox.db-wal", "outbox.db-shm"] {
            let _ = std::fs::remove_file(d.dir.path().join(f));
        }
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        let second = o.append(&[rec("a", 2)]).await.unwrap();
        assert!(second.first > first.last, "{second:?} after {first:?}");
        o.close().await;
    });
}

#[test]
fn totals_and_counters_survive_reopen() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        o.append(&[rec("a", 1), rec("a", 2)]).await.unwrap();
        let before = o.stats().await.unwrap();
        o.close().await;
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        assert_eq!(o.stats().await.unwrap(), before);
        assert_eq!(read_stats(&d.dir.path().join("outbox.db")).unwrap(), before);
        o.close().await;
    });
}

#[test]
fn drop_oldest_evicts_the_head_and_counts_it() {
    rt().block_on(async {
        let d = Dir::new();
        let size = rec("a", 1).encode().unwrap().len() as u64 + ROW_OVERHEAD;
        let o = d.open(config(size * 3, WhenFull::DropOldest));
        for n in 1..=5 {
            o.append(&[rec("a", n)]).await.unwrap();
        }
        let left: Vec<i64> = all(&o).await.iter().map(|l| l.record.ts_ms).collect();
        assert_eq!(left, [3, 4, 5]);
        let st = o.stats().await.unwrap();
        assert_eq!(st.dropped["full"], 2);
        assert_eq!(st.bytes, size * 3);
        o.close().await;
    });
}

#[test]
fn reject_refuses_what_does_not_fit_and_keeps_what_is_stored() {
    rt().block_on(async {
        let d = Dir::new();
        let size = rec("a", 1).encode().unwrap().len() as u64 + ROW_OVERHEAD;
        let o = d.open(config(size * 2, WhenFull::Reject));
        o.append(&[rec("a", 1), rec("a", 2)]).await.unwrap();
        assert!(matches!(
            o.append(&[rec("a", 3)]).await,
            Err(AppendError::Full)
        ));
        let left: Vec<i64> = all(&o).await.iter().map(|l| l.record.ts_ms).collect();
        assert_eq!(left, [1, 2]);
        assert_eq!(o.stats().await.unwrap().dropped["rejected"], 1);
        o.close().await;
    });
}

#[test]
fn purge_and_expiry_count_by_reason() {
    rt().block_on(async {
        let d = Dir::new();
        let mut cfg = config(1 << 20, WhenFull::DropOldest);
        cfg.max_age = Duration::ZERO;
        let o = d.open(cfg);
        o.append(&[rec("a", 1)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        o.maintain().await.unwrap();
        o.append(&[rec("a", 2)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(o.purge(None, Duration::ZERO).await.unwrap(), 1);
        let st = o.stats().await.unwrap();
        assert_eq!((st.dropped["expired"], st.dropped["purged"]), (1, 1));
        assert_eq!(st.records, 0);
        o.close().await;
    });
}

#[test]
fn newer_outbox_schema_is_refused() {
    let d = Dir::new();
    let p = d.dir.path().join("outbox.db");
    let c = Connection::open(&p).unwrap();
    c.pragma_update(None, "user_version", 9).unwrap();
    drop(c);
    let err = Outbox::open(
        &p,
        &d.dir.path().join("state.db"),
        config(1, WhenFull::Reject),
        clock(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, OutboxError::NewerSchema { found: 9, .. }),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_set_aside_and_a_fresh_outbox_used() {
    rt().block_on(async {
        let d = Dir::new();
        let p = d.dir.path().join("outbox.db");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let o = d.open(config(1 << 20, WhenFull::Reject));
        o.append(&[rec("a", 1)]).await.unwrap();
        let st = o.stats().await.unwrap();
        assert_eq!((st.records, st.corrupt_set_aside), (1, 1));
        let moved: Vec<_> = std::fs::read_dir(d.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("outbox.db.corrupt-")
            })
            .collect();
        assert_eq!(moved.len(), 1);
        assert_eq!(std::fs::read(moved[0].path()).unwrap(), vec![0x5a; 8192]);
        o.close().await;
    });
}

#[test]
fn damaged_rows_are_dropped_and_counted_when_leased() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        o.append(&[rec("a", 1), rec("a", 2)]).await.unwrap();
        let side = Connection::open(d.dir.path().join("outbox.db")).unwrap();
        side.execute(
            "UPDATE records SET body = x'01ffffff' WHERE seq = (SELECT min(seq) FROM records)",
            [],
        )
        .unwrap();
        let got = all(&o).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.ts_ms, 2);
        o.append(&[]).await.unwrap();
        assert_eq!(o.stats().await.unwrap().dropped["corrupt"], 1);
        o.close().await;
    });
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    AckFirst(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..5).prop_map(Op::Append),
        2 => (0u8..6).prop_map(Op::AckFirst),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// The outbox behaves like a FIFO of (seq, record) with strictly increasing
    /// seqs, across acks and reopenings.
    #[test]
    fn outbox_matches_a_fifo_model(ops in proptest::collection::vec(op(), 1..30)) {
        rt().block_on(async {
            let d = Dir::new();
            let cfg = config(1 << 30, WhenFull::Reject);
            let mut o = d.open(cfg.clone());
            let mut model: VecDeque<(Seq, i64)> = VecDeque::new();
            let mut last_seq = Seq(0);
            let mut n = 0i64;
            for op in ops {
                match op {
                    Op::Append(k) => {
                        let recs: Vec<Record> = (0..k).map(|_| { n += 1; rec("d", n) }).collect();
                        let r = o.append(&recs).await.unwrap();
                        assert!(r.first > last_seq);
                        assert_eq!(r.last.0 - r.first.0 + 1, u64::from(k));
                        for (i, rc) in recs.iter().enumerate() {
                            model.push_back((Seq(r.first.0 + i as u64), rc.ts_ms));
                        }
                        last_seq = r.last;
                    }
                    Op::AckFirst(k) => {
                        let seqs: Vec<Seq> = model.iter().take(usize::from(k)).map(|(s, _)| *s).collect();
                        for _ in 0..seqs.len() { model.pop_front(); }
                        o.ack(seqs).await.unwrap();
                        o.append(&[]).await.unwrap(); // acks are not awaited: sync
                    }
                    Op::Reopen => {
                        o.close().await;
                        o = d.open(cfg.clone());
                    }
                }
                let got: Vec<(Seq, i64)> = all(&o).await.iter().map(|l| (l.seq, l.record.ts_ms)).collect();
                assert_eq!(got, model.iter().copied().collect::<Vec<_>>());
                assert_eq!(o.stats().await.unwrap().records, model.len() as u64);
            }
            o.close().await;
        });
    }
}

fn streams_config(max_bytes: u64, when_full: WhenFull) -> OutboxConfig {
    OutboxConfig {
        streams: vec![StreamConfig {
            name: "bulk".into(),
            priority: 1,
            max_age: Duration::from_secs(3600),
            max_bytes: max_bytes / 2,
        }],
        ..config(max_bytes, when_full)
    }
}

fn one_size() -> u64 {
    rec("a", 1).encode().unwrap().len() as u64 + ROW_OVERHEAD
}

async fn ns(o: &Outbox, stream: &str) -> Vec<i64> {
    o.lease(Some(stream), Seq(0), 1 << 20, u64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|l| l.record.ts_ms)
        .collect()
}

#[test]
fn a_full_outbox_evicts_the_lowest_priority_stream_first_oldest_first() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(streams_config(one_size() * 6, WhenFull::DropOldest));
        for n in 1..=3 {
            o.append_to("bulk", &[rec("b", n)]).await.unwrap();
        }
        for n in 1..=3 {
            o.append_to("telemetry", &[rec("t", n)]).await.unwrap();
        }
        // Full: alarms (priority 9) push out bulk (1) before telemetry (5).
        for n in 1..=4 {
            o.append_to("alarms", &[rec("a", n)]).await.unwrap();
        }
        assert_eq!(ns(&o, "bulk").await, Vec::<i64>::new());
        assert_eq!(ns(&o, "telemetry").await, [2, 3]);
        assert_eq!(ns(&o, "alarms").await, [1, 2, 3, 4]);
        let st = o.stats().await.unwrap();
        assert_eq!(st.streams["bulk"].dropped["full"], 3);
        assert_eq!(st.streams["telemetry"].dropped["full"], 1);
        assert_eq!(st.dropped["full"], 4);
        assert!(st.bytes <= one_size() * 6);
        // Telemetry cannot push out alarms: only its own oldest go.
        o.append_to("telemetry", &[rec("t", 4)]).await.unwrap();
        assert_eq!(ns(&o, "telemetry").await, [3, 4]);
        assert_eq!(ns(&o, "alarms").await, [1, 2, 3, 4]);
        // Bulk, the lowest, is refused rather than evicting anything higher.
        assert!(matches!(
            o.append_to("bulk", &[rec("b", 9)]).await,
            Err(AppendError::Full)
        ));
        assert_eq!(ns(&o, "bulk").await, Vec::<i64>::new());
        o.close().await;
    });
}

#[test]
fn a_streams_own_cap_and_reject_apply_per_stream() {
    rt().block_on(async {
        let d = Dir::new();
        // bulk may hold half of 8 records' worth.
        let o = d.open(streams_config(one_size() * 8, WhenFull::Reject));
        for n in 1..=4 {
            o.append_to("bulk", &[rec("b", n)]).await.unwrap();
        }
        assert!(matches!(
            o.append_to("bulk", &[rec("b", 5)]).await,
            Err(AppendError::Full)
        ));
        // Another stream still has room.
        o.append_to("telemetry", &[rec("t", 1)]).await.unwrap();
        let st = o.stats().await.unwrap();
        assert_eq!(st.streams["bulk"].dropped["rejected"], 1);
        assert_eq!(st.streams["telemetry"].dropped["rejected"], 0);
        assert!(matches!(
            o.append_to("nope", &[rec("x", 1)]).await,
            Err(AppendError::UnknownStream(_))
        ));
        o.close().await;
    });
}

#[test]
fn expiry_follows_the_lifetime_clock_not_wall_clock_jumps() {
    rt().block_on(async {
        let d = Dir::new();
        let clk = clock();
        let mut cfg = config(1 << 20, WhenFull::DropOldest);
        cfg.max_age = Duration::from_millis(300);
        let o = d.open_with(cfg, clk.clone());
        o.append(&[rec("a", 1)]).await.unwrap();
        // The wall clock leaps a month forward, then a month back: nothing expires.
        for skew in [30 * 86_400_000, -30 * 86_400_000] {
            clk.skew_wall_for_tests(skew);
            o.maintain().await.unwrap();
            settle(&o).await;
            assert_eq!(o.stats().await.unwrap().records, 1, "skew {skew}");
        }
        clk.skew_wall_for_tests(0);
        // Real (monotonic) time passes: now it expires.
        tokio::time::sleep(Duration::from_millis(350)).await;
        o.maintain().await.unwrap();
        settle(&o).await;
        let st = o.stats().await.unwrap();
        assert_eq!((st.records, st.dropped["expired"]), (0, 1));
        o.close().await;
    });
}

#[test]
fn readings_stamped_by_an_untrusted_clock_are_restamped_when_it_becomes_trusted() {
    rt().block_on(async {
        let d = Dir::new();
        let clk = Arc::new(Clock::fixed(false, 7));
        // Booted at 1970: the wall clock is 56 years behind.
        let behind = clk.wall_ms();
        clk.skew_wall_for_tests(-behind);
        let o = d.open_with(config(1 << 20, WhenFull::DropOldest), clk.clone());
        let mut r = rec("a", 0);
        r.ts_ms = clk.wall_ms();
        r.ts_trusted = false;
        let mut device_ts = rec("a", 0);
        device_ts.ts_ms = 1234;
        o.append(&[r, device_ts]).await.unwrap();
        let before = all(&o).await;
        assert!(!before[0].record.ts_trusted && before[0].record.ts_ms < 10_000);

        tokio::time::sleep(Duration::from_millis(50)).await;
        clk.skew_wall_for_tests(0);
        clk.set_trusted(true);
        o.restamp().await.unwrap();
        settle(&o).await;
        let after = all(&o).await;
        let now = clk.wall_ms();
        assert!(after[0].record.ts_trusted);
        let age = now - after[0].record.ts_ms;
        assert!(
            (40..5_000).contains(&age),
            "re-stamped {age} ms in the past"
        );
        assert_eq!(
            after[1].record.ts_ms, 1234,
            "device timestamps are left alone"
        );
        assert_eq!(after[0].seq, before[0].seq);
        o.close().await;
    });
}

#[test]
fn untrusted_readings_of_an_earlier_boot_stay_flagged() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open_with(
            config(1 << 20, WhenFull::DropOldest),
            Arc::new(Clock::fixed(false, 1)),
        );
        let mut r = rec("a", 0);
        r.ts_trusted = false;
        o.append(&[r]).await.unwrap();
        o.close().await;
        let clk = Arc::new(Clock::fixed(true, 2));
        let o = d.open_with(config(1 << 20, WhenFull::DropOldest), clk);
        o.restamp().await.unwrap();
        settle(&o).await;
        assert!(!all(&o).await[0].record.ts_trusted);
        o.close().await;
    });
}

#[test]
fn schema_1_files_migrate_forward_with_their_records_and_totals() {
    rt().block_on(async {
        let d = Dir::new();
        let p = d.dir.path().join("outbox.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            for n in 1..=3i64 {
                let body = rec("old", n).encode().unwrap();
                c.execute(
                    "INSERT INTO records (seq, accepted_ms, len, body) VALUES (?1, 5, ?2, ?3)",
                    params![n, body.len() as i64 + 24, body],
                )
                .unwrap();
            }
            let len = (rec("old", 1).encode().unwrap().len() as i64 + 24) * 3;
            for (k, v) in [
                ("records", 3),
                ("bytes", len),
                ("acked", 10),
                ("dropped_full", 2),
            ] {
                c.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )
                .unwrap();
            }
        }
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        let got = all(&o).await;
        assert_eq!(got.iter().map(|l| l.seq.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(got.iter().all(|l| l.stream == "telemetry"));
        let st = o.stats().await.unwrap();
        assert_eq!((st.records, st.records_acked), (3, 10));
        assert_eq!(st.streams["telemetry"].dropped["full"], 2);
        let next = o.append(&[rec("new", 4)]).await.unwrap();
        assert!(next.first.0 > 3);
        o.close().await;
        let v: i64 = Connection::open(&p)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, OUTBOX_SCHEMA_VERSION);
    });
}

#[test]
fn corruption_found_in_operation_sets_the_file_aside_and_service_continues() {
    rt().block_on(async {
        let d = Dir::new();
        let p = d.dir.path().join("outbox.db");
        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        let big: Vec<Record> = (0..3000).map(|n| rec("a", n)).collect();
        o.append(&big).await.unwrap();
        o.close().await;
        // Smash pages in the middle of the file (not the header).
        let mut bytes = std::fs::read(&p).unwrap();
        let page = 4096;
        for b in &mut bytes[page * 3..page * 12] {
            *b = 0xa5;
        }
        std::fs::write(&p, &bytes).unwrap();

        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        // Reading the damaged pages finds the corruption (if open did not).
        let _ = o.lease_after(Seq(0), 5000, u64::MAX).await;
        o.append(&[]).await.unwrap();
        let r = o.append(&[rec("after", 1)]).await.unwrap();
        let st = o.stats().await.unwrap();
        assert!(st.corrupt_set_aside >= 1, "{st:?}");
        let got = all(&o).await;
        assert_eq!(got.last().unwrap().seq, r.first, "the fresh outbox works");
        assert!(o.check().await.unwrap().ok);
        assert!(
            std::fs::read_dir(d.dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e
                    .file_name()
                    .to_string_lossy()
                    .starts_with("outbox.db.corrupt-"))
        );
        o.close().await;
    });
}

/// Waits until everything sent so far, including the maintenance that runs
/// after a commit, is done.
async fn settle(o: &Outbox) {
    o.append(&[]).await.unwrap();
    o.append(&[]).await.unwrap();
}

#[test]
fn the_file_gives_space_back_after_a_drain_and_the_wal_is_truncated() {
    rt().block_on(async {
        let d = Dir::new();
        let p = d.dir.path().join("outbox.db");
        let wal = d.dir.path().join("outbox.db-wal");
        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        let fill = |k: i64| {
            (0..100_000)
                .map(move |n| rec("a", k * 1_000_000 + n))
                .collect::<Vec<_>>()
        };
        o.append(&fill(1)).await.unwrap();
        o.maintain().await.unwrap();
        settle(&o).await;
        let full = std::fs::metadata(&p).unwrap().len();
        // Truncated by the checkpoint; only the barrier's own small commit is left.
        let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert!(wal_len < 64 * 1024, "WAL {wal_len} B after maintenance");
        let seqs: Vec<Seq> = all(&o).await.iter().map(|l| l.seq).collect();
        o.ack(seqs).await.unwrap();
        o.maintain().await.unwrap();
        settle(&o).await;
        let drained = std::fs::metadata(&p).unwrap().len();
        assert!(drained < full / 2, "after drain {drained} vs full {full}");
        o.append(&fill(2)).await.unwrap();
        o.maintain().await.unwrap();
        settle(&o).await;
        let refilled = std::fs::metadata(&p).unwrap().len();
        assert!(
            refilled <= full + full / 10,
            "refill {refilled} vs first fill {full}"
        );
        eprintln!("outbox file: full {full} B, drained {drained} B, refilled {refilled} B");
        o.close().await;
    });
}

/// A tmpfs of `size` mounted for one test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` when not running as root (mounting needs it; CI runs as root).
    fn mount(at: &Path, size: &str) -> Option<Self> {
        let uid = std::process::Command::new("id").arg("-u").output().ok()?;
        if uid.stdout != b"0\n" {
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "running as root but cannot mount a tmpfs at {}",
            at.display()
        );
        Some(Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_appends_like_reject_and_ingest_resumes_when_space_returns() {
    let d = Dir::new();
    let mnt = d.dir.path().join("small-disk");
    let Some(_fs) = Tmpfs::mount(&mnt, "2m") else {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    };
    rt().block_on(async {
        // Another tenant of the disk, deleted later to give space back.
        let ballast = mnt.join("ballast");
        std::fs::write(&ballast, vec![7u8; 768 * 1024]).unwrap();
        let o = Outbox::open(
            &mnt.join("outbox.db"),
            &d.dir.path().join("state.db"),
            config(1 << 30, WhenFull::DropOldest),
            clock(),
        )
        .unwrap();
        let mut stored = Vec::new();
        let mut refused = 0;
        for batch in 0..400i64 {
            let recs: Vec<Record> = (0..50).map(|k| rec("a", batch * 100 + k)).collect();
            match o.append(&recs).await {
                Ok(_) => stored.extend(recs.iter().map(|r| r.ts_ms)),
                Err(AppendError::Full) => {
                    refused += 1;
                    if refused > 3 {
                        break;
                    }
                }
                Err(e) => panic!("disk full must look like a full outbox, got {e}"),
            }
        }
        assert!(refused > 0, "the 2 MiB disk never filled");
        let got: Vec<i64> = all(&o).await.iter().map(|l| l.record.ts_ms).collect();
        assert_eq!(got, stored, "everything acknowledged is intact");
        assert!(o.check().await.unwrap().ok);

        std::fs::remove_file(&ballast).unwrap();
        o.append(&[rec("b", 1)])
            .await
            .expect("ingest resumes once space returns");
        let st = o.stats().await.unwrap();
        assert!(st.dropped["rejected"] >= 50, "{st:?}");
        assert_eq!(st.records as usize, stored.len() + 1);
        o.close().await;
    });
}

#[test]
fn read_stats_reports_uninitialised_and_schema_1_files_without_migrating_them() {
    let d = Dir::new();
    let p = d.dir.path().join("outbox.db");
    Connection::open(&p)
        .unwrap()
        .execute_batch("PRAGMA user_version = 0")
        .unwrap();
    assert_eq!(read_stats(&p).unwrap().records, 0);
    std::fs::remove_file(&p).unwrap();
    {
        let c = Connection::open(&p).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        let body = rec("old", 1).encode().unwrap();
        c.execute(
            "INSERT INTO records (seq, accepted_ms, len, body) VALUES (1, 5, 30, ?1)",
            [body],
        )
        .unwrap();
        for (k, v) in [("records", 1), ("bytes", 30), ("acked", 4)] {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .unwrap();
        }
    }
    let st = read_stats(&p).unwrap();
    assert_eq!((st.records, st.bytes, st.records_acked), (1, 30, 4));
    assert_eq!(st.streams["telemetry"].oldest_accepted_ms, Some(5));
    let v: i64 = Connection::open(&p)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 1, "a read-only command does not migrate");
}

/// A record whose encoded size does not depend on `n` (so the model can
/// predict eviction exactly): the number rides in an f64, ts is constant.
fn fixed(device: &str, n: u32) -> Record {
    Record {
        device: DeviceName::new(device),
        ts_ms: 0,
        ts_trusted: true,
        values: vec![("n".into(), Value::F64(f64::from(n)))],
    }
}

fn fixed_n(r: &Record) -> u32 {
    match r.values[0].1 {
        Value::F64(f) => f as u32,
        _ => u32::MAX,
    }
}

const STREAMS: [(&str, u8); 3] = [("bulk", 1), ("telemetry", 5), ("alarms", 9)];

#[derive(Debug, Clone)]
enum StreamOp {
    /// Append k records of device d to stream s.
    Append {
        s: usize,
        d: u8,
        k: u8,
    },
    /// Lease a batch of stream s and ack the first `ack` of it (the rest is
    /// "nacked": left in place, as when a connection drops).
    LeaseAck {
        s: usize,
        batch: u8,
        ack: u8,
    },
    Reopen,
    PurgeAll,
}

fn stream_op() -> impl Strategy<Value = StreamOp> {
    prop_oneof![
        6 => (0usize..3, 0u8..3, 1u8..6).prop_map(|(s, d, k)| StreamOp::Append { s, d, k }),
        3 => (0usize..3, 1u8..8, 0u8..8).prop_map(|(s, batch, ack)| StreamOp::LeaseAck { s, batch, ack }),
        1 => Just(StreamOp::Reopen),
        1 => Just(StreamOp::PurgeAll),
    ]
}

/// The model's eviction: the appending stream is never over its cap (all caps
/// are the whole outbox here), so only the total matters: evict the oldest of
/// the lowest-priority non-empty stream not above the appender, own stream
/// first on a tie; refuse when only higher priorities remain.
fn model_append(
    model: &mut [VecDeque<(Seq, u8, u32)>; 3],
    s: usize,
    k: usize,
    cap_records: usize,
    dropped: &mut u64,
) -> bool {
    let mut total: usize = model.iter().map(VecDeque::len).sum();
    if k > cap_records {
        return false;
    }
    while total + k > cap_records {
        let victim = (0..3)
            .filter(|&i| !model[i].is_empty() && STREAMS[i].1 <= STREAMS[s].1)
            .min_by_key(|&i| (STREAMS[i].1, usize::from(i != s)));
        let Some(v) = victim else { return false };
        model[v].pop_front();
        *dropped += 1;
        total -= 1;
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// Streams, priority eviction, partial acks (the rest nacked), reopen and
    /// purge against an in-memory model: nothing acknowledged is lost except
    /// by counted eviction or purge, seqs are never reused, each device's
    /// records of a stream stay in order, and the byte bound holds.
    #[test]
    fn outbox_with_streams_matches_its_model(ops in proptest::collection::vec(stream_op(), 1..40)) {
        rt().block_on(async {
            let d = Dir::new();
            let size = fixed("d0", 0).encode().unwrap().len() as u64 + ROW_OVERHEAD;
            let cap_records = 12usize;
            let cfg = OutboxConfig {
                streams: vec![StreamConfig {
                    name: "bulk".into(),
                    priority: 1,
                    max_age: Duration::from_secs(3600),
                    max_bytes: size * cap_records as u64,
                }],
                ..config(size * cap_records as u64, WhenFull::DropOldest)
            };
            let mut o = d.open(cfg.clone());
            let mut model: [VecDeque<(Seq, u8, u32)>; 3] = Default::default();
            let mut seen_seqs = std::collections::BTreeSet::new();
            let mut dropped_full = 0u64;
            let mut n = 0u32;
            for op in ops {
                match op {
                    StreamOp::Append { s, d: dev, k } => {
                        let recs: Vec<Record> = (0..k).map(|_| { n += 1; fixed(&format!("d{dev}"), n) }).collect();
                        let fits = model_append(&mut model, s, recs.len(), cap_records, &mut dropped_full);
                        match o.append_to(STREAMS[s].0, &recs).await {
                            Ok(r) => {
                                assert!(fits, "the model refused what the outbox took");
                                for (i, rc) in recs.iter().enumerate() {
                                    let seq = Seq(r.first.0 + i as u64);
                                    assert!(seen_seqs.insert(seq), "seq {seq} reused");
                                    model[s].push_back((seq, dev, fixed_n(rc)));
                                }
                            }
                            Err(AppendError::Full) => assert!(!fits, "the outbox refused what the model took"),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    StreamOp::LeaseAck { s, batch, ack } => {
                        let leased = o.lease(Some(STREAMS[s].0), Seq(0), usize::from(batch), u64::MAX).await.unwrap();
                        let want: Vec<Seq> = model[s].iter().take(usize::from(batch)).map(|m| m.0).collect();
                        assert_eq!(leased.iter().map(|l| l.seq).collect::<Vec<_>>(), want);
                        let acked: Vec<Seq> = want.iter().take(usize::from(ack)).copied().collect();
                        for _ in 0..acked.len() { model[s].pop_front(); }
                        o.ack(acked).await.unwrap();
                        o.append(&[]).await.unwrap();
                    }
                    StreamOp::Reopen => {
                        o.close().await;
                        o = d.open(cfg.clone());
                    }
                    StreamOp::PurgeAll => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let purged = o.purge(None, Duration::ZERO).await.unwrap();
                        let had: usize = model.iter().map(VecDeque::len).sum();
                        assert_eq!(purged as usize, had);
                        model.iter_mut().for_each(VecDeque::clear);
                    }
                }
                let st = o.stats().await.unwrap();
                for (i, (name, _)) in STREAMS.iter().enumerate() {
                    let got: Vec<(Seq, u32)> = o.lease(Some(name), Seq(0), 1 << 20, u64::MAX).await.unwrap()
                        .iter().map(|l| (l.seq, fixed_n(&l.record))).collect();
                    let want: Vec<(Seq, u32)> = model[i].iter().map(|m| (m.0, m.2)).collect();
                    assert_eq!(got, want, "stream {name}");
                    assert_eq!(st.streams[*name].records, model[i].len() as u64);
                    let devs: std::collections::HashSet<i64> = model[i]
                        .iter()
                        .map(|m| device_key(&DeviceName::new(format!("d{}", m.1))))
                        .collect();
                    assert_eq!(o.devices_in(name).await.unwrap(), devs, "devices of {name}");
                    // Per device, n rises with seq.
                    for dev in 0..3u8 {
                        let ns: Vec<u32> = model[i].iter().filter(|m| m.1 == dev).map(|m| m.2).collect();
                        assert!(ns.windows(2).all(|w| w[0] < w[1]));
                    }
                }
                assert!(st.bytes <= size * cap_records as u64, "bound exceeded: {}", st.bytes);
                assert_eq!(st.dropped["full"], dropped_full);
            }
            o.close().await;
        });
    }
}

/// What a crash leaves on disk: committed frames still in the WAL, never
/// checkpointed. The files are copied while the writer idles (everything it
/// acknowledged is fsynced), so the copy is exactly the on-disk state of a
/// process killed at that moment, and no live connection shares it.
fn crashed_copy(rows: i64) -> Dir {
    let d = Dir::new();
    let o = d.open(config(1 << 30, WhenFull::DropOldest));
    rt().block_on(async {
        let recs: Vec<Record> = (0..rows).map(|n| rec("a", n)).collect();
        o.append(&recs).await.unwrap();
    });
    let copy = Dir::new();
    for f in ["outbox.db", "outbox.db-wal", "state.db", "state.db-wal"] {
        let from = d.dir.path().join(f);
        if from.exists() {
            std::fs::copy(&from, copy.dir.path().join(f)).unwrap();
        }
    }
    rt().block_on(o.close());
    copy
}

#[test]
fn a_torn_wal_or_a_missing_shm_does_not_stop_the_outbox() {
    let d = crashed_copy(2000);
    let wal = d.dir.path().join("outbox.db-wal");
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len > 4096, "the crash left a WAL ({len} B)");
    assert!(
        !d.dir.path().join("outbox.db-shm").exists(),
        "no shared-memory index"
    );
    // Tear the last frame.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    rt().block_on(async {
        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        let st = o.stats().await.unwrap();
        let got = all(&o).await;
        // SQLite replays the whole frames and drops the torn one: the totals
        // written in each commit agree with the rows it kept.
        assert_eq!(st.records, got.len() as u64);
        assert!(o.check().await.unwrap().ok);
        let r = o.append(&[rec("b", 1)]).await.unwrap();
        assert!(got.iter().all(|l| l.seq < r.first));
        o.close().await;
    });
}

#[test]
fn a_large_append_is_stored_whole_and_in_order_across_insert_chunks() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        let n = ROWS_PER_INSERT as i64 * 3 + 7;
        let recs: Vec<Record> = (0..n).map(|i| rec(&format!("d{}", i % 5), i)).collect();
        let r = o.append(&recs).await.unwrap();
        assert_eq!(r.last.0 - r.first.0 + 1, n as u64);
        let got = all(&o).await;
        assert_eq!(
            got.iter().map(|l| l.record.clone()).collect::<Vec<_>>(),
            recs
        );
        assert!(got.windows(2).all(|w| w[1].seq.0 == w[0].seq.0 + 1));
        let st = o.stats().await.unwrap();
        assert_eq!(st.records, n as u64);
        assert_eq!(st.bytes, got.iter().map(|l| l.len).sum::<u64>());
        assert_eq!(o.devices_in("telemetry").await.unwrap().len(), 5);
        o.close().await;
    });
}

#[test]
fn appends_sharing_one_buffer_keep_each_bodys_bytes_size_and_flags() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 30, WhenFull::DropOldest));
        // Bodies of different sizes and trust, in appends submitted back to
        // back (so several share one commit), crossing the INSERT chunks.
        let batch = |b: i64| -> Vec<Record> {
            (0..ROWS_PER_INSERT as i64 + 5)
                .map(|i| Record {
                    device: DeviceName::new(format!("d{}", i % 3)),
                    ts_ms: b * 1000 + i,
                    ts_trusted: i % 4 != 0,
                    values: vec![("pad".into(), Value::Str("x".repeat((i * 7 % 90) as usize)))],
                })
                .collect()
        };
        let batches: Vec<Vec<Record>> = (0..4).map(batch).collect();
        let mut pending = Vec::new();
        for b in &batches {
            pending.push(o.submit(b).await.unwrap());
        }
        for p in pending {
            p.await.unwrap();
        }
        let want: Vec<Record> = batches.concat();
        let got = all(&o).await;
        assert_eq!(
            got.iter().map(|l| l.record.clone()).collect::<Vec<_>>(),
            want
        );
        for (l, r) in got.iter().zip(&want) {
            assert_eq!(l.len, r.encode().unwrap().len() as u64 + ROW_OVERHEAD);
        }
        o.close().await;
        let conn = Connection::open(d.dir.path().join("outbox.db")).unwrap();
        let untrusted: i64 = conn
            .query_row(
                "SELECT count(*) FROM records WHERE untrusted = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            untrusted,
            want.iter().filter(|r| !r.ts_trusted).count() as i64
        );
    });
}

#[test]
fn try_result_is_none_until_the_writer_answers_then_spent() {
    let receipt = AppendReceipt {
        first: Seq(3),
        last: Seq(5),
    };
    let (tx, rx) = oneshot::channel();
    let mut p = PendingAppend::new(rx);
    assert!(p.try_result().is_none());
    tx.send(Ok(receipt)).unwrap();
    assert!(matches!(p.try_result(), Some(Ok(r)) if r == receipt));
    assert!(matches!(p.try_result(), Some(Err(AppendError::Closed))));

    let (tx, rx) = oneshot::channel::<Result<AppendReceipt, AppendError>>();
    let mut p = PendingAppend::new(rx);
    drop(tx);
    assert!(matches!(p.try_result(), Some(Err(AppendError::Closed))));
}

#[test]
fn rule_state_commits_with_accepted_appends_only() {
    let d = Dir::new();
    let path = d.dir.path().join("outbox.db");
    rt().block_on(async {
        let o = d.open(config(8 * 1024, WhenFull::Reject));
        // State with no records at all (a reading folded into a window).
        o.submit_with_state(
            "telemetry",
            &[],
            vec![(b"w1".to_vec(), Some(b"open".to_vec()))],
        )
        .await
        .unwrap()
        .await
        .unwrap();
        o.submit_with_state(
            "telemetry",
            &[rec("d", 1)],
            vec![
                (b"w1".to_vec(), None),
                (b"w2".to_vec(), Some(b"x".to_vec())),
            ],
        )
        .await
        .unwrap()
        .await
        .unwrap();
        // A refused append (over the cap under `reject`) changes no state.
        let big: Vec<Record> = (0..200).map(|i| rec("d", i)).collect();
        let refused = o
            .submit_with_state(
                "telemetry",
                &big,
                vec![(b"w3".to_vec(), Some(b"y".to_vec()))],
            )
            .await
            .unwrap()
            .await;
        assert!(matches!(refused, Err(AppendError::Full)), "{refused:?}");
        o.close().await;
    });
    assert_eq!(
        read_rule_state(&path).unwrap(),
        vec![(b"w2".to_vec(), b"x".to_vec())]
    );
}

#[test]
fn a_joined_append_waits_for_all_and_reports_the_first_failure() {
    rt().block_on(async {
        let (t1, r1) = oneshot::channel();
        let (t2, r2) = oneshot::channel();
        let (t3, r3) = oneshot::channel();
        let mut p =
            PendingAppend::new(r3).after(vec![PendingAppend::new(r1), PendingAppend::new(r2)]);
        let ok = |n| {
            Ok(AppendReceipt {
                first: Seq(n),
                last: Seq(n),
            })
        };
        t3.send(ok(3)).unwrap();
        assert!(p.try_result().is_none(), "earlier appends not answered yet");
        t1.send(ok(1)).unwrap();
        t2.send(Err(AppendError::Full)).unwrap();
        assert!(matches!(p.await, Err(AppendError::Full)));
        let (t4, r4) = oneshot::channel();
        let (t5, r5) = oneshot::channel();
        let p = PendingAppend::new(r5).after(vec![PendingAppend::new(r4)]);
        t4.send(ok(4)).unwrap();
        t5.send(ok(5)).unwrap();
        assert_eq!(p.await.unwrap().last, Seq(5));
    });
}

#[test]
fn ping_is_answered_by_a_live_writer_behind_queued_work_and_fails_after_close() {
    rt().block_on(async {
        let d = Dir::new();
        let o = d.open(config(1 << 20, WhenFull::DropOldest));
        let limit = Duration::from_secs(10);
        tokio::time::timeout(limit, o.ping())
            .await
            .unwrap()
            .unwrap();
        let mut pending = Vec::new();
        for n in 0..50 {
            pending.push(o.submit(&[rec("a", n)]).await.unwrap());
        }
        tokio::time::timeout(limit, o.ping())
            .await
            .unwrap()
            .unwrap();
        for p in pending {
            tokio::time::timeout(limit, p).await.unwrap().unwrap();
        }
        assert_eq!(o.stats().await.unwrap().records, 50, "a ping adds nothing");
        o.close().await;
        assert!(matches!(o.ping().await, Err(OutboxError::Closed)));
    });
}
