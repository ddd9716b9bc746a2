//! The CoAP message layer (RFC 7252 §4) without I/O: deduplication of
//! requests, retransmission of our own confirmable messages, and the
//! bookkeeping that ties ACK/RST to them.
//!
//! Deduplication: a request is remembered by (endpoint, message id) for
//! EXCHANGE_LIFETIME (247 s). A duplicate of one still being processed is
//! ignored (its answer will come); a duplicate of an answered one gets the
//! very same bytes again, never a second record. Entries are compact (the
//! encoded answer, bounded to [`MAX_CACHED_RESPONSE`] bytes — larger answers
//! are remembered as "answered" only, and a duplicate then gets nothing),
//! with a per-endpoint and a global cap: the oldest entry goes first, and an
//! eviction before EXCHANGE_LIFETIME is counted (a duplicate arriving after
//! its entry was evicted would be processed again: the counter says how
//! often that risk was taken).
//!
//! Our confirmable messages (separate responses, Observe notifications) are
//! retransmitted after ACK_TIMEOUT × (1…1.5), doubling, up to
//! MAX_RETRANSMIT times; an ACK or RST ends them, and the caller learns
//! which of its messages was reset or given up on.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 7252 EXCHANGE_LIFETIME.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// RFC 7252 ACK_TIMEOUT.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 MAX_RETRANSMIT.
pub const MAX_RETRANSMIT: u32 = 4;
/// Largest answer kept for duplicates, bytes.
pub const MAX_CACHED_RESPONSE: usize = 1280;

/// A request's identity for deduplication.
pub type ExchangeKey = (SocketAddr, u16);

#[derive(Debug)]
enum Answer {
    /// Being processed.
    Pending,
    /// Processing is slow: an empty ACK went out; the response will be a
    /// separate CON.
    EmptyAcked,
    /// Answered with these bytes (empty = too large to keep).
    Done(Vec<u8>),
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    at: Instant,
    /// Generation, to recognise stale queue slots.
    r#gen: u64,
}

/// What to do with a duplicate request.
#[derive(Debug, PartialEq, Eq)]
pub enum Duplicate {
    /// Not a duplicate: process it.
    New,
    /// Still being processed: send nothing now.
    InProgress,
    /// An empty ACK was sent for it: send another.
    ResendEmptyAck,
    /// Answered: send these bytes again.
    Resend(Vec<u8>),
    /// Answered, but the answer was too large to keep.
    Forgotten,
}

/// Counters of the message layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeStats {
    /// Duplicates answered from the cache or ignored while in progress.
    pub duplicates: u64,
    /// Entries evicted before EXCHANGE_LIFETIME (cap reached).
    pub early_evictions: u64,
    /// Our CON messages retransmitted.
    pub retransmissions: u64,
    /// Our CON messages given up on after MAX_RETRANSMIT.
    pub timeouts: u64,
    /// RSTs received for our CON messages.
    pub resets: u64,
}

/// An outgoing confirmable message awaiting its ACK.
#[derive(Debug)]
struct Outgoing<T> {
    bytes: Vec<u8>,
    attempts: u32,
    timeout: Duration,
    next_at: Instant,
    tag: T,
}

/// How a confirmable message of ours ended without an ACK.
#[derive(Debug, PartialEq, Eq)]
pub enum Unacked<T> {
    /// The peer answered with RST.
    Reset(T),
    /// No ACK after MAX_RETRANSMIT retransmissions.
    TimedOut(T),
}

/// The message layer's state. `T` tags our confirmable messages (the
/// caller's reason for sending them).
#[derive(Debug)]
pub struct MessageLayer<T> {
    entries: HashMap<ExchangeKey, Entry>,
    /// Insertion order (oldest first) with generations; stale slots are
    /// skipped.
    order: VecDeque<(ExchangeKey, u64)>,
    per_endpoint: HashMap<SocketAddr, VecDeque<(u16, u64)>>,
    per_endpoint_cap: usize,
    global_cap: usize,
    next_gen: u64,
    outgoing: HashMap<ExchangeKey, Outgoing<T>>,
    next_mid: u16,
    /// Counters.
    pub stats: ExchangeStats,
}

impl<T> MessageLayer<T> {
    /// A layer remembering at most `per_endpoint` requests per endpoint and
    /// `global` in all; our message ids start at `first_mid` (random, so a
    /// restart does not reuse recent ids).
    pub fn new(per_endpoint: usize, global: usize, first_mid: u16) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            per_endpoint: HashMap::new(),
            per_endpoint_cap: per_endpoint.max(1),
            global_cap: global.max(1),
            next_gen: 0,
            outgoing: HashMap::new(),
            next_mid: first_mid,
            stats: ExchangeStats::default(),
        }
    }

    /// Requests remembered now.
    pub fn remembered(&self) -> usize {
        self.entries.len()
    }

    /// Confirmable messages of ours awaiting an ACK.
    pub fn awaiting_ack(&self) -> usize {
        self.outgoing.len()
    }

    fn remove(&mut self, key: &ExchangeKey, now: Instant, counted: bool) {
        if let Some(e) = self.entries.remove(key) {
            if counted && now.duration_since(e.at) < EXCHANGE_LIFETIME {
                self.stats.early_evictions += 1;
            }
            if let Some(q) = self.per_endpoint.get_mut(&key.0) {
                // Evictions and expiries take the endpoint's oldest entry:
                // O(1) then, not a scan of up to `per_endpoint_cap` slots.
                if q.front() == Some(&(key.1, e.r#gen)) {
                    q.pop_front();
                } else {
                    q.retain(|(mid, g)| !(*mid == key.1 && *g == e.r#gen));
                }
                if q.is_empty() {
                    self.per_endpoint.remove(&key.0);
                }
            }
        }
    }

    /// Drops entries older than EXCHANGE_LIFETIME.
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, g)) = self.order.front() {
            match self.entries.get(&key) {
                Some(e) if e.r#gen == g => {
                    if now.duration_since(e.at) < EXCHANGE_LIFETIME {
                        break;
                    }
                    self.order.pop_front();
                    self.remove(&key, now, false);
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
    }

    /// Looks a request up; a new one is remembered as being processed.
    pub fn check(&mut self, key: ExchangeKey, now: Instant) -> Duplicate {
        self.expire(now);
        if let Some(e) = self.entries.get(&key) {
            self.stats.duplicates += 1;
            return match &e.answer {
                Answer::Pending => Duplicate::InProgress,
                Answer::EmptyAcked => Duplicate::ResendEmptyAck,
                Answer::Done(b) if b.is_empty() => Duplicate::Forgotten,
                Answer::Done(b) => Duplicate::Resend(b.clone()),
            };
        }
        // Make room: the endpoint's oldest first, then the oldest overall.
        if self
            .per_endpoint
            .get(&key.0)
            .is_some_and(|q| q.len() >= self.per_endpoint_cap)
            && let Some((mid, _)) = self
                .per_endpoint
                .get(&key.0)
                .and_then(|q| q.front())
                .copied()
        {
            self.remove(&(key.0, mid), now, true);
        }
        while self.entries.len() >= self.global_cap {
            let Some((old, g)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|e| e.r#gen == g) {
                self.remove(&old, now, true);
            }
        }
        let g = self.next_gen;
        self.next_gen += 1;
        self.entries.insert(
            key,
            Entry {
                answer: Answer::Pending,
                at: now,
                r#gen: g,
            },
        );
        self.order.push_back((key, g));
        // Slots of entries evicted per endpoint stay in `order` until they
        // reach its front; compact when they dominate, so memory stays flat
        // even while one old entry holds the front.
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order
                .retain(|(k, g)| entries.get(k).is_some_and(|e| e.r#gen == *g));
        }
        self.per_endpoint
            .entry(key.0)
            .or_default()
            .push_back((key.1, g));
        Duplicate::New
    }

    /// Records that an empty ACK was sent for `key` (separate response).
    pub fn empty_acked(&mut self, key: ExchangeKey) {
        if let Some(e) = self.entries.get_mut(&key)
            && matches!(e.answer, Answer::Pending)
        {
            e.answer = Answer::EmptyAcked;
        }
    }

    /// Records the answer to `key` (sent piggybacked or as NON).
    pub fn answered(&mut self, key: ExchangeKey, bytes: &[u8]) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.answer = Answer::Done(if bytes.len() <= MAX_CACHED_RESPONSE {
                bytes.to_vec()
            } else {
                Vec::new()
            });
        }
    }

    /// Forgets `key` (its processing failed before any answer: a
    /// retransmission may try again).
    pub fn forget(&mut self, key: ExchangeKey, now: Instant) {
        self.remove(&key, now, false);
    }

    /// A fresh message id for a message of ours.
    pub fn next_message_id(&mut self) -> u16 {
        let m = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        m
    }

    /// Starts tracking our confirmable message `mid` to `peer` (its bytes
    /// already sent once); `jitter` in 0..=1 picks the first timeout in
    /// ACK_TIMEOUT × [1, 1.5].
    pub fn sent_confirmable(
        &mut self,
        peer: SocketAddr,
        mid: u16,
        bytes: Vec<u8>,
        tag: T,
        now: Instant,
        jitter: f64,
    ) {
        let timeout = ACK_TIMEOUT.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0);
        self.outgoing.insert(
            (peer, mid),
            Outgoing {
                bytes,
                attempts: 0,
                timeout,
                next_at: now + timeout,
                tag,
            },
        );
    }

    /// An ACK from `peer` for `mid`: returns the tag of our message it
    /// acknowledges, if any.
    pub fn acked(&mut self, peer: SocketAddr, mid: u16) -> Option<T> {
        self.outgoing.remove(&(peer, mid)).map(|o| o.tag)
    }

    /// An RST from `peer` for `mid`.
    pub fn reset(&mut self, peer: SocketAddr, mid: u16) -> Option<Unacked<T>> {
        let o = self.outgoing.remove(&(peer, mid))?;
        self.stats.resets += 1;
        Some(Unacked::Reset(o.tag))
    }

    /// Due retransmissions (peer, bytes) and the messages given up on.
    #[allow(clippy::type_complexity)]
    pub fn tick(&mut self, now: Instant) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<Unacked<T>>) {
        self.expire(now);
        let due: Vec<ExchangeKey> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.next_at <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut resend = Vec::new();
        let mut gone = Vec::new();
        for key in due {
            let Some(o) = self.outgoing.get_mut(&key) else {
                continue;
            };
            if o.attempts >= MAX_RETRANSMIT {
                if let Some(o) = self.outgoing.remove(&key) {
                    self.stats.timeouts += 1;
                    gone.push(Unacked::TimedOut(o.tag));
                }
                continue;
            }
            o.attempts += 1;
            o.timeout *= 2;
            o.next_at = now + o.timeout;
            self.stats.retransmissions += 1;
            resend.push((key.0, o.bytes.clone()));
        }
        (resend, gone)
    }

    /// When the next retransmission is due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.outgoing.values().map(|o| o.next_at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    #[test]
    fn duplicates_get_the_same_answer_and_in_progress_ones_nothing() {
        let mut l: MessageLayer<()> = MessageLayer::new(8, 100, 0);
        let t = Instant::now();
        let k = (peer(1), 7);
        assert_eq!(l.check(k, t), Duplicate::New);
        assert_eq!(l.check(k, t), Duplicate::InProgress);
        l.answered(k, b"ack-bytes");
        assert_eq!(l.check(k, t), Duplicate::Resend(b"ack-bytes".to_vec()));
        assert_eq!(
            l.check((peer(2), 7), t),
            Duplicate::New,
            "message ids are per endpoint"
        );
        assert_eq!(l.stats.duplicates, 2);
        // After EXCHANGE_LIFETIME the id may be reused.
        assert_eq!(l.check(k, t + EXCHANGE_LIFETIME), Duplicate::New);
        assert_eq!(l.stats.early_evictions, 0);
    }

    #[test]
    fn empty_acks_are_repeated_and_large_answers_forgotten() {
        let mut l: MessageLayer<()> = MessageLayer::new(8, 100, 0);
        let t = Instant::now();
        let k = (peer(1), 1);
        l.check(k, t);
        l.empty_acked(k);
        assert_eq!(l.check(k, t), Duplicate::ResendEmptyAck);
        l.answered(k, &vec![0; MAX_CACHED_RESPONSE + 1]);
        assert_eq!(l.check(k, t), Duplicate::Forgotten);
        let k2 = (peer(1), 2);
        l.check(k2, t);
        l.forget(k2, t);
        assert_eq!(
            l.check(k2, t),
            Duplicate::New,
            "a failed one may be retried"
        );
    }

    #[test]
    fn caps_evict_the_oldest_and_count_it() {
        let mut l: MessageLayer<()> = MessageLayer::new(3, 5, 0);
        let t = Instant::now();
        for mid in 0..4 {
            l.check((peer(1), mid), t);
        }
        assert_eq!(l.remembered(), 3, "per-endpoint cap");
        assert_eq!(l.check((peer(1), 0), t), Duplicate::New, "oldest went");
        for p in 2..6 {
            l.check((peer(p), 0), t);
        }
        assert_eq!(l.remembered(), 5, "global cap");
        assert!(l.stats.early_evictions >= 3);
        // Memory stays flat under a flood of distinct requests.
        for mid in 0..10_000u16 {
            l.check((peer(9), mid), t);
        }
        assert!(l.remembered() <= 5);
        assert!(l.order.len() <= 2 * 5 + 1024, "stale slots are compacted");
        // Even while one old entry of another endpoint holds the front.
        let mut l: MessageLayer<()> = MessageLayer::new(2, 100, 0);
        l.check((peer(1), 0), t);
        for mid in 0..50_000u16 {
            l.check((peer(2), mid), t);
        }
        assert!(l.order.len() <= 2 * 3 + 1024 + 1);
    }

    #[test]
    fn confirmables_are_retransmitted_then_given_up_and_acks_end_them() {
        let mut l: MessageLayer<&str> = MessageLayer::new(8, 100, 65535);
        let t = Instant::now();
        let m1 = l.next_message_id();
        let m2 = l.next_message_id();
        assert_eq!((m1, m2), (65535, 0), "ids wrap");
        l.sent_confirmable(peer(1), m1, b"n1".to_vec(), "notify", t, 0.0);
        l.sent_confirmable(peer(1), m2, b"n2".to_vec(), "separate", t, 1.0);
        assert_eq!(l.next_deadline(), Some(t + ACK_TIMEOUT));
        let (resend, gone) = l.tick(t + ACK_TIMEOUT);
        assert_eq!(resend, vec![(peer(1), b"n1".to_vec())]);
        assert!(gone.is_empty());
        assert_eq!(l.acked(peer(1), m2), Some("separate"));
        assert_eq!(l.acked(peer(1), m2), None);
        // 2 + 4 + 8 + 16 s of retransmissions, then the end.
        let mut at = t + ACK_TIMEOUT;
        let mut sent = 1;
        loop {
            at += Duration::from_secs(40);
            let (r, g) = l.tick(at);
            sent += r.len();
            if !g.is_empty() {
                assert_eq!(g, vec![Unacked::TimedOut("notify")]);
                break;
            }
        }
        assert_eq!(sent, MAX_RETRANSMIT as usize);
        assert_eq!(l.stats.timeouts, 1);
        let m3 = l.next_message_id();
        l.sent_confirmable(peer(2), m3, b"n3".to_vec(), "notify", t, 0.5);
        assert_eq!(l.reset(peer(2), m3), Some(Unacked::Reset("notify")));
        assert_eq!(l.awaiting_ack(), 0);
    }
}
