use super::*;
use crate::record::{DeviceName, Value};
use proptest::prelude::*;
use std::collections::VecDeque;

fn config(max_bytes: u64, when_full: WhenFull) -> OutboxConfig {
    OutboxConfig {
        max_bytes,
        max_age: Duration::from_secs(3600),
        when_full,
        durability: Durability::Process,
    }
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
        Outbox::open(
            &self.dir.path().join("outbox.db"),
            &self.dir.path().join("state.db"),
            cfg,
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
        o.expire().await.unwrap();
        o.append(&[rec("a", 2)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(o.purge(Duration::ZERO).await.unwrap(), 1);
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
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, OutboxError::NewerSchema { found: 9, .. }),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_an_error_not_a_panic() {
    let d = Dir::new();
    let p = d.dir.path().join("outbox.db");
    std::fs::write(&p, vec![0x5a; 8192]).unwrap();
    assert!(
        Outbox::open(
            &p,
            &d.dir.path().join("state.db"),
            config(1, WhenFull::Reject)
        )
        .is_err()
    );
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
