//! The store-and-forward outbox: `state_dir/outbox.db`.
//!
//! # Design
//!
//! **Schema** (PRAGMA user_version = 1, `auto_vacuum = INCREMENTAL` from creation):
//! - `records(seq INTEGER PRIMARY KEY, accepted_ms INTEGER, len INTEGER, body BLOB)`:
//!   one row per record; `body` is [`Record::encode`] (a version byte + postcard);
//!   `len` is the row's accounted size (body + [`ROW_OVERHEAD`]); `accepted_ms` is
//!   the gateway's wall clock when it committed the record (age limits count from
//!   it, never from the device's `ts`).
//! - `meta(key TEXT PRIMARY KEY, value INTEGER)`: running totals (records, bytes),
//!   drop counters by reason and the acked counter, updated in the same
//!   transaction as the rows they describe, so start-up reads totals instead of
//!   scanning the table.
//!
//! **Ordering.** `seq` is assigned by the single writer in commit order, so
//! `ORDER BY seq` is acceptance order, and a reader (WAL snapshot) always sees a
//! gap-free committed prefix of new seqs: leasing "everything after seq N" never
//! skips a record that commits later with a smaller seq.
//!
//! **Seq never repeats.** The writer reserves seqs in blocks of [`SEQ_BLOCK`] by
//! raising the high-water mark in `state.db` (fsynced) *before* committing any
//! record that uses them. At open, the next seq is the larger of that mark and
//! `max(seq) + 1`, so a deleted, replaced or restored outbox cannot reuse one.
//!
//! **Durability.** WAL journal; `outbox.durability = "power"` → `synchronous = FULL`
//! (a commit survives power loss), `"process"` → `NORMAL` (survives a crash of
//! sluice, may lose the last commits on power loss). One writer thread owns the
//! write connection; it takes every pending command (appends, acks, expiry) into
//! one transaction (group commit) and answers each append only after that
//! commit returned. A caller's ack to its device therefore means the record is
//! on disk. Deletes (acks, eviction) go through the same writer because a second
//! writing connection starves under `synchronous = FULL`.
//!
//! **Eviction.** Bounded by `max_bytes` (sum of `len`) and `max_age`. When an
//! append does not fit: `drop_oldest` deletes from the head (lowest seq) until it
//! does, counted as `full`; `reject` refuses the append (the device is told to
//! retry), counted as `rejected`. Expiry deletes records older than `max_age`,
//! counted as `expired`. A row that cannot be decoded is dropped when leased,
//! counted as `corrupt`.
//!
//! **What a crash can lose.** Nothing that was acknowledged to a device (its
//! append committed before the ack). An ack from the cloud that was not yet
//! committed is lost, so that record is sent again with the same seq: upstream
//! is at-least-once, deduplicable by `(gateway, epoch, seq)`.
//!
//! **Start-up cost.** Opening reads `meta`, `max(seq)` and the oldest row: a few
//! b-tree lookups whatever the backlog; nothing scans the table.

use crate::record::{Record, Seq};
use crate::statedb;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// The schema version this binary writes.
pub const OUTBOX_SCHEMA_VERSION: i64 = 1;
/// Bytes accounted per row on top of its body (key, columns, b-tree cell).
pub const ROW_OVERHEAD: u64 = 24;
/// Seqs reserved per fsync of the high-water mark.
pub const SEQ_BLOCK: u64 = 100_000;
/// Most commands taken into one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 4096;
/// Most rows one expiry pass deletes in one transaction.
const MAX_EXPIRED_PER_COMMIT: usize = 10_000;
/// Capacity of the command channel to the writer.
const COMMAND_CHANNEL: usize = 1024;

/// What to do with an append that does not fit in `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest records until it fits.
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

/// The outbox's bounds and policy.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Upper bound on the sum of accounted record sizes.
    pub max_bytes: u64,
    /// Records older than this (since acceptance) are expired.
    pub max_age: Duration,
    /// Policy when an append does not fit.
    pub when_full: WhenFull,
    /// Commit durability.
    pub durability: Durability,
}

impl Default for OutboxConfig {
    /// The documented defaults: 256 MiB, 7 days, `drop_oldest`, `power`.
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 86_400),
            when_full: WhenFull::DropOldest,
            durability: Durability::Power,
        }
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
    /// The outbox has shut down.
    #[error("the outbox is closed")]
    Closed,
}

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// `when_full = "reject"` and the records do not fit, or they are larger
    /// than the whole outbox.
    #[error("outbox full")]
    Full,
    /// The commit failed; nothing of this append is stored.
    #[error("outbox commit failed: {0}")]
    Storage(String),
    /// A record could not be encoded.
    #[error("record cannot be encoded: {0}")]
    Encode(postcard::Error),
    /// The outbox has shut down.
    #[error("the outbox is closed")]
    Closed,
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
    /// When the outbox accepted it (unix ms).
    pub accepted_ms: i64,
    /// Its accounted size.
    pub len: u64,
    /// The record.
    pub record: Record,
}

/// Drop reasons, as counted and reported.
pub const DROP_REASONS: [&str; 5] = ["full", "expired", "purged", "rejected", "corrupt"];

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
    /// Acceptance time of the oldest stored record (unix ms), if any.
    pub oldest_accepted_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    bytes: AtomicU64,
    acked: AtomicU64,
    dropped: [AtomicU64; 5],
}

/// Handle to the outbox; cheap to clone. All writes go to one writer thread.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cmd_tx: mpsc::Sender<Command>,
    reader: Mutex<Connection>,
    counters: Arc<Counters>,
    committed_rx: watch::Receiver<Seq>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
}

enum Command {
    Append {
        bodies: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<AppendReceipt, AppendError>>,
    },
    Ack(Vec<Seq>),
    DropCorrupt(Vec<Seq>),
    Expire,
    Purge {
        older_than: Duration,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    Shutdown,
}

fn now_ms() -> i64 {
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

impl Outbox {
    /// Opens `outbox.db` at `path` (creating it), seeds the seq counter from
    /// the high-water mark in `state_db`, and starts the writer thread.
    ///
    /// Fails when either file cannot be opened, is not a database, or carries
    /// a newer schema than this binary knows.
    pub fn open(path: &Path, state_db: &Path, config: OutboxConfig) -> Result<Self, OutboxError> {
        let sql = |source| OutboxError::Sqlite {
            path: path.to_owned(),
            source,
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
        migrate(&mut conn, path)?;

        let state = statedb::open(state_db)?;
        let state_err = |source| {
            OutboxError::State(statedb::StateDbError::Sqlite {
                path: state_db.to_owned(),
                source,
            })
        };
        let mark = statedb::seq_mark(&state).map_err(state_err)?;
        let max_seq: Option<i64> = conn
            .query_row("SELECT max(seq) FROM records", [], |r| r.get(0))
            .map_err(sql)?;
        let next_seq = mark.max(max_seq.map_or(1, |m| to_u64(m) + 1)).max(1);

        let counters = Arc::new(Counters::default());
        let meta = read_meta(&conn).map_err(sql)?;
        counters.records.store(meta.records, Ordering::Relaxed);
        counters.bytes.store(meta.bytes, Ordering::Relaxed);
        counters.acked.store(meta.acked, Ordering::Relaxed);
        for (i, d) in meta.dropped.iter().enumerate() {
            counters.dropped[i].store(*d, Ordering::Relaxed);
        }

        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        reader.busy_timeout(Duration::from_secs(5)).map_err(sql)?;

        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL);
        let (committed_tx, committed_rx) = watch::channel(Seq(next_seq.saturating_sub(1)));
        let writer = Writer {
            path: path.to_owned(),
            conn,
            state,
            config,
            next_seq,
            reserved_end: next_seq,
            meta,
            counters: counters.clone(),
            committed_tx,
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(cmd_rx))
            .map_err(OutboxError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                cmd_tx,
                reader: Mutex::new(reader),
                counters,
                committed_rx,
                writer: Mutex::new(Some(handle)),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Stores `records` durably; returns once they are committed.
    ///
    /// Fails with [`AppendError::Full`] when `when_full = "reject"` and they do
    /// not fit (or they exceed `max_bytes` on their own), with
    /// [`AppendError::Storage`] when the commit failed (nothing is stored), and
    /// [`AppendError::Closed`] after shutdown.
    pub async fn append(&self, records: &[Record]) -> Result<AppendReceipt, AppendError> {
        let bodies = records
            .iter()
            .map(Record::encode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(AppendError::Encode)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Append { bodies, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Deletes records the cloud acknowledged. Seqs no longer stored are ignored.
    ///
    /// Fails only after shutdown.
    pub async fn ack(&self, seqs: Vec<Seq>) -> Result<(), OutboxError> {
        self.inner
            .cmd_tx
            .send(Command::Ack(seqs))
            .await
            .map_err(|_| OutboxError::Closed)
    }

    /// Deletes records older than `max_age` (counted as `expired`).
    ///
    /// Fails only after shutdown.
    pub async fn expire(&self) -> Result<(), OutboxError> {
        self.inner
            .cmd_tx
            .send(Command::Expire)
            .await
            .map_err(|_| OutboxError::Closed)
    }

    /// Deletes records accepted more than `older_than` ago (counted as
    /// `purged`); returns how many.
    ///
    /// Fails when the commit fails or after shutdown.
    pub async fn purge(&self, older_than: Duration) -> Result<u64, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmd_tx
            .send(Command::Purge { older_than, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Reads up to `max_records` stored records with seq greater than `after`,
    /// in seq order, stopping before `max_bytes` would be exceeded (at least one
    /// record is returned when any exists). Rows that cannot be decoded are
    /// dropped (counted as `corrupt`) and skipped.
    ///
    /// Fails when SQLite fails or after shutdown.
    pub async fn lease_after(
        &self,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Leased>, OutboxError> {
        let inner = self.inner.clone();
        let (leased, corrupt) =
            tokio::task::spawn_blocking(move || inner.read_after(after, max_records, max_bytes))
                .await
                .map_err(|_| OutboxError::Closed)??;
        if !corrupt.is_empty() {
            tracing::error!(count = corrupt.len(), first = %corrupt[0], "dropping undecodable outbox rows");
            self.inner
                .cmd_tx
                .send(Command::DropCorrupt(corrupt))
                .await
                .map_err(|_| OutboxError::Closed)?;
        }
        Ok(leased)
    }

    /// A receiver of the highest committed seq: changes whenever new records
    /// are committed.
    pub fn committed(&self) -> watch::Receiver<Seq> {
        self.inner.committed_rx.clone()
    }

    /// The current figures.
    ///
    /// Fails when SQLite cannot read the oldest row.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let inner = self.inner.clone();
        let oldest = tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().map_err(|_| OutboxError::Closed)?;
            oldest_accepted(&conn).map_err(|source| OutboxError::Sqlite {
                path: inner.path.clone(),
                source,
            })
        })
        .await
        .map_err(|_| OutboxError::Closed)??;
        let c = &self.inner.counters;
        Ok(OutboxStats {
            records: c.records.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            records_acked: c.acked.load(Ordering::Relaxed),
            dropped: DROP_REASONS
                .iter()
                .zip(&c.dropped)
                .map(|(r, n)| ((*r).to_owned(), n.load(Ordering::Relaxed)))
                .collect(),
            oldest_accepted_ms: oldest,
        })
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

impl Inner {
    fn read_after(
        &self,
        after: Seq,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Leased>, Vec<Seq>), OutboxError> {
        let sql = |source| OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let conn = self.reader.lock().map_err(|_| OutboxError::Closed)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, accepted_ms, len, body FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql)?;
        let limit = i64::try_from(max_records).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![to_i64(after.0), limit]).map_err(sql)?;
        let mut leased = Vec::new();
        let mut corrupt = Vec::new();
        let mut bytes = 0u64;
        while let Some(row) = rows.next().map_err(sql)? {
            let seq = Seq(to_u64(row.get(0).map_err(sql)?));
            let accepted_ms: i64 = row.get(1).map_err(sql)?;
            let len = to_u64(row.get(2).map_err(sql)?);
            if !leased.is_empty() && bytes + len > max_bytes {
                break;
            }
            let body = row.get_ref(3).map_err(sql)?;
            match body.as_blob().ok().map(Record::decode) {
                Some(Ok(record)) => {
                    bytes += len;
                    leased.push(Leased {
                        seq,
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
        Ok((leased, corrupt))
    }
}

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
        tx.execute_batch(
            "CREATE TABLE records (
                 seq INTEGER PRIMARY KEY,
                 accepted_ms INTEGER NOT NULL,
                 len INTEGER NOT NULL,
                 body BLOB NOT NULL
             );
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .map_err(sql)?;
    }
    tx.commit().map_err(sql)
}

#[derive(Debug, Clone, Default)]
struct Meta {
    records: u64,
    bytes: u64,
    acked: u64,
    dropped: [u64; 5],
}

const META_KEYS: [&str; 8] = [
    "records",
    "bytes",
    "acked",
    "dropped_full",
    "dropped_expired",
    "dropped_purged",
    "dropped_rejected",
    "dropped_corrupt",
];

impl Meta {
    fn values(&self) -> [u64; 8] {
        let d = &self.dropped;
        [
            self.records,
            self.bytes,
            self.acked,
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
        ]
    }
}

fn read_meta(conn: &Connection) -> rusqlite::Result<Meta> {
    let mut m = Meta::default();
    let mut stmt = conn.prepare("SELECT key, value FROM meta")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let v = to_u64(row.get(1)?);
        match key.as_str() {
            "records" => m.records = v,
            "bytes" => m.bytes = v,
            "acked" => m.acked = v,
            "dropped_full" => m.dropped[0] = v,
            "dropped_expired" => m.dropped[1] = v,
            "dropped_purged" => m.dropped[2] = v,
            "dropped_rejected" => m.dropped[3] = v,
            "dropped_corrupt" => m.dropped[4] = v,
            _ => {}
        }
    }
    Ok(m)
}

fn oldest_accepted(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT accepted_ms FROM records ORDER BY seq LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// Reads the figures of an outbox file without starting a writer (for the CLI,
/// with or without a running daemon).
///
/// Fails when the file does not exist, is not a database, or is newer than
/// this binary.
pub fn read_stats(path: &Path) -> Result<OutboxStats, OutboxError> {
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
    if found == 0 {
        return Ok(OutboxStats {
            records: 0,
            bytes: 0,
            dropped: DROP_REASONS.iter().map(|r| ((*r).to_owned(), 0)).collect(),
            records_acked: 0,
            oldest_accepted_ms: None,
        });
    }
    let meta = read_meta(&conn).map_err(sql)?;
    Ok(OutboxStats {
        records: meta.records,
        bytes: meta.bytes,
        records_acked: meta.acked,
        dropped: DROP_REASONS
            .iter()
            .zip(meta.dropped)
            .map(|(r, n)| ((*r).to_owned(), n))
            .collect(),
        oldest_accepted_ms: oldest_accepted(&conn).map_err(sql)?,
    })
}

struct Writer {
    path: PathBuf,
    conn: Connection,
    state: Connection,
    config: OutboxConfig,
    next_seq: u64,
    reserved_end: u64,
    meta: Meta,
    counters: Arc<Counters>,
    committed_tx: watch::Sender<Seq>,
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

impl Writer {
    fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let _span = tracing::info_span!("outbox-writer").entered();
        let mut batch = Vec::new();
        while let Some(first) = cmd_rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_COMMANDS_PER_COMMIT {
                match cmd_rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
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
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
    }

    fn commit_batch(&mut self, batch: Vec<Command>) {
        let saved_meta = self.meta.clone();
        let saved_next = self.next_seq;
        let needed: u64 = batch
            .iter()
            .map(|c| match c {
                Command::Append { bodies, .. } => bodies.len() as u64,
                _ => 0,
            })
            .sum();
        let reserve_error = self.reserve(needed).err();

        let mut replies = Vec::new();
        let result = self.apply(batch, reserve_error.as_ref(), &mut replies);
        match result {
            Ok(()) => {
                self.publish_counters();
                let last = Seq(self.next_seq.saturating_sub(1));
                if self.next_seq != saved_next {
                    self.committed_tx.send_replace(last);
                }
                for r in replies {
                    match r {
                        Reply::Append(tx, res) => {
                            let _ = tx.send(res);
                        }
                        Reply::Purge(tx, res) => {
                            let _ = tx.send(res);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "outbox commit failed");
                self.meta = saved_meta;
                self.next_seq = saved_next;
                let msg = e.to_string();
                for r in replies {
                    match r {
                        Reply::Append(tx, _) => {
                            let _ = tx.send(Err(AppendError::Storage(msg.clone())));
                        }
                        Reply::Purge(tx, _) => {
                            let _ = tx.send(Err(AppendError::Storage(msg.clone())));
                        }
                    }
                }
            }
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

    fn apply(
        &mut self,
        batch: Vec<Command>,
        reserve_error: Option<&rusqlite::Error>,
        replies: &mut Vec<Reply>,
    ) -> rusqlite::Result<()> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for cmd in batch {
            match cmd {
                Command::Append { bodies, reply } => {
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
                        &mut self.meta,
                        &mut self.next_seq,
                        now,
                        bodies,
                    )?;
                    replies.push(Reply::Append(reply, res));
                }
                Command::Ack(seqs) => {
                    let n = delete_seqs(&tx, &mut self.meta, &seqs)?;
                    self.meta.acked += n;
                }
                Command::DropCorrupt(seqs) => {
                    let n = delete_seqs(&tx, &mut self.meta, &seqs)?;
                    self.meta.dropped[4] += n;
                }
                Command::Expire => {
                    let cutoff = now.saturating_sub(to_i64(self.config.max_age.as_millis() as u64));
                    let n = delete_head_older_than(
                        &tx,
                        &mut self.meta,
                        cutoff,
                        MAX_EXPIRED_PER_COMMIT,
                    )?;
                    self.meta.dropped[1] += n;
                }
                Command::Purge { older_than, reply } => {
                    let cutoff = now.saturating_sub(to_i64(older_than.as_millis() as u64));
                    let n = delete_head_older_than(&tx, &mut self.meta, cutoff, usize::MAX)?;
                    self.meta.dropped[2] += n;
                    replies.push(Reply::Purge(reply, Ok(n)));
                }
                Command::Shutdown => {}
            }
        }
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?;
            for (k, v) in META_KEYS.iter().zip(self.meta.values()) {
                stmt.execute(params![k, to_i64(v)])?;
            }
        }
        tx.commit()
    }

    fn publish_counters(&self) {
        let c = &self.counters;
        c.records.store(self.meta.records, Ordering::Relaxed);
        c.bytes.store(self.meta.bytes, Ordering::Relaxed);
        c.acked.store(self.meta.acked, Ordering::Relaxed);
        for (a, v) in c.dropped.iter().zip(self.meta.dropped) {
            a.store(v, Ordering::Relaxed);
        }
    }
}

fn append(
    tx: &rusqlite::Transaction<'_>,
    config: &OutboxConfig,
    meta: &mut Meta,
    next_seq: &mut u64,
    now: i64,
    bodies: Vec<Vec<u8>>,
) -> rusqlite::Result<Result<AppendReceipt, AppendError>> {
    if bodies.is_empty() {
        let last = Seq(next_seq.saturating_sub(1));
        return Ok(Ok(AppendReceipt { first: last, last }));
    }
    let size: u64 = bodies.iter().map(|b| b.len() as u64 + ROW_OVERHEAD).sum();
    let n = bodies.len() as u64;
    if size > config.max_bytes {
        meta.dropped[3] += n;
        return Ok(Err(AppendError::Full));
    }
    if meta.bytes + size > config.max_bytes {
        match config.when_full {
            WhenFull::Reject => {
                meta.dropped[3] += n;
                return Ok(Err(AppendError::Full));
            }
            WhenFull::DropOldest => {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM records WHERE seq = (SELECT min(seq) FROM records) RETURNING len",
                )?;
                while meta.bytes + size > config.max_bytes {
                    let len: Option<i64> = stmt.query_row([], |r| r.get(0)).optional()?;
                    let Some(len) = len else { break };
                    meta.records = meta.records.saturating_sub(1);
                    meta.bytes = meta.bytes.saturating_sub(to_u64(len));
                    meta.dropped[0] += 1;
                }
            }
        }
    }
    let first = *next_seq;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO records (seq, accepted_ms, len, body) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for body in bodies {
        let len = body.len() as u64 + ROW_OVERHEAD;
        stmt.execute(params![to_i64(*next_seq), now, to_i64(len), body])?;
        *next_seq += 1;
        meta.records += 1;
        meta.bytes += len;
    }
    Ok(Ok(AppendReceipt {
        first: Seq(first),
        last: Seq(*next_seq - 1),
    }))
}

fn delete_seqs(
    tx: &rusqlite::Transaction<'_>,
    meta: &mut Meta,
    seqs: &[Seq],
) -> rusqlite::Result<u64> {
    let mut stmt = tx.prepare_cached("DELETE FROM records WHERE seq = ?1 RETURNING len")?;
    let mut n = 0;
    for s in seqs {
        let len: Option<i64> = stmt.query_row([to_i64(s.0)], |r| r.get(0)).optional()?;
        if let Some(len) = len {
            n += 1;
            meta.records = meta.records.saturating_sub(1);
            meta.bytes = meta.bytes.saturating_sub(to_u64(len));
        }
    }
    Ok(n)
}

fn delete_head_older_than(
    tx: &rusqlite::Transaction<'_>,
    meta: &mut Meta,
    cutoff_ms: i64,
    max: usize,
) -> rusqlite::Result<u64> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM records WHERE seq = (SELECT min(seq) FROM records) AND accepted_ms < ?1 RETURNING len",
    )?;
    let mut n = 0u64;
    while (n as usize) < max {
        let len: Option<i64> = stmt.query_row([cutoff_ms], |r| r.get(0)).optional()?;
        let Some(len) = len else { break };
        n += 1;
        meta.records = meta.records.saturating_sub(1);
        meta.bytes = meta.bytes.saturating_sub(to_u64(len));
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
