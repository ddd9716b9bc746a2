//! Which stream the uplink sends from next, and how fast: an I/O-free
//! scheduler.
//!
//! Each stream drains in seq order from its own cursor (so one device's
//! records of one stream leave in order). Streams share the uplink by weighted
//! round robin over batches, weight = priority + 1: a stream of priority 9
//! gets ten batches for every one of a priority-0 stream while both have data,
//! and every non-empty stream gets at least its share — none starves. A
//! stream found empty is skipped until new records are committed.
//! `cloud.max_bytes_per_sec` caps the payload rate with a token bucket
//! (burst: one second's worth).

use crate::record::Seq;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Lane {
    name: String,
    cursor: Seq,
    /// Skipped while the highest committed seq is at most this.
    idle_until: Option<Seq>,
}

/// The drain schedule.
#[derive(Debug, Clone)]
pub struct DrainSchedule {
    lanes: Vec<Lane>,
    /// Lane indexes, each repeated by its weight, interleaved.
    cycle: Vec<usize>,
    pos: usize,
    bucket: Option<Bucket>,
}

#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl DrainSchedule {
    /// A schedule over `streams` (name, priority 0–9), all cursors at the
    /// start, with an optional byte-rate cap.
    pub fn new(streams: &[(String, u8)], max_bytes_per_sec: Option<u64>, now: Instant) -> Self {
        let lanes: Vec<Lane> = streams
            .iter()
            .map(|(name, _)| Lane {
                name: name.clone(),
                cursor: Seq(0),
                idle_until: None,
            })
            .collect();
        // Interleave: round r takes every lane whose weight exceeds r.
        let weights: Vec<usize> = streams.iter().map(|(_, p)| usize::from(*p) + 1).collect();
        let max_w = weights.iter().copied().max().unwrap_or(1);
        let mut cycle = Vec::new();
        for round in 0..max_w {
            for (i, w) in weights.iter().enumerate() {
                if *w > round {
                    cycle.push(i);
                }
            }
        }
        Self {
            lanes,
            cycle,
            pos: 0,
            bucket: max_bytes_per_sec.map(|r| Bucket {
                rate: r as f64,
                tokens: r as f64,
                at: now,
            }),
        }
    }

    /// The next stream to lease from and its cursor, or `None` when every
    /// stream is drained up to `committed`.
    pub fn next(&mut self, committed: Seq) -> Option<(String, Seq)> {
        for _ in 0..self.cycle.len() {
            let i = self.cycle[self.pos % self.cycle.len()];
            self.pos = (self.pos + 1) % self.cycle.len();
            let lane = &self.lanes[i];
            let idle = lane.idle_until.is_some_and(|s| committed <= s) || lane.cursor >= committed;
            if !idle {
                return Some((lane.name.clone(), lane.cursor));
            }
        }
        None
    }

    /// Records that `stream` was sent up to `last`.
    pub fn advanced(&mut self, stream: &str, last: Seq) {
        if let Some(l) = self.lanes.iter_mut().find(|l| l.name == stream) {
            l.cursor = l.cursor.max(last);
            l.idle_until = None;
        }
    }

    /// Records that `stream` had nothing after its cursor at `committed`.
    pub fn exhausted(&mut self, stream: &str, committed: Seq) {
        if let Some(l) = self.lanes.iter_mut().find(|l| l.name == stream) {
            l.idle_until = Some(committed);
        }
    }

    /// Takes `bytes` from the rate budget, or says when enough will be there.
    /// A payload larger than one second's budget is let through once the
    /// bucket is full, so it cannot wedge the drain.
    pub fn spend(&mut self, bytes: usize, now: Instant) -> Result<(), Instant> {
        let Some(b) = &mut self.bucket else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.rate).min(b.rate);
        b.at = now;
        let need = (bytes as f64).min(b.rate);
        if b.tokens >= need {
            b.tokens -= bytes as f64;
            Ok(())
        } else {
            let wait = (need - b.tokens) / b.rate;
            Err(now + Duration::from_secs_f64(wait))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Vec<(String, u8)> {
        vec![
            ("alarms".into(), 9),
            ("telemetry".into(), 5),
            ("bulk".into(), 0),
        ]
    }

    #[test]
    fn busy_streams_share_by_weight_and_none_starves() {
        let mut d = DrainSchedule::new(&streams(), None, Instant::now());
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..170 {
            let (name, _) = d.next(Seq(1_000_000)).unwrap();
            *counts.entry(name).or_insert(0) += 1;
        }
        assert_eq!(counts["alarms"], 100);
        assert_eq!(counts["telemetry"], 60);
        assert_eq!(
            counts["bulk"], 10,
            "the lowest priority still gets its share"
        );
    }

    #[test]
    fn an_exhausted_stream_is_skipped_until_new_records_commit() {
        let mut d = DrainSchedule::new(&streams(), None, Instant::now());
        d.exhausted("alarms", Seq(10));
        d.exhausted("bulk", Seq(10));
        for _ in 0..5 {
            assert_eq!(d.next(Seq(10)).unwrap().0, "telemetry");
        }
        d.exhausted("telemetry", Seq(10));
        assert_eq!(d.next(Seq(10)), None);
        assert!(d.next(Seq(11)).is_some(), "a new commit wakes them");
    }

    #[test]
    fn cursors_advance_per_stream() {
        let mut d = DrainSchedule::new(&[("t".into(), 0)], None, Instant::now());
        assert_eq!(d.next(Seq(5)), Some(("t".into(), Seq(0))));
        d.advanced("t", Seq(5));
        assert_eq!(d.next(Seq(5)), None);
        assert_eq!(d.next(Seq(6)), Some(("t".into(), Seq(5))));
    }

    #[test]
    fn the_byte_rate_is_capped() {
        let t0 = Instant::now();
        let mut d = DrainSchedule::new(&streams(), Some(1000), t0);
        assert!(d.spend(600, t0).is_ok());
        let wait = d.spend(600, t0).unwrap_err();
        assert_eq!(wait - t0, Duration::from_millis(200));
        assert!(d.spend(600, t0 + Duration::from_millis(200)).is_ok());
        // Oversized payloads pass once the bucket is full.
        assert!(d.spend(5000, t0 + Duration::from_secs(5)).is_ok());
    }
}
