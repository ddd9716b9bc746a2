//! Gateway self-update hooks: hand a verified image to the system's A/B
//! installer (RAUC, Mender, SWUpdate …), then, after the restart that
//! follows, commit it once the uplink is healthy or roll it back.
//!
//! The daemon runs unprivileged and sandboxed, so with `firmware.handoff =
//! "systemd"` it never runs the installer itself: it starts the privileged
//! oneshot `sluice-update@<sha256>.service` (`systemctl start --no-block`,
//! allowed for the `sluice` user by the polkit rule
//! `systemd/50-sluice-update.rules`), which runs `sluice firmware install
//! <sha256>` ([`install`]) as root. `handoff = "direct"` runs
//! `firmware.install_command` in the calling process, for systems without
//! systemd. Commands are `/bin/sh -c` lines with `{path}` replaced by the
//! shell-quoted image path and `SLUICE_FW_TITLE`, `SLUICE_FW_VERSION`,
//! `SLUICE_FW_SHA256` (and `SLUICE_FW_PATH` for the installer) in their
//! environment; their output goes to the log; each runs in its own process
//! group, killed as a whole when it overruns ([`INSTALL_TIMEOUT`],
//! [`HOOK_TIMEOUT`]). See `docs/firmware.md` for the life cycle and a
//! worked RAUC example.
//!
//! Files, in `state_dir/firmware/` (beside `ready/`, where the image is):
//! - `gateway-pending.json` — the pending-update marker
//!   `{"title","version","sha256","from_version","requested_ms",
//!   "handoff_pid","confirm_attempts","install_error"?}`, written before the
//!   installer starts and removed once the update is committed, rolled back
//!   or its hand-off failed. The privileged installer adds `install_error`
//!   when the install command fails; the daemon reports that at its next
//!   start and removes the marker.
//! - `gateway.json` — the installed record `{"title","version","sha256",
//!   "committed_ms"}`, written at commit: the anti-rollback floor
//!   ([`installed_version`]).
//!
//! Durability: both are written to a temp file, fsynced, renamed over and
//! the directory fsynced, so a power cut leaves the old or the new file,
//! never half of one. What a crash can do: between the marker write and the
//! installer's end, the next start finds a marker for an install that may
//! not have happened; it is confirmed like any other (a commit then marks
//! the slot that booted, the old one, good — harmless with RAUC — but
//! `gateway.json` names the new version). A daemon that keeps restarting
//! before its uplink confirms rolls back at the fourth start
//! ([`MAX_CONFIRM_ATTEMPTS`]).
//!
//! The confirmation itself ([`confirm`]) is decided by `Decision` /
//! `Verdict`, plain functions of the marker and what happened, tested
//! without processes; the command runs are the only I/O.

use crate::config::{Config, Handoff};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use sluice_firmware::lwm2m::{UpdateResult, UpdateState};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The pending-update marker, in the firmware dir.
pub const PENDING_FILE: &str = "gateway-pending.json";
/// The installed record, in the firmware dir.
pub const INSTALLED_FILE: &str = "gateway.json";
/// How long an install command may run before it is killed.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a commit or rollback command (and `systemctl start`) may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Starts with a pending marker before the update is rolled back without
/// waiting for the uplink (a daemon that crashes before its uplink is up
/// would otherwise wait `confirm_timeout` afresh at every restart).
pub const MAX_CONFIRM_ATTEMPTS: u32 = 3;
/// How often [`confirm`] looks at the uplink.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long to wait for a command's output to drain after it exited (a
/// grandchild may hold the pipes open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How long to wait for a killed process group to be reaped.
const KILL_REAP: Duration = Duration::from_secs(10);

/// Why a self-update step failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfUpdateError {
    /// `firmware.install_command` is not set.
    #[error(
        "gateway self-update is off: set firmware.install_command (e.g. \"rauc install {{path}}\")"
    )]
    Disabled,
    /// Not a SHA-256 in lower-case hex.
    #[error("{0:?} is not a SHA-256 (64 lower-case hex digits)")]
    BadSha256(String),
    /// The image is not a staged image of the firmware store.
    #[error("{path}: not a staged image (gateway images must be {ready}/<sha256>.bin)")]
    NotStaged {
        /// The image given.
        path: PathBuf,
        /// Where staged images live.
        ready: PathBuf,
    },
    /// The image's bytes do not hash to what was expected.
    #[error("{path}: SHA-256 is {actual}, expected {expected}")]
    HashMismatch {
        /// The image.
        path: PathBuf,
        /// The expected hash.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Another gateway update is waiting for its restart.
    #[error(
        "gateway update {version} (sha256 {sha256}) is already pending: it is committed or rolled back at the next start of the daemon (delete {path} to abandon it)"
    )]
    AlreadyPending {
        /// The pending version.
        version: String,
        /// The pending image.
        sha256: String,
        /// The marker.
        path: PathBuf,
    },
    /// `sluice firmware install` was run for an image no marker names.
    #[error(
        "no pending gateway update for sha256 {sha256} in {path}: hand images over with `sluice firmware stage --gateway`"
    )]
    NotPending {
        /// The image asked for.
        sha256: String,
        /// The marker that is missing or names another image.
        path: PathBuf,
    },
    /// A record file is not what this module writes.
    #[error("{path}: damaged record: {reason}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A command could not be started.
    #[error("{hook} `{command}` could not be started: {source}")]
    Spawn {
        /// `install_command`, `commit_command`, `rollback_command` or
        /// `systemctl`.
        hook: &'static str,
        /// The command line.
        command: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A command ended unsuccessfully.
    #[error("{hook} `{command}` {}{}", exit_text(*.exit_code), last_line_text(.last_stderr))]
    CommandFailed {
        /// Which command.
        hook: &'static str,
        /// The command line.
        command: String,
        /// Its exit code (`None`: killed by a signal).
        exit_code: Option<i32>,
        /// The last non-empty line it wrote to stderr.
        last_stderr: String,
    },
    /// A command overran its time and was killed with its process group.
    #[error("{hook} `{command}` did not finish within {}s and was killed", .timeout.as_secs())]
    TimedOut {
        /// Which command.
        hook: &'static str,
        /// The command line.
        command: String,
        /// Its limit.
        timeout: Duration,
    },
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with {c}"),
        None => "was killed by a signal".into(),
    }
}

fn last_line_text(line: &str) -> String {
    if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

impl SelfUpdateError {
    /// The failed command's exit code, when a command failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Self::CommandFailed { exit_code, .. } => *exit_code,
            _ => None,
        }
    }
}

/// What [`hand_off`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOff {
    /// The privileged unit was started (`systemctl start --no-block`); it
    /// installs in the background.
    Started {
        /// `sluice-update@<sha256>.service`.
        unit: String,
    },
    /// The install command ran in this process and succeeded.
    Installed,
}

/// The pending-update marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingUpdate {
    title: String,
    version: String,
    sha256: String,
    from_version: String,
    requested_ms: i64,
    /// The process that handed the image off: a start in that same process
    /// (an in-process restart) is not the restart that follows the install.
    #[serde(default)]
    handoff_pid: u32,
    /// Daemon starts that began confirming this update.
    #[serde(default)]
    confirm_attempts: u32,
    /// Set by the privileged installer when the install command failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    install_error: Option<InstallError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InstallError {
    exit_code: Option<i32>,
    error: String,
}

/// The installed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InstalledGateway {
    title: String,
    version: String,
    sha256: String,
    committed_ms: i64,
}

/// The version the gateway runs: the one last committed by a self-update
/// (`gateway.json`), else `firmware.gateway_version` (sluice's own version
/// unless set). The anti-rollback floor for gateway images.
///
/// A damaged `gateway.json` is logged and ignored.
pub fn installed_version(cfg: &Config) -> String {
    let path = cfg.firmware_dir().join(INSTALLED_FILE);
    match read_json::<InstalledGateway>(&path) {
        Ok(Some(rec)) => rec.version,
        Ok(None) => cfg.firmware.gateway_version.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the installed-gateway record");
            cfg.firmware.gateway_version.clone()
        }
    }
}

/// The image of the pending gateway update, if one is pending: the
/// firmware store keeps it until the update is committed or rolled back.
///
/// Fails when the marker cannot be read or is damaged.
pub fn pending_sha256(cfg: &Config) -> Result<Option<String>, SelfUpdateError> {
    Ok(read_json::<PendingUpdate>(&cfg.firmware_dir().join(PENDING_FILE))?.map(|m| m.sha256))
}

/// Hands the staged, verified `image` (`firmware_dir()/ready/<sha256>.bin`)
/// to the installer: writes the pending marker, then starts
/// `sluice-update@<sha256>.service` (`handoff = "systemd"`, returns once
/// systemd queued it) or runs `install_command` here (`handoff = "direct"`,
/// returns when it finished, up to [`INSTALL_TIMEOUT`]). Blocking: call it
/// from `spawn_blocking` in async code.
///
/// Fails when self-update is off, `sha256` is malformed, the image is not a
/// staged image or does not hash to `sha256`, another update is pending,
/// the marker cannot be written, or `systemctl`/the install command fails
/// (then the marker is removed again).
pub fn hand_off(
    cfg: &Config,
    image: &Path,
    sha256: &str,
    title: &str,
    version: &str,
) -> Result<HandOff, SelfUpdateError> {
    let install_command = cfg
        .firmware
        .install_command
        .as_deref()
        .ok_or(SelfUpdateError::Disabled)?;
    check_sha256(sha256)?;
    let dir = cfg.firmware_dir();
    let ready = dir.join("ready");
    let staged = ready.join(format!("{sha256}.bin"));
    let canonical = |p: &Path| {
        std::fs::canonicalize(p).map_err(|source| SelfUpdateError::Io {
            path: p.to_owned(),
            source,
        })
    };
    if canonical(image)? != canonical(&staged).map_err(|_| not_staged(image, &ready))? {
        return Err(not_staged(image, &ready));
    }
    verify(&staged, sha256)?;
    let marker_path = dir.join(PENDING_FILE);
    if let Some(old) = read_json::<PendingUpdate>(&marker_path)? {
        if old.install_error.is_none() {
            return Err(SelfUpdateError::AlreadyPending {
                version: old.version,
                sha256: old.sha256,
                path: marker_path,
            });
        }
        tracing::warn!(version = %old.version, sha256 = %old.sha256,
            "replacing the marker of a gateway update whose install failed");
    }
    let marker = PendingUpdate {
        title: title.to_owned(),
        version: version.to_owned(),
        sha256: sha256.to_owned(),
        from_version: installed_version(cfg),
        requested_ms: now_ms(),
        handoff_pid: std::process::id(),
        confirm_attempts: 0,
        install_error: None,
    };
    write_json(&marker_path, &marker)?;
    tracing::info!(title, version, sha256, from_version = %marker.from_version,
        handoff = ?cfg.firmware.handoff, "handing a gateway image to the installer");
    let outcome = match cfg.firmware.handoff {
        Handoff::Systemd => {
            let unit = format!("sluice-update@{sha256}.service");
            run_command(
                "systemctl",
                "systemctl",
                &["systemctl", "start", "--no-block", &unit],
                &[],
                HOOK_TIMEOUT,
            )
            .map(|()| HandOff::Started { unit })
        }
        Handoff::Direct => {
            run_install(install_command, &staged, &marker).map(|()| HandOff::Installed)
        }
    };
    if outcome.is_err() {
        remove(&marker_path);
    }
    outcome
}

/// What the privileged `sluice-update@<sha256>.service` runs (`sluice
/// firmware install <sha256>`): re-verifies `ready/<sha256>.bin` and runs
/// `install_command` on it (up to [`INSTALL_TIMEOUT`]). A failure is also
/// written into the pending marker, for the daemon to report at its next
/// start.
///
/// Fails when self-update is off, `sha256` is malformed or names no staged
/// image, the image's bytes do not match, no pending marker names it, or
/// the install command fails.
pub fn install(cfg: &Config, sha256: &str) -> Result<(), SelfUpdateError> {
    let install_command = cfg
        .firmware
        .install_command
        .as_deref()
        .ok_or(SelfUpdateError::Disabled)?;
    check_sha256(sha256)?;
    let dir = cfg.firmware_dir();
    let image = dir.join("ready").join(format!("{sha256}.bin"));
    if !image.is_file() {
        return Err(not_staged(&image, &dir.join("ready")));
    }
    verify(&image, sha256)?;
    let marker_path = dir.join(PENDING_FILE);
    let marker = read_json::<PendingUpdate>(&marker_path)?
        .filter(|m| m.sha256 == sha256 && m.install_error.is_none())
        .ok_or_else(|| SelfUpdateError::NotPending {
            sha256: sha256.to_owned(),
            path: marker_path.clone(),
        })?;
    let result = run_install(install_command, &image, &marker);
    if let Err(e) = &result {
        let failed = PendingUpdate {
            install_error: Some(InstallError {
                exit_code: e.exit_code(),
                error: e.to_string(),
            }),
            ..marker
        };
        if let Err(w) = write_json(&marker_path, &failed) {
            tracing::error!(error = %w, "cannot record the failed install in the marker");
        }
    }
    result
}

fn run_install(
    template: &str,
    image: &Path,
    marker: &PendingUpdate,
) -> Result<(), SelfUpdateError> {
    let path = image.to_string_lossy();
    let line = template.replace("{path}", &shell_quote(&path));
    let mut env = fw_env(marker);
    env.push(("SLUICE_FW_PATH", path.into_owned()));
    run_command(
        "install_command",
        template,
        &["/bin/sh", "-c", &line],
        &env,
        INSTALL_TIMEOUT,
    )
}

fn run_hook(
    hook: &'static str,
    command: Option<&str>,
    marker: &PendingUpdate,
) -> Result<(), SelfUpdateError> {
    match command {
        None => Ok(()),
        Some(c) => run_command(
            hook,
            c,
            &["/bin/sh", "-c", c],
            &fw_env(marker),
            HOOK_TIMEOUT,
        ),
    }
}

fn fw_env(marker: &PendingUpdate) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE_FW_TITLE", marker.title.clone()),
        ("SLUICE_FW_VERSION", marker.version.clone()),
        ("SLUICE_FW_SHA256", marker.sha256.clone()),
    ]
}

/// At daemon start: if a gateway update is pending, waits up to
/// `firmware.confirm_timeout` for `connected()` (the uplink), then commits it
/// (`commit_command`, `gateway.json`) or rolls it back
/// (`rollback_command`), removes the marker and passes the outcome to
/// `report` (a `P/firmware/state` document, LwM2M object 5 result codes:
/// 1 success, 8 update failed). Without a `[cloud]` nothing can confirm the
/// uplink: the update is committed at once, with a warning.
///
/// Never fails: problems are logged and reported.
pub async fn confirm(cfg: Config, connected: impl Fn() -> bool, report: impl Fn(Json)) {
    let dir = cfg.firmware_dir();
    let marker_path = dir.join(PENDING_FILE);
    let load = {
        let path = marker_path.clone();
        tokio::task::spawn_blocking(move || begin_confirm(&path)).await
    };
    let marker = match load {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the pending gateway update; leaving it alone");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the pending gateway update failed");
            return;
        }
    };
    let decision = Decision::at_start(
        &marker,
        std::process::id(),
        cfg.cloud.is_some(),
        MAX_CONFIRM_ATTEMPTS,
    );
    let verdict = match decision {
        Decision::NotRestartedYet => {
            tracing::info!(version = %marker.version,
                "a gateway update handed off by this process waits for the restart that follows it");
            return;
        }
        Decision::InstallFailed => Verdict::InstallFailed,
        Decision::CommitOffline => {
            tracing::warn!(version = %marker.version,
                "no [cloud] configured: committing the gateway update without an uplink check");
            Verdict::Healthy
        }
        Decision::RollBack => Verdict::CrashLoop,
        Decision::AwaitUplink => {
            tracing::info!(version = %marker.version, timeout_s = cfg.firmware.confirm_timeout.as_secs_f64(),
                "gateway update pending: waiting for the uplink to confirm it");
            let deadline = Instant::now() + cfg.firmware.confirm_timeout;
            loop {
                if connected() {
                    break Verdict::Healthy;
                }
                if Instant::now() >= deadline {
                    break Verdict::UplinkDown;
                }
                tokio::time::sleep(POLL_INTERVAL.min(deadline - Instant::now())).await;
            }
        }
    };
    let finish = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || finish(&cfg, &marker, verdict)).await
    };
    match finish {
        Ok(doc) => report(doc),
        Err(e) => tracing::error!(error = %e, "finishing the gateway update failed"),
    }
}

/// Reads the marker and counts this start as a confirmation attempt.
fn begin_confirm(path: &Path) -> Result<Option<PendingUpdate>, SelfUpdateError> {
    let Some(mut marker) = read_json::<PendingUpdate>(path)? else {
        return Ok(None);
    };
    if marker.handoff_pid != std::process::id() && marker.install_error.is_none() {
        marker.confirm_attempts = marker.confirm_attempts.saturating_add(1);
        write_json(path, &marker)?;
    }
    Ok(Some(marker))
}

/// What to do with a marker found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// This very process handed it off: the restart has not happened yet.
    NotRestartedYet,
    /// The privileged installer recorded a failure: report it.
    InstallFailed,
    /// No cloud to confirm with: commit.
    CommitOffline,
    /// Too many starts without a confirmation: roll back now.
    RollBack,
    /// Wait for the uplink.
    AwaitUplink,
}

impl Decision {
    fn at_start(marker: &PendingUpdate, pid: u32, cloud: bool, max_attempts: u32) -> Self {
        if marker.install_error.is_some() {
            Self::InstallFailed
        } else if marker.handoff_pid == pid {
            Self::NotRestartedYet
        } else if !cloud {
            Self::CommitOffline
        } else if marker.confirm_attempts > max_attempts {
            Self::RollBack
        } else {
            Self::AwaitUplink
        }
    }
}

/// How the confirmation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The uplink came up (or there is none to wait for): commit.
    Healthy,
    /// The uplink stayed down for `confirm_timeout`: roll back.
    UplinkDown,
    /// The daemon restarted too often before confirming: roll back.
    CrashLoop,
    /// The install itself failed: report, nothing to run.
    InstallFailed,
}

/// Runs the commit or rollback command, writes the installed record on a
/// successful commit, removes the marker; returns the report.
fn finish(cfg: &Config, marker: &PendingUpdate, verdict: Verdict) -> Json {
    let dir = cfg.firmware_dir();
    let fw = &cfg.firmware;
    let outcome: Result<(), (String, Option<i32>)> = match verdict {
        Verdict::Healthy => {
            match run_hook("commit_command", fw.commit_command.as_deref(), marker) {
                Ok(()) => {
                    let rec = InstalledGateway {
                        title: marker.title.clone(),
                        version: marker.version.clone(),
                        sha256: marker.sha256.clone(),
                        committed_ms: now_ms(),
                    };
                    write_json(&dir.join(INSTALLED_FILE), &rec).map_err(|e| (e.to_string(), None))
                }
                Err(e) => Err((e.to_string(), e.exit_code())),
            }
        }
        Verdict::UplinkDown | Verdict::CrashLoop => {
            let why = if verdict == Verdict::UplinkDown {
                format!(
                    "the uplink did not connect within {}",
                    human_duration(fw.confirm_timeout)
                )
            } else {
                format!(
                    "the daemon started {} times without its uplink confirming the update",
                    marker.confirm_attempts
                )
            };
            match run_hook("rollback_command", fw.rollback_command.as_deref(), marker) {
                Ok(()) => Err((format!("{why}; rolled back"), None)),
                Err(e) => Err((format!("{why}; rolling back failed: {e}"), e.exit_code())),
            }
        }
        Verdict::InstallFailed => {
            let e = marker.install_error.clone().unwrap_or(InstallError {
                exit_code: None,
                error: "the install failed".into(),
            });
            Err((e.error, e.exit_code))
        }
    };
    remove(&dir.join(PENDING_FILE));
    let mut doc = json!({
        "target": "gateway",
        "title": marker.title,
        "version": marker.version,
        "state": UpdateState::Idle.name(),
    });
    match outcome {
        Ok(()) => {
            tracing::info!(title = %marker.title, version = %marker.version,
                from_version = %marker.from_version, "gateway update committed");
            doc["result"] = json!(UpdateResult::Success.name());
            doc["result_code"] = json!(UpdateResult::Success.code());
        }
        Err((error, exit_code)) => {
            tracing::warn!(title = %marker.title, version = %marker.version,
                error = %error, "gateway update failed");
            doc["result"] = json!(UpdateResult::UpdateFailed.name());
            doc["result_code"] = json!(UpdateResult::UpdateFailed.code());
            doc["error"] = json!(error);
            if let Some(c) = exit_code {
                doc["exit_code"] = json!(c);
            }
        }
    }
    doc
}

fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn check_sha256(sha256: &str) -> Result<(), SelfUpdateError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(())
    } else {
        Err(SelfUpdateError::BadSha256(sha256.to_owned()))
    }
}

fn not_staged(path: &Path, ready: &Path) -> SelfUpdateError {
    SelfUpdateError::NotStaged {
        path: path.to_owned(),
        ready: ready.to_owned(),
    }
}

/// Hashes `path` and compares with `expected`.
fn verify(path: &Path, expected: &str) -> Result<(), SelfUpdateError> {
    let io = |source| SelfUpdateError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let actual: String = hash
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual == expected {
        Ok(())
    } else {
        Err(SelfUpdateError::HashMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

/// `'…'` with embedded quotes escaped: one word for `sh`, whatever it holds.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, SelfUpdateError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SelfUpdateError::BadRecord {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SelfUpdateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `value` to `path` atomically: temp file, fsync, rename, fsync of
/// the directory. The file is given to the directory's owner, so a record
/// written by the root installer stays the daemon's to replace.
fn write_json(path: &Path, value: &impl Serialize) -> Result<(), SelfUpdateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| SelfUpdateError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map_or_else(|| "record".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| SelfUpdateError::BadRecord {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    if let Ok(meta) = std::fs::metadata(dir) {
        // Best effort: only root can give a file away, and only root needs to.
        let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot remove the pending gateway update marker")
        }
    }
}

/// Runs `argv` with `env`, stdin closed, its stdout/stderr lines logged,
/// in a new process group that is killed (SIGKILL) when it overruns
/// `timeout`. Blocking.
fn run_command(
    hook: &'static str,
    command: &str,
    argv: &[&str],
    env: &[(&'static str, String)],
    timeout: Duration,
) -> Result<(), SelfUpdateError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let spawn_error = |source| SelfUpdateError::Spawn {
        hook,
        command: command.to_owned(),
        source,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| spawn_error(std::io::Error::other("empty command")))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(spawn_error)?;
    let pid = rustix::process::Pid::from_child(&child);
    tracing::info!(hook, command, pid = child.id(), "running");
    let last_stderr = Arc::new(Mutex::new(String::new()));
    let (drained_tx, drained_rx) = mpsc::sync_channel::<()>(2);
    if let Some(out) = child.stdout.take() {
        let tx = drained_tx.clone();
        spawn_thread("sluice-hook-out", move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                tracing::info!(hook, output = %line, "command output");
            }
            let _ = tx.send(());
        });
    }
    if let Some(err) = child.stderr.take() {
        let tx = drained_tx.clone();
        let last = last_stderr.clone();
        spawn_thread("sluice-hook-err", move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                tracing::warn!(hook, output = %line, "command error output");
                if !line.trim().is_empty()
                    && let Ok(mut g) = last.lock()
                {
                    line.trim().clone_into(&mut *g);
                }
            }
            let _ = tx.send(());
        });
    }
    drop(drained_tx);
    let (status_tx, status_rx) = mpsc::sync_channel(1);
    spawn_thread("sluice-hook-wait", move || {
        let _ = status_tx.send(child.wait());
    });
    let status = match status_rx.recv_timeout(timeout) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(spawn_error(e)),
        Err(_) => {
            // The shell and whatever it started (the installer) go together.
            if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL)
            {
                tracing::error!(hook, error = %e, "cannot kill the overrunning command");
            }
            let _ = status_rx.recv_timeout(KILL_REAP);
            return Err(SelfUpdateError::TimedOut {
                hook,
                command: command.to_owned(),
                timeout,
            });
        }
    };
    let end = Instant::now() + OUTPUT_DRAIN;
    for _ in 0..2 {
        if drained_rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    if status.success() {
        tracing::info!(hook, command, "finished");
        return Ok(());
    }
    let last_stderr = last_stderr.lock().map(|g| g.clone()).unwrap_or_default();
    Err(SelfUpdateError::CommandFailed {
        hook,
        command: command.to_owned(),
        exit_code: status.code(),
        last_stderr,
    })
}

/// Spawns a helper thread; if the OS refuses, runs nothing and logs (the
/// channels it would have fed then report a timeout or no output).
fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::error!(error = %e, "cannot start a helper thread for a firmware command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A config with its state dir in `dir` and the three hooks as scripts
    /// that append their name (and the install's argument) to `dir/calls`.
    fn setup(dir: &Path, handoff: &str, extra: &str) -> Config {
        let calls = shell_quote(&dir.join("calls").to_string_lossy());
        for (name, body) in [
            (
                "install.sh",
                format!("echo \"install $1 $SLUICE_FW_TITLE $SLUICE_FW_VERSION\" >> {calls}"),
            ),
            ("commit.sh", format!("echo commit >> {calls}")),
            ("rollback.sh", format!("echo rollback >> {calls}")),
            (
                "fail.sh",
                format!(
                    "echo \"fail $1\" >> {calls}; echo 'some detail' >&2; echo 'slot B is busy' >&2; exit 3"
                ),
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let script = |name: &str| shell_quote(&dir.join(name).to_string_lossy());
        let text = format!(
            "[gateway]\nid = \"gw\"\nstate_dir = \"{}\"\n\n[firmware]\nhandoff = \"{handoff}\"\n\
             install_command = '''{} {{path}}'''\ncommit_command = '''{}'''\n\
             rollback_command = '''{}'''\nconfirm_timeout = \"300ms\"\ngateway_version = \"1.0\"\n{extra}",
            dir.join("state").display(),
            script("install.sh"),
            script("commit.sh"),
            script("rollback.sh"),
        );
        let path = dir.join("sluice.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::load(&path).unwrap()
    }

    /// A `[cloud]` that is never connected to: [`confirm`] only reads
    /// whether one is configured.
    const CLOUD: &str = "\n[cloud]\nurl = \"mqtt://127.0.0.1:1\"\n";

    fn stage(cfg: &Config, bytes: &[u8]) -> sluice_firmware::Image {
        let src = cfg.state_dir.with_file_name("img.src");
        std::fs::write(&src, bytes).unwrap();
        sluice_firmware::stage(&cfg.firmware_dir(), &src, "gw-os", "2.0").unwrap()
    }

    fn calls(cfg: &Config) -> Vec<String> {
        std::fs::read_to_string(cfg.state_dir.with_file_name("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn marker(cfg: &Config) -> Option<PendingUpdate> {
        read_json(&cfg.firmware_dir().join(PENDING_FILE)).unwrap()
    }

    /// The marker as a restarted process would find it.
    fn pretend_restart(cfg: &Config) {
        let mut m = marker(cfg).unwrap();
        m.handoff_pid = std::process::id().wrapping_add(1);
        write_json(&cfg.firmware_dir().join(PENDING_FILE), &m).unwrap();
    }

    async fn run_confirm(cfg: &Config, connected: bool) -> Vec<Json> {
        let reports = Mutex::new(Vec::new());
        confirm(
            cfg.clone(),
            || connected,
            |doc| reports.lock().unwrap().push(doc),
        )
        .await;
        reports.into_inner().unwrap()
    }

    #[test]
    fn direct_hand_off_runs_the_installer_on_the_ready_image_and_leaves_a_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", "");
        let img = stage(&cfg, b"gateway image v2");
        let out = hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        assert_eq!(out, HandOff::Installed);
        assert_eq!(
            calls(&cfg),
            vec![format!("install {} gw-os 2.0", img.path.display())]
        );
        let m = marker(&cfg).unwrap();
        assert_eq!(
            (m.version.as_str(), m.from_version.as_str()),
            ("2.0", "1.0")
        );
        assert_eq!(m.sha256, img.sha256);
        // A second hand-off while one is pending is refused.
        assert!(matches!(
            hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0"),
            Err(SelfUpdateError::AlreadyPending { .. })
        ));
    }

    #[test]
    fn hand_off_refuses_when_off_unstaged_or_mismatched() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = setup(tmp.path(), "direct", "");
        let img = stage(&cfg, b"image");
        let other = tmp.path().join("elsewhere.bin");
        std::fs::copy(&img.path, &other).unwrap();
        assert!(matches!(
            hand_off(&cfg, &other, &img.sha256, "t", "2"),
            Err(SelfUpdateError::NotStaged { .. })
        ));
        assert!(matches!(
            hand_off(&cfg, &img.path, "../../etc/passwd", "t", "2"),
            Err(SelfUpdateError::BadSha256(_))
        ));
        // The right file name with other bytes (tampered after staging).
        std::fs::write(&img.path, b"tampered").unwrap();
        assert!(matches!(
            hand_off(&cfg, &img.path, &img.sha256, "t", "2"),
            Err(SelfUpdateError::HashMismatch { .. })
        ));
        cfg.firmware.install_command = None;
        assert!(matches!(
            hand_off(&cfg, &img.path, &img.sha256, "t", "2"),
            Err(SelfUpdateError::Disabled)
        ));
        assert!(calls(&cfg).is_empty(), "{:?}", calls(&cfg));
        assert!(marker(&cfg).is_none());
    }

    #[test]
    fn a_failing_installer_removes_the_marker_and_reports_its_exit_code_and_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = setup(tmp.path(), "direct", "");
        cfg.firmware.install_command =
            Some(format!("{} {{path}}", tmp.path().join("fail.sh").display()));
        let img = stage(&cfg, b"image");
        let err = hand_off(&cfg, &img.path, &img.sha256, "t", "2").unwrap_err();
        assert_eq!(err.exit_code(), Some(3), "{err}");
        assert!(err.to_string().ends_with(": slot B is busy"), "{err}");
        assert!(marker(&cfg).is_none());
        assert_eq!(calls(&cfg).len(), 1);
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("it's a dir");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = setup(&dir, "direct", "");
        let img = stage(&cfg, b"quoted");
        hand_off(&cfg, &img.path, &img.sha256, "t", "2").unwrap();
        assert_eq!(
            calls(&cfg),
            vec![format!("install {} t 2", img.path.display())]
        );
    }

    #[test]
    fn systemd_hand_off_that_cannot_start_the_unit_removes_the_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "systemd", "");
        let img = stage(&cfg, b"image");
        // No systemd in a test environment: systemctl is missing or fails.
        let err = hand_off(&cfg, &img.path, &img.sha256, "t", "2").unwrap_err();
        assert!(
            matches!(
                err,
                SelfUpdateError::Spawn {
                    hook: "systemctl",
                    ..
                } | SelfUpdateError::CommandFailed {
                    hook: "systemctl",
                    ..
                }
            ),
            "{err}"
        );
        assert!(marker(&cfg).is_none());
        assert!(calls(&cfg).is_empty());
    }

    #[test]
    fn install_verifies_the_image_and_records_a_failure_in_the_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = setup(tmp.path(), "systemd", "");
        let img = stage(&cfg, b"image");
        // Nothing pending for this image yet.
        assert!(matches!(
            install(&cfg, &img.sha256),
            Err(SelfUpdateError::NotPending { .. })
        ));
        let pending = PendingUpdate {
            title: "gw-os".into(),
            version: "2.0".into(),
            sha256: img.sha256.clone(),
            from_version: "1.0".into(),
            requested_ms: 1,
            handoff_pid: 1,
            confirm_attempts: 0,
            install_error: None,
        };
        write_json(&cfg.firmware_dir().join(PENDING_FILE), &pending).unwrap();
        install(&cfg, &img.sha256).unwrap();
        assert_eq!(
            calls(&cfg),
            vec![format!("install {} gw-os 2.0", img.path.display())]
        );
        cfg.firmware.install_command =
            Some(format!("{} {{path}}", tmp.path().join("fail.sh").display()));
        let err = install(&cfg, &img.sha256).unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        let m = marker(&cfg).unwrap();
        assert_eq!(m.install_error.unwrap().exit_code, Some(3));
        assert!(matches!(
            install(&cfg, &"0".repeat(64)),
            Err(SelfUpdateError::NotStaged { .. })
        ));
    }

    #[test]
    fn install_refuses_an_image_changed_after_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "systemd", "");
        let img = stage(&cfg, b"image");
        std::fs::write(&img.path, b"swapped").unwrap();
        assert!(matches!(
            install(&cfg, &img.sha256),
            Err(SelfUpdateError::HashMismatch { .. })
        ));
        assert!(calls(&cfg).is_empty());
    }

    #[tokio::test]
    async fn a_healthy_restart_commits_and_records_the_new_version() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        assert_eq!(installed_version(&cfg), "1.0");
        pretend_restart(&cfg);
        let reports = run_confirm(&cfg, true).await;
        assert_eq!(calls(&cfg)[1..], ["commit".to_owned()]);
        assert_eq!(
            reports,
            vec![
                json!({"target": "gateway", "title": "gw-os", "version": "2.0",
                "state": "idle", "result": "success", "result_code": 1})
            ]
        );
        assert!(marker(&cfg).is_none());
        assert_eq!(installed_version(&cfg), "2.0");
    }

    #[tokio::test]
    async fn an_uplink_that_stays_down_rolls_back_after_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        pretend_restart(&cfg);
        let started = Instant::now();
        let reports = run_confirm(&cfg, false).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(calls(&cfg)[1..], ["rollback".to_owned()]);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0]["result"], "update_failed");
        assert_eq!(reports[0]["result_code"], 8);
        assert_eq!(
            reports[0]["error"],
            "the uplink did not connect within 300ms; rolled back"
        );
        assert!(marker(&cfg).is_none());
        assert_eq!(installed_version(&cfg), "1.0");
    }

    #[tokio::test]
    async fn a_failing_commit_is_reported_with_its_exit_code_and_not_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        pretend_restart(&cfg);
        cfg.firmware.commit_command = Some(tmp.path().join("fail.sh").display().to_string());
        let reports = run_confirm(&cfg, true).await;
        assert_eq!(reports[0]["result_code"], 8);
        assert_eq!(reports[0]["exit_code"], 3);
        assert!(
            reports[0]["error"]
                .as_str()
                .unwrap()
                .contains("slot B is busy"),
            "{}",
            reports[0]
        );
        assert_eq!(installed_version(&cfg), "1.0");
        assert!(marker(&cfg).is_none());
    }

    #[tokio::test]
    async fn a_failing_rollback_is_reported_with_its_exit_code() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        pretend_restart(&cfg);
        cfg.firmware.rollback_command = Some(tmp.path().join("fail.sh").display().to_string());
        let reports = run_confirm(&cfg, false).await;
        assert_eq!(reports[0]["result"], "update_failed");
        assert_eq!(reports[0]["exit_code"], 3);
        let error = reports[0]["error"].as_str().unwrap();
        assert!(
            error.starts_with("the uplink did not connect within 300ms; rolling back failed"),
            "{error}"
        );
        assert!(marker(&cfg).is_none());
    }

    #[tokio::test]
    async fn without_a_cloud_the_update_is_committed_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", "");
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        pretend_restart(&cfg);
        let reports = run_confirm(&cfg, false).await;
        assert_eq!(calls(&cfg)[1..], ["commit".to_owned()]);
        assert_eq!(reports[0]["result_code"], 1);
        assert_eq!(installed_version(&cfg), "2.0");
    }

    #[tokio::test]
    async fn the_process_that_handed_off_does_not_confirm_its_own_update() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        hand_off(&cfg, &img.path, &img.sha256, "gw-os", "2.0").unwrap();
        let reports = run_confirm(&cfg, true).await;
        assert!(reports.is_empty());
        assert_eq!(calls(&cfg).len(), 1, "only the install: {:?}", calls(&cfg));
        assert!(marker(&cfg).is_some());
    }

    #[tokio::test]
    async fn a_recorded_install_failure_is_reported_without_running_hooks() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = setup(tmp.path(), "direct", CLOUD);
        let img = stage(&cfg, b"v2");
        let failed = PendingUpdate {
            title: "gw-os".into(),
            version: "2.0".into(),
            sha256: img.sha256.clone(),
            from_version: "1.0".into(),
            requested_ms: 1,
            handoff_pid: 1,
            confirm_attempts: 0,
            install_error: Some(InstallError {
                exit_code: Some(4),
                error: "install_command `rauc install` exited with 4".into(),
            }),
        };
        write_json(&cfg.firmware_dir().join(PENDING_FILE), &failed).unwrap();
        let reports = run_confirm(&cfg, true).await;
        assert!(calls(&cfg).is_empty());
        assert_eq!(reports[0]["result_code"], 8);
        assert_eq!(reports[0]["exit_code"], 4);
        assert!(marker(&cfg).is_none());
    }

    #[test]
    fn restarts_are_counted_and_too_many_roll_back_without_waiting() {
        let m = PendingUpdate {
            title: "t".into(),
            version: "2".into(),
            sha256: "a".repeat(64),
            from_version: "1".into(),
            requested_ms: 0,
            handoff_pid: 10,
            confirm_attempts: 1,
            install_error: None,
        };
        assert_eq!(
            Decision::at_start(&m, 10, true, 3),
            Decision::NotRestartedYet
        );
        assert_eq!(Decision::at_start(&m, 11, true, 3), Decision::AwaitUplink);
        assert_eq!(
            Decision::at_start(&m, 11, false, 3),
            Decision::CommitOffline
        );
        let looping = PendingUpdate {
            confirm_attempts: 4,
            ..m.clone()
        };
        assert_eq!(
            Decision::at_start(&looping, 11, true, 3),
            Decision::RollBack
        );

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(PENDING_FILE);
        write_json(&path, &m).unwrap();
        begin_confirm(&path).unwrap();
        let again = begin_confirm(&path).unwrap().unwrap();
        assert_eq!(again.confirm_attempts, 3);
    }

    #[test]
    fn a_command_that_overruns_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
        let started = Instant::now();
        let err = run_command(
            "commit_command",
            &script,
            &["/bin/sh", "-c", &script],
            &[],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, SelfUpdateError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let pid = pid.trim();
        // The grandchild went with the group (it may linger as a zombie of
        // init for a moment, never as a running sleep).
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let alive = state.as_deref().is_some_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            });
            if !alive {
                break;
            }
            assert!(Instant::now() < end, "sleep {pid} survived: {state:?}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn stored_records_survive_a_round_trip_and_damage_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(INSTALLED_FILE);
        let rec = InstalledGateway {
            title: "gw-os".into(),
            version: "2.0".into(),
            sha256: "b".repeat(64),
            committed_ms: 5,
        };
        write_json(&path, &rec).unwrap();
        assert_eq!(read_json::<InstalledGateway>(&path).unwrap(), Some(rec));
        std::fs::write(&path, b"{\"title\":").unwrap();
        assert!(matches!(
            read_json::<InstalledGateway>(&path),
            Err(SelfUpdateError::BadRecord { .. })
        ));
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temp file left behind"
        );
    }
}
