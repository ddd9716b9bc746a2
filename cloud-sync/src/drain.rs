//! Which stream the uplink sends from next, and how fast: an I/O-free
//! scheduler.
//!
//! Streams share the uplink by weighted round robin over batches, weight =
//! priority + 1: a stream of priority 9 gets ten batches for every one of a
//! priority-0 stream while both have data, and every non-empty stream gets at
//! least its share — none starves. A part found empty is skipped until new
//! records are committed. `cloud.max_bytes_per_sec` caps the payload rate
//! with a token bucket (burst: one second's worth).
//!
//! Within a stream, [`DrainMode::Fifo`] sends everything oldest first.
//! [`DrainMode::LiveFirst`] splits the stream's devices when the connection
//! comes up: devices with records waiting then (the *backlog*) and the others
//! (*live*). Live devices' new records go at once; backlog devices' records,
//! oldest first, get `backfill_share` of the stream's turns (all of them when
//! nothing live is waiting). Each device's records are sent by one part only,
//! in seq order, so one device's records of one stream keep their order in
//! both modes.

use crate::outbox::DeviceFilter;
use crate::record::Seq;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a stream is drained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DrainMode {
    /// Oldest first.
    Fifo,
    /// Caught-up devices first; the backlog gets this share of turns (0–1).
    LiveFirst {
        /// Share of a stream's turns that goes to its backlog while live
        /// records wait.
        backfill_share: f64,
    },
}

/// Which part of a stream a pick is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Fifo mode: the whole stream.
    All,
    /// Live first: devices that were caught up.
    Live,
    /// Live first: devices with a backlog.
    Backlog,
}

/// One scheduling decision: lease from `stream` after `after` with `filter`.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The stream.
    pub stream: String,
    /// The part of it.
    pub part: Part,
    /// Lease after this seq.
    pub after: Seq,
    /// The devices this part takes.
    pub filter: DeviceFilter,
}

#[derive(Debug, Clone, Default)]
struct Cursor {
    at: Seq,
    /// Skipped while the highest committed seq is at most this.
    idle_until: Option<Seq>,
}

impl Cursor {
    fn ready(&self, committed: Seq) -> bool {
        self.at < committed && self.idle_until.is_none_or(|s| committed > s)
    }
}

#[derive(Debug, Clone)]
struct Lane {
    name: String,
    /// Fifo: the whole stream; live first: the live part.
    main: Cursor,
    /// Live first, once the backlog devices are known.
    backlog: Option<(Arc<HashSet<i64>>, Cursor)>,
    turns: u64,
}

/// The drain schedule of one connection.
#[derive(Debug, Clone)]
pub struct DrainSchedule {
    mode: DrainMode,
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
    /// start, with an optional byte-rate cap. In live-first mode, call
    /// [`DrainSchedule::set_backlog`] for each stream before draining it.
    pub fn new(
        streams: &[(String, u8)],
        mode: DrainMode,
        max_bytes_per_sec: Option<u64>,
        now: Instant,
    ) -> Self {
        let lanes: Vec<Lane> = streams
            .iter()
            .map(|(name, _)| Lane {
                name: name.clone(),
                main: Cursor::default(),
                backlog: None,
                turns: 0,
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
            mode,
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

    /// Live first: the devices of `stream` that had records waiting when the
    /// connection came up, with `boundary` the highest seq committed then.
    /// The live part starts after `boundary` (the others' records are all
    /// newer); an empty set means the whole stream is live.
    pub fn set_backlog(&mut self, stream: &str, devices: HashSet<i64>, boundary: Seq) {
        if let Some(l) = self.lanes.iter_mut().find(|l| l.name == stream) {
            if devices.is_empty() {
                l.backlog = None;
            } else {
                l.backlog = Some((Arc::new(devices), Cursor::default()));
                l.main.at = l.main.at.max(boundary);
            }
        }
    }

    /// The next lease to make, or `None` when every part is drained up to
    /// `committed`.
    pub fn next(&mut self, committed: Seq) -> Option<Pick> {
        let backfill_every = match self.mode {
            DrainMode::Fifo => 0,
            DrainMode::LiveFirst { backfill_share } if backfill_share >= 1.0 => 1,
            DrainMode::LiveFirst { backfill_share } if backfill_share > 0.0 => {
                (1.0 / backfill_share).round().max(1.0) as u64
            }
            DrainMode::LiveFirst { .. } => u64::MAX,
        };
        for _ in 0..self.cycle.len() {
            let i = self.cycle[self.pos % self.cycle.len()];
            self.pos = (self.pos + 1) % self.cycle.len();
            let lane = &mut self.lanes[i];
            let main_ready = lane.main.ready(committed);
            let pick_backlog = match &lane.backlog {
                Some((_, c)) if c.ready(committed) => {
                    lane.turns += 1;
                    !main_ready || lane.turns.is_multiple_of(backfill_every)
                }
                _ => false,
            };
            if pick_backlog && let Some((devs, c)) = &lane.backlog {
                return Some(Pick {
                    stream: lane.name.clone(),
                    part: Part::Backlog,
                    after: c.at,
                    filter: DeviceFilter::Only(devs.clone()),
                });
            }
            if main_ready {
                let (part, filter) = match (&self.mode, &lane.backlog) {
                    (DrainMode::Fifo, _) => (Part::All, DeviceFilter::All),
                    (_, Some((devs, _))) => (Part::Live, DeviceFilter::Except(devs.clone())),
                    (_, None) => (Part::Live, DeviceFilter::All),
                };
                return Some(Pick {
                    stream: lane.name.clone(),
                    part,
                    after: lane.main.at,
                    filter,
                });
            }
        }
        None
    }

    fn cursor(&mut self, stream: &str, part: Part) -> Option<&mut Cursor> {
        let lane = self.lanes.iter_mut().find(|l| l.name == stream)?;
        match part {
            Part::Backlog => lane.backlog.as_mut().map(|(_, c)| c),
            Part::All | Part::Live => Some(&mut lane.main),
        }
    }

    /// Records that a lease of `pick`'s part examined rows up to `scanned_to`
    /// (sent, or passed over by its filter).
    pub fn advanced(&mut self, stream: &str, part: Part, scanned_to: Seq) {
        if let Some(c) = self.cursor(stream, part) {
            c.at = c.at.max(scanned_to);
            c.idle_until = None;
        }
    }

    /// Records that the part had nothing after its cursor at `committed`.
    pub fn exhausted(&mut self, stream: &str, part: Part, committed: Seq) {
        if let Some(c) = self.cursor(stream, part) {
            c.idle_until = Some(committed);
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

    fn fifo(streams: &[(String, u8)]) -> DrainSchedule {
        DrainSchedule::new(streams, DrainMode::Fifo, None, Instant::now())
    }

    #[test]
    fn busy_streams_share_by_weight_and_none_starves() {
        let mut d = fifo(&streams());
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..170 {
            let p = d.next(Seq(1_000_000)).unwrap();
            *counts.entry(p.stream).or_insert(0) += 1;
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
        let mut d = fifo(&streams());
        d.exhausted("alarms", Part::All, Seq(10));
        d.exhausted("bulk", Part::All, Seq(10));
        for _ in 0..5 {
            assert_eq!(d.next(Seq(10)).unwrap().stream, "telemetry");
        }
        d.exhausted("telemetry", Part::All, Seq(10));
        assert!(d.next(Seq(10)).is_none());
        assert!(d.next(Seq(11)).is_some(), "a new commit wakes them");
    }

    #[test]
    fn cursors_advance_per_stream() {
        let mut d = fifo(&[("t".into(), 0)]);
        assert_eq!(d.next(Seq(5)).unwrap().after, Seq(0));
        d.advanced("t", Part::All, Seq(5));
        assert!(d.next(Seq(5)).is_none());
        assert_eq!(d.next(Seq(6)).unwrap().after, Seq(5));
    }

    #[test]
    fn live_first_serves_caught_up_devices_and_backfills_at_its_share() {
        let mut d = DrainSchedule::new(
            &[("t".into(), 0)],
            DrainMode::LiveFirst {
                backfill_share: 0.25,
            },
            None,
            Instant::now(),
        );
        d.set_backlog("t", HashSet::from([7]), Seq(50));
        assert_eq!(
            d.next(Seq(100)).unwrap().after,
            Seq(50),
            "live starts after the boundary"
        );
        let mut parts = Vec::new();
        for _ in 0..7 {
            let p = d.next(Seq(100)).unwrap();
            match (&p.part, &p.filter) {
                (Part::Live, DeviceFilter::Except(s)) | (Part::Backlog, DeviceFilter::Only(s)) => {
                    assert!(s.contains(&7));
                }
                other => panic!("unexpected {other:?}"),
            }
            parts.push(p.part);
        }
        assert_eq!(parts.iter().filter(|p| **p == Part::Backlog).count(), 2);
        // Nothing live waiting: the backlog gets every turn.
        d.exhausted("t", Part::Live, Seq(100));
        for _ in 0..4 {
            assert_eq!(d.next(Seq(100)).unwrap().part, Part::Backlog);
        }
        // Backlog done too: nothing to do until a commit.
        d.exhausted("t", Part::Backlog, Seq(100));
        assert!(d.next(Seq(100)).is_none());
    }

    #[test]
    fn live_first_without_a_backlog_is_all_live() {
        let mut d = DrainSchedule::new(
            &[("t".into(), 0)],
            DrainMode::LiveFirst {
                backfill_share: 0.5,
            },
            None,
            Instant::now(),
        );
        d.set_backlog("t", HashSet::new(), Seq(2));
        let p = d.next(Seq(3)).unwrap();
        assert_eq!(p.part, Part::Live);
        assert!(matches!(p.filter, DeviceFilter::All));
    }

    #[test]
    fn the_byte_rate_is_capped() {
        let t0 = Instant::now();
        let mut d = DrainSchedule::new(&streams(), DrainMode::Fifo, Some(1000), t0);
        assert!(d.spend(600, t0).is_ok());
        let wait = d.spend(600, t0).unwrap_err();
        assert_eq!(wait - t0, Duration::from_millis(200));
        assert!(d.spend(600, t0 + Duration::from_millis(200)).is_ok());
        // Oversized payloads pass once the bucket is full.
        assert!(d.spend(5000, t0 + Duration::from_secs(5)).is_ok());
    }
}
