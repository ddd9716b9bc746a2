//! `sluice doctor`: checks a gateway's setup and says how to fix what is
//! wrong.
//!
//! Each check is a function that returns [`Finding`]s (`ok`, `warn` or
//! `fail`, a detail, and for anything not ok the fix). The checks that judge
//! evidence (a bind error, free bytes, a certificate's expiry, what the clock
//! tools said) are pure and unit-tested; the thin layer around them gathers
//! the evidence: the configuration, the running daemon's status over the
//! admin socket (or, with the daemon stopped, the state dir and trial binds),
//! `statvfs`, the certificate files, a DNS + TCP + TLS handshake with the
//! broker, and what systemd-timesyncd, timedatectl, chrony and systemctl say.
//!
//! Nothing here writes outside one temporary file in the state dir, and no
//! MQTT session is opened: a CONNECT with the gateway's client id would
//! throw the running daemon's uplink off the broker.
//!
//! ```no_run
//! let report = sluice_agent::doctor::run(
//!     std::path::Path::new("/etc/sluice/sluice.toml"),
//!     &sluice_agent::doctor::Options::default(),
//! );
//! print!("{}", report.to_table());
//! std::process::exit(if report.failures() == 0 { 0 } else { 1 });
//! ```

use crate::admin::{self, AdminError};
use crate::config::{self, Config};
use serde::Serialize;
use serde_json::{Value as Json, json};
use sluice_cloud_sync::{Clock, ClockMode, UplinkTls, certificate};
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A client certificate closer to its expiry than this is a warning.
const CLIENT_CERT_WARN_DAYS: i64 = 30;
/// The broker's certificate is someone else's to renew (often at 30 days
/// left, as ACME clients do): warn later than for our own.
const BROKER_CERT_WARN_DAYS: i64 = 14;
/// Below this, SQLite commits (and so every acknowledged reading) fail soon.
const MIN_FREE_BYTES: u64 = 16 << 20;
/// Below this many free inodes the next WAL or firmware file may not fit.
const MIN_FREE_INODES: u64 = 64;
/// Free inodes under this share of the total is a warning.
const INODE_WARN_PERCENT: u64 = 5;
/// How long a TLS 1.3 client waits after its handshake for the broker to
/// refuse its certificate (the server judges it after the client is done).
const ALERT_WAIT: Duration = Duration::from_secs(1);
/// The longest a helper (timedatectl, chronyc, systemctl) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// The systemd unit the watchdog check reads.
const UNIT: &str = "sluice.service";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, but worth fixing (or could not be told).
    Warn,
    /// Broken: the gateway does not work, or will not.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked (`state_dir.writable`, `cloud.tls`…).
    pub check: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (`None` when ok).
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &str, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What `sluice doctor` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run SQLite's `quick_check` on the outbox (a full read of the file).
    pub quick_check: bool,
    /// Limit of each network step (DNS, TCP connect, TLS handshake).
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quick_check: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Every finding, in the order the checks ran.
#[derive(Debug, Clone)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// How many checks failed (the exit code is 1 when any did).
    pub fn failures(&self) -> usize {
        self.count(Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    /// `{"ok":bool,"summary":{"ok":n,"warn":n,"fail":n},"findings":[…]}`.
    pub fn to_json(&self) -> Json {
        json!({
            "ok": self.failures() == 0,
            "summary": {
                "ok": self.count(Status::Ok),
                "warn": self.count(Status::Warn),
                "fail": self.count(Status::Fail),
            },
            "findings": self.findings,
        })
    }

    /// The human table: one line per check, its fix indented below.
    pub fn to_table(&self) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!(
                "{:<4}  {:<width$}  {}\n",
                f.status.label(),
                f.check,
                f.detail
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        out.push_str(&format!(
            "\n{}, {}, {}\n",
            plural(self.count(Status::Ok), "ok", "ok"),
            plural(self.count(Status::Warn), "warning", "warnings"),
            plural(self.count(Status::Fail), "failure", "failures"),
        ));
        out
    }
}

/// Runs every check against the configuration at `config_path`. Never
/// fails: what cannot be checked is itself a finding.
pub fn run(config_path: &Path, opts: &Options) -> Report {
    let mut findings = Vec::new();
    let loaded = config::load(config_path);
    findings.push(config_finding(config_path, &loaded));
    let mut clock_mode = ClockMode::Auto;
    if let Ok(cfg) = &loaded {
        clock_mode = cfg.clock;
        let daemon = Daemon::ask(&cfg.admin_socket);
        findings.push(daemon_finding(&daemon));
        findings.extend(check_listeners(cfg, &daemon));
        findings.extend(check_state_dir(cfg));
        findings.push(check_outbox(cfg, &daemon, opts.quick_check));
        findings.extend(check_certificates(cfg, now_s()));
        findings.extend(check_cloud(cfg, &daemon, opts.timeout));
    }
    findings.push(clock_finding(
        clock_mode,
        Clock::new(clock_mode).trusted(),
        &ClockEvidence::gather(),
    ));
    findings.push(watchdog_finding(&WatchdogEvidence::gather()));
    Report { findings }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The configuration loads and validates.
pub fn config_finding(path: &Path, loaded: &Result<Config, config::ConfigError>) -> Finding {
    match loaded {
        Ok(cfg) => Finding::ok(
            "config",
            format!(
                "{} is valid (gateway {}{})",
                path.display(),
                cfg.gateway_id,
                cfg.fleet_version
                    .map(|v| format!(", fleet configuration version {v} layered in"))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => Finding::fail(
            "config",
            e.to_string(),
            "correct the key named above (`sluice check-config` prints the effective \
             configuration); the other checks need a valid configuration",
        ),
    }
}

/// What the admin socket said.
#[derive(Debug)]
enum Daemon {
    /// Its status document.
    Running(Json),
    /// Nothing answers.
    Stopped(String),
    /// Something may run but could not be asked.
    Unknown(String),
}

impl Daemon {
    fn ask(socket: &Path) -> Self {
        match admin::request(socket, "status") {
            Ok(st) => Self::Running(st),
            Err(AdminError::NotRunning { path, source })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                Self::Unknown(format!("{}: {source}", path.display()))
            }
            Err(AdminError::NotRunning { path, source }) => {
                Self::Stopped(format!("nothing answers on {}: {source}", path.display()))
            }
            Err(e) => Self::Unknown(e.to_string()),
        }
    }

    fn status(&self) -> Option<&Json> {
        match self {
            Self::Running(st) => Some(st),
            _ => None,
        }
    }
}

fn daemon_finding(daemon: &Daemon) -> Finding {
    const CHECK: &str = "daemon";
    match daemon {
        Daemon::Running(st) => {
            let version = st["version"].as_str().unwrap_or("?");
            let detail = format!(
                "running: sluice {version}, up {}s, gateway {}",
                st["uptime_s"],
                st.pointer("/gateway/id")
                    .and_then(Json::as_str)
                    .unwrap_or("?")
            );
            if version == env!("CARGO_PKG_VERSION") {
                Finding::ok(CHECK, detail)
            } else {
                Finding::warn(
                    CHECK,
                    format!("{detail}; this CLI is {}", env!("CARGO_PKG_VERSION")),
                    "restart the daemon so it runs the installed version (systemctl restart sluice)",
                )
            }
        }
        Daemon::Stopped(why) => Finding::warn(
            CHECK,
            format!(
                "not running ({why}); the checks below read the configuration and the state dir"
            ),
            "start it: `systemctl start sluice` (or `sluice run`); `journalctl -u sluice` says why it stopped",
        ),
        Daemon::Unknown(why) => Finding::warn(
            CHECK,
            format!("cannot ask the daemon: {why}"),
            "run sluice doctor as root or as a member of the sluice group (the admin socket is mode 0660)",
        ),
    }
}

/// Which socket a listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP listener.
    Tcp,
    /// A UDP socket (CoAP).
    Udp,
}

fn check_listeners(cfg: &Config, daemon: &Daemon) -> Vec<Finding> {
    let mut listeners: Vec<(&str, &str, SocketAddr, Proto)> = Vec::new();
    if let Some(h) = &cfg.http {
        listeners.push(("http", "listeners.http.bind", h.bind, Proto::Tcp));
    }
    if let Some(m) = &cfg.mqtt {
        listeners.push(("mqtt", "listeners.mqtt.bind", m.bind, Proto::Tcp));
    }
    if let Some(m) = &cfg.mqtts {
        listeners.push(("mqtts", "listeners.mqtts.bind", m.listener.bind, Proto::Tcp));
    }
    if let Some(c) = &cfg.coap {
        listeners.push(("coap", "listeners.coap.bind", c.bind, Proto::Udp));
    }
    if let Some(b) = cfg.metrics_bind {
        listeners.push(("metrics", "metrics.bind", b, Proto::Tcp));
    }
    if listeners.is_empty() {
        return vec![Finding::warn(
            "listeners",
            "no listener is configured: no device can reach this gateway",
            "add a [listeners.http], [listeners.mqtt], [listeners.mqtts] or [listeners.coap] section",
        )];
    }
    listeners
        .into_iter()
        .map(|(name, key, addr, proto)| {
            let check = format!("listener.{name}");
            match daemon {
                Daemon::Running(st) => bound_finding(
                    &check,
                    key,
                    addr,
                    st.pointer(&format!("/listeners/{name}"))
                        .and_then(Json::as_str),
                ),
                Daemon::Stopped(_) | Daemon::Unknown(_) if addr.port() == 0 => Finding::ok(
                    &check,
                    format!("{addr}: port 0, the daemon binds an ephemeral port at start (`sluice status` shows it)"),
                ),
                Daemon::Stopped(_) => bind_finding(&check, key, addr, proto, &probe_bind(addr, proto), false),
                Daemon::Unknown(_) => bind_finding(&check, key, addr, proto, &probe_bind(addr, proto), true),
            }
        })
        .collect()
}

/// Judges a listener from the running daemon's status: `bound` is the
/// address it reports for this listener.
pub fn bound_finding(
    check: &str,
    key: &str,
    configured: SocketAddr,
    bound: Option<&str>,
) -> Finding {
    match bound {
        None => Finding::fail(
            check,
            format!("{key} = {configured} is configured but the running daemon has not bound it"),
            "the configuration changed since the daemon started: restart it (systemctl restart sluice)",
        ),
        Some(b) => {
            let same =
                configured.port() == 0 || b.parse::<SocketAddr>().is_ok_and(|a| a == configured);
            if same {
                Finding::ok(check, format!("bound on {b} by the running daemon"))
            } else {
                Finding::warn(
                    check,
                    format!("{key} = {configured}, but the running daemon bound {b}"),
                    "the configuration changed since the daemon started: restart it (systemctl restart sluice)",
                )
            }
        }
    }
}

/// Binds `addr` for a moment (the daemon is stopped, so the port should be
/// free).
pub fn probe_bind(addr: SocketAddr, proto: Proto) -> io::Result<()> {
    match proto {
        Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
    }
}

/// Judges a trial bind of a listener's address; `daemon_unknown`: a daemon
/// may be running that could not be asked (so a busy port may be its own).
pub fn bind_finding(
    check: &str,
    key: &str,
    addr: SocketAddr,
    proto: Proto,
    probe: &io::Result<()>,
    daemon_unknown: bool,
) -> Finding {
    let ss = match proto {
        Proto::Tcp => "ss -ltnp",
        Proto::Udp => "ss -lunp",
    };
    match probe {
        Ok(()) => Finding::ok(check, format!("{addr} is free to bind")),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && daemon_unknown => Finding::warn(
            check,
            format!("{addr} is in use, perhaps by the daemon that could not be asked"),
            format!(
                "run sluice doctor as root to tell; `{ss} 'sport = :{}'` shows who holds it",
                addr.port()
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Finding::fail(
            check,
            format!("{addr} is in use by another process; sluice cannot start"),
            format!(
                "find it with `{ss} 'sport = :{}'` and stop it, or move {key} to a free port",
                addr.port()
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Finding::fail(
            check,
            format!("not allowed to bind {addr}: {e} (ports below 1024 need CAP_NET_BIND_SERVICE)"),
            format!(
                "run sluice from the shipped unit (AmbientCapabilities=CAP_NET_BIND_SERVICE) or set {key} to a port of 1024 or more"
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Finding::fail(
            check,
            format!("{addr} is not an address of this host: {e}"),
            format!(
                "set {key} to 0.0.0.0:{} or to an address `ip addr` lists",
                addr.port()
            ),
        ),
        Err(e) => Finding::fail(
            check,
            format!("cannot bind {addr}: {e}"),
            format!("check {key}"),
        ),
    }
}

fn check_state_dir(cfg: &Config) -> Vec<Finding> {
    let dir = &cfg.state_dir;
    let mut out = vec![writable_finding(dir), owners_finding(dir)];
    let existing = dir
        .ancestors()
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find(|d| d.exists());
    let vfs = existing.map(|d| (d, rustix::fs::statvfs(d)));
    match vfs {
        Some((on, Ok(s))) => {
            let outbox_bytes: u64 = ["outbox.db", "outbox.db-wal"]
                .iter()
                .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
                .map(|m| m.len())
                .sum();
            out.push(space_finding(
                on,
                s.f_bavail.saturating_mul(s.f_frsize),
                s.f_blocks.saturating_mul(s.f_frsize),
                cfg.outbox.max_bytes.saturating_sub(outbox_bytes),
            ));
            out.push(inodes_finding(on, s.f_favail, s.f_files));
        }
        Some((on, Err(e))) => out.push(Finding::warn(
            "state_dir.space",
            format!("statvfs {}: {e}", on.display()),
            "check the free space by hand (`df -h`, `df -i`)",
        )),
        None => out.push(Finding::warn(
            "state_dir.space",
            format!("no part of {} exists", dir.display()),
            "check gateway.state_dir",
        )),
    }
    out
}

/// Creates, syncs and removes a file in `dir` (or, when `dir` does not
/// exist yet, in its nearest existing ancestor, where the daemon will
/// create it).
pub fn writable_finding(dir: &Path) -> Finding {
    const CHECK: &str = "state_dir.writable";
    let uid = rustix::process::getuid().as_raw();
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Finding::fail(
            CHECK,
            format!("{} is not a directory", dir.display()),
            "set gateway.state_dir to a directory",
        ),
        Ok(m) => match probe_write(dir) {
            Ok(()) => Finding::ok(
                CHECK,
                format!(
                    "{}: created, synced and removed a file as uid {uid} (owner uid {}, mode {:o})",
                    dir.display(),
                    m.uid(),
                    m.permissions().mode() & 0o7777
                ),
            ),
            Err(e) => write_failure(CHECK, dir, &e, uid, Some(&m)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.ancestors().skip(1).find(|d| d.is_dir());
            match parent {
                Some(p) => match probe_write(p) {
                    Ok(()) => Finding::ok(
                        CHECK,
                        format!(
                            "{} does not exist yet; `sluice run` creates it ({} is writable by uid {uid})",
                            dir.display(),
                            p.display()
                        ),
                    ),
                    Err(e) => write_failure(CHECK, p, &e, uid, std::fs::metadata(p).ok().as_ref()),
                },
                None => Finding::fail(
                    CHECK,
                    format!("no part of {} exists", dir.display()),
                    "set gateway.state_dir to a path on a writable filesystem",
                ),
            }
        }
        Err(e) => Finding::fail(
            CHECK,
            format!("{}: {e}", dir.display()),
            "check gateway.state_dir and the permissions of its parents",
        ),
    }
}

fn probe_write(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!(".sluice-doctor-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(b"sluice doctor\n")?;
            f.sync_all()
        });
    match written {
        Ok(()) => std::fs::remove_file(&path),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

fn write_failure(
    check: &str,
    dir: &Path,
    e: &io::Error,
    uid: u32,
    meta: Option<&std::fs::Metadata>,
) -> Finding {
    let d = dir.display();
    match e.kind() {
        io::ErrorKind::ReadOnlyFilesystem => Finding::fail(
            check,
            format!("{d} is on a read-only filesystem: {e}"),
            "remount it read-write, or set gateway.state_dir to a writable filesystem \
             (under the shipped unit ProtectSystem=strict makes / read-only and \
             StateDirectory=sluice gives a writable /var/lib/sluice)",
        ),
        io::ErrorKind::PermissionDenied => Finding::fail(
            check,
            format!(
                "uid {uid} may not write in {d}{}: {e}",
                meta.map(|m| format!(
                    " (owner uid {}, mode {:o})",
                    m.uid(),
                    m.permissions().mode() & 0o7777
                ))
                .unwrap_or_default()
            ),
            format!(
                "give it to the daemon's user: `chown -R sluice:sluice {d} && chmod 0750 {d}` \
                 (the shipped unit's StateDirectory=sluice does this for /var/lib/sluice)"
            ),
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Finding::fail(
            check,
            format!("{d}: {e}"),
            "free space on that filesystem (old firmware images, logs) or move gateway.state_dir",
        ),
        _ => Finding::fail(
            check,
            format!("cannot write in {d}: {e}"),
            "check gateway.state_dir, its filesystem and permissions",
        ),
    }
}

/// The databases must belong to the directory's owner (the daemon's user):
/// a CLI command run as root in a fresh state dir creates them as root.
fn owners_finding(dir: &Path) -> Finding {
    const CHECK: &str = "state_dir.owner";
    let Ok(d) = std::fs::metadata(dir) else {
        return Finding::ok(CHECK, "no state dir yet");
    };
    let foreign: Vec<String> = [
        "outbox.db",
        "outbox.db-wal",
        "outbox.db-shm",
        "state.db",
        "state.db-wal",
        "state.db-shm",
    ]
    .iter()
    .filter_map(|f| {
        let m = std::fs::metadata(dir.join(f)).ok()?;
        (m.uid() != d.uid()).then(|| format!("{f} (uid {})", m.uid()))
    })
    .collect();
    if foreign.is_empty() {
        Finding::ok(
            CHECK,
            format!(
                "the databases belong to the directory's owner (uid {})",
                d.uid()
            ),
        )
    } else {
        Finding::warn(
            CHECK,
            format!(
                "{} not owned by the directory's owner (uid {}): a daemon running as that user cannot write them",
                foreign.join(", "),
                d.uid()
            ),
            format!(
                "`chown -R {}:{} {}` (run CLI commands as the sluice user, or with the daemon running)",
                d.uid(),
                d.gid(),
                dir.display()
            ),
        )
    }
}

/// Judges the free space of the filesystem `on` (the state dir or its
/// nearest existing ancestor): `headroom` is how much more the outbox may
/// grow before `outbox.max_bytes`.
pub fn space_finding(on: &Path, available: u64, total: u64, headroom: u64) -> Finding {
    const CHECK: &str = "state_dir.space";
    let detail = format!(
        "{} free of {} on {}",
        bytes(available),
        bytes(total),
        on.display()
    );
    if available < MIN_FREE_BYTES {
        Finding::fail(
            CHECK,
            format!("only {detail}: commits fail soon, and then readings are refused"),
            "free space (old firmware images in state_dir/firmware, logs) or move gateway.state_dir to a larger filesystem",
        )
    } else if available < headroom {
        Finding::warn(
            CHECK,
            format!(
                "{detail}, but the outbox may still grow by {} (outbox.max_bytes): the disk fills first",
                bytes(headroom)
            ),
            format!(
                "free space, or lower outbox.max_bytes so the outbox fits in {}",
                bytes(available)
            ),
        )
    } else {
        Finding::ok(CHECK, detail)
    }
}

/// Judges free inodes (`files` 0: the filesystem has no fixed count).
pub fn inodes_finding(on: &Path, free: u64, files: u64) -> Finding {
    const CHECK: &str = "state_dir.inodes";
    if files == 0 {
        return Finding::ok(CHECK, format!("{}: no fixed inode count", on.display()));
    }
    let detail = format!("{free} of {files} inodes free on {}", on.display());
    let fix = "delete the many small files filling that filesystem (`du --inodes -d2`), or move gateway.state_dir";
    if free < MIN_FREE_INODES {
        Finding::fail(
            CHECK,
            format!("only {detail}: new files cannot be created"),
            fix,
        )
    } else if free.saturating_mul(100) < files.saturating_mul(INODE_WARN_PERCENT) {
        Finding::warn(CHECK, format!("only {detail}"), fix)
    } else {
        Finding::ok(CHECK, detail)
    }
}

fn check_outbox(cfg: &Config, daemon: &Daemon, quick_check: bool) -> Finding {
    const CHECK: &str = "outbox";
    let path = cfg.outbox_path();
    let size = std::fs::metadata(&path).map(|m| m.len());
    if !quick_check {
        return Finding::ok(
            CHECK,
            match size {
                Ok(n) => format!(
                    "{} ({}); not scanned (--quick-check runs SQLite's quick_check, a full read)",
                    path.display(),
                    bytes(n)
                ),
                Err(_) => format!("no {} yet (the daemon creates it)", path.display()),
            },
        );
    }
    let report = match daemon {
        Daemon::Running(_) => admin::request(&cfg.admin_socket, "queue_check")
            .map_err(|e| e.to_string())
            .and_then(|v| {
                serde_json::from_value::<sluice_cloud_sync::outbox::CheckReport>(v)
                    .map_err(|e| e.to_string())
            }),
        _ if size.is_err() => {
            return Finding::ok(
                CHECK,
                format!("no {} yet (the daemon creates it)", path.display()),
            );
        }
        _ => sluice_cloud_sync::outbox::check_file(&path).map_err(|e| e.to_string()),
    };
    match report {
        Ok(r) if r.ok => Finding::ok(CHECK, format!("{}: quick_check ok", path.display())),
        Ok(r) => Finding::fail(
            CHECK,
            format!(
                "{}: quick_check found damage: {}",
                path.display(),
                r.messages
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "stop the daemon, keep a copy of outbox.db for analysis and move it aside; \
             the daemon starts a fresh outbox (seqs never repeat)",
        ),
        Err(e) => Finding::fail(
            CHECK,
            format!("cannot run quick_check on {}: {e}", path.display()),
            "check the file's permissions (`sluice queue check` runs the same check)",
        ),
    }
}

fn check_certificates(cfg: &Config, now: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(tls) = cfg.cloud.as_ref().and_then(|c| c.tls.as_ref()) {
        match sluice_cloud_sync::tls::tls_client_config(tls) {
            Ok(_) => out.push(Finding::ok(
                "cloud.tls_files",
                format!(
                    "{}{} load",
                    tls.ca_file.display(),
                    tls.client_cert
                        .as_ref()
                        .map(|(c, k)| format!(", {} and {}", c.display(), k.display()))
                        .unwrap_or_default()
                ),
            )),
            Err(e) => out.push(Finding::fail(
                "cloud.tls_files",
                e.to_string(),
                "fix the PEM file named above (cloud.ca_file, cloud.cert_file, cloud.key_file; \
                 the key must match the certificate)",
            )),
        }
        if let Some((cert, _)) = &tls.client_cert {
            out.push(expiry_finding(
                "cloud.client_cert",
                cert,
                leaf_not_after(cert),
                now,
                CLIENT_CERT_WARN_DAYS,
                "renew the certificate in cloud.cert_file (with its cloud.key_file): the uplink \
                 loads renewed files at its next connection, no restart needed",
            ));
        }
    }
    if let Some(m) = &cfg.mqtts {
        out.push(expiry_finding(
            "listeners.mqtts.cert",
            &m.tls.cert_file,
            leaf_not_after(&m.tls.cert_file),
            now,
            CLIENT_CERT_WARN_DAYS,
            "renew the certificate in listeners.mqtts.cert_file and restart the daemon",
        ));
    }
    out
}

fn leaf_not_after(path: &Path) -> Option<i64> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let leaf = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    certificate::not_after(&leaf)
}

/// Judges a certificate's `notAfter` (unix seconds) at `now`.
pub fn expiry_finding(
    check: &str,
    path: &Path,
    not_after: Option<i64>,
    now: i64,
    warn_days: i64,
    renew: &str,
) -> Finding {
    let p = path.display();
    let Some(end) = not_after else {
        return Finding::fail(
            check,
            format!("cannot read the expiry of {p}"),
            format!("check it is a PEM X.509 certificate: `openssl x509 -in {p} -noout -enddate`"),
        );
    };
    let left = end - now;
    if left < 0 {
        Finding::fail(
            check,
            format!("{p} expired on {} ({} ago)", date(end), span(-left)),
            renew,
        )
    } else if left < warn_days * 86_400 {
        Finding::warn(
            check,
            format!("{p} expires on {} (in {})", date(end), span(left)),
            renew,
        )
    } else {
        Finding::ok(
            check,
            format!("{p} valid until {} ({} left)", date(end), span(left)),
        )
    }
}

fn check_cloud(cfg: &Config, daemon: &Daemon, timeout: Duration) -> Vec<Finding> {
    let Some(c) = &cfg.cloud else {
        return vec![Finding::ok(
            "cloud",
            "offline mode (no [cloud] section): readings stay in the outbox",
        )];
    };
    let mut out = Vec::new();
    if let Some(p) = &c.password_file {
        out.push(match std::fs::read_to_string(p) {
            Ok(s) if s.trim_end_matches(['\n', '\r']).is_empty() => Finding::warn(
                "cloud.credentials",
                format!("{} is empty", p.display()),
                "write the broker password into cloud.password_file",
            ),
            Ok(_) => Finding::ok("cloud.credentials", format!("{} is readable", p.display())),
            Err(e) => Finding::fail(
                "cloud.credentials",
                format!("{}: {e}; the daemon will not start", p.display()),
                "create cloud.password_file, readable by the sluice user (mode 0640, group sluice)",
            ),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match rt {
        Ok(rt) => {
            out.extend(rt.block_on(reach(&c.host, c.port, c.tls.as_ref(), timeout)));
            // A DNS lookup past its timeout keeps a blocking thread: do not
            // wait for it.
            rt.shutdown_background();
        }
        Err(e) => out.push(Finding::fail(
            "cloud.dns",
            format!("cannot start the network checks: {e}"),
            "retry; the system may be out of threads or file descriptors",
        )),
    }
    if let Some(st) = daemon.status() {
        out.push(uplink_finding(st));
    }
    out
}

/// The running daemon's view of its uplink.
pub fn uplink_finding(st: &Json) -> Finding {
    const CHECK: &str = "uplink";
    let connected = st.pointer("/uplink/connected") == Some(&Json::Bool(true));
    let error = st.pointer("/uplink/error").and_then(Json::as_str);
    let acked = st
        .pointer("/uplink/records_acked")
        .cloned()
        .unwrap_or(Json::Null);
    match (connected, error) {
        (true, _) => Finding::ok(
            CHECK,
            format!("the daemon is connected to the broker ({acked} records acknowledged)"),
        ),
        (false, Some(e)) => Finding::fail(
            CHECK,
            format!("the daemon is not connected to the broker: {e}"),
            "a refused CONNECT means wrong credentials or client id (cloud.username, \
             cloud.password_file, cloud.client_id) or a broker ACL; otherwise see the \
             cloud.* checks above and `journalctl -u sluice`",
        ),
        (false, None) => Finding::warn(
            CHECK,
            "the daemon is still connecting to the broker",
            "run sluice doctor again in a minute; `journalctl -u sluice` shows the attempts",
        ),
    }
}

/// DNS, TCP and (for `mqtts://`) a TLS handshake with the broker; stops at
/// the first step that fails.
pub async fn reach(
    host: &str,
    port: u16,
    tls: Option<&UplinkTls>,
    timeout: Duration,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let target = format!("{host}:{port}");
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((host, port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            out.push(Finding::fail(
                    "cloud.dns",
                    format!("cannot resolve {host}: {e}"),
                    "check the host in cloud.url and the resolver (/etc/resolv.conf, `getent hosts HOST`)",
                ));
            return out;
        }
        Err(_) => {
            out.push(Finding::fail(
                "cloud.dns",
                format!("resolving {host} took over {}s", timeout.as_secs_f32()),
                "check the resolver (/etc/resolv.conf) and that DNS (port 53) is reachable",
            ));
            return out;
        }
    };
    if addrs.is_empty() {
        out.push(Finding::fail(
            "cloud.dns",
            format!("{host} resolves to no address"),
            "check the host in cloud.url",
        ));
        return out;
    }
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    out.push(Finding::ok(
        "cloud.dns",
        if host.parse::<std::net::IpAddr>().is_ok() {
            format!("{host} is an IP address: no lookup needed")
        } else {
            format!("{host} resolves to {}", list.join(", "))
        },
    ));

    let mut last = None;
    let mut tcp = None;
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, *addr, started.elapsed()));
                break;
            }
            Ok(Err(e)) => last = Some((*addr, Some(e))),
            Err(_) => last = Some((*addr, None)),
        }
    }
    let Some((stream, addr, took)) = tcp else {
        out.push(tcp_failure(&target, last));
        return out;
    };
    out.push(Finding::ok(
        "cloud.tcp",
        format!("connected to {addr} in {} ms", took.as_millis()),
    ));

    let Some(tls) = tls else {
        out.push(Finding::warn(
            "cloud.tls",
            "mqtt:// sends telemetry and the broker password unencrypted",
            "use mqtts:// with cloud.ca_file",
        ));
        return out;
    };
    out.push(handshake(host, &target, stream, tls, timeout).await);
    out
}

fn tcp_failure(target: &str, last: Option<(SocketAddr, Option<io::Error>)>) -> Finding {
    const CHECK: &str = "cloud.tcp";
    match last {
        Some((addr, Some(e))) if e.kind() == io::ErrorKind::ConnectionRefused => Finding::fail(
            CHECK,
            format!("{addr} refused the connection: nothing listens there"),
            format!(
                "check the port in cloud.url ({target}) and that the broker runs; a firewall may also reject it"
            ),
        ),
        Some((addr, None)) => Finding::fail(
            CHECK,
            format!("{addr} did not answer in time"),
            "a firewall drops the packets or there is no route: allow outbound TCP to the broker's port",
        ),
        Some((addr, Some(e))) => Finding::fail(
            CHECK,
            format!("cannot connect to {addr}: {e}"),
            "check the gateway's network link and default route (`ip route`)",
        ),
        None => Finding::fail(
            CHECK,
            format!("no address to connect to for {target}"),
            "check cloud.url",
        ),
    }
}

async fn handshake(
    host: &str,
    target: &str,
    stream: tokio::net::TcpStream,
    tls: &UplinkTls,
    timeout: Duration,
) -> Finding {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const CHECK: &str = "cloud.tls";
    let config = match sluice_cloud_sync::tls::tls_client_config(tls) {
        Ok(c) => c,
        Err(e) => {
            return Finding::fail(
                CHECK,
                format!("no handshake tried: {e}"),
                "fix the TLS files (see cloud.tls_files)",
            );
        }
    };
    let name = match rustls::pki_types::ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => {
            return Finding::fail(
                CHECK,
                format!("{host} is not a valid TLS server name: {e}"),
                "check the host in cloud.url",
            );
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tls_failure(host, target, &e),
        Err(_) => {
            return Finding::fail(
                CHECK,
                format!("the TLS handshake with {target} did not finish in time"),
                "check that the port speaks TLS (mqtts://), and that nothing in between holds the connection",
            );
        }
    };
    let (_, session) = stream.get_ref();
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_owned(),
    };
    let tls13 = session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let chain: Vec<Option<i64>> = session
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| certificate::not_after(c))
        .collect();
    // A TLS 1.3 server judges the client's certificate after the client has
    // finished its handshake: its refusal arrives as an alert on the first
    // read.
    if tls13 {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(ALERT_WAIT, stream.read(&mut buf)).await {
            Ok(Err(e)) => return tls_failure(host, target, &e),
            Ok(Ok(0)) => {
                return Finding::fail(
                    CHECK,
                    format!("{target} closed the connection right after the {version} handshake"),
                    "the broker refuses this client: its log says why (client certificate, TLS settings)",
                );
            }
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    let _ = tokio::time::timeout(ALERT_WAIT, stream.shutdown()).await;
    let leaf = chain.first().copied().flatten();
    let now = now_s();
    let chain_text = format!(
        "{version} with {target}; the broker sent {} certificate{}",
        chain.len(),
        if chain.len() == 1 { "" } else { "s" }
    );
    match leaf {
        Some(end) if end - now < BROKER_CERT_WARN_DAYS * 86_400 => Finding::warn(
            CHECK,
            format!(
                "{chain_text}; its certificate expires on {} (in {})",
                date(end),
                span(end - now)
            ),
            "tell the broker's operator to renew its certificate",
        ),
        Some(end) => Finding::ok(
            CHECK,
            format!(
                "{chain_text}; its certificate is valid until {} ({} left)",
                date(end),
                span(end - now)
            ),
        ),
        None => Finding::ok(CHECK, format!("{chain_text} (expiry unreadable)")),
    }
}

/// Explains a failed handshake (or a post-handshake alert) and its fix.
pub fn tls_failure(host: &str, target: &str, e: &io::Error) -> Finding {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    const CHECK: &str = "cloud.tls";
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<R>());
    let (detail, fix): (String, String) = match inner {
        Some(R::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => (
            format!("the broker's certificate has expired ({e})"),
            "the broker's operator must renew it; if it is in fact valid, this gateway's clock \
             is ahead: fix the time (NTP)"
                .into(),
        ),
        Some(R::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => (
            format!("the broker's certificate is not valid yet ({e})"),
            "this gateway's clock is probably behind: set the time (NTP, `timedatectl`)".into(),
        ),
        Some(R::InvalidCertificate(C::UnknownIssuer)) => (
            format!("the broker's certificate is not signed by a CA in cloud.ca_file ({e})"),
            format!(
                "put the CA that signed the broker's certificate in cloud.ca_file \
                 (`openssl s_client -connect {target} -showcerts` shows the chain)"
            ),
        ),
        Some(R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => (
            format!("the broker's certificate is not for {host} ({e})"),
            "use in cloud.url a host name the broker's certificate lists".into(),
        ),
        Some(R::InvalidCertificate(_)) => (
            format!("the broker's certificate is refused: {e}"),
            format!("check the broker's certificate chain (`openssl s_client -connect {target}`)"),
        ),
        Some(R::AlertReceived(A::CertificateExpired)) => (
            format!("the broker refused our client certificate as expired ({e})"),
            "renew the certificate in cloud.cert_file (with its cloud.key_file); the uplink \
             loads renewed files without a restart"
                .into(),
        ),
        Some(R::AlertReceived(A::CertificateRequired)) => (
            format!("the broker requires a client certificate ({e})"),
            "set cloud.cert_file and cloud.key_file".into(),
        ),
        Some(R::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::AccessDenied,
        )) => (
            format!("the broker refused our client certificate ({e})"),
            "the broker must trust the CA that signed cloud.cert_file, and the certificate \
             needs extendedKeyUsage=clientAuth"
                .into(),
        ),
        Some(R::AlertReceived(A::NoApplicationProtocol)) => (
            format!("the broker accepts none of the ALPN protocols offered ({e})"),
            "check cloud.alpn (AWS IoT Core on port 443 wants x-amzn-mqtt-ca)".into(),
        ),
        Some(R::AlertReceived(
            A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity,
        ))
        | Some(R::PeerIncompatible(_)) => (
            format!("no common TLS version or cipher suite with the broker ({e})"),
            "the broker must offer TLS 1.2 or 1.3 with ECDHE and AES-GCM or ChaCha20-Poly1305"
                .into(),
        ),
        Some(R::InvalidMessage(_) | R::PeerSentOversizedRecord) => (
            format!("{target} does not speak TLS ({e})"),
            "use the broker's TLS port in cloud.url, or mqtt:// for a plain listener".into(),
        ),
        None if e.kind() == io::ErrorKind::UnexpectedEof => (
            format!("{target} closed the connection during the TLS handshake ({e})"),
            "check that the port speaks TLS (mqtt:// is for a plain listener) and the broker's log"
                .into(),
        ),
        _ => (
            format!("the TLS handshake with {target} failed: {e}"),
            "check that the port speaks TLS (mqtts://) and the broker's log".into(),
        ),
    };
    Finding::fail(CHECK, detail, fix)
}

/// What the clock tools said: `Some(true)` synchronized, `Some(false)` not,
/// `None` no answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClockEvidence {
    /// systemd-timesyncd's marker (`/run/systemd/timesync/synchronized`),
    /// when timesyncd runs (`/run/systemd/timesync` exists).
    pub timesyncd: Option<bool>,
    /// `timedatectl show -p NTPSynchronized --value` (the kernel's
    /// adjtimex state through timedated), under systemd.
    pub timedatectl: Option<bool>,
    /// `chronyc tracking`'s leap status, when chronyd runs.
    pub chrony: Option<bool>,
}

impl ClockEvidence {
    fn gather() -> Self {
        let timesyncd = Path::new("/run/systemd/timesync")
            .is_dir()
            .then(|| Path::new("/run/systemd/timesync/synchronized").exists());
        let timedatectl = if under_systemd() {
            command_output("timedatectl", &["show", "-p", "NTPSynchronized", "--value"]).and_then(
                |s| match s.trim() {
                    "yes" => Some(true),
                    "no" => Some(false),
                    _ => None,
                },
            )
        } else {
            None
        };
        let chrony = if Path::new("/run/chrony").is_dir() {
            command_output("chronyc", &["-n", "tracking"])
                .as_deref()
                .and_then(chrony_synchronized)
        } else {
            None
        };
        Self {
            timesyncd,
            timedatectl,
            chrony,
        }
    }
}

/// Reads `Leap status` from `chronyc tracking`: `Normal` (or a pending
/// leap second) is synchronized, `Not synchronised` is not.
pub fn chrony_synchronized(tracking: &str) -> Option<bool> {
    let status = tracking
        .lines()
        .find_map(|l| l.strip_prefix("Leap status"))?
        .trim_start()
        .strip_prefix(':')?
        .trim();
    Some(!status.starts_with("Not synchronised"))
}

/// Judges the wall clock: `sluice_trusts` is whether sluice itself trusts
/// it now (see `gateway.clock`).
pub fn clock_finding(mode: ClockMode, sluice_trusts: bool, ev: &ClockEvidence) -> Finding {
    const CHECK: &str = "clock";
    let sources = [
        ("systemd-timesyncd", ev.timesyncd),
        ("timedatectl", ev.timedatectl),
        ("chrony", ev.chrony),
    ];
    let said = |want: bool| -> Vec<&str> {
        sources
            .iter()
            .filter(|(_, v)| *v == Some(want))
            .map(|(n, _)| *n)
            .collect()
    };
    let (synced, unsynced) = (said(true), said(false));
    let trust = match (mode, sluice_trusts) {
        (ClockMode::Untrusted, _) => "sluice does not trust it (gateway.clock = \"untrusted\")",
        (ClockMode::Trusted, _) => "sluice trusts it (gateway.clock = \"trusted\")",
        (ClockMode::Auto, true) => "sluice trusts it",
        (ClockMode::Auto, false) => {
            "sluice does not trust it yet: readings without ts go up flagged ts_trusted:false"
        }
    };
    let skew = "skew against the broker unknown (neither MQTT nor TLS carries the broker's time)";
    let ntp_fix = "check the NTP client (`timedatectl timesync-status` or `chronyc sources`) \
                   and that its servers are reachable (UDP 123)";
    if !synced.is_empty() {
        let detail = format!("synchronized (per {}); {trust}; {skew}", synced.join(", "));
        match mode {
            ClockMode::Untrusted => Finding::warn(
                CHECK,
                detail,
                "set gateway.clock = \"auto\" so synchronized time is trusted",
            ),
            _ => Finding::ok(CHECK, detail),
        }
    } else if !unsynced.is_empty() {
        Finding::warn(
            CHECK,
            format!(
                "not synchronized (per {}); {trust}; {skew}",
                unsynced.join(", ")
            ),
            ntp_fix,
        )
    } else {
        Finding::warn(
            CHECK,
            format!(
                "cannot tell whether the clock is synchronized: no systemd-timesyncd, timedatectl \
                 or chrony answered (usual in a container, where the host keeps time); {trust}; {skew}"
            ),
            "run an NTP client (systemd-timesyncd or chrony) on this host or the container's host",
        )
    }
}

/// What the watchdog check found out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchdogEvidence {
    /// `$WATCHDOG_USEC` (set when doctor itself runs inside the unit).
    pub env_usec: Option<String>,
    /// systemd is the init system (`/run/systemd/system` exists).
    pub systemd: bool,
    /// `systemctl show sluice.service -p LoadState -p WatchdogUSec`.
    pub show: Option<String>,
}

impl WatchdogEvidence {
    fn gather() -> Self {
        let systemd = under_systemd();
        Self {
            env_usec: std::env::var("WATCHDOG_USEC").ok(),
            systemd,
            show: if systemd {
                command_output(
                    "systemctl",
                    &["show", UNIT, "-p", "LoadState", "-p", "WatchdogUSec"],
                )
            } else {
                None
            },
        }
    }
}

/// Judges the systemd watchdog of the unit.
pub fn watchdog_finding(ev: &WatchdogEvidence) -> Finding {
    const CHECK: &str = "watchdog";
    if let Some(usec) = ev
        .env_usec
        .as_deref()
        .filter(|u| u.parse::<u64>().is_ok_and(|n| n > 0))
    {
        return Finding::ok(
            CHECK,
            format!("WATCHDOG_USEC={usec}: running under a systemd watchdog"),
        );
    }
    if !ev.systemd {
        return Finding::warn(
            CHECK,
            "systemd is not running here (no /run/systemd/system): nothing restarts a hung daemon",
            "run sluice from the shipped systemd/sluice.service (WatchdogSec=30s), or have the \
             container runtime probe /healthz (metrics.bind)",
        );
    }
    let Some(show) = &ev.show else {
        return Finding::warn(
            CHECK,
            format!("`systemctl show {UNIT}` did not answer"),
            format!("check by hand: `systemctl show {UNIT} -p WatchdogUSec`"),
        );
    };
    let prop = |key: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    };
    if prop("LoadState") == Some("not-found") {
        return Finding::warn(
            CHECK,
            format!("{UNIT} is not installed"),
            "install systemd/sluice.service (Type=notify, WatchdogSec=30s) and run sluice from it",
        );
    }
    match prop("WatchdogUSec") {
        Some(v) if !matches!(v, "" | "0" | "infinity") => Finding::ok(
            CHECK,
            format!("{UNIT} has WatchdogSec={v}: systemd restarts a daemon that stops answering"),
        ),
        _ => Finding::warn(
            CHECK,
            format!("{UNIT} sets no WatchdogSec: nothing restarts a hung daemon"),
            "`systemctl edit sluice` and add `[Service]` `WatchdogSec=30s`",
        ),
    }
}

fn under_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The stdout of a helper that exited 0 within [`COMMAND_TIMEOUT`]; `None`
/// when it is missing, fails or hangs (it is then killed).
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = tx.send(stdout.read_to_string(&mut text).map(|_| text));
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(text)) => child.wait().ok()?.success().then_some(text),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// `1.5 GiB`-style sizes.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `3 days`, `5 h`, `40 min` (rounded down).
fn span(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{} h", s / 3600),
        s => format!("{} min", s / 60),
    }
}

/// `YYYY-MM-DD HH:MM UTC` of unix seconds (H. Hinnant's `civil_from_days`).
fn date(unix_s: i64) -> String {
    let days = unix_s.div_euclid(86_400);
    let secs = unix_s.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn dates_and_spans_read_like_a_calendar() {
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
        assert_eq!(date(1_709_208_000), "2024-02-29 12:00 UTC");
        assert_eq!(date(4_107_542_400), "2100-03-01 00:00 UTC");
        assert_eq!(date(-86_400), "1969-12-31 00:00 UTC");
        assert_eq!(span(3 * 86_400 + 5), "3 days");
        assert_eq!(span(7200), "2 h");
        assert_eq!(span(59), "0 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn a_port_held_by_another_process_fails_with_who_to_look_for() {
        let held = TcpListener::bind(addr(0)).unwrap();
        let a = held.local_addr().unwrap();
        let f = bind_finding(
            "listener.http",
            "listeners.http.bind",
            a,
            Proto::Tcp,
            &probe_bind(a, Proto::Tcp),
            false,
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            f.fix
                .as_deref()
                .unwrap()
                .contains(&format!("sport = :{}", a.port())),
            "{f:?}"
        );
        assert!(
            f.fix.as_deref().unwrap().contains("listeners.http.bind"),
            "{f:?}"
        );
        // With a daemon that could not be asked, the port may be its own.
        let f = bind_finding(
            "listener.http",
            "listeners.http.bind",
            a,
            Proto::Tcp,
            &probe_bind(a, Proto::Tcp),
            true,
        );
        assert_eq!(f.status, Status::Warn, "{f:?}");
        drop(held);
        let f = bind_finding(
            "listener.http",
            "listeners.http.bind",
            a,
            Proto::Tcp,
            &probe_bind(a, Proto::Tcp),
            false,
        );
        assert_eq!(f.status, Status::Ok, "{f:?}");
    }

    #[test]
    fn a_udp_port_in_use_fails_too() {
        let held = std::net::UdpSocket::bind(addr(0)).unwrap();
        let a = held.local_addr().unwrap();
        let f = bind_finding(
            "listener.coap",
            "listeners.coap.bind",
            a,
            Proto::Udp,
            &probe_bind(a, Proto::Udp),
            false,
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.fix.as_deref().unwrap().contains("ss -lunp"), "{f:?}");
    }

    #[test]
    fn bind_errors_name_their_cause() {
        let a = addr(80);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let f = bind_finding(
            "listener.http",
            "listeners.http.bind",
            a,
            Proto::Tcp,
            &Err(denied),
            false,
        );
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("CAP_NET_BIND_SERVICE"));
        let absent = io::Error::from(io::ErrorKind::AddrNotAvailable);
        let f = bind_finding(
            "listener.http",
            "listeners.http.bind",
            a,
            Proto::Tcp,
            &Err(absent),
            false,
        );
        assert!(f.fix.unwrap().contains("ip addr"));
    }

    #[test]
    fn the_daemons_bound_addresses_are_compared_with_the_configuration() {
        let f = bound_finding(
            "listener.http",
            "listeners.http.bind",
            addr(0),
            Some("127.0.0.1:4242"),
        );
        assert_eq!(f.status, Status::Ok);
        assert!(f.detail.contains("127.0.0.1:4242"));
        let f = bound_finding(
            "listener.http",
            "listeners.http.bind",
            addr(8080),
            Some("127.0.0.1:8080"),
        );
        assert_eq!(f.status, Status::Ok);
        let f = bound_finding(
            "listener.http",
            "listeners.http.bind",
            addr(8080),
            Some("127.0.0.1:8081"),
        );
        assert_eq!(f.status, Status::Warn);
        let f = bound_finding("listener.coap", "listeners.coap.bind", addr(5683), None);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("restart"));
    }

    #[test]
    fn a_writable_state_dir_passes_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let f = writable_finding(tmp.path());
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        // Not there yet: the daemon creates it in a writable parent.
        let f = writable_finding(&tmp.path().join("a/b"));
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert!(f.detail.contains("does not exist yet"), "{f:?}");
        // A file where the directory should be.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(writable_finding(&file).status, Status::Fail);
    }

    #[test]
    fn write_errors_get_the_fix_for_their_cause() {
        let dir = Path::new("/var/lib/sluice");
        let ro = io::Error::from(io::ErrorKind::ReadOnlyFilesystem);
        let f = write_failure("state_dir.writable", dir, &ro, 998, None);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("read-only"), "{f:?}");
        assert!(f.fix.unwrap().contains("StateDirectory="));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let f = write_failure("state_dir.writable", dir, &denied, 998, None);
        assert!(
            f.fix
                .unwrap()
                .contains("chown -R sluice:sluice /var/lib/sluice")
        );
    }

    #[test]
    fn free_space_is_judged_against_a_floor_and_the_outbox_headroom() {
        let on = Path::new("/var/lib/sluice");
        let gib = 1u64 << 30;
        assert_eq!(
            space_finding(on, 10 * gib, 20 * gib, 256 << 20).status,
            Status::Ok
        );
        let f = space_finding(on, 100 << 20, 20 * gib, 256 << 20);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(f.fix.unwrap().contains("outbox.max_bytes"));
        let f = space_finding(on, 1 << 20, 20 * gib, 0);
        assert_eq!(f.status, Status::Fail, "{f:?}");
    }

    #[test]
    fn inode_headroom_is_judged() {
        let on = Path::new("/");
        assert_eq!(inodes_finding(on, 0, 0).status, Status::Ok);
        assert_eq!(inodes_finding(on, 500_000, 1_000_000).status, Status::Ok);
        assert_eq!(inodes_finding(on, 40_000, 1_000_000).status, Status::Warn);
        assert_eq!(inodes_finding(on, 10, 1_000_000).status, Status::Fail);
    }

    #[test]
    fn certificate_expiry_warns_inside_the_window_and_fails_after() {
        let p = Path::new("/etc/sluice/tls/gw.crt");
        let now = 1_800_000_000;
        let f = expiry_finding(
            "cloud.client_cert",
            p,
            Some(now + 90 * 86_400),
            now,
            30,
            "renew",
        );
        assert_eq!(f.status, Status::Ok, "{f:?}");
        let f = expiry_finding(
            "cloud.client_cert",
            p,
            Some(now + 10 * 86_400),
            now,
            30,
            "renew",
        );
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(f.detail.contains("in 10 days"), "{f:?}");
        let f = expiry_finding(
            "cloud.client_cert",
            p,
            Some(now - 3 * 86_400),
            now,
            30,
            "renew",
        );
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            f.detail.contains("expired on") && f.detail.contains("3 days ago"),
            "{f:?}"
        );
        assert_eq!(f.fix.as_deref(), Some("renew"));
        let f = expiry_finding("cloud.client_cert", p, None, now, 30, "renew");
        assert_eq!(f.status, Status::Fail);
    }

    #[test]
    fn tls_errors_map_to_their_fix() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as R};
        let wrap = |e: R| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (R::InvalidCertificate(C::UnknownIssuer), "cloud.ca_file"),
            (R::InvalidCertificate(C::Expired), "renew"),
            (R::InvalidCertificate(C::NotValidYet), "clock"),
            (R::InvalidCertificate(C::NotValidForName), "host name"),
            (R::AlertReceived(A::CertificateExpired), "cloud.cert_file"),
            (R::AlertReceived(A::CertificateRequired), "cloud.cert_file"),
            (R::AlertReceived(A::UnknownCA), "clientAuth"),
            (R::AlertReceived(A::NoApplicationProtocol), "cloud.alpn"),
            (
                R::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                "mqtt://",
            ),
        ];
        for (e, want) in cases {
            let what = format!("{e:?}");
            let f = tls_failure("broker", "broker:8883", &wrap(e));
            assert_eq!(f.status, Status::Fail);
            assert!(f.fix.as_deref().unwrap().contains(want), "{what}: {f:?}");
        }
        let f = tls_failure(
            "broker",
            "broker:8883",
            &io::Error::from(io::ErrorKind::ConnectionReset),
        );
        assert_eq!(f.status, Status::Fail);
    }

    #[test]
    fn a_closed_port_fails_at_tcp_and_a_plain_listener_fails_at_tls() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let closed = {
            let l = TcpListener::bind(addr(0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let f = rt.block_on(reach("127.0.0.1", closed, None, Duration::from_secs(2)));
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            (f[0].check.as_str(), f[0].status),
            ("cloud.dns", Status::Ok)
        );
        assert_eq!(
            (f[1].check.as_str(), f[1].status),
            ("cloud.tcp", Status::Fail)
        );
        assert!(f[1].detail.contains("refused"), "{f:?}");

        // A listener that never speaks TLS: the handshake times out.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=ca", "-keyout"])
            .arg(dir.path().join("ca.key"))
            .arg("-out")
            .arg(&ca)
            .output()
            .expect("openssl must be installed");
        assert!(st.status.success());
        let silent = TcpListener::bind(addr(0)).unwrap();
        let port = silent.local_addr().unwrap().port();
        let tls = UplinkTls {
            ca_file: ca,
            client_cert: None,
            alpn: Vec::new(),
        };
        let f = rt.block_on(reach(
            "127.0.0.1",
            port,
            Some(&tls),
            Duration::from_millis(500),
        ));
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!(f[1].status, Status::Ok, "{f:?}");
        assert_eq!(
            (f[2].check.as_str(), f[2].status),
            ("cloud.tls", Status::Fail)
        );
    }

    #[test]
    fn an_unresolvable_host_fails_at_dns() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // RFC 6761: .invalid never resolves.
        let f = rt.block_on(reach("broker.invalid", 8883, None, Duration::from_secs(5)));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].check.as_str(), f[0].status),
            ("cloud.dns", Status::Fail)
        );
        rt.shutdown_background();
    }

    #[test]
    fn chrony_leap_status_tells_synchronization() {
        let synced = "Reference ID    : C0A80001 (ntp)\nLeap status     : Normal\n";
        let unsynced = "Reference ID    : 00000000 ()\nLeap status     : Not synchronised\n";
        assert_eq!(chrony_synchronized(synced), Some(true));
        assert_eq!(chrony_synchronized(unsynced), Some(false));
        assert_eq!(chrony_synchronized("506 Cannot talk to daemon\n"), None);
    }

    #[test]
    fn an_unknown_clock_is_a_warning_and_a_synchronized_one_is_ok() {
        let none = ClockEvidence::default();
        let f = clock_finding(ClockMode::Auto, true, &none);
        assert_eq!(f.status, Status::Warn);
        assert!(f.detail.contains("cannot tell"), "{f:?}");
        assert!(
            f.detail.contains("skew against the broker unknown"),
            "{f:?}"
        );
        let synced = ClockEvidence {
            timesyncd: Some(true),
            ..ClockEvidence::default()
        };
        assert_eq!(
            clock_finding(ClockMode::Auto, true, &synced).status,
            Status::Ok
        );
        assert_eq!(
            clock_finding(ClockMode::Untrusted, false, &synced).status,
            Status::Warn
        );
        let unsynced = ClockEvidence {
            chrony: Some(false),
            ..ClockEvidence::default()
        };
        let f = clock_finding(ClockMode::Auto, false, &unsynced);
        assert_eq!(f.status, Status::Warn);
        assert!(
            f.detail.contains("per chrony") && f.detail.contains("ts_trusted:false"),
            "{f:?}"
        );
    }

    #[test]
    fn the_watchdog_is_read_from_the_unit() {
        let no_systemd = WatchdogEvidence::default();
        assert_eq!(watchdog_finding(&no_systemd).status, Status::Warn);
        let on = WatchdogEvidence {
            systemd: true,
            show: Some("LoadState=loaded\nWatchdogUSec=30s\n".into()),
            ..WatchdogEvidence::default()
        };
        let f = watchdog_finding(&on);
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert!(f.detail.contains("WatchdogSec=30s"));
        let off = WatchdogEvidence {
            systemd: true,
            show: Some("LoadState=loaded\nWatchdogUSec=0\n".into()),
            ..WatchdogEvidence::default()
        };
        assert!(
            watchdog_finding(&off)
                .fix
                .unwrap()
                .contains("WatchdogSec=30s")
        );
        let missing = WatchdogEvidence {
            systemd: true,
            show: Some("LoadState=not-found\nWatchdogUSec=0\n".into()),
            ..WatchdogEvidence::default()
        };
        assert!(watchdog_finding(&missing).detail.contains("not installed"));
        let inside = WatchdogEvidence {
            env_usec: Some("30000000".into()),
            ..WatchdogEvidence::default()
        };
        assert_eq!(watchdog_finding(&inside).status, Status::Ok);
    }

    #[test]
    fn the_uplink_view_of_a_running_daemon_is_judged() {
        let up = json!({"uplink": {"connected": true, "records_acked": 5}});
        assert_eq!(uplink_finding(&up).status, Status::Ok);
        let refused =
            json!({"uplink": {"connected": false, "error": "connection refused: not authorized"}});
        let f = uplink_finding(&refused);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("not authorized"));
        let connecting = json!({"uplink": {"connected": false, "error": null}});
        assert_eq!(uplink_finding(&connecting).status, Status::Warn);
    }

    #[test]
    fn the_report_renders_a_table_and_json_and_counts_failures() {
        let r = Report {
            findings: vec![
                Finding::ok("config", "fine"),
                Finding::warn("clock", "cannot tell", "run NTP"),
                Finding::fail("cloud.tcp", "refused", "start the broker"),
            ],
        };
        assert_eq!(r.failures(), 1);
        let t = r.to_table();
        assert!(t.contains("FAIL  cloud.tcp  refused\n"), "{t}");
        assert!(t.contains("fix: start the broker"), "{t}");
        assert!(t.ends_with("1 ok, 1 warning, 1 failure\n"), "{t}");
        let j = r.to_json();
        assert_eq!(j["ok"], false);
        assert_eq!(j["summary"]["fail"], 1);
        assert_eq!(j["findings"][1]["status"], "warn");
        assert_eq!(j["findings"][0]["fix"], Json::Null);
    }
}
