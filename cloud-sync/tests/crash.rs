//! The outbox under `kill -9` (DESIGN.md invariants 1 and 2).
//!
//! The test binary is its own child process: `crash_child` does nothing
//! unless `SLUICE_CRASH_CHILD_DIR` is set, and then appends to the outbox in
//! that dir from several tasks until it is killed, printing one line per
//! acknowledged append *after* `append` returned:
//!
//! ```text
//! A <first_seq> <last_seq> <writer> <n_first> <count>
//! ```
//!
//! With `SLUICE_CRASH_CHILD_DRAIN=1` a drainer also leases after a cursor and
//! acks what it leased, like the uplink, printing `D <seq>...` *before* the
//! ack, so a record not named on a `D` line must still be stored.
//!
//! The parent kills the child with SIGKILL at a pseudo-random moment
//! (deterministic seed), then checks the file it left: every acknowledged
//! record is stored exactly once unless it was drained, nothing deleted comes
//! back, seqs are never handed out twice (also across the restart: the parent
//! appends one record after reopening), `quick_check` passes and the meta
//! totals agree with the rows. Each state dir lives for several kills, so
//! recovery from a crash is itself crashed into.

// A failed set-up step or a broken invariant is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rusqlite::{Connection, OpenFlags};
use sluice_cloud_sync::clock::{Clock, ClockMode};
use sluice_cloud_sync::outbox::read_stats;
use sluice_cloud_sync::{DeviceName, Durability, Outbox, OutboxConfig, Record, Seq, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const DIR_ENV: &str = "SLUICE_CRASH_CHILD_DIR";
const DRAIN_ENV: &str = "SLUICE_CRASH_CHILD_DRAIN";
const WRITER_BASE_ENV: &str = "SLUICE_CRASH_CHILD_WRITER_BASE";

/// Concurrent appending tasks in the child.
const WRITERS: u64 = 4;
/// Writer ids used per round: the child's writers plus the parent's append
/// after reopening.
const WRITER_IDS_PER_ROUND: u64 = WRITERS + 1;
/// Kills one state dir survives before a fresh one is started.
const ROUNDS_PER_DIR: u64 = 10;
/// How long the child may run on its own; the parent kills it long before.
/// This only stops an orphan whose parent died.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// Bound on every wait for the child.
const CHILD_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The child.

#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let drain = std::env::var(DRAIN_ENV).is_ok_and(|v| v == "1");
    let writer_base: u64 = std::env::var(WRITER_BASE_ENV)
        .expect("writer base")
        .parse()
        .expect("writer base is a number");
    // libtest has printed "test crash_child ... " without a newline; end it
    // so the first protocol line starts a line of its own.
    say("\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let outbox = open(&dir);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            tasks.spawn(append_forever(outbox.clone(), writer_base + w));
        }
        if drain {
            tasks.spawn(drain_forever(outbox.clone()));
        }
        match tokio::time::timeout(CHILD_LIFETIME, tasks.join_next()).await {
            Ok(Some(Err(e))) => panic!("child task failed: {e}"),
            Ok(_) => panic!("a child task ended"),
            Err(_) => panic!("child was never killed"),
        }
    });
}

async fn append_forever(outbox: Outbox, writer: u64) {
    let mut rng = Lcg(writer);
    let mut n = 0;
    loop {
        let count = 1 + rng.below(20);
        let records: Vec<Record> = (n..n + count).map(|i| reading(writer, i)).collect();
        let receipt = outbox.append(&records).await.expect("append");
        say(&format!(
            "A {} {} {writer} {n} {count}\n",
            receipt.first, receipt.last
        ));
        n += count;
    }
}

async fn drain_forever(outbox: Outbox) {
    let mut committed = outbox.committed();
    let mut rng = Lcg(0xd7a1);
    let mut cursor = Seq(0);
    loop {
        let leased = outbox
            .lease_after(cursor, 64, 1 << 20)
            .await
            .expect("lease");
        let Some(last) = leased.last() else {
            // The timeout only covers a change missed between lease and wait.
            let _ = tokio::time::timeout(Duration::from_millis(20), committed.changed()).await;
            continue;
        };
        cursor = last.seq;
        // The broker's PUBACK takes a moment; the backlog grows meanwhile.
        tokio::time::sleep(Duration::from_micros(500 + 500 * rng.below(4))).await;
        let mut line = String::from("D");
        for l in &leased {
            write!(line, " {}", l.seq).unwrap();
        }
        line.push('\n');
        say(&line);
        outbox
            .ack(leased.iter().map(|l| l.seq).collect())
            .await
            .expect("ack");
    }
}

/// Writes one whole line with one `write(2)` (a pipe keeps writes up to
/// PIPE_BUF whole), so a kill never leaves half a line that parses.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

// ---------------------------------------------------------------------------
// Records and the outbox, shared by child and parent.

/// Builds every record of this test (the one place to adapt if `Record`
/// grows a field); `(writer, n)` is unique across a whole test.
fn reading(writer: u64, n: u64) -> Record {
    Record {
        device: DeviceName::new(format!("dev-{writer}")),
        ts_ms: 1_700_000_000_000 + i64::try_from(n).unwrap(),
        ts_trusted: true,
        values: vec![
            ("writer".into(), Value::I64(i64::try_from(writer).unwrap())),
            ("n".into(), Value::I64(i64::try_from(n).unwrap())),
            ("t".into(), Value::F64(20.0 + (n % 100) as f64 / 10.0)),
        ],
    }
}

/// The `(writer, n)` a stored record was built with.
fn identity(record: &Record) -> (u64, u64) {
    let get = |key: &str| {
        record
            .values
            .iter()
            .find_map(|(k, v)| match v {
                Value::I64(i) if k == key => Some(u64::try_from(*i).unwrap()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("stored record without {key}: {record:?}"))
    };
    (get("writer"), get("n"))
}

fn outbox_path(dir: &Path) -> PathBuf {
    dir.join("outbox.db")
}

fn open(dir: &Path) -> Outbox {
    Outbox::open(
        &outbox_path(dir),
        &dir.join("state.db"),
        OutboxConfig {
            durability: Durability::Power,
            ..OutboxConfig::default()
        },
        Arc::new(Clock::new(ClockMode::Trusted)),
    )
    .expect("open outbox")
}

/// A deterministic pseudo-random sequence (Knuth's MMIX LCG).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

// ---------------------------------------------------------------------------
// The parent.

#[test]
fn outbox_survives_200_sigkills_while_appending() {
    survive_sigkills(200, false, 0x5eed_0001);
}

#[test]
fn outbox_survives_sigkills_while_appending_and_draining() {
    survive_sigkills(100, true, 0x5eed_0002);
}

fn survive_sigkills(rounds: u64, drain: bool, seed: u64) {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = Lcg(seed);
    let mut scratch = None;
    let mut ledger = Ledger::default();
    let (mut acked_total, mut drained_total) = (0, 0);
    for round in 0..rounds {
        if round % ROUNDS_PER_DIR == 0 {
            scratch = Some(tempfile::tempdir().unwrap());
            ledger = Ledger::default();
        }
        let dir = scratch.as_ref().unwrap().path();
        let kill = if rng.below(8) == 0 {
            // Into start-up: opening, migrating, the first commits.
            Kill::AfterSpawn(Duration::from_millis(rng.below(25)))
        } else {
            Kill::AfterFirstAck(Duration::from_millis(5 + rng.below(76)))
        };
        let writer_base = round * WRITER_IDS_PER_ROUND;
        let transcript = run_child(dir, drain, writer_base, kill);
        let context = format!("round {round} ({kill:?}, dir {})", dir.display());
        acked_total += transcript.appends.iter().map(|a| a.count).sum::<u64>();
        drained_total += transcript.drained.len();
        ledger.check_after_crash(dir, &transcript, &context);

        // Restart: the next seq handed out is above every seq ever printed.
        let outbox = open(dir);
        let writer = writer_base + WRITERS;
        let receipt = rt
            .block_on(outbox.append(&[reading(writer, 0)]))
            .expect("append after reopen");
        assert!(
            receipt.first.0 > ledger.max_seq,
            "{context}: seq {} after restart reuses a seq (highest seen {})",
            receipt.first,
            ledger.max_seq
        );
        rt.block_on(outbox.close());
        ledger.record_own_append(writer, receipt.first.0);
    }
    eprintln!(
        "{rounds} kills ({}), {acked_total} acknowledged records, {drained_total} drained, in {:?}",
        if drain {
            "appending and draining"
        } else {
            "appending"
        },
        started.elapsed()
    );
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    AfterSpawn(Duration),
    AfterFirstAck(Duration),
}

/// One acknowledged append, as the child printed it.
#[derive(Debug)]
struct Append {
    first: u64,
    last: u64,
    writer: u64,
    n_first: u64,
    count: u64,
}

/// What a killed child printed.
#[derive(Debug, Default)]
struct Transcript {
    appends: Vec<Append>,
    drained: Vec<u64>,
}

fn parse(lines: &[String]) -> Transcript {
    let mut t = Transcript::default();
    for line in lines {
        let mut words = line.split_whitespace();
        let num = |w: Option<&str>| -> u64 {
            w.and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("bad child line {line:?}"))
        };
        match words.next() {
            Some("A") => {
                let a = Append {
                    first: num(words.next()),
                    last: num(words.next()),
                    writer: num(words.next()),
                    n_first: num(words.next()),
                    count: num(words.next()),
                };
                assert_eq!(a.last + 1 - a.first, a.count, "receipt range in {line:?}");
                t.appends.push(a);
            }
            Some("D") => t.drained.extend(words.map(|w| num(Some(w)))),
            _ => {}
        }
    }
    t
}

/// The child's stdout, read on a thread: complete lines only (a kill may cut
/// the last one), and whether the pipe has closed.
#[derive(Default)]
struct Output {
    lines: Vec<String>,
    acks: usize,
    closed: bool,
}

fn run_child(dir: &Path, drain: bool, writer_base: u64, kill: Kill) -> Transcript {
    let stderr_path = dir.join("child.stderr");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(DIR_ENV, dir)
            .env(DRAIN_ENV, if drain { "1" } else { "0" })
            .env(WRITER_BASE_ENV, writer_base.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let spawned = Instant::now();
    let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
    let reader = {
        let output = output.clone();
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        std::thread::spawn(move || {
            let (lock, cvar) = &*output;
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdout.read_line(&mut line).unwrap_or(0);
                let mut out = lock.lock().unwrap();
                if n == 0 || !line.ends_with('\n') {
                    out.closed = true;
                    cvar.notify_all();
                    return;
                }
                if line.starts_with("A ") {
                    out.acks += 1;
                }
                out.lines.push(line.clone());
                cvar.notify_all();
            }
        })
    };
    let child_failed = |why: &str| -> ! {
        panic!(
            "child {why}; its stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    };

    match kill {
        Kill::AfterSpawn(d) => pause(d.saturating_sub(spawned.elapsed())),
        Kill::AfterFirstAck(d) => {
            let got = wait_output(&output, |o| o.acks > 0 || o.closed);
            if !got || output.0.lock().unwrap().acks == 0 {
                child_failed("acknowledged no append");
            }
            pause(d);
        }
    }
    // SIGKILL, by the handle of the process we spawned.
    if child.0.kill().is_err() {
        child_failed("ended before it was killed");
    }
    let status = wait_exit(&mut child.0);
    if status.signal() != Some(9) {
        child_failed(&format!("ended with {status}, not by SIGKILL"));
    }
    if !wait_output(&output, |o| o.closed) {
        panic!("the killed child's stdout never closed");
    }
    reader.join().unwrap();
    let lines = std::mem::take(&mut output.0.lock().unwrap().lines);
    parse(&lines)
}

/// Waits until `cond` holds on the child's output or the deadline passes;
/// returns whether it holds.
fn wait_output(output: &(Mutex<Output>, Condvar), cond: impl Fn(&Output) -> bool) -> bool {
    let (lock, cvar) = output;
    let guard = lock.lock().unwrap();
    let (guard, _) = cvar
        .wait_timeout_while(guard, CHILD_DEADLINE, |o| !cond(o))
        .unwrap();
    cond(&guard)
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let end = Instant::now() + CHILD_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < end, "killed child did not exit");
        pause(Duration::from_millis(1));
    }
}

/// Sleeps the test thread. Only pacing (when to pull the plug, how often to
/// look for an exit status); every wait for a result has a deadline.
#[allow(clippy::disallowed_methods)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Kills and reaps the child if the parent panics mid-round.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// What one state dir has promised so far, and the checks against it.

#[derive(Default)]
struct Ledger {
    /// Every acknowledged record: `(writer, n)` → its seq.
    acked: BTreeMap<(u64, u64), u64>,
    /// Seqs a drainer acked (or was about to): they may be gone.
    drained: BTreeSet<u64>,
    /// The highest seq printed, stored or handed out so far.
    max_seq: u64,
    /// Seqs stored at the last look; no seq up to `max_seq` may appear that
    /// was not among them (a deleted record never comes back).
    stored: BTreeSet<u64>,
}

impl Ledger {
    fn check_after_crash(&mut self, dir: &Path, t: &Transcript, context: &str) {
        // Seqs printed this round: new, and never handed out twice.
        let mut printed = BTreeSet::new();
        for a in &t.appends {
            assert!(
                a.first > self.max_seq,
                "{context}: append got seq {} but {} was handed out before",
                a.first,
                self.max_seq
            );
            for i in 0..a.count {
                let seq = a.first + i;
                assert!(printed.insert(seq), "{context}: seq {seq} handed out twice");
                let before = self.acked.insert((a.writer, a.n_first + i), seq);
                assert!(before.is_none(), "{context}: record printed twice");
            }
        }
        self.drained.extend(&t.drained);

        let db = outbox_path(dir);
        let rows = stored_rows(&db, context);
        for (&(writer, n), &seq) in &self.acked {
            match rows.get(&seq) {
                Some(&(_, id)) => {
                    assert_eq!(id, (writer, n), "{context}: seq {seq} holds another record")
                }
                None => assert!(
                    self.drained.contains(&seq),
                    "{context}: acknowledged record (writer {writer}, n {n}) at seq {seq} \
                     is lost; it was never drained"
                ),
            }
        }
        let mut ids = BTreeMap::new();
        for (&seq, &(_, id)) in &rows {
            if let Some(other) = ids.insert(id, seq) {
                panic!("{context}: record {id:?} stored twice, as seqs {other} and {seq}");
            }
            assert!(
                seq > self.max_seq || self.stored.contains(&seq),
                "{context}: seq {seq} was deleted and has come back"
            );
        }
        self.max_seq = self
            .max_seq
            .max(printed.last().copied().unwrap_or(0))
            .max(t.drained.iter().copied().max().unwrap_or(0))
            .max(rows.keys().last().copied().unwrap_or(0));
        self.stored = rows.into_keys().collect();
    }

    fn record_own_append(&mut self, writer: u64, seq: u64) {
        self.acked.insert((writer, 0), seq);
        self.stored.insert(seq);
        self.max_seq = seq;
    }
}

/// Reads every row of the outbox file read-only, after checking the file
/// (`quick_check`) and that its meta totals agree with its rows. Seq →
/// (accounted length, `(writer, n)`). A file the child never finished
/// creating has no rows.
fn stored_rows(db: &Path, context: &str) -> BTreeMap<u64, (u64, (u64, u64))> {
    let mut rows = BTreeMap::new();
    if !db.exists() {
        return rows;
    }
    // A kill before the file reached WAL mode can leave a hot rollback
    // journal, which only a writing connection may roll back (as the outbox's
    // own open does); otherwise look without writing.
    let flags = if db.with_extension("db-journal").exists() {
        OpenFlags::default()
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let conn = Connection::open_with_flags(db, flags).unwrap();
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap_or_else(|e| {
            let files: Vec<_> = std::fs::read_dir(db.parent().unwrap())
                .unwrap()
                .map(|f| f.unwrap().file_name())
                .collect();
            panic!("{context}: quick_check failed: {e}; files: {files:?}")
        });
    assert_eq!(check, "ok", "{context}: quick_check");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'records'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if tables == 0 {
        return rows;
    }
    let mut stmt = conn
        .prepare("SELECT seq, len, body FROM records ORDER BY seq")
        .unwrap();
    let mut q = stmt.query([]).unwrap();
    while let Some(row) = q.next().unwrap() {
        let seq: i64 = row.get(0).unwrap();
        let len: i64 = row.get(1).unwrap();
        let body: Vec<u8> = row.get(2).unwrap();
        let record = Record::decode(&body)
            .unwrap_or_else(|e| panic!("{context}: seq {seq} is undecodable: {e}"));
        rows.insert(
            u64::try_from(seq).unwrap(),
            (u64::try_from(len).unwrap(), identity(&record)),
        );
    }
    let count: i64 = conn
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(usize::try_from(count).unwrap(), rows.len());
    let stats = read_stats(db).unwrap();
    assert_eq!(
        stats.records,
        rows.len() as u64,
        "{context}: meta says {} records, the table holds {}",
        stats.records,
        rows.len()
    );
    let bytes: u64 = rows.values().map(|(len, _)| len).sum();
    assert_eq!(
        stats.bytes, bytes,
        "{context}: meta says {} bytes, the rows add up to {bytes}",
        stats.bytes
    );
    rows
}
