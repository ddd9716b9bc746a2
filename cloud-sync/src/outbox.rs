//! The store-and-forward outbox: `state_dir/outbox.db`.
//!
//! # Design
//!
//! **Schema** (PRAGMA user_version = 3, `auto_vacuum = INCREMENTAL` from creation):
//! - `records(seq INTEGER PRIMARY KEY, stream, accepted_ms, life_ms, boot, mono_ms,
//!   untrusted, len, body, dev)`: one row per record; `dev` is the device's
//!   key ([`device_key`]). `body` is [`Record::encode`] (a
//!   version byte + postcard). `len` is the accounted size (body +
//!   [`ROW_OVERHEAD`]). `accepted_ms` is the wall clock at acceptance (shown to
//!   operators only); `life_ms` is the gateway's *lifetime monotonic clock* at
//!   acceptance (running time summed over boots, never jumps), which age limits
//!   use, so no clock jump ever deletes a record. `boot`/`mono_ms` place the
//!   acceptance on this boot's monotonic timeline, and `untrusted = 1` marks a
//!   record whose `ts` was stamped by an untrusted wall clock: those are
//!   re-stamped when the clock becomes trusted (same boot only), and sent
//!   flagged otherwise, never held back.
//!   Indexes: `(stream, seq)` for per-stream eviction, expiry and leasing; a
//!   partial index on `boot` over untrusted rows.
//! - `streams(id, name, priority, records, bytes, dropped_*)`: per-stream running
//!   totals and drop counters; `stream_devices(stream, dev, records)`: how many
//!   records each device has waiting per stream (the live-first drain asks which
//!   devices have a backlog); `meta(key, value)`: acked count and the lifetime
//!   clock. All are updated in the same transaction as the rows they describe
//!   (per-device counts summed over the transaction, one upsert per device), so
//!   start-up reads totals instead of scanning the table.
//! - `rule_state(key BLOB PRIMARY KEY, value BLOB)` (schema 3): opaque state
//!   of the telemetry rules (open aggregation windows, deadband/throttle
//!   memory), written in the same transaction as the append whose readings
//!   changed it ([`Outbox::submit_with_state`]), so a reading acknowledged to
//!   a device has its contribution on disk even when it produced no record.
//! - Schema 1 (the walking skeleton's) is migrated forward in one transaction
//!   (columns added with constant defaults: no table rewrite); its rows land in
//!   the `telemetry` stream.
//!
//! **Streams and priority.** Every record belongs to a stream (`telemetry` by
//! default; `attributes`, `alarms` and any `[[outbox.streams]]`), each with a
//! priority 0–9, a `max_age` and a byte cap. Within a stream records leave in
//! seq order, so one device's records of one stream stay in order.
//!
//! **Ordering.** `seq` is assigned by the single writer in commit order, so a
//! reader (WAL snapshot) always sees a gap-free committed prefix of new seqs:
//! leasing "everything after seq N" never skips a record that commits later.
//!
//! **Seq never repeats.** The writer reserves seqs in blocks of [`SEQ_BLOCK`] by
//! raising the high-water mark in `state.db` (fsynced) *before* committing any
//! record that uses them; at open the next seq is the larger of that mark and
//! `max(seq) + 1`, so a deleted, replaced, set-aside or restored outbox never
//! reuses one.
//!
//! **Durability.** WAL journal; `outbox.durability = "power"` → `synchronous = FULL`
//! (a commit survives power loss), `"process"` → `NORMAL` (survives a crash of
//! sluice, may lose the last commits on power loss). One writer thread owns the
//! write connection; it takes every pending command (appends, acks, expiry) into
//! one transaction (group commit) and answers each append only after that
//! commit returned. Deletes go through the same writer: a second writing
//! connection starves under `synchronous = FULL`. A ping ([`Outbox::ping`],
//! the systemd watchdog's liveness probe) is answered as the writer takes
//! it, with no transaction: a writer stuck in a commit answers none.
//!
//! **Eviction.** An append to stream S that does not fit — S over its own cap,
//! or the outbox over `max_bytes` — under `drop_oldest` deletes the oldest
//! records of S (own cap), then of the lowest-priority non-empty stream whose
//! priority is not above S's (total), oldest first, counted as `full`; if only
//! higher-priority records remain, the append is refused. Under `reject` it is
//! refused (counted as `rejected`; the device is told to retry). Expiry deletes
//! records older than their stream's `max_age` on the lifetime clock (`expired`);
//! `purge` deletes on request (`purged`). A row that cannot be decoded is dropped
//! when leased (`corrupt`). Disk full (`SQLITE_FULL`) is handled like `reject`:
//! the transaction rolls back, acks and expiry in it are retried without the
//! appends, and ingest resumes when space returns.
//!
//! **Corruption.** A file that is not a database or reports `SQLITE_CORRUPT` /
//! `SQLITE_NOTADB` at open or in operation is moved aside to
//! `outbox.db.corrupt-<unix ms>` (with its `-wal`/`-shm`), logged at error and
//! counted, and sluice continues with a fresh outbox; records in the moved file
//! are counted as dropped `corrupt`. A missing or torn `-wal`/`-shm` is SQLite's
//! own recovery. `PRAGMA quick_check` runs only on request ([`Outbox::check`]).
//!
//! **Space and the WAL.** `wal_autocheckpoint` (1000 pages) plus a periodic
//! `TRUNCATE` checkpoint ([`Outbox::maintain`]) bound the WAL; the reader never
//! holds a read transaction across a batch. Freed pages are reused by new rows
//! and returned to the file system by `incremental_vacuum` during maintenance
//! when more than [`VACUUM_FREE_PAGES`] are free.
//!
//! **What a crash can lose.** Nothing that was acknowledged to a device. An ack
//! from the cloud that was not yet committed is lost, so that record is sent
//! again with the same seq: upstream is at-least-once, deduplicable by
//! `(gateway, epoch, seq)`.
//!
//! **Start-up cost.** Opening reads `streams`, `meta`, `max(seq)` and the oldest
//! row: a few b-tree lookups whatever the backlog; nothing scans the table.

use crate::clock::Clock;
use crate::histogram::{self, Histogram};
use crate::record::{Record, Seq};
use crate::statedb;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// The schema version this binary writes.
pub const OUTBOX_SCHEMA_VERSION: i64 = 3;

/// A change to the rules' persisted state: key, and the new value (`None`
/// deletes the key).
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);

/// A stored entry of the rules' state: key and value.
pub type StoredState = (Vec<u8>, Vec<u8>);
/// Bytes accounted per row on top of its body (key, columns, b-tree cell).
pub const ROW_OVERHEAD: u64 = 40;
/// Seqs reserved per fsync of the high-water mark.
pub const SEQ_BLOCK: u64 = 100_000;
/// Free pages above which maintenance returns space to the file system.
pub const VACUUM_FREE_PAGES: i64 = 1024;
/// The stream records go to unless told otherwise.
pub const DEFAULT_STREAM: &str = "telemetry";
/// Most commands taken into one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 4096;
/// Most rows one expiry pass deletes in one transaction.
const MAX_EXPIRED_PER_COMMIT: usize = 10_000;
/// Capacity of the command channel to the writer.
const COMMAND_CHANNEL: usize = 1024;
/// Most bytes an append reserves up front for its bodies (from the first
/// body's size); more grow as needed.
const BODIES_RESERVE_MAX: usize = 1 << 20;

/// What to do with an append that does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest (lowest-priority first) records until it fits.
    DropOldest,
    /// Refuse the append; the device is told to retry later.
    Reject,
}

/// How far a commit must reach before an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash of sluice (SQLite `synchronous = NORMAL`).
    Process,
    /// Survives power loss (SQLite `synchronous = FULL`).
    Power,
}

/// One stream's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Name (`telemetry`, `attributes`, `alarms`, or configured).
    pub name: String,
    /// 0 (lowest) to 9 (highest): evicted last, drained with more weight.
    pub priority: u8,
    /// Records older than this (lifetime clock since acceptance) expire.
    pub max_age: Duration,
    /// This stream's byte cap (its share of `max_bytes`).
    pub max_bytes: u64,
}

/// The outbox's bounds and policy.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Upper bound on the sum of accounted record sizes.
    pub max_bytes: u64,
    /// Default age limit of streams that set none.
    pub max_age: Duration,
    /// Policy when an append does not fit.
    pub when_full: WhenFull,
    /// Commit durability.
    pub durability: Durability,
    /// Streams beyond (or overriding) the built-in `telemetry` (priority 5),
    /// `attributes` (7) and `alarms` (9).
    pub streams: Vec<StreamConfig>,
}

impl Default for OutboxConfig {
    /// The documented defaults: 256 MiB, 7 days, `drop_oldest`, `power`,
    /// the built-in streams.
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 86_400),
            when_full: WhenFull::DropOldest,
            durability: Durability::Power,
            streams: Vec::new(),
        }
    }
}

impl OutboxConfig {
    /// The built-in streams with the configured ones laid over them.
    pub fn effective_streams(&self) -> Vec<StreamConfig> {
        let mut out: Vec<StreamConfig> = [("telemetry", 5), ("attributes", 7), ("alarms", 9)]
            .into_iter()
            .map(|(name, priority)| StreamConfig {
                name: name.into(),
                priority,
                max_age: self.max_age,
                max_bytes: self.max_bytes,
            })
            .collect();
        for s in &self.streams {
            match out.iter_mut().find(|o| o.name == s.name) {
                Some(o) => *o = s.clone(),
                None => out.push(s.clone()),
            }
        }
        out
    }
}

/// Why the outbox could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite failed on the outbox file.
    #[error("outbox {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// Moving a corrupt file aside failed.
    #[error("cannot move the corrupt outbox {path} aside: {source}")]
    SetAside {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file was written by a newer sluice.
    #[error(
        "outbox {path} has schema version {found}, newer than this binary's {known}; \
         refusing to start (run the newer sluice)"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its user_version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// state.db (the seq high-water mark) failed.
    #[error(transparent)]
    State(#[from] statedb::StateDbError),
    /// The writer thread could not be started.
    #[error("cannot start the outbox writer thread: {0}")]
    Thread(std::io::Error),
    /// No such stream.
    #[error("unknown outbox stream {0:?}")]
    UnknownStream(String),
    /// The outbox has shut down.
    #[error("the outbox is closed")]
    Closed,
}

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// `when_full = "reject"` and the records do not fit, they are larger than
    /// their stream's cap, only higher-priority records are left to evict, or
    /// the disk is full.
    #[error("outbox full")]
    Full,
    /// The commit failed; nothing of this append is stored.
    #[error("outbox commit failed: {0}")]
    Storage(String),
    /// A record could not be encoded.
    #[error("record cannot be encoded: {0}")]
    Encode(postcard::Error),
    /// No such stream.
    #[error("unknown outbox stream {0:?}")]
    UnknownStream(String),
    /// The outbox has shut down.
    #[error("the outbox is closed")]
    Closed,
}

/// An append handed to the writer: resolves with its receipt once the
/// commit is durable (cancel-safe: poll it by `&mut`).
#[derive(Debug)]
pub struct PendingAppend {
    rx: oneshot::Receiver<Result<AppendReceipt, AppendError>>,
    /// Appends submitted before this one that it stands for too
    /// ([`PendingAppend::after`]); their answers, once in.
    earlier: Vec<Earlier>,
}

type AppendResult = Result<AppendReceipt, AppendError>;

#[derive(Debug)]
enum Earlier {
    Waiting(oneshot::Receiver<AppendResult>),
    Done(AppendResult),
}

impl std::future::Future for PendingAppend {
    type Output = AppendResult;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        let mut waiting = false;
        for e in &mut this.earlier {
            if let Earlier::Waiting(rx) = e {
                match std::pin::Pin::new(rx).poll(cx) {
                    Poll::Ready(r) => *e = Earlier::Done(r.unwrap_or(Err(AppendError::Closed))),
                    Poll::Pending => waiting = true,
                }
            }
        }
        let last = match std::pin::Pin::new(&mut this.rx).poll(cx) {
            Poll::Ready(r) => r.unwrap_or(Err(AppendError::Closed)),
            Poll::Pending => return Poll::Pending,
        };
        if waiting {
            return Poll::Pending;
        }
        Poll::Ready(this.settle(last))
    }
}

impl PendingAppend {
    fn new(rx: oneshot::Receiver<AppendResult>) -> Self {
        Self {
            rx,
            earlier: Vec::new(),
        }
    }

    /// One pending append standing for `earlier` ones (submitted before it)
    /// as well: it resolves once all are answered, with the first failure
    /// among them, else this one's receipt.
    #[must_use]
    pub fn after(mut self, earlier: Vec<PendingAppend>) -> Self {
        for e in earlier {
            self.earlier.extend(e.earlier);
            self.earlier.push(Earlier::Waiting(e.rx));
        }
        self
    }

    fn settle(&mut self, last: AppendResult) -> AppendResult {
        for e in &mut self.earlier {
            if matches!(e, Earlier::Done(Err(_)))
                && let Earlier::Done(Err(err)) =
                    std::mem::replace(e, Earlier::Done(Err(AppendError::Closed)))
            {
                return Err(err);
            }
        }
        last
    }

    /// The append's result if the writer has already answered, without
    /// waiting: lets a caller settle every commit that is done before it
    /// writes its acknowledgements. After `Some`, the append is spent
    /// (polling it again yields [`AppendError::Closed`]).
    pub fn try_result(&mut self) -> Option<AppendResult> {
        for e in &mut self.earlier {
            if let Earlier::Waiting(rx) = e {
                match rx.try_recv() {
                    Ok(r) => *e = Earlier::Done(r),
                    Err(oneshot::error::TryRecvError::Empty) => return None,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        *e = Earlier::Done(Err(AppendError::Closed));
                    }
                }
            }
        }
        let last = match self.rx.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => Err(AppendError::Closed),
        };
        Some(self.settle(last))
    }
}

/// The seqs given to an append's records (contiguous, in the order given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    /// The first record's seq.
    pub first: Seq,
    /// The last record's seq.
    pub last: Seq,
}

/// A stored record handed to the uplink.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    /// Its seq.
    pub seq: Seq,
    /// Its stream.
    pub stream: String,
    /// When the outbox accepted it (wall clock, unix ms).
    pub accepted_ms: i64,
    /// Its accounted size.
    pub len: u64,
    /// The record.
    pub record: Record,
}

/// A device's key in the outbox: a 63-bit FNV-1a hash of its name (two
/// devices sharing one only makes the drain keep their records in one order).
pub fn device_key(device: &crate::record::DeviceName) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::try_from(h >> 1).unwrap_or(0)
}

/// Which devices' records a lease takes.
#[derive(Debug, Clone, Default)]
pub enum DeviceFilter {
    /// Everyone's.
    #[default]
    All,
    /// Only these devices' (keys from [`device_key`]).
    Only(Arc<HashSet<i64>>),
    /// Everyone's but these devices'.
    Except(Arc<HashSet<i64>>),
}

impl DeviceFilter {
    fn takes(&self, dev: i64) -> bool {
        match self {
            DeviceFilter::All => true,
            DeviceFilter::Only(s) => s.contains(&dev),
            DeviceFilter::Except(s) => !s.contains(&dev),
        }
    }
}

/// What a filtered lease found.
#[derive(Debug, Clone, Default)]
pub struct LeaseBatch {
    /// The records taken, in seq order.
    pub records: Vec<Leased>,
    /// The last seq examined (taken or passed over by the filter); the next
    /// lease of the same part starts after it.
    pub scanned_to: Option<Seq>,
}

/// Drop reasons, as counted and reported.
pub const DROP_REASONS: [&str; 5] = ["full", "expired", "purged", "rejected", "corrupt"];
const FULL: usize = 0;
const EXPIRED: usize = 1;
const PURGED: usize = 2;
const REJECTED: usize = 3;
const CORRUPT: usize = 4;

/// One stream's figures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// Priority 0–9.
    pub priority: u8,
    /// Records stored.
    pub records: u64,
    /// Accounted bytes stored.
    pub bytes: u64,
    /// Records dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Acceptance time (wall, unix ms) of its oldest record, if any.
    pub oldest_accepted_ms: Option<i64>,
}

/// A snapshot of the outbox's figures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Records stored.
    pub records: u64,
    /// Accounted bytes stored.
    pub bytes: u64,
    /// Records dropped, by reason (every reason present, 0 when none).
    pub dropped: BTreeMap<String, u64>,
    /// Records deleted after the cloud acknowledged them.
    pub records_acked: u64,
    /// Acceptance time (wall, unix ms) of the oldest stored record, if any.
    pub oldest_accepted_ms: Option<i64>,
    /// Corrupt outbox files moved aside since start.
    pub corrupt_set_aside: u64,
    /// Per stream.
    pub streams: BTreeMap<String, StreamStats>,
}

/// Result of `PRAGMA quick_check`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// True when SQLite answered `ok`.
    pub ok: bool,
    /// SQLite's messages (at most 100).
    pub messages: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct StreamState {
    id: i64,
    name: String,
    priority: u8,
    max_age_ms: i64,
    max_bytes: u64,
    records: u64,
    bytes: u64,
    dropped: [u64; 5],
    /// Device key → change of its record count in the open transaction.
    dev_delta: std::collections::HashMap<i64, i64>,
}

impl StreamState {
    fn removed(&mut self, len: i64, dev: i64) {
        self.records = self.records.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(to_u64(len));
        *self.dev_delta.entry(dev).or_default() -= 1;
    }
}

#[derive(Debug, Clone, Default)]
struct Totals {
    streams: Vec<StreamState>,
    acked: u64,
    life_ms: i64,
}

impl Totals {
    fn bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }
    fn index(&self, id: i64) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }
}

struct Shared {
    totals: Mutex<Totals>,
    corrupt_set_aside: AtomicU64,
    commit_seconds: Histogram,
    batch_records: Histogram,
}

/// Handle to the outbox; cheap to clone. All writes go to one writer thread.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cmd_tx: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
    committed_rx: watch::Receiver<Seq>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
}

enum Command {
    Append {
        stream: String,
        bodies: Bodies,
        state: Vec<StateChange>,
        reply: oneshot::Sender<Result<AppendReceipt, AppendError>>,
    },
    Ack(Vec<Seq>),
    DropCorrupt(Vec<Seq>),
    Maintain,
    Restamp,
    Purge {
        stream: Option<String>,
        older_than: Duration,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    SetAside(String),
    /// Answered as soon as the writer takes it (a liveness probe).
    Ping(oneshot::Sender<()>),
    Shutdown,
}

/// The encoded records of one append: their bodies back to back in one
/// buffer (one allocation per append, not one per record, on either side of
/// the channel) and, per record, where its body ends, whether its `ts` is
/// untrusted, and its device key.
struct Bodies {
    bytes: Vec<u8>,
    rows: Vec<(usize, bool, i64)>,
}

impl Bodies {
    fn encode(records: &[Record]) -> Result<Self, postcard::Error> {
        let mut bytes = Vec::new();
        let mut rows = Vec::with_capacity(records.len());
        for r in records {
            r.encode_into(&mut bytes)?;
            if rows.is_empty() {
                // Records of one append are mostly alike in size; a large
                // first one must not reserve many times its size, though.
                let rest = bytes.len().saturating_mul(records.len().saturating_sub(1));
                bytes.reserve(rest.min(BODIES_RESERVE_MAX));
            }
            rows.push((bytes.len(), !r.ts_trusted, device_key(&r.device)));
        }
        Ok(Self { bytes, rows })
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Per record: its body's range in `bytes`, untrusted flag, device key.
    fn ranges(&self) -> impl Iterator<Item = (std::ops::Range<usize>, bool, i64)> + '_ {
        let starts = std::iter::once(0).chain(self.rows.iter().map(|r| r.0));
        starts
            .zip(&self.rows)
            .map(|(start, &(end, untrusted, dev))| (start..end, untrusted, dev))
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether SQLite says the file is damaged or not a database.
fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DiskFull))
}

/// Moves `path` and its `-wal`/`-shm` to `path.corrupt-<ms>`; returns the new name.
fn set_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    let stamp = unix_ms();
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt-{stamp}"));
    let target = PathBuf::from(target);
    std::fs::rename(path, &target).map_err(|source| OutboxError::SetAside {
        path: path.to_owned(),
        source,
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = target.as_os_str().to_owned();
        to.push(suffix);
        let _ = std::fs::rename(PathBuf::from(from), PathBuf::from(to));
    }
    Ok(target)
}

struct Opened {
    conn: Connection,
    totals: Totals,
    max_seq: Option<u64>,
    life_at_open: i64,
}

/// Opens, migrates and reads the totals of the outbox file.
fn open_db(
    path: &Path,
    config: &OutboxConfig,
    clock: &Clock,
) -> Result<Opened, (OutboxError, bool)> {
    let sql = |source: rusqlite::Error| {
        let corrupt = is_corruption(&source);
        (
            OutboxError::Sqlite {
                path: path.to_owned(),
                source,
            },
            corrupt,
        )
    };
    let mut conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    // auto_vacuum only takes effect before the first table is created.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql)?;
    let sync = match config.durability {
        Durability::Power => "FULL",
        Durability::Process => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync).map_err(sql)?;
    migrate(&mut conn, path).map_err(|e| match e {
        OutboxError::Sqlite { source, .. } => sql(source),
        other => (other, false),
    })?;
    let mut totals = read_totals(&conn).map_err(sql)?;
    // Streams named in the config but not yet in the file get a row now, so
    // their ids are stable.
    for sc in config.effective_streams() {
        let id = match totals.streams.iter().find(|s| s.name == sc.name) {
            Some(s) => s.id,
            None => {
                conn.execute("INSERT INTO streams (name) VALUES (?1)", [&sc.name])
                    .map_err(sql)?;
                let id = conn.last_insert_rowid();
                totals.streams.push(StreamState {
                    id,
                    name: sc.name.clone(),
                    ..StreamState::default()
                });
                id
            }
        };
        if let Some(i) = totals.index(id) {
            let s = &mut totals.streams[i];
            s.priority = sc.priority.min(9);
            s.max_age_ms = dur_ms(sc.max_age);
            s.max_bytes = sc.max_bytes;
        }
    }
    // Streams that are in the file but no longer configured keep draining
    // at the lowest priority under the default bounds.
    for s in &mut totals.streams {
        if s.max_bytes == 0 {
            s.priority = 0;
            s.max_age_ms = dur_ms(config.max_age);
            s.max_bytes = config.max_bytes;
        }
    }
    let max_seq: Option<i64> = conn
        .query_row("SELECT max(seq) FROM records", [], |r| r.get(0))
        .map_err(sql)?;
    let (life_boot, life_mono): (Option<i64>, Option<i64>) = (
        read_meta_value(&conn, "life_boot").map_err(sql)?,
        read_meta_value(&conn, "life_mono").map_err(sql)?,
    );
    let now_mono = clock.mono_ms();
    // Same boot: the process restarted, the monotonic clock kept running.
    let life_at_open = totals.life_ms
        + match (life_boot, life_mono) {
            (Some(b), Some(m)) if b == clock.boot() && now_mono >= m => now_mono - m,
            _ => 0,
        };
    Ok(Opened {
        conn,
        totals,
        max_seq: max_seq.map(to_u64),
        life_at_open,
    })
}

impl Outbox {
    /// Opens `outbox.db` at `path` (creating it), seeds the seq counter from
    /// the high-water mark in `state_db`, and starts the writer thread. A
    /// corrupt file, or one that is not a database, is moved aside and a fresh
    /// outbox is used.
    ///
    /// Fails when `state.db` cannot be used, when the outbox cannot be created,
    /// or when it carries a newer schema than this binary knows.
    pub fn open(
        path: &Path,
        state_db: &Path,
        config: OutboxConfig,
        clock: Arc<Clock>,
    ) -> Result<Self, OutboxError> {
        let shared = Arc::new(Shared {
            totals: Mutex::new(Totals::default()),
            corrupt_set_aside: AtomicU64::new(0),
            commit_seconds: Histogram::new(histogram::SECONDS),
            batch_records: Histogram::new(histogram::COUNTS),
        });
        let opened = match open_db(path, &config, &clock) {
            Ok(o) => o,
            Err((e, true)) => {
                let moved = set_aside(path)?;
                tracing::error!(error = %e, moved_to = %moved.display(),
                    "the outbox is corrupt: moved it aside and starting a fresh one");
                shared.corrupt_set_aside.fetch_add(1, Ordering::Relaxed);
                open_db(path, &config, &clock).map_err(|(e, _)| e)?
            }
            Err((e, false)) => return Err(e),
        };

        let state = statedb::open(state_db)?;
        let mark = statedb::seq_mark(&state).map_err(|source| {
            OutboxError::State(statedb::StateDbError::Sqlite {
                path: state_db.to_owned(),
                source,
            })
        })?;
        let next_seq = mark.max(opened.max_seq.map_or(1, |m| m + 1)).max(1);

        let sql = |source| OutboxError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let reader = Arc::new(Mutex::new(open_reader(path).map_err(sql)?));
        if let Ok(mut t) = shared.totals.lock() {
            *t = opened.totals.clone();
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL);
        let (committed_tx, committed_rx) = watch::channel(Seq(next_seq.saturating_sub(1)));
        let writer = Writer {
            path: path.to_owned(),
            conn: opened.conn,
            reader: reader.clone(),
            state,
            config,
            clock: clock.clone(),
            next_seq,
            reserved_end: next_seq,
            totals: opened.totals,
            life_at_open: opened.life_at_open,
            mono_at_open: clock.mono_ms(),
            shared: shared.clone(),
            committed_tx,
            #[cfg(debug_assertions)]
            freeze_at: freeze_hook(),
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(cmd_rx))
            .map_err(OutboxError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                cmd_tx,
                reader,
                shared,
                committed_rx,
                writer: Mutex::new(Some(handle)),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Stores `records` durably in the `telemetry` stream; returns once they
    /// are committed. See [`Outbox::append_to`].
    ///
    /// Fails as [`Outbox::append_to`] does.
    pub async fn append(&self, records: &[Record]) -> Result<AppendReceipt, AppendError> {
        self.append_to(DEFAULT_STREAM, records).await
    }

    /// Stores `records` durably in `stream`; returns once they are committed.
    ///
    /// Fails with [`AppendError::Full`] when they do not fit under the policy
    /// (or the disk is full), [`AppendError::UnknownStream`] for a stream that
    /// is not configured, [`AppendError::Storage`] when the commit failed
    /// (nothing is stored), and [`AppendError::Closed`] after shutdown.
    pub async fn append_to(
        &self,
        stream: &str,
        records: &[Record],
    ) -> Result<AppendReceipt, AppendError> {
        self.submit_to(stream, records).await?.await
    }

    /// Hands `records` to the writer for the `telemetry` stream and returns
    /// once they are queued (this is where a busy writer pushes back); the
    /// returned [`PendingAppend`] resolves when they are committed. Appends
    /// submitted one after another from one task are committed, and get
    /// their seqs, in submission order, so a caller may keep several in
    /// flight and still acknowledge in order.
    ///
    /// Fails as [`Outbox::append_to`] does (the commit's own failures come
    /// from the [`PendingAppend`]).
    pub async fn submit(&self, records: &[Record]) -> Result<PendingAppend, AppendError> {
        self.submit_to(DEFAULT_STREAM, records).await
    }

    /// [`Outbox::submit`] to `stream`.
    ///
    /// Fails as [`Outbox::append_to`] does.
    pub async fn submit_to(
        &self,
        stream: &str,
        records: &[Record],
    ) -> Result<PendingAppend, AppendError> {
        self.submit_with_state(stream, records, Vec::new()).await
    }

    /// [`Outbox::submit_to`] that also writes `state` changes to the
    /// `rule_state` table in the same transaction — only if the records are
    /// accepted (a refused append changes no state). `records` may be empty.
    ///
    /// Fails as [`Outbox::append_to`] does.
    pub async fn submit_with_state(
        &self,
        stream: &str,
        records: &[Record],
        state: Vec<StateChange>,
    ) -> Result<PendingAppend, AppendError> {
        if self.inner.stream_id(stream).is_none() {
            return Err(AppendError::UnknownStream(stream.to_owned()));
        }
        let bodies = Bodies::encode(records).map_err(AppendError::Encode)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Append {
                stream: stream.to_owned(),
                bodies,
                state,
                reply,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(PendingAppend::new(rx))
    }

    /// Deletes records the cloud acknowledged. Seqs no longer stored are ignored.
    ///
    /// Fails only after shutdown.
    pub async fn ack(&self, seqs: Vec<Seq>) -> Result<(), OutboxError> {
        self.send(Command::Ack(seqs)).await
    }

    /// Periodic upkeep: expires records past their stream's `max_age`
    /// (counted as `expired`), checkpoints the WAL with `TRUNCATE`, and returns
    /// free pages to the file system.
    ///
    /// Fails only after shutdown.
    pub async fn maintain(&self) -> Result<(), OutboxError> {
        self.send(Command::Maintain).await
    }

    /// Re-stamps queued records whose `ts` came from an untrusted clock in
    /// this boot, now that the clock is trusted.
    ///
    /// Fails only after shutdown.
    pub async fn restamp(&self) -> Result<(), OutboxError> {
        self.send(Command::Restamp).await
    }

    /// Returns once the writer thread has taken every command queued
    /// before this one: it is making progress, not stuck in a commit (the
    /// systemd watchdog's liveness probe). Costs one channel round trip,
    /// no transaction.
    ///
    /// Fails only after shutdown.
    pub async fn ping(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping(reply)).await?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    async fn send(&self, cmd: Command) -> Result<(), OutboxError> {
        self.inner
            .cmd_tx
            .send(cmd)
            .await
            .map_err(|_| OutboxError::Closed)
    }

    /// Deletes records (of `stream`, or of all streams) accepted more than
    /// `older_than` ago on the lifetime clock (counted as `purged`); returns
    /// how many.
    ///
    /// Fails for an unknown stream, when the commit fails, or after shutdown.
    pub async fn purge(
        &self,
        stream: Option<&str>,
        older_than: Duration,
    ) -> Result<u64, AppendError> {
        if let Some(s) = stream
            && self.inner.stream_id(s).is_none()
        {
            return Err(AppendError::UnknownStream(s.to_owned()));
        }
        let stream = stream.map(str::to_owned);
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Purge {
                stream,
                older_than,
                reply,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// The configured streams by name with their priority, highest first.
    pub fn streams(&self) -> Vec<(String, u8)> {
        let mut v: Vec<(String, u8)> = self
            .inner
            .shared
            .totals
            .lock()
            .map(|t| {
                t.streams
                    .iter()
                    .map(|s| (s.name.clone(), s.priority))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Reads up to `max_records` stored records with seq greater than `after`
    /// — of `stream`, or of all streams — in seq order, stopping before
    /// `max_bytes` would be exceeded (at least one record is returned when any
    /// exists). Rows that cannot be decoded are dropped (counted as `corrupt`)
    /// and skipped.
    ///
    /// Fails for an unknown stream, when SQLite fails, or after shutdown.
    pub async fn lease(
        &self,
        stream: Option<&str>,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Leased>, OutboxError> {
        Ok(self
            .lease_where(stream, after, max_records, max_bytes, DeviceFilter::All)
            .await?
            .records)
    }

    /// [`Outbox::lease`] taking only the records `filter` admits; rows passed
    /// over still advance [`LeaseBatch::scanned_to`]. One call examines a
    /// bounded number of rows.
    ///
    /// Fails as [`Outbox::lease`] does.
    pub async fn lease_where(
        &self,
        stream: Option<&str>,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
        filter: DeviceFilter,
    ) -> Result<LeaseBatch, OutboxError> {
        let stream = match stream {
            None => None,
            Some(s) => Some(
                self.inner
                    .stream_id(s)
                    .ok_or_else(|| OutboxError::UnknownStream(s.to_owned()))?,
            ),
        };
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            inner.read_after(stream, after, max_records, max_bytes, &filter)
        })
        .await
        .map_err(|_| OutboxError::Closed)?;
        let (batch, corrupt) = match result {
            Ok(v) => v,
            Err(OutboxError::Sqlite { path, source }) if is_corruption(&source) => {
                let _ = self.send(Command::SetAside(source.to_string())).await;
                return Err(OutboxError::Sqlite { path, source });
            }
            Err(e) => return Err(e),
        };
        if !corrupt.is_empty() {
            tracing::error!(count = corrupt.len(), first = %corrupt[0], "dropping undecodable outbox rows");
            self.send(Command::DropCorrupt(corrupt)).await?;
        }
        Ok(batch)
    }

    /// The keys of the devices that have records in `stream` (from the
    /// per-device counts kept with the rows, not a scan of the records).
    ///
    /// Fails for an unknown stream, when SQLite fails, or after shutdown.
    pub async fn devices_in(&self, stream: &str) -> Result<HashSet<i64>, OutboxError> {
        let id = self
            .inner
            .stream_id(stream)
            .ok_or_else(|| OutboxError::UnknownStream(stream.to_owned()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let sql = |source| OutboxError::Sqlite {
                path: inner.path.clone(),
                source,
            };
            let conn = inner.reader.lock().map_err(|_| OutboxError::Closed)?;
            let mut stmt = conn
                .prepare_cached("SELECT dev FROM stream_devices WHERE stream = ?1 AND records > 0")
                .map_err(sql)?;
            let devs = stmt
                .query_map([id], |r| r.get::<_, i64>(0))
                .map_err(sql)?
                .collect::<Result<HashSet<i64>, _>>()
                .map_err(sql)?;
            Ok(devs)
        })
        .await
        .map_err(|_| OutboxError::Closed)?
    }

    /// [`Outbox::lease`] over all streams.
    ///
    /// Fails as [`Outbox::lease`] does.
    pub async fn lease_after(
        &self,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Leased>, OutboxError> {
        self.lease(None, after, max_records, max_bytes).await
    }

    /// A receiver of the highest committed seq: changes whenever new records
    /// are committed.
    pub fn committed(&self) -> watch::Receiver<Seq> {
        self.inner.committed_rx.clone()
    }

    /// The current figures.
    ///
    /// Fails when SQLite cannot read the oldest rows.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let totals = inner
                .shared
                .totals
                .lock()
                .map_err(|_| OutboxError::Closed)?
                .clone();
            let conn = inner.reader.lock().map_err(|_| OutboxError::Closed)?;
            let mut stats = stats_of(&conn, &totals).map_err(|source| OutboxError::Sqlite {
                path: inner.path.clone(),
                source,
            })?;
            stats.corrupt_set_aside = inner.shared.corrupt_set_aside.load(Ordering::Relaxed);
            Ok(stats)
        })
        .await
        .map_err(|_| OutboxError::Closed)?
    }

    /// Appends the writer's histograms in Prometheus text format:
    /// `sluice_outbox_commit_seconds` (one group commit, begin to durable) and
    /// `sluice_outbox_commit_batch_records` (records appended per commit).
    pub fn render_histograms(&self, out: &mut String) {
        out.push_str("# HELP sluice_outbox_commit_seconds Duration of one group commit of the outbox writer.\n# TYPE sluice_outbox_commit_seconds histogram\n");
        self.inner
            .shared
            .commit_seconds
            .render(out, "sluice_outbox_commit_seconds", "");
        out.push_str("# HELP sluice_outbox_commit_batch_records Records appended per group commit.\n# TYPE sluice_outbox_commit_batch_records histogram\n");
        self.inner
            .shared
            .batch_records
            .render(out, "sluice_outbox_commit_batch_records", "");
    }

    /// Runs `PRAGMA quick_check` on the read connection (a full scan: only on
    /// request).
    ///
    /// Fails when SQLite cannot run the check.
    pub async fn check(&self) -> Result<CheckReport, OutboxError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().map_err(|_| OutboxError::Closed)?;
            quick_check(&conn).map_err(|source| OutboxError::Sqlite {
                path: inner.path.clone(),
                source,
            })
        })
        .await
        .map_err(|_| OutboxError::Closed)?
    }

    /// Commits what is pending and stops the writer thread. Later calls on any
    /// clone fail with `Closed`.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.inner.cmd_tx.send(Command::Shutdown).await;
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let reader = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    reader.busy_timeout(Duration::from_secs(5))?;
    Ok(reader)
}

fn quick_check(conn: &Connection) -> rusqlite::Result<CheckReport> {
    let mut stmt = conn.prepare("PRAGMA quick_check(100)")?;
    let messages: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    Ok(CheckReport {
        ok: messages.len() == 1 && messages[0] == "ok",
        messages,
    })
}

impl Inner {
    fn stream_id(&self, name: &str) -> Option<i64> {
        let t = self.shared.totals.lock().ok()?;
        t.streams.iter().find(|s| s.name == name).map(|s| s.id)
    }

    fn read_after(
        &self,
        stream: Option<i64>,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
        filter: &DeviceFilter,
    ) -> Result<(LeaseBatch, Vec<Seq>), OutboxError> {
        let sql = |source| OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let names: BTreeMap<i64, String> = self
            .shared
            .totals
            .lock()
            .map_err(|_| OutboxError::Closed)?
            .streams
            .iter()
            .map(|s| (s.id, s.name.clone()))
            .collect();
        let conn = self.reader.lock().map_err(|_| OutboxError::Closed)?;
        // A filtered lease may pass over rows; bound the rows one call examines.
        let scan = match filter {
            DeviceFilter::All => max_records,
            _ => max_records.saturating_mul(8).max(1024),
        };
        let limit = i64::try_from(scan).unwrap_or(i64::MAX);
        let mut stmt = match stream {
            Some(_) => conn.prepare_cached(
                "SELECT seq, stream, accepted_ms, len, body, dev FROM records
                 WHERE stream = ?3 AND seq > ?1 ORDER BY seq LIMIT ?2",
            ),
            None => conn.prepare_cached(
                "SELECT seq, stream, accepted_ms, len, body, dev FROM records
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            ),
        }
        .map_err(sql)?;
        let mut rows = match stream {
            Some(id) => stmt.query(params![to_i64(after.0), limit, id]),
            None => stmt.query(params![to_i64(after.0), limit]),
        }
        .map_err(sql)?;
        let mut leased = Vec::new();
        let mut corrupt = Vec::new();
        let mut bytes = 0u64;
        let mut scanned_to = None;
        while let Some(row) = rows.next().map_err(sql)? {
            let seq = Seq(to_u64(row.get(0).map_err(sql)?));
            let stream_id: i64 = row.get(1).map_err(sql)?;
            let accepted_ms: i64 = row.get(2).map_err(sql)?;
            let len = to_u64(row.get(3).map_err(sql)?);
            let dev: i64 = row.get(5).map_err(sql)?;
            if !filter.takes(dev) {
                scanned_to = Some(seq);
                continue;
            }
            if leased.len() >= max_records || (!leased.is_empty() && bytes + len > max_bytes) {
                break;
            }
            scanned_to = Some(seq);
            let body = row.get_ref(4).map_err(sql)?;
            match body.as_blob().ok().map(Record::decode) {
                Some(Ok(record)) => {
                    bytes += len;
                    leased.push(Leased {
                        seq,
                        stream: names
                            .get(&stream_id)
                            .cloned()
                            .unwrap_or_else(|| DEFAULT_STREAM.to_owned()),
                        accepted_ms,
                        len,
                        record,
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(%seq, error = %e, "undecodable outbox row");
                    corrupt.push(seq);
                }
                None => corrupt.push(seq),
            }
        }
        Ok((
            LeaseBatch {
                records: leased,
                scanned_to,
            },
            corrupt,
        ))
    }
}

const SCHEMA_V1: &str = "CREATE TABLE records (
         seq INTEGER PRIMARY KEY,
         accepted_ms INTEGER NOT NULL,
         len INTEGER NOT NULL,
         body BLOB NOT NULL
     );
     CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;";

const MIGRATE_V1_TO_V2: &str = "ALTER TABLE records ADD COLUMN stream INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE records ADD COLUMN life_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE records ADD COLUMN boot INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE records ADD COLUMN mono_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE records ADD COLUMN untrusted INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE records ADD COLUMN dev INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX records_stream_seq ON records (stream, seq);
     CREATE TABLE stream_devices (
         stream INTEGER NOT NULL,
         dev INTEGER NOT NULL,
         records INTEGER NOT NULL,
         PRIMARY KEY (stream, dev)
     ) WITHOUT ROWID;
     INSERT INTO stream_devices (stream, dev, records)
         SELECT 1, 0, value FROM meta WHERE key = 'records' AND value > 0;
     CREATE INDEX records_untrusted ON records (boot) WHERE untrusted = 1;
     CREATE TABLE streams (
         id INTEGER PRIMARY KEY,
         name TEXT NOT NULL UNIQUE,
         priority INTEGER NOT NULL DEFAULT 0,
         records INTEGER NOT NULL DEFAULT 0,
         bytes INTEGER NOT NULL DEFAULT 0,
         dropped_full INTEGER NOT NULL DEFAULT 0,
         dropped_expired INTEGER NOT NULL DEFAULT 0,
         dropped_purged INTEGER NOT NULL DEFAULT 0,
         dropped_rejected INTEGER NOT NULL DEFAULT 0,
         dropped_corrupt INTEGER NOT NULL DEFAULT 0
     );
     INSERT INTO streams (id, name, records, bytes, dropped_full, dropped_expired,
                          dropped_purged, dropped_rejected, dropped_corrupt)
         SELECT 1, 'telemetry',
             coalesce((SELECT value FROM meta WHERE key = 'records'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'bytes'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'dropped_full'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'dropped_expired'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'dropped_purged'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'dropped_rejected'), 0),
             coalesce((SELECT value FROM meta WHERE key = 'dropped_corrupt'), 0);
     DELETE FROM meta WHERE key <> 'acked';";

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OutboxError> {
    let sql = |source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found > OUTBOX_SCHEMA_VERSION {
        return Err(OutboxError::NewerSchema {
            path: path.to_owned(),
            found,
            known: OUTBOX_SCHEMA_VERSION,
        });
    }
    if found < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(sql)?;
    }
    if found < 2 {
        tx.execute_batch(MIGRATE_V1_TO_V2).map_err(sql)?;
        if found == 1 {
            tracing::info!(path = %path.display(), "outbox migrated from schema 1 to 2");
        }
    }
    if found < 3 {
        tx.execute_batch(
            "CREATE TABLE rule_state (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", OUTBOX_SCHEMA_VERSION)
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

fn read_meta_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn read_totals(conn: &Connection) -> rusqlite::Result<Totals> {
    let mut stmt = conn.prepare(
        "SELECT id, name, records, bytes, dropped_full, dropped_expired, dropped_purged,
                dropped_rejected, dropped_corrupt, priority FROM streams ORDER BY id",
    )?;
    let streams = stmt
        .query_map([], |r| {
            Ok(StreamState {
                id: r.get(0)?,
                name: r.get(1)?,
                records: to_u64(r.get(2)?),
                bytes: to_u64(r.get(3)?),
                dropped: [
                    to_u64(r.get(4)?),
                    to_u64(r.get(5)?),
                    to_u64(r.get(6)?),
                    to_u64(r.get(7)?),
                    to_u64(r.get(8)?),
                ],
                priority: u8::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
                ..StreamState::default()
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Totals {
        streams,
        acked: to_u64(read_meta_value(conn, "acked")?.unwrap_or(0)),
        life_ms: read_meta_value(conn, "life_ms")?.unwrap_or(0),
    })
}

fn dropped_map(d: &[u64; 5]) -> BTreeMap<String, u64> {
    DROP_REASONS
        .iter()
        .zip(d)
        .map(|(r, n)| ((*r).to_owned(), *n))
        .collect()
}

fn stats_of(conn: &Connection, totals: &Totals) -> rusqlite::Result<OutboxStats> {
    let mut streams = BTreeMap::new();
    let mut dropped = [0u64; 5];
    let mut oldest: Option<i64> = None;
    for s in &totals.streams {
        let o: Option<i64> = if s.records > 0 {
            conn.prepare_cached(
                "SELECT accepted_ms FROM records WHERE stream = ?1 ORDER BY seq LIMIT 1",
            )?
            .query_row([s.id], |r| r.get(0))
            .optional()?
        } else {
            None
        };
        oldest = match (oldest, o) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (d, v) in dropped.iter_mut().zip(s.dropped) {
            *d += v;
        }
        streams.insert(
            s.name.clone(),
            StreamStats {
                priority: s.priority,
                records: s.records,
                bytes: s.bytes,
                dropped: dropped_map(&s.dropped),
                oldest_accepted_ms: o,
            },
        );
    }
    Ok(OutboxStats {
        records: totals.streams.iter().map(|s| s.records).sum(),
        bytes: totals.bytes(),
        dropped: dropped_map(&dropped),
        records_acked: totals.acked,
        oldest_accepted_ms: oldest,
        corrupt_set_aside: 0,
        streams,
    })
}

/// Reads the figures of an outbox file without starting a writer (for the CLI,
/// with or without a running daemon).
///
/// Fails when the file does not exist, is not a database, or is newer than
/// this binary.
pub fn read_stats(path: &Path) -> Result<OutboxStats, OutboxError> {
    let conn = open_read_only_checked(path)?;
    let sql = |source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found == 0 {
        // Created but never initialised (e.g. killed during its first start).
        return stats_of(&conn, &Totals::default()).map_err(sql);
    }
    if found == 1 {
        // Not migrated yet (a read-only command must not migrate): schema 1's
        // totals, all in the telemetry stream.
        return stats_v1(&conn).map_err(sql);
    }
    let totals = read_totals(&conn).map_err(sql)?;
    stats_of(&conn, &totals).map_err(sql)
}

fn stats_v1(conn: &Connection) -> rusqlite::Result<OutboxStats> {
    let v = |k: &str| read_meta_value(conn, k).map(|v| to_u64(v.unwrap_or(0)));
    let mut dropped = [0u64; 5];
    for (d, k) in dropped.iter_mut().zip([
        "dropped_full",
        "dropped_expired",
        "dropped_purged",
        "dropped_rejected",
        "dropped_corrupt",
    ]) {
        *d = v(k)?;
    }
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT accepted_ms FROM records ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let (records, bytes) = (v("records")?, v("bytes")?);
    let mut streams = BTreeMap::new();
    streams.insert(
        DEFAULT_STREAM.to_owned(),
        StreamStats {
            priority: 5,
            records,
            bytes,
            dropped: dropped_map(&dropped),
            oldest_accepted_ms: oldest,
        },
    );
    Ok(OutboxStats {
        records,
        bytes,
        dropped: dropped_map(&dropped),
        records_acked: v("acked")?,
        oldest_accepted_ms: oldest,
        corrupt_set_aside: 0,
        streams,
    })
}

/// Reads up to `n` of the oldest records (of `stream`, or all), for the CLI.
///
/// Fails when the file cannot be read or is newer than this binary.
pub fn peek(path: &Path, stream: Option<&str>, n: usize) -> Result<Vec<Leased>, OutboxError> {
    let conn = open_read_only_checked(path)?;
    let sql = |source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let totals = read_totals(&conn).map_err(sql)?;
    let names: BTreeMap<i64, String> = totals
        .streams
        .iter()
        .map(|s| (s.id, s.name.clone()))
        .collect();
    let stream_id = match stream {
        None => None,
        Some(s) => Some(
            totals
                .streams
                .iter()
                .find(|t| t.name == s)
                .map(|t| t.id)
                .ok_or_else(|| OutboxError::UnknownStream(s.to_owned()))?,
        ),
    };
    let mut stmt = conn
        .prepare(
            "SELECT seq, stream, accepted_ms, len, body FROM records
             WHERE (?1 IS NULL OR stream = ?1) ORDER BY seq LIMIT ?2",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map(
            params![stream_id, i64::try_from(n).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            },
        )
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, sid, accepted_ms, len, body) = row.map_err(sql)?;
        if let Ok(record) = Record::decode(&body) {
            out.push(Leased {
                seq: Seq(to_u64(seq)),
                stream: names.get(&sid).cloned().unwrap_or_default(),
                accepted_ms,
                len: to_u64(len),
                record,
            });
        }
    }
    Ok(out)
}

/// Runs `PRAGMA quick_check` on an outbox file (for the CLI).
///
/// Fails when the file cannot be opened.
pub fn check_file(path: &Path) -> Result<CheckReport, OutboxError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            OutboxError::Sqlite {
                path: path.to_owned(),
                source,
            }
        })?;
    quick_check(&conn).map_err(|source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    })
}

fn open_read_only_checked(path: &Path) -> Result<Connection, OutboxError> {
    let sql = |source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found > OUTBOX_SCHEMA_VERSION {
        return Err(OutboxError::NewerSchema {
            path: path.to_owned(),
            found,
            known: OUTBOX_SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

struct Writer {
    path: PathBuf,
    conn: Connection,
    reader: Arc<Mutex<Connection>>,
    state: Connection,
    config: OutboxConfig,
    clock: Arc<Clock>,
    next_seq: u64,
    reserved_end: u64,
    totals: Totals,
    life_at_open: i64,
    mono_at_open: i64,
    shared: Arc<Shared>,
    committed_tx: watch::Sender<Seq>,
    /// When the test hook freezes this thread ([`FREEZE_WRITER_ENV`]).
    #[cfg(debug_assertions)]
    freeze_at: Option<std::time::Instant>,
}

/// Test hook, debug builds only (release builds have no such variable):
/// `SLUICE_TEST_FREEZE_WRITER_AFTER_MS=N` stops the writer thread for good
/// at the first command it takes N ms after the outbox opened, as a writer
/// stuck in the kernel would. The watchdog test uses it to see the
/// daemon's systemd pings stop.
#[cfg(debug_assertions)]
const FREEZE_WRITER_ENV: &str = "SLUICE_TEST_FREEZE_WRITER_AFTER_MS";

#[cfg(debug_assertions)]
fn freeze_hook() -> Option<std::time::Instant> {
    let ms: u64 = std::env::var(FREEZE_WRITER_ENV).ok()?.trim().parse().ok()?;
    Some(std::time::Instant::now() + Duration::from_millis(ms))
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendReceipt, AppendError>>,
        Result<AppendReceipt, AppendError>,
    ),
    Purge(
        oneshot::Sender<Result<u64, AppendError>>,
        Result<u64, AppendError>,
    ),
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Append(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Purge(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
    fn fail(self, e: impl Fn() -> AppendError) {
        match self {
            Reply::Append(tx, _) => {
                let _ = tx.send(Err(e()));
            }
            Reply::Purge(tx, _) => {
                let _ = tx.send(Err(e()));
            }
        }
    }
}

/// Adds `cmd` to the batch being collected; a ping is answered at once
/// (taking it is the proof of progress it asks for).
fn take(batch: &mut Vec<Command>, cmd: Command) {
    match cmd {
        Command::Ping(reply) => {
            let _ = reply.send(());
        }
        cmd => batch.push(cmd),
    }
}

/// What the lifetime clock and this boot's clock read for one transaction.
#[derive(Clone, Copy)]
struct Now {
    wall: i64,
    life: i64,
    boot: i64,
    mono: i64,
}

impl Writer {
    fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let _span = tracing::info_span!("outbox-writer").entered();
        let mut batch = Vec::new();
        while let Some(first) = cmd_rx.blocking_recv() {
            #[cfg(debug_assertions)]
            self.freeze_if_due();
            take(&mut batch, first);
            while batch.len() < MAX_COMMANDS_PER_COMMIT {
                match cmd_rx.try_recv() {
                    Ok(c) => take(&mut batch, c),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let shutdown = batch.iter().any(|c| matches!(c, Command::Shutdown));
            self.commit_batch(std::mem::take(&mut batch));
            if shutdown {
                break;
            }
        }
        cmd_rx.close();
        // Whatever raced in after Shutdown is answered, not silently dropped.
        while let Ok(cmd) = cmd_rx.try_recv() {
            match cmd {
                Command::Append { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                Command::Purge { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                _ => {}
            }
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
    }

    #[cfg(debug_assertions)]
    fn freeze_if_due(&self) {
        if self
            .freeze_at
            .is_some_and(|at| std::time::Instant::now() >= at)
        {
            tracing::warn!(
                hook = FREEZE_WRITER_ENV,
                "test hook: the outbox writer freezes now"
            );
            loop {
                std::thread::park();
            }
        }
    }

    fn now(&self) -> Now {
        let mono = self.clock.mono_ms();
        Now {
            wall: self.clock.wall_ms(),
            life: self.life_at_open + (mono - self.mono_at_open).max(0),
            boot: self.clock.boot(),
            mono,
        }
    }

    fn commit_batch(&mut self, mut batch: Vec<Command>) {
        let saved = self.totals.clone();
        let saved_next = self.next_seq;
        let needed: u64 = batch
            .iter()
            .map(|c| match c {
                Command::Append { bodies, .. } => bodies.len() as u64,
                _ => 0,
            })
            .sum();
        let appended: Vec<(String, u64)> = batch
            .iter()
            .filter_map(|c| match c {
                Command::Append { stream, bodies, .. } => {
                    Some((stream.clone(), bodies.len() as u64))
                }
                _ => None,
            })
            .collect();
        let reserve_error = self.reserve(needed).err();
        let mut maintain = false;
        let mut restamp = false;
        let mut set_aside_why = None;
        batch.retain(|c| match c {
            Command::Maintain => {
                maintain = true;
                true
            }
            Command::Restamp => {
                restamp = true;
                false
            }
            Command::SetAside(why) => {
                set_aside_why = Some(why.clone());
                false
            }
            _ => true,
        });
        if let Some(why) = set_aside_why {
            self.replace_corrupt(&why);
        }

        let now = self.now();
        let mut replies = Vec::new();
        let started = std::time::Instant::now();
        let (result, leftover) = self.apply(batch, reserve_error.as_ref(), now, &mut replies);
        match result {
            Ok(()) => {
                self.shared
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                if needed > 0 {
                    self.shared.batch_records.observe(needed as f64);
                }
                self.published(saved_next);
                replies.into_iter().for_each(Reply::send);
            }
            Err(e) => {
                self.totals = saved.clone();
                self.next_seq = saved_next;
                let corrupt = is_corruption(&e);
                let full = is_disk_full(&e);
                if full {
                    tracing::warn!(path = %self.path.display(), "disk full: refusing appends until space returns");
                    for r in replies {
                        r.fail(|| AppendError::Full);
                    }
                    // Retry what frees space (acks, expiry) without the appends.
                    let mut retry_replies = Vec::new();
                    let (retry, _) = self.apply(leftover, None, now, &mut retry_replies);
                    match retry {
                        Ok(()) => retry_replies.into_iter().for_each(Reply::send),
                        Err(e2) => {
                            self.totals = saved;
                            tracing::error!(error = %e2, "outbox commit failed again without appends");
                            retry_replies
                                .into_iter()
                                .for_each(|r| r.fail(|| AppendError::Full));
                        }
                    }
                    // The refusals are counted whether or not the retry could
                    // commit (on disk with the next commit that succeeds).
                    for (name, n) in &appended {
                        if let Some(s) = self.totals.streams.iter_mut().find(|s| s.name == *name) {
                            s.dropped[REJECTED] += n;
                        }
                    }
                    self.published(saved_next);
                } else {
                    tracing::error!(path = %self.path.display(), error = %e, "outbox commit failed");
                    let msg = e.to_string();
                    for r in replies {
                        r.fail(|| AppendError::Storage(msg.clone()));
                    }
                    if corrupt {
                        self.replace_corrupt(&msg);
                    }
                }
            }
        }
        if restamp {
            self.restamp(now);
        }
        if maintain {
            self.maintain();
        }
    }

    fn published(&mut self, saved_next: u64) {
        if let Ok(mut t) = self.shared.totals.lock() {
            *t = self.totals.clone();
        }
        if self.next_seq != saved_next {
            self.committed_tx
                .send_replace(Seq(self.next_seq.saturating_sub(1)));
        }
    }

    /// Makes sure `needed` seqs from `next_seq` are covered by a durable
    /// high-water mark.
    fn reserve(&mut self, needed: u64) -> rusqlite::Result<()> {
        if self.next_seq + needed <= self.reserved_end {
            return Ok(());
        }
        let end = self.next_seq + needed + SEQ_BLOCK;
        statedb::raise_seq_mark(&self.state, end)?;
        self.reserved_end = end;
        Ok(())
    }

    /// Applies `batch` in one transaction. On failure returns the commands
    /// that do not add data (acks, expiry…) so they can be retried.
    fn apply(
        &mut self,
        batch: Vec<Command>,
        reserve_error: Option<&rusqlite::Error>,
        now: Now,
        replies: &mut Vec<Reply>,
    ) -> (rusqlite::Result<()>, Vec<Command>) {
        let mut leftover = Vec::new();
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut rows = Rows::default();
            for cmd in batch {
                if !matches!(cmd, Command::Append { .. }) {
                    // Deletes and purges see every row appended before them.
                    flush_rows(&tx, &mut rows)?;
                }
                match cmd {
                    Command::Append {
                        stream,
                        bodies,
                        state,
                        reply,
                    } => {
                        if let Some(e) = reserve_error {
                            replies.push(Reply::Append(
                                reply,
                                Err(AppendError::Storage(format!("seq reservation failed: {e}"))),
                            ));
                            continue;
                        }
                        let res = append(
                            &tx,
                            &self.config,
                            &mut self.totals,
                            &mut self.next_seq,
                            now,
                            &stream,
                            bodies,
                            &mut rows,
                        )?;
                        if res.is_ok() {
                            write_state(&tx, &state)?;
                        }
                        replies.push(Reply::Append(reply, res));
                    }
                    Command::Ack(seqs) => {
                        let n = delete_seqs(&tx, &mut self.totals, &seqs, None)?;
                        self.totals.acked += n;
                        leftover.push(Command::Ack(seqs));
                    }
                    Command::DropCorrupt(seqs) => {
                        delete_seqs(&tx, &mut self.totals, &seqs, Some(CORRUPT))?;
                        leftover.push(Command::DropCorrupt(seqs));
                    }
                    Command::Maintain => {
                        for i in 0..self.totals.streams.len() {
                            let s = &self.totals.streams[i];
                            if s.records == 0 {
                                continue;
                            }
                            let cutoff = now.life.saturating_sub(s.max_age_ms);
                            delete_head_older_than(
                                &tx,
                                &mut self.totals.streams[i],
                                cutoff,
                                MAX_EXPIRED_PER_COMMIT,
                                EXPIRED,
                            )?;
                        }
                        leftover.push(Command::Maintain);
                    }
                    Command::Purge {
                        stream,
                        older_than,
                        reply,
                    } => {
                        let cutoff = now.life.saturating_sub(dur_ms(older_than));
                        let mut n = 0;
                        for i in 0..self.totals.streams.len() {
                            if stream
                                .as_ref()
                                .is_some_and(|name| *name != self.totals.streams[i].name)
                            {
                                continue;
                            }
                            n += delete_head_older_than(
                                &tx,
                                &mut self.totals.streams[i],
                                cutoff,
                                usize::MAX,
                                PURGED,
                            )?;
                        }
                        replies.push(Reply::Purge(reply, Ok(n)));
                    }
                    Command::Restamp
                    | Command::SetAside(_)
                    | Command::Ping(_)
                    | Command::Shutdown => {}
                }
            }
            flush_rows(&tx, &mut rows)?;
            write_totals(&tx, &mut self.totals, now)?;
            tx.commit()
        })();
        (result, leftover)
    }

    fn restamp(&mut self, now: Now) {
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut changed: Vec<(i64, Vec<u8>, u64, i64)> = Vec::new();
            {
                let mut stmt = tx.prepare(
                    "SELECT seq, mono_ms, len, body, stream FROM records WHERE boot = ?1 AND untrusted = 1",
                )?;
                let mut rows = stmt.query([now.boot])?;
                while let Some(row) = rows.next()? {
                    let seq: i64 = row.get(0)?;
                    let mono: i64 = row.get(1)?;
                    let len = to_u64(row.get(2)?);
                    let body: Vec<u8> = row.get(3)?;
                    let stream: i64 = row.get(4)?;
                    let Ok(mut record) = Record::decode(&body) else {
                        continue;
                    };
                    record.ts_ms = now.wall - (now.mono - mono).max(0);
                    record.ts_trusted = true;
                    if let Ok(new_body) = record.encode() {
                        let new_len = new_body.len() as u64 + ROW_OVERHEAD;
                        if let Some(i) = self.totals.index(stream) {
                            let s = &mut self.totals.streams[i];
                            s.bytes = (s.bytes + new_len).saturating_sub(len);
                        }
                        changed.push((seq, new_body, new_len, stream));
                    }
                }
            }
            {
                let mut upd = tx.prepare(
                    "UPDATE records SET body = ?2, len = ?3, untrusted = 0 WHERE seq = ?1",
                )?;
                for (seq, body, len, _) in &changed {
                    upd.execute(params![seq, body, to_i64(*len)])?;
                }
            }
            write_totals(&tx, &mut self.totals, now)?;
            tx.commit()?;
            Ok::<usize, rusqlite::Error>(changed.len())
        })();
        match result {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(
                        records = n,
                        "re-stamped records taken before the clock was trusted"
                    );
                }
                self.published(self.next_seq);
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-stamping failed; records stay flagged untrusted")
            }
        }
    }

    fn maintain(&mut self) {
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            }) {
            Ok((0, _, _)) => {}
            Ok((_, log, done)) => {
                tracing::debug!(log, done, "WAL checkpoint was blocked by a reader");
            }
            Err(e) => tracing::debug!(error = %e, "WAL checkpoint did not complete"),
        }
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap_or(0);
        if free > VACUUM_FREE_PAGES {
            // Keep some free pages for the next fill; give back the rest.
            let give_back = free - VACUUM_FREE_PAGES / 2;
            // Each step of this pragma frees one page: step it to the end.
            let vacuum = (|| {
                let mut stmt = self
                    .conn
                    .prepare(&format!("PRAGMA incremental_vacuum({give_back})"))?;
                let mut rows = stmt.query([])?;
                while rows.next()?.is_some() {}
                Ok::<(), rusqlite::Error>(())
            })();
            if let Err(e) = vacuum {
                tracing::warn!(error = %e, "incremental vacuum failed");
            } else {
                tracing::debug!(pages = give_back, "returned free pages to the file system");
                let _ = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            }
        }
    }

    /// Moves the corrupt file aside and continues with a fresh outbox.
    fn replace_corrupt(&mut self, why: &str) {
        let fresh = match Connection::open_in_memory() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the corrupt outbox");
                return;
            }
        };
        drop(std::mem::replace(&mut self.conn, fresh));
        if let Ok(mut r) = self.reader.lock()
            && let Ok(c) = Connection::open_in_memory()
        {
            drop(std::mem::replace(&mut *r, c));
        }
        let moved = match set_aside(&self.path) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot move the corrupt outbox aside");
                return;
            }
        };
        self.shared
            .corrupt_set_aside
            .fetch_add(1, Ordering::Relaxed);
        let lost: Vec<(String, u64)> = self
            .totals
            .streams
            .iter()
            .map(|s| (s.name.clone(), s.records))
            .collect();
        tracing::error!(reason = why, moved_to = %moved.display(),
            "the outbox is corrupt: moved it aside and continuing with a fresh one");
        match open_db(&self.path, &self.config, &self.clock) {
            Ok(o) => {
                self.conn = o.conn;
                let mut totals = o.totals;
                for (name, n) in lost {
                    if let Some(s) = totals.streams.iter_mut().find(|s| s.name == name) {
                        s.dropped[CORRUPT] += n;
                    }
                }
                totals.acked = self.totals.acked;
                self.totals = totals;
                if let (Ok(mut r), Ok(c)) = (self.reader.lock(), open_reader(&self.path)) {
                    *r = c;
                }
                let now = self.now();
                if let Err(e) = write_totals(&self.conn, &mut self.totals, now) {
                    tracing::error!(error = %e, "cannot write the fresh outbox's totals");
                }
                self.published(self.next_seq);
            }
            Err((e, _)) => tracing::error!(error = %e, "cannot create a fresh outbox"),
        }
    }
}

fn write_totals(conn: &Connection, totals: &mut Totals, now: Now) -> rusqlite::Result<()> {
    let mut up = conn.prepare_cached(
        "INSERT INTO stream_devices (stream, dev, records) VALUES (?1, ?2, ?3)
         ON CONFLICT (stream, dev) DO UPDATE SET records = records + excluded.records",
    )?;
    let mut gone = conn.prepare_cached(
        "DELETE FROM stream_devices WHERE stream = ?1 AND dev = ?2 AND records <= 0",
    )?;
    for s in &mut totals.streams {
        for (dev, delta) in s.dev_delta.drain() {
            if delta != 0 {
                up.execute(params![s.id, dev, delta])?;
                if delta < 0 {
                    gone.execute(params![s.id, dev])?;
                }
            }
        }
    }
    let mut st = conn.prepare_cached(
        "UPDATE streams SET records = ?2, bytes = ?3, dropped_full = ?4, dropped_expired = ?5,
             dropped_purged = ?6, dropped_rejected = ?7, dropped_corrupt = ?8, priority = ?9
         WHERE id = ?1",
    )?;
    for s in &totals.streams {
        let d = s.dropped.map(to_i64);
        st.execute(params![
            s.id,
            to_i64(s.records),
            to_i64(s.bytes),
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            i64::from(s.priority)
        ])?;
    }
    let mut meta = conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?;
    meta.execute(params!["acked", to_i64(totals.acked)])?;
    meta.execute(params!["life_ms", now.life])?;
    meta.execute(params!["life_boot", now.boot])?;
    meta.execute(params!["life_mono", now.mono])?;
    Ok(())
}

// The writer's fields are passed one by one so their borrows stay disjoint.
fn write_state(tx: &rusqlite::Transaction<'_>, state: &[StateChange]) -> rusqlite::Result<()> {
    if state.is_empty() {
        return Ok(());
    }
    let mut put =
        tx.prepare_cached("INSERT OR REPLACE INTO rule_state (key, value) VALUES (?1, ?2)")?;
    let mut del = tx.prepare_cached("DELETE FROM rule_state WHERE key = ?1")?;
    for (k, v) in state {
        match v {
            Some(v) => put.execute(rusqlite::params![k, v])?,
            None => del.execute([k])?,
        };
    }
    Ok(())
}

/// The rules' persisted state (for restoring the engine at start-up).
///
/// Fails when the file cannot be read.
pub fn read_rule_state(path: &Path) -> Result<Vec<StoredState>, OutboxError> {
    let sql = |source| OutboxError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'rule_state')",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare("SELECT key, value FROM rule_state ORDER BY key")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql)?;
    rows.collect::<Result<_, _>>().map_err(sql)
}

#[allow(clippy::too_many_arguments)]
fn append(
    tx: &rusqlite::Transaction<'_>,
    config: &OutboxConfig,
    totals: &mut Totals,
    next_seq: &mut u64,
    now: Now,
    stream: &str,
    bodies: Bodies,
    rows: &mut Rows,
) -> rusqlite::Result<Result<AppendReceipt, AppendError>> {
    let Some(si) = totals.streams.iter().position(|s| s.name == stream) else {
        return Ok(Err(AppendError::UnknownStream(stream.to_owned())));
    };
    let stream = totals.streams[si].id;
    if bodies.is_empty() {
        let last = Seq(next_seq.saturating_sub(1));
        return Ok(Ok(AppendReceipt { first: last, last }));
    }
    let size: u64 = bodies.bytes.len() as u64 + bodies.len() as u64 * ROW_OVERHEAD;
    let n = bodies.len() as u64;
    let cap = totals.streams[si].max_bytes.min(config.max_bytes);
    let refuse = |totals: &mut Totals| {
        totals.streams[si].dropped[REJECTED] += n;
        Ok(Err(AppendError::Full))
    };
    if size > cap {
        return refuse(totals);
    }
    let over_own = totals.streams[si].bytes + size > cap;
    let over_total = totals.bytes() + size > config.max_bytes;
    if over_own || over_total {
        if config.when_full == WhenFull::Reject {
            return refuse(totals);
        }
        // Eviction looks for the oldest rows in the table: put the buffered
        // ones there first.
        flush_rows(tx, rows)?;
        // Own cap first: the stream makes room within itself.
        while totals.streams[si].bytes + size > cap {
            if delete_head_older_than(tx, &mut totals.streams[si], i64::MAX, 1, FULL)? == 0 {
                break;
            }
        }
        // Then the total: lowest priority first (never above ours), oldest first.
        while totals.bytes() + size > config.max_bytes {
            let prio = totals.streams[si].priority;
            let victim = totals
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| s.records > 0 && s.priority <= prio)
                .min_by_key(|(i, s)| (s.priority, usize::from(*i != si)))
                .map(|(i, _)| i);
            let Some(v) = victim else {
                return refuse(totals);
            };
            if delete_head_older_than(tx, &mut totals.streams[v], i64::MAX, 1, FULL)? == 0 {
                return refuse(totals);
            }
        }
    }
    let first = *next_seq;
    let s = &mut totals.streams[si];
    let buf = rows.bufs.len();
    rows.rows.reserve(bodies.len());
    for (body, untrusted, dev) in bodies.ranges() {
        let len = body.len() as u64 + ROW_OVERHEAD;
        rows.rows.push(Row {
            ints: [
                to_i64(*next_seq),
                stream,
                now.wall,
                now.life,
                now.boot,
                now.mono,
                i64::from(untrusted),
                to_i64(len),
                dev,
            ],
            buf,
            body,
        });
        *next_seq += 1;
        s.records += 1;
        s.bytes += len;
        *s.dev_delta.entry(dev).or_default() += 1;
    }
    rows.bufs.push(bodies.bytes);
    Ok(Ok(AppendReceipt {
        first: Seq(first),
        last: Seq(*next_seq - 1),
    }))
}

/// A record row waiting to be inserted: appends of one transaction are
/// buffered and written together, in seq order, in multi-row INSERTs (per-
/// statement overhead was about a quarter of the writer's time, and many
/// appends carry one record: an HTTP request, a CoAP message).
struct Row {
    /// seq, stream, accepted_ms, life_ms, boot, mono_ms, untrusted, len, dev.
    ints: [i64; 9],
    /// Which of [`Rows::bufs`] holds the body, and where.
    buf: usize,
    body: std::ops::Range<usize>,
}

/// The rows buffered in a transaction and the appends' buffers that hold
/// their bodies.
#[derive(Default)]
struct Rows {
    rows: Vec<Row>,
    bufs: Vec<Vec<u8>>,
}

/// Binds row `r` (body `body`) to parameters `first..first + 10` of `stmt`.
fn bind_row(
    stmt: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    r: &Row,
    body: &[u8],
) -> rusqlite::Result<()> {
    let i = &r.ints;
    for (k, v) in i[..8].iter().enumerate() {
        stmt.raw_bind_parameter(first + k, v)?;
    }
    stmt.raw_bind_parameter(first + 8, body)?;
    stmt.raw_bind_parameter(first + 9, i[8])
}

/// Inserts the buffered rows (in chunks of [`ROWS_PER_INSERT`], the rest one
/// by one) and empties the buffer.
fn flush_rows(tx: &rusqlite::Transaction<'_>, rows: &mut Rows) -> rusqlite::Result<()> {
    if rows.rows.is_empty() {
        return Ok(());
    }
    let mut chunk_stmt = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
    let mut row_stmt = tx.prepare_cached(&insert_sql(1))?;
    let body = |r: &Row| rows.bufs.get(r.buf).and_then(|b| b.get(r.body.clone()));
    for chunk in rows.rows.chunks(ROWS_PER_INSERT) {
        let stmt = if chunk.len() == ROWS_PER_INSERT {
            &mut chunk_stmt
        } else {
            &mut row_stmt
        };
        let mut bound = 0;
        for r in chunk {
            // Every row's range was cut from its own buffer by `append`.
            let b = body(r).unwrap_or_default();
            bind_row(stmt, bound * 10 + 1, r, b)?;
            bound += 1;
            if stmt.parameter_count() == bound * 10 {
                stmt.raw_execute()?;
                bound = 0;
            }
        }
    }
    rows.rows.clear();
    rows.bufs.clear();
    Ok(())
}

/// Rows per multi-row INSERT (10 parameters each; SQLite allows 32 766).
const ROWS_PER_INSERT: usize = 64;

/// `INSERT INTO records … VALUES (…)` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let one_row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    format!(
        "INSERT INTO records (seq, stream, accepted_ms, life_ms, boot, mono_ms, untrusted, len, body, dev) VALUES {}",
        vec![one_row; rows].join(", ")
    )
}

fn delete_seqs(
    tx: &rusqlite::Transaction<'_>,
    totals: &mut Totals,
    seqs: &[Seq],
    reason: Option<usize>,
) -> rusqlite::Result<u64> {
    let mut stmt =
        tx.prepare_cached("DELETE FROM records WHERE seq = ?1 RETURNING stream, len, dev")?;
    let mut n = 0;
    for s in seqs {
        let row: Option<(i64, i64, i64)> = stmt
            .query_row([to_i64(s.0)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((stream, len, dev)) = row {
            n += 1;
            if let Some(i) = totals.index(stream) {
                let st = &mut totals.streams[i];
                st.removed(len, dev);
                if let Some(r) = reason {
                    st.dropped[r] += 1;
                }
            }
        }
    }
    Ok(n)
}

/// Deletes up to `max` of the stream's oldest records accepted (lifetime
/// clock) before `cutoff_life_ms`, counting them under `reason`.
fn delete_head_older_than(
    tx: &rusqlite::Transaction<'_>,
    stream: &mut StreamState,
    cutoff_life_ms: i64,
    max: usize,
    reason: usize,
) -> rusqlite::Result<u64> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM records
         WHERE seq = (SELECT min(seq) FROM records WHERE stream = ?1) AND life_ms < ?2
         RETURNING len, dev",
    )?;
    let mut n = 0u64;
    while (n as usize) < max {
        let row: Option<(i64, i64)> = stmt
            .query_row(params![stream.id, cutoff_life_ms], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((len, dev)) = row else { break };
        n += 1;
        stream.removed(len, dev);
        stream.dropped[reason] += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
