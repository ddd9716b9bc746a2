//! The `sluice` command line: `run` is the daemon, every other command is
//! local diagnostics (over the admin socket, or straight on the state dir when
//! the daemon may be stopped). Exit codes: 0 ok, 1 runtime failure, 2 bad
//! configuration or usage.

use crate::admin;
use crate::bench;
use crate::config::{self, Config, LogFormat};
use crate::daemon::{self, Exit};
use crate::registry::{self, RegistryDb};
use clap::{Parser, Subcommand};
use serde_json::Value as Json;
use sluice_cloud_sync::outbox;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::filter::Targets;

/// `println!` that ends the program quietly when stdout is gone (e.g.
/// `sluice queue stats | head -1`) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// `print!` with the same handling as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "sluice: an edge/IoT gateway that never loses an acknowledged reading"
)]
struct Cli {
    /// Configuration file (conf.d/*.toml beside it is layered on top).
    #[arg(long, global = true, env = "SLUICE_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format: text or json (overrides log.format; "human" is an alias
    /// of text).
    #[arg(long, global = true, value_parser = ["text", "human", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run,
    /// Load and validate the configuration; print it (exit 2 on error).
    CheckConfig,
    /// Show the running daemon's state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage registered devices (works with the daemon stopped).
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Inspect the outbox (works with the daemon stopped).
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Load a running gateway; print msgs/s and ack latency p50/p99.
    Bench(bench::BenchArgs),
    /// Signed fleet configuration: keys and envelopes (works offline).
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Follow the records leaving the rules (what goes upstream), live.
    Tail {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Also show readings the rules dropped, with the rule.
        #[arg(long)]
        dropped: bool,
        /// Print raw JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Check the setup (configuration, listeners, state dir, certificates,
    /// broker, clock, watchdog) and say how to fix what is wrong; exit 1
    /// when a check fails (works with the daemon stopped).
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also run SQLite's quick_check on the outbox (a full read).
        #[arg(long)]
        quick_check: bool,
    },
    /// Firmware images for devices (works with the daemon stopped).
    #[command(subcommand)]
    Firmware(FirmwareCmd),
    /// Show the running daemon's log filter, or replace it until the
    /// daemon restarts: `sluice log-level debug`,
    /// `sluice log-level sluice_agent::mqtt=debug,info` (`log.level` syntax).
    LogLevel {
        /// The new filter; without it, print the one in force.
        filter: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCmd {
    /// Write a new Ed25519 key pair: OUT (private, mode 0600) and OUT.pub
    /// (the public key for fleet.trusted_keys); prints the public key.
    Keygen {
        /// Private key file to create.
        out: PathBuf,
    },
    /// Print the signed envelope of FILE's bytes — a fleet configuration
    /// payload `{"version":N,"config":{…}}` (publish on P/config) or a
    /// firmware manifest (publish on P/firmware).
    Sign {
        /// Private key file (from `fleet keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The payload file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum FirmwareCmd {
    /// Stage a local image and start a campaign for devices: up to
    /// firmware.max_concurrent_devices at once get the shared attributes
    /// fw_title, fw_version, fw_size, fw_checksum (SHA-256) and
    /// fw_checksum_algorithm (pushed at once to connected devices), the
    /// others when a slot frees. Recorded in the firmware audit.
    Stage {
        /// The image file.
        file: PathBuf,
        /// Firmware title (fw_title).
        #[arg(long)]
        title: String,
        /// Firmware version (fw_version).
        #[arg(long)]
        version: String,
        /// A target device (repeat for more).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Every active device of this type (repeat for more).
        #[arg(long = "type")]
        types: Vec<String>,
        /// Allow a version that is not newer than what a target runs.
        #[arg(long)]
        allow_downgrade: bool,
        /// The image is for the gateway itself: hand it to the installer
        /// (firmware.install_command, through sluice-update@.service or
        /// directly, see firmware.handoff); committed or rolled back after
        /// the restart that follows.
        #[arg(long, conflicts_with_all = ["devices", "types"])]
        gateway: bool,
    },
    /// Install the pending gateway image SHA256 (what the privileged
    /// sluice-update@SHA256.service runs; needs root): re-verifies
    /// ready/SHA256.bin and runs firmware.install_command on it.
    Install {
        /// The image's SHA-256 (lower-case hex).
        sha256: String,
    },
    /// Downloads, campaigns and per-device progress (works with the daemon
    /// stopped).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List staged images.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCmd {
    /// Register a device; prints its access token.
    Add {
        /// Device name (A-Z a-z 0-9 - _ .).
        name: String,
        /// Device type (profile).
        #[arg(long = "type", default_value = "default")]
        kind: String,
        /// Use this access token instead of generating one.
        #[arg(long)]
        token: Option<String>,
        /// SHA-256 fingerprint of the device's TLS client certificate (64
        /// hex digits, colons allowed): it then authenticates on mqtts
        /// without a token.
        #[arg(long = "cert-sha256")]
        cert_sha256: Option<String>,
        /// Let this device publish for the devices whose names match GLOB
        /// (`*`, `?`) on mapped legacy MQTT topics (`[[mqtt.mappings]]`).
        #[arg(long = "bridge-for")]
        bridge_for: Option<String>,
        /// DTLS PSK identity for CoAP over DTLS: what the device sends in
        /// the handshake (1-128 bytes of UTF-8, no control characters,
        /// unique). Needs --psk-key or --psk-key-file.
        #[arg(long = "psk-identity", value_name = "ID", requires = "psk_key_source")]
        psk_identity: Option<String>,
        /// The pre-shared key as hex (1-64 bytes). It shows in shell
        /// history and `ps`: prefer --psk-key-file.
        #[arg(
            long = "psk-key",
            value_name = "HEX",
            group = "psk_key_source",
            requires = "psk_identity"
        )]
        psk_key: Option<String>,
        /// A file holding the pre-shared key as hex (surrounding whitespace
        /// ignored). Refused when group or others may read it (like ssh with
        /// private keys): `chmod 600 FILE`.
        #[arg(
            long = "psk-key-file",
            value_name = "FILE",
            group = "psk_key_source",
            requires = "psk_identity"
        )]
        psk_key_file: Option<PathBuf>,
    },
    /// List devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        /// Device name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device's token (takes effect at once in a running daemon).
    Revoke {
        /// Device name.
        name: String,
    },
    /// Give a device a new token; prints it.
    RotateToken {
        /// Device name.
        name: String,
    },
    /// Give an active device a new DTLS pre-shared key (CoAP over DTLS).
    ///
    /// Without --psk-key or --psk-key-file a random 16-byte key is made and
    /// printed once as hex; it is not shown again. A running daemon closes
    /// the device's DTLS sessions on the old key.
    RotatePsk {
        /// Device name.
        name: String,
        /// Set (or change) its PSK identity; needed when it has none yet.
        #[arg(long = "psk-identity", value_name = "ID")]
        psk_identity: Option<String>,
        /// Use this key, as hex (1-64 bytes). It shows in shell history and
        /// `ps`: prefer --psk-key-file.
        #[arg(long = "psk-key", value_name = "HEX", conflicts_with = "psk_key_file")]
        psk_key: Option<String>,
        /// Use the key in this file, as hex (surrounding whitespace
        /// ignored). Refused when group or others may read it (like ssh with
        /// private keys): `chmod 600 FILE`.
        #[arg(long = "psk-key-file", value_name = "FILE")]
        psk_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Records, bytes, oldest age and drops of the outbox, per stream.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the oldest records.
    Peek {
        /// How many.
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete records accepted longer ago than DUR (e.g. 2h, 7d), counted as purged.
    Purge {
        /// Age, like 30m, 12h, 7d.
        #[arg(long)]
        older_than: String,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Run SQLite's quick_check on the outbox (a full scan); exit 1 if damaged.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, Failure> {
    config::load(path).map_err(|e| Failure {
        code: 2,
        message: e.to_string(),
    })
}

/// The program: parse arguments, dispatch, map failures to exit codes.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sluice: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Whether stderr goes to systemd's journal, which timestamps every line
/// itself (`JOURNAL_STREAM` is set for a unit whose stderr is the journal,
/// `INVOCATION_ID` for any unit).
fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

fn init_logging(cfg: &Config, cli_format: Option<&str>) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{filter::LevelFilter, fmt, reload};
    let format = match cli_format {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => cfg.log_format,
    };
    let from_env = std::env::var("SLUICE_LOG").ok();
    let wanted = from_env.clone().unwrap_or_else(|| cfg.log_level.clone());
    let (filter, bad_env) = match config::parse_log_filter(&wanted) {
        Ok(f) => (f, None),
        Err(e) => (Targets::new().with_default(LevelFilter::INFO), Some(e)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let _ = LOG_FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text if under_systemd() => registry.with(layer.without_time()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
    if let (Some(e), Some(env)) = (bad_env, from_env) {
        tracing::warn!(SLUICE_LOG = %env, error = %e, "not a log filter; logging at info");
    }
}

/// The running daemon's log filter, swappable at runtime.
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Replaces the log filter of this process (`log.level` syntax, see
/// [`config::parse_log_filter`]) without a restart; returns the filter it
/// replaced. It lasts until the process ends or the configuration is
/// re-read (which applies `log.level` again unless `SLUICE_LOG` is set).
///
/// Fails on an invalid filter, or when logging was not set up (only
/// `sluice run` sets it up).
pub fn set_log_filter(filter: &str) -> Result<String, String> {
    let filter = config::parse_log_filter(filter)?;
    let mut previous = String::new();
    LOG_FILTER
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_string())?
        .modify(|current| {
            previous = current.to_string();
            *current = filter;
        })
        .map_err(|e| e.to_string())?;
    Ok(previous)
}

/// The log filter in force in this process, in `log.level` syntax.
///
/// Fails when logging was not set up (only `sluice run` sets it up).
pub fn log_filter() -> Result<String, String> {
    LOG_FILTER
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_string())?
        .with_current(ToString::to_string)
        .map_err(|e| e.to_string())
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Failure> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Tells a running daemon to re-read the registry; quiet when none runs.
fn notify_registry_change(cfg: &Config) {
    match admin::request(&cfg.admin_socket, "reload_devices") {
        Ok(_) => eprintln!("(the running daemon reloaded its device registry)"),
        Err(admin::AdminError::NotRunning { .. }) => {}
        Err(e) => eprintln!("warning: the running daemon did not reload: {e}"),
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    // Fleet keys and envelopes are made on an operator's machine: no
    // gateway configuration needed.
    if let Command::Fleet(cmd) = &cli.command {
        return fleet(cmd);
    }
    // A configuration that does not load is one of the doctor's findings.
    if let Command::Doctor { json, quick_check } = cli.command {
        return doctor(&cli.config, json, quick_check);
    }
    let cfg = load_config(&cli.config)?;
    match cli.command {
        Command::Run => {
            init_logging(&cfg, cli.log_format.as_deref());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sluice")
                .build()?;
            let mut cfg = cfg;
            loop {
                match rt.block_on(daemon::run(cfg)) {
                    // A fleet configuration was installed or rolled back,
                    // or SIGHUP found changed files: the same process runs
                    // again with what is on disk.
                    Ok(Exit::Restart) => {
                        cfg = load_config(&cli.config)?;
                        if std::env::var_os("SLUICE_LOG").is_none()
                            && let Err(e) = set_log_filter(&cfg.log_level)
                        {
                            tracing::warn!(error = %e, "log.level not applied");
                        }
                        tracing::info!(fleet_version = ?cfg.fleet_version, "restarting with the configuration on disk");
                        continue;
                    }
                    other => break finish(other),
                }
            }
        }
        Command::CheckConfig => {
            out!("{}", config::effective_toml(&cfg)?);
            Ok(())
        }
        Command::Status { json } => {
            let st = match admin::request(&cfg.admin_socket, "status") {
                Ok(st) => st,
                // No daemon: say so, and show what the state dir tells.
                Err(e @ admin::AdminError::NotRunning { .. }) => {
                    eprintln!("sluice: {e}; showing what the state dir holds");
                    let st = offline_status(&cfg);
                    if json {
                        print_json(&st)?;
                    } else {
                        print_offline_status(&st);
                    }
                    return Err(Failure {
                        code: 1,
                        message: "the daemon is not running".into(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&st)
            } else {
                print_status(&st);
                Ok(())
            }
        }
        Command::Bench(args) => {
            let report = bench::run(&cfg, &args).map_err(|e| Failure {
                code: e.exit_code(),
                message: e.to_string(),
            })?;
            if args.json {
                print_json(&report)
            } else {
                report.print_human();
                Ok(())
            }
        }
        Command::Devices(cmd) => devices(&cfg, cmd),
        Command::Queue(cmd) => queue(&cfg, cmd),
        Command::Firmware(cmd) => firmware(&cfg, cmd),
        Command::LogLevel { filter, json } => log_level(&cfg, filter.as_deref(), json),
        Command::Fleet(cmd) => fleet(&cmd),
        Command::Tail {
            device,
            dropped,
            json,
        } => tail(&cfg, device, dropped, json),
        Command::Doctor { json, quick_check } => doctor(&cli.config, json, quick_check),
    }
}

/// `sluice status` without a daemon: `{"running":false, "gateway":{"id",
/// "epoch"}, "outbox":{…}|null, "devices":{"registered"}, "firmware":{…}}`
/// from the state dir (each part `null` when its file is missing or
/// unreadable).
fn offline_status(cfg: &Config) -> Json {
    use serde_json::json;
    let outbox = sluice_cloud_sync::outbox::read_stats(&cfg.outbox_path())
        .ok()
        .and_then(|st| serde_json::to_value(st).ok())
        .unwrap_or(Json::Null);
    let (epoch, registered, firmware) = if cfg.state_db_path().exists() {
        match sluice_cloud_sync::statedb::open_read_only(&cfg.state_db_path()) {
            Ok(conn) => (
                sluice_cloud_sync::statedb::epoch(&conn).ok(),
                conn.query_row("SELECT count(*) FROM devices WHERE revoked = 0", [], |r| {
                    r.get::<_, i64>(0)
                })
                .ok(),
                crate::campaign::status(&conn).ok(),
            ),
            Err(_) => (None, None, None),
        }
    } else {
        (None, None, None)
    };
    json!({
        "running": false,
        "version": env!("CARGO_PKG_VERSION"),
        "gateway": {"id": cfg.gateway_id, "epoch": epoch},
        "outbox": outbox,
        "devices": {"registered": registered},
        "firmware": firmware,
    })
}

fn print_offline_status(st: &Json) {
    outln!("daemon         not running");
    outln!(
        "gateway        {} (epoch {})",
        st["gateway"]["id"].as_str().unwrap_or("?"),
        st["gateway"]["epoch"].as_str().unwrap_or("unknown")
    );
    match st["outbox"].as_object() {
        Some(o) => outln!(
            "outbox         {} records, {} bytes queued",
            o.get("records").and_then(Json::as_u64).unwrap_or(0),
            o.get("bytes").and_then(Json::as_u64).unwrap_or(0)
        ),
        None => outln!("outbox         none (has the daemon ever run?)"),
    }
    if let Some(n) = st["devices"]["registered"].as_i64() {
        outln!("devices        {n} registered");
    }
    if let Some(c) = st["firmware"]["campaigns"]
        .as_array()
        .filter(|c| !c.is_empty())
    {
        outln!(
            "firmware       {} device campaign(s) (sluice firmware status)",
            c.len()
        );
    }
}

fn doctor(config: &std::path::Path, json: bool, quick_check: bool) -> Result<(), Failure> {
    let opts = crate::doctor::Options {
        quick_check,
        ..crate::doctor::Options::default()
    };
    let report = crate::doctor::run(config, &opts);
    if json {
        print_json(&report.to_json())?;
    } else {
        out!("{}", report.to_table());
    }
    match report.failures() {
        0 => Ok(()),
        n => Err(Failure {
            code: 1,
            message: format!("{n} check{} failed", if n == 1 { "" } else { "s" }),
        }),
    }
}

/// `sluice log-level [FILTER]`: a bad filter is refused here (exit 2)
/// before the daemon is asked.
fn log_level(cfg: &Config, filter: Option<&str>, json: bool) -> Result<(), Failure> {
    let mut req = serde_json::json!({"cmd": "log_level"});
    if let Some(f) = filter {
        let bad = |why: String| Failure {
            code: 2,
            message: format!("{f:?} is not a log filter: {why}"),
        };
        if f.trim().is_empty() {
            return Err(bad("it is empty (\"off\" turns logging off)".into()));
        }
        config::parse_log_filter(f).map_err(bad)?;
        req["filter"] = Json::from(f);
    }
    let answer = admin::request_with(&cfg.admin_socket, req)?;
    if json {
        return print_json(&answer);
    }
    let now = answer["filter"].as_str().unwrap_or_default();
    match answer["previous"].as_str() {
        Some(previous) => outln!("log filter: {previous} -> {now}"),
        None => outln!("{now}"),
    }
    Ok(())
}

fn tail(cfg: &Config, device: Option<String>, dropped: bool, json: bool) -> Result<(), Failure> {
    use std::io::{BufRead, Write};
    let not_running = |e: std::io::Error| Failure {
        code: 1,
        message: format!(
            "the daemon is not running (admin socket {}: {e})",
            cfg.admin_socket.display()
        ),
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(&cfg.admin_socket).map_err(not_running)?;
    let req = serde_json::json!({"cmd": "tail", "device": device, "dropped": dropped});
    writeln!(stream, "{req}").map_err(not_running)?;
    let mut lines = std::io::BufReader::new(stream).lines();
    // The first line acknowledges the request.
    match lines.next() {
        Some(Ok(_)) => {}
        _ => {
            return Err(Failure {
                code: 1,
                message: "the daemon closed the tail at once".into(),
            });
        }
    }
    for line in lines {
        let line = line.map_err(not_running)?;
        if json {
            outln!("{line}");
            continue;
        }
        let Ok(ev) = serde_json::from_str::<Json>(&line) else {
            continue;
        };
        if let Some(n) = ev.get("lagged") {
            outln!("… {n} records skipped (reading too slowly)");
            continue;
        }
        let what = match (ev["stream"].as_str(), ev["dropped_by"].as_str()) {
            (_, Some(rule)) => format!("DROPPED by {rule}"),
            (Some(s), None) => s.to_owned(),
            _ => String::new(),
        };
        outln!(
            "{} {:<20} {:<12} {}",
            ev["ts"],
            ev["device"].as_str().unwrap_or(""),
            what,
            ev["values"]
        );
    }
    Ok(())
}

/// Who runs the CLI, for the firmware audit: `$SUDO_USER`, `$USER`, or the
/// uid.
fn actor() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map_or_else(|_| "unknown".into(), |m| format!("uid {}", m.uid()))
        })
}

/// A text progress bar, `[#####.....]  50%`.
fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        (frac * 100.0).round() as u64
    )
}

fn firmware_status(cfg: &Config, json: bool) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let fail = |e: String| Failure {
        code: 1,
        message: e,
    };
    let mut status = if cfg.state_db_path().exists() {
        let conn = sluice_cloud_sync::statedb::open(&cfg.state_db_path())
            .map_err(|e| fail(e.to_string()))?;
        crate::campaign::status(&conn).map_err(|e| fail(format!("state.db: {e}")))?
    } else {
        serde_json::json!({"downloads": [], "campaigns": []})
    };
    // Bytes on disk of downloads still running.
    if let Some(list) = status["downloads"].as_array_mut() {
        for d in list {
            let sha = d["sha256"].as_str().unwrap_or_default().to_owned();
            let bytes = if d["state"] == "ready" {
                d["size"].as_u64().unwrap_or(0)
            } else {
                sluice_firmware::download::partial_len(&cfg.firmware_dir(), &sha)
            };
            d["bytes"] = serde_json::json!(bytes);
        }
    }
    status["gateway"] = serde_json::json!({"version": crate::selfupdate::installed_version(cfg)});
    if json {
        return print_json(&status);
    }
    let tty = std::io::stdout().is_terminal();
    outln!(
        "gateway runs {}",
        status["gateway"]["version"].as_str().unwrap_or("?")
    );
    let downloads = status["downloads"].as_array().cloned().unwrap_or_default();
    if downloads.is_empty() {
        outln!("no firmware manifests received");
    } else {
        outln!(
            "\n{:<20} {:<10} {:<12} {:<22} PROGRESS",
            "TITLE",
            "VERSION",
            "STATE",
            "RESULT"
        );
        for d in &downloads {
            let (bytes, size) = (
                d["bytes"].as_u64().unwrap_or(0),
                d["size"].as_u64().unwrap_or(0),
            );
            let progress = if tty {
                format!("{} {bytes}/{size} B", progress_bar(bytes, size, 20))
            } else {
                format!("{bytes}/{size} B")
            };
            outln!(
                "{:<20} {:<10} {:<12} {:<22} {progress}{}",
                d["title"].as_str().unwrap_or(""),
                d["version"].as_str().unwrap_or(""),
                d["state"].as_str().unwrap_or(""),
                d["result"].as_str().unwrap_or(""),
                d["error"]
                    .as_str()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    }
    let campaigns = status["campaigns"].as_array().cloned().unwrap_or_default();
    if !campaigns.is_empty() {
        outln!(
            "\n{:<24} {:<20} {:<10} {:<8} {:<12} NOTE",
            "DEVICE",
            "TITLE",
            "VERSION",
            "STATE",
            "FW_STATE"
        );
        for c in &campaigns {
            outln!(
                "{:<24} {:<20} {:<10} {:<8} {:<12} {}",
                c["device"].as_str().unwrap_or(""),
                c["title"].as_str().unwrap_or(""),
                c["version"].as_str().unwrap_or(""),
                c["state"].as_str().unwrap_or(""),
                c["fw_state"].as_str().unwrap_or("-"),
                c["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `sluice firmware stage --gateway`: stage, check anti-rollback against
/// the installed version, hand off to the installer.
fn stage_gateway(
    cfg: &Config,
    file: &std::path::Path,
    title: &str,
    version: &str,
    allow_downgrade: bool,
) -> Result<(), Failure> {
    use crate::selfupdate;
    init_logging(cfg, None);
    let fail = |message: String| Failure { code: 1, message };
    if cfg.firmware.install_command.is_none() {
        return Err(fail(selfupdate::SelfUpdateError::Disabled.to_string()));
    }
    let installed = selfupdate::installed_version(cfg);
    let newer = sluice_firmware::version::compare_versions(version, &installed).is_gt();
    if !newer && !allow_downgrade {
        return Err(fail(format!(
            "refusing gateway version {version}: it is not newer than the installed {installed} (--allow-downgrade to install it anyway)"
        )));
    }
    std::fs::create_dir_all(&cfg.state_dir)?;
    let img = sluice_firmware::stage(&cfg.firmware_dir(), file, title, version)
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(actor = %actor(), action = "stage", target = "gateway", title, version,
        from_version = %installed, sha256 = %img.sha256, downgrade = !newer,
        "local firmware staging");
    let audit = sluice_cloud_sync::statedb::open(&cfg.state_db_path())
        .map_err(|e| fail(e.to_string()))
        .and_then(|conn| {
            crate::campaign::audit(
                &conn,
                "cli",
                &actor(),
                "staged",
                &serde_json::json!({"target": "gateway", "title": title, "version": version,
                    "from_version": installed, "sha256": img.sha256, "size": img.size,
                    "allow_downgrade": allow_downgrade}),
            )
            .map_err(|e| fail(format!("state.db: {e}")))
        });
    audit?;
    match selfupdate::hand_off(cfg, &img.path, &img.sha256, title, version)
        .map_err(|e| fail(e.to_string()))?
    {
        selfupdate::HandOff::Started { unit } => outln!(
            "staged gateway {title} {version} (sha256 {}); {unit} installs it, the daemon commits or rolls it back after the restart",
            img.sha256
        ),
        selfupdate::HandOff::Installed => outln!(
            "installed gateway {title} {version} (sha256 {}); the daemon commits or rolls it back after the restart",
            img.sha256
        ),
    }
    Ok(())
}

fn firmware(cfg: &Config, cmd: FirmwareCmd) -> Result<(), Failure> {
    use sluice_cloud_sync::DeviceName;
    match cmd {
        FirmwareCmd::Stage {
            file,
            title,
            version,
            devices,
            types,
            allow_downgrade,
            gateway: false,
        } => {
            std::fs::create_dir_all(&cfg.state_dir)?;
            let targets: Vec<DeviceName> = devices.iter().map(DeviceName::new).collect();
            let staged = crate::attributes::stage_firmware(
                &cfg.state_db_path(),
                &cfg.firmware_dir(),
                &file,
                &title,
                &version,
                &targets,
                &types,
                cfg.firmware.max_concurrent_devices,
                allow_downgrade,
                &actor(),
            )
            .map_err(|e| Failure {
                code: 1,
                message: format!("{e:#}"),
            })?;
            let img = &staged.image;
            outln!(
                "staged {} {} ({} bytes, sha256 {}) for {}; updating now: {}",
                img.title,
                img.version,
                img.size,
                img.sha256,
                staged.targets.join(", "),
                if staged.admitted.is_empty() {
                    "none (waiting for a free slot)".to_owned()
                } else {
                    staged.admitted.join(", ")
                }
            );
            let req = serde_json::json!({"cmd": "reload_attributes", "devices": staged.admitted});
            match admin::request_with(&cfg.admin_socket, req) {
                Ok(_) => eprintln!(
                    "(the running daemon pushed the fw_* attributes to connected devices)"
                ),
                Err(admin::AdminError::NotRunning { .. }) => {}
                Err(e) => eprintln!("warning: the running daemon did not reload attributes: {e}"),
            }
            Ok(())
        }
        FirmwareCmd::Status { json } => firmware_status(cfg, json),
        FirmwareCmd::Stage {
            file,
            title,
            version,
            allow_downgrade,
            gateway: true,
            ..
        } => stage_gateway(cfg, &file, &title, &version, allow_downgrade),
        FirmwareCmd::Install { sha256 } => {
            init_logging(cfg, None);
            crate::selfupdate::install(cfg, &sha256).map_err(|e| Failure {
                code: 1,
                message: e.to_string(),
            })
        }
        FirmwareCmd::List { json } => {
            let list =
                crate::attributes::list_firmware(&cfg.state_db_path()).map_err(|e| Failure {
                    code: 1,
                    message: format!("{e:#}"),
                })?;
            let rows: Vec<Json> = list
                .iter()
                .map(|(img, staged_ms)| {
                    serde_json::json!({"title": img.title, "version": img.version, "size": img.size,
                        "sha256": img.sha256, "file": img.path, "staged_ms": staged_ms})
                })
                .collect();
            if json {
                return print_json(&rows);
            }
            outln!("{:<24} {:<12} {:>10}  SHA256", "TITLE", "VERSION", "SIZE");
            for (img, _) in &list {
                outln!(
                    "{:<24} {:<12} {:>10}  {}",
                    img.title,
                    img.version,
                    img.size,
                    img.sha256
                );
            }
            Ok(())
        }
    }
}

fn fleet(cmd: &FleetCmd) -> Result<(), Failure> {
    match cmd {
        FleetCmd::Keygen { out } => {
            let public = crate::fleet::keygen(out)?;
            outln!("{public}");
            eprintln!(
                "(private key in {}, public key in {}.pub: add it to fleet.trusted_keys)",
                out.display(),
                out.display()
            );
            Ok(())
        }
        FleetCmd::Sign { key, file } => {
            let payload = std::fs::read(file).map_err(|e| Failure {
                code: 1,
                message: format!("{}: {e}", file.display()),
            })?;
            // Refuse to sign what a gateway would refuse to read.
            let v: Json = serde_json::from_slice(&payload).map_err(|e| Failure {
                code: 2,
                message: format!("{}: not JSON: {e}", file.display()),
            })?;
            let fleet = v
                .get("version")
                .and_then(Json::as_u64)
                .is_some_and(|n| n > 0)
                && v.get("config").is_some_and(Json::is_object);
            if !fleet && v.get("config").is_some() {
                return Err(Failure {
                    code: 2,
                    message: format!(
                        "{}: a fleet payload is {{\"version\":N (> 0),\"config\":{{…}}}}",
                        file.display()
                    ),
                });
            }
            if !fleet {
                // Otherwise it must be a firmware manifest.
                sluice_firmware::manifest::Manifest::parse(&payload, u64::MAX).map_err(|e| {
                    Failure {
                        code: 2,
                        message: format!(
                            "{}: neither a fleet payload {{\"version\":N,\"config\":{{…}}}} nor a firmware manifest: {e}",
                            file.display()
                        ),
                    }
                })?;
            }
            outln!("{}", crate::fleet::sign(key, &payload)?);
            Ok(())
        }
    }
}

/// Maps how the daemon ended to the CLI's result.
fn finish(r: anyhow::Result<Exit>) -> Result<(), Failure> {
    match r {
        Ok(Exit::Stopped | Exit::Restart) => Ok(()),
        Ok(Exit::TaskFailed(name)) => Err(Failure {
            code: 1,
            message: format!("{name} ended unexpectedly"),
        }),
        // Non-zero, so a supervisor that restarts on failure starts us again.
        Ok(Exit::Reboot) => Err(Failure {
            code: 3,
            message: "stopped for the cloud's gateway_reboot command".into(),
        }),
        Err(e) => Err(Failure {
            code: 1,
            message: format!("{e:#}"),
        }),
    }
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn age_text(accepted_ms: Option<i64>) -> String {
    accepted_ms.map_or("-".into(), |t| {
        format!("{}s", (unix_now_ms() - t).max(0) / 1000)
    })
}

fn queue(cfg: &Config, cmd: QueueCmd) -> Result<(), Failure> {
    let path = cfg.outbox_path();
    let need_file = || -> Result<(), Failure> {
        if path.exists() {
            Ok(())
        } else {
            Err(Failure {
                code: 1,
                message: format!("no outbox at {} (has the daemon ever run?)", path.display()),
            })
        }
    };
    match cmd {
        QueueCmd::Stats { json } => {
            need_file()?;
            let st = outbox::read_stats(&path)?;
            if json {
                return print_json(&st);
            }
            outln!("records        {}", st.records);
            outln!("bytes          {}", st.bytes);
            outln!("oldest age     {}", age_text(st.oldest_accepted_ms));
            outln!("records acked  {}", st.records_acked);
            let drops: Vec<String> = st.dropped.iter().map(|(r, n)| format!("{r}={n}")).collect();
            outln!("dropped        {}", drops.join(" "));
            outln!();
            outln!(
                "{:<14} {:>4} {:>10} {:>12} {:>8}  DROPPED",
                "STREAM",
                "PRIO",
                "RECORDS",
                "BYTES",
                "OLDEST"
            );
            for (name, s) in &st.streams {
                let drops: Vec<String> = s
                    .dropped
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(r, n)| format!("{r}={n}"))
                    .collect();
                outln!(
                    "{name:<14} {:>4} {:>10} {:>12} {:>8}  {}",
                    s.priority,
                    s.records,
                    s.bytes,
                    age_text(s.oldest_accepted_ms),
                    drops.join(" ")
                );
            }
            Ok(())
        }
        QueueCmd::Peek { n, stream, json } => {
            need_file()?;
            let rows = outbox::peek(&path, stream.as_deref(), n)?;
            if json {
                let v: Vec<Json> = rows
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "seq": l.seq.0,
                            "stream": l.stream,
                            "device": l.record.device.as_str(),
                            "ts": l.record.ts_ms,
                            "ts_trusted": l.record.ts_trusted,
                            "accepted_ms": l.accepted_ms,
                            "values": l.record.values.iter().map(|(k, v)| (k.clone(), sluice_cloud_sync::profile::value_json(v))).collect::<serde_json::Map<_, _>>(),
                        })
                    })
                    .collect();
                return print_json(&v);
            }
            for l in rows {
                let values: Vec<String> = l
                    .record
                    .values
                    .iter()
                    .map(|(k, v)| format!("{k}={}", value_text(v)))
                    .collect();
                outln!(
                    "{:>10} {:<12} {:<20} ts={}{} age={} {}",
                    l.seq.0,
                    l.stream,
                    l.record.device.as_str(),
                    l.record.ts_ms,
                    if l.record.ts_trusted {
                        ""
                    } else {
                        " (untrusted)"
                    },
                    age_text(Some(l.accepted_ms)),
                    values.join(" ")
                );
            }
            Ok(())
        }
        QueueCmd::Purge { older_than, stream } => {
            let older = config::parse_duration(&config::DurationValue::Text(older_than.clone()))
                .ok_or_else(|| Failure {
                    code: 2,
                    message: format!(
                        "--older-than: {older_than:?} is not a duration like 12h or 7d"
                    ),
                })?;
            let req = serde_json::json!({
                "cmd": "queue_purge",
                "older_than_ms": u64::try_from(older.as_millis()).unwrap_or(u64::MAX),
                "stream": stream,
            });
            let purged = match admin::request_with(&cfg.admin_socket, req) {
                Ok(v) => v["purged"].as_u64().unwrap_or(0),
                Err(admin::AdminError::NotRunning { .. }) => {
                    need_file()?;
                    // No daemon: this process is the outbox's only writer.
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let clock = std::sync::Arc::new(sluice_cloud_sync::Clock::new(cfg.clock));
                        let o = sluice_cloud_sync::Outbox::open(
                            &path,
                            &cfg.state_db_path(),
                            cfg.outbox.clone(),
                            clock,
                        )?;
                        let n = o.purge(stream.as_deref(), older).await;
                        o.close().await;
                        Ok::<u64, Failure>(n?)
                    })?
                }
                Err(e) => return Err(e.into()),
            };
            outln!("purged {purged} records");
            Ok(())
        }
        QueueCmd::Check { json } => {
            let report: outbox::CheckReport = match admin::request(&cfg.admin_socket, "queue_check")
            {
                Ok(v) => serde_json::from_value(v)?,
                Err(admin::AdminError::NotRunning { .. }) => {
                    need_file()?;
                    outbox::check_file(&path)?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&report)?;
            } else if report.ok {
                outln!("ok");
            } else {
                for m in &report.messages {
                    outln!("{m}");
                }
            }
            if report.ok {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    message: "the outbox failed SQLite's quick_check".into(),
                })
            }
        }
    }
}

fn value_text(v: &sluice_cloud_sync::Value) -> String {
    sluice_cloud_sync::profile::value_json(v).to_string()
}

/// The pre-shared key given as `--psk-key HEX` or `--psk-key-file FILE`,
/// if either.
///
/// Fails on bad hex or length, or a key file that cannot be read or that
/// group or others may read.
fn psk_key_arg(
    hex: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<Vec<u8>>, Failure> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt;
    if let Some(hex) = hex {
        return Ok(Some(registry::parse_psk_hex(hex)?));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let failed = |what: String| format!("--psk-key-file {}: {what}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
    // The mode of the file opened, not of whatever the path names later.
    let mode = f
        .metadata()
        .map_err(|e| failed(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(failed(format!(
            "mode {:04o} lets group or others read the key; `chmod 600 {}` first",
            mode & 0o7777,
            path.display()
        ))
        .into());
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| failed(e.to_string()))?;
    Ok(Some(
        registry::parse_psk_hex(&text).map_err(|e| failed(e.to_string()))?,
    ))
}

fn devices(cfg: &Config, cmd: DevicesCmd) -> Result<(), Failure> {
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("gateway.state_dir {}: {e}", cfg.state_dir.display()))?;
    let db = RegistryDb::open(&cfg.state_db_path())?;
    match cmd {
        DevicesCmd::Add {
            name,
            kind,
            token,
            cert_sha256,
            bridge_for,
            psk_identity,
            psk_key,
            psk_key_file,
        } => {
            let cert = cert_sha256
                .as_deref()
                .map(registry::parse_cert_sha256)
                .transpose()?;
            if let Some(g) = bridge_for.as_deref()
                && !registry::valid_glob(g)
            {
                return Err(registry::RegistryError::BadGlob(g.into()).into());
            }
            // clap makes the identity and a key come together.
            let psk_key = psk_key_arg(psk_key.as_deref(), psk_key_file.as_deref())?;
            let psk = psk_identity.as_deref().zip(psk_key.as_deref());
            let token = db.add_with_cert(&name, &kind, token.as_deref(), cert.as_ref(), psk)?;
            if bridge_for.is_some() {
                db.set_bridge_for(&name, bridge_for.as_deref())?;
            }
            outln!("{token}");
            notify_registry_change(cfg);
        }
        DevicesCmd::List { json } => {
            let list = db.list()?;
            if json {
                print_json(&list)?;
            } else {
                outln!("{:<24} {:<16} STATE", "NAME", "TYPE");
                for d in list {
                    let state = if d.revoked { "revoked" } else { "active" };
                    outln!("{:<24} {:<16} {state}", d.name, d.kind);
                }
            }
        }
        DevicesCmd::Show { name, json } => {
            let d = db.show(&name)?;
            if json {
                print_json(&d)?;
            } else {
                outln!("name     {}", d.name);
                outln!("type     {}", d.kind);
                outln!("state    {}", if d.revoked { "revoked" } else { "active" });
                outln!("created  {} (unix ms)", d.created_ms);
                outln!("cert     {}", d.cert_sha256.as_deref().unwrap_or("-"));
                outln!("psk      {}", d.psk_identity.as_deref().unwrap_or("-"));
                outln!("source   {}", d.source);
            }
        }
        DevicesCmd::Revoke { name } => {
            db.revoke(&name)?;
            outln!("revoked {name}");
            notify_registry_change(cfg);
        }
        DevicesCmd::RotateToken { name } => {
            outln!("{}", db.rotate_token(&name)?);
            notify_registry_change(cfg);
        }
        DevicesCmd::RotatePsk {
            name,
            psk_identity,
            psk_key,
            psk_key_file,
        } => {
            match psk_key_arg(psk_key.as_deref(), psk_key_file.as_deref())? {
                Some(key) => {
                    db.set_psk(&name, psk_identity.as_deref(), &key)?;
                    outln!("psk rotated for {name}");
                }
                None => {
                    let key = registry::generate_psk()?;
                    db.set_psk(&name, psk_identity.as_deref(), &key)?;
                    outln!("{}", registry::fingerprint_hex(&key));
                }
            }
            notify_registry_change(cfg);
        }
    }
    Ok(())
}

fn print_status(st: &Json) {
    let s = |p: &str| {
        st.pointer(p).map_or("-".to_owned(), |v| match v {
            Json::String(s) => s.clone(),
            Json::Null => "-".to_owned(),
            other => other.to_string(),
        })
    };
    outln!(
        "sluice {}  gateway {} (epoch {})  up {}s",
        s("/version"),
        s("/gateway/id"),
        s("/gateway/epoch"),
        s("/uptime_s")
    );
    if let Some(Json::Object(l)) = st.get("listeners") {
        for (name, addr) in l {
            outln!("listener {name:<6} {}", addr.as_str().unwrap_or("-"));
        }
    }
    outln!(
        "outbox   {} records, {} bytes, oldest {}s, dropped {}",
        s("/outbox/records"),
        s("/outbox/bytes"),
        s("/outbox/oldest_age_s"),
        s("/outbox/dropped")
    );
    if st.pointer("/uplink/configured") == Some(&Json::Bool(true)) {
        outln!(
            "uplink   connected={} last ack {}s ago, {} records acked{}",
            s("/uplink/connected"),
            s("/uplink/last_ack_age_s"),
            s("/uplink/records_acked"),
            st.pointer("/uplink/error")
                .and_then(Json::as_str)
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
        if let Some(left) = st
            .pointer("/uplink/client_cert_expires_in_s")
            .and_then(Json::as_i64)
        {
            if left < 0 {
                outln!("         client certificate EXPIRED {}s ago", -left);
            } else {
                outln!("         client certificate expires in {left}s");
            }
        }
    } else {
        outln!("uplink   offline mode (no [cloud] configured)");
    }
    outln!("devices  {} registered", s("/devices/registered"));
    if st.get("coaps").is_some_and(|c| !c.is_null()) {
        outln!(
            "coaps    {} sessions, {} handshaking; {} handshakes, {} failed auth, {} timed out, {} revoked",
            s("/coaps/established"),
            s("/coaps/half_open"),
            s("/coaps/handshakes"),
            s("/coaps/auth_failures"),
            s("/coaps/handshake_timeouts"),
            s("/coaps/revoked")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice").chain(args.split_whitespace()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_psk_needs_an_identity_and_exactly_one_key_source() {
        for ok in [
            "devices add d --psk-identity i --psk-key 01",
            "devices add d --psk-identity i --psk-key-file f",
            "devices rotate-psk d",
            "devices rotate-psk d --psk-identity i",
            "devices rotate-psk d --psk-key 01",
            "devices rotate-psk d --psk-identity i --psk-key-file f",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "devices add d --psk-identity i",
            "devices add d --psk-key 01",
            "devices add d --psk-key-file f",
            "devices add d --psk-identity i --psk-key 01 --psk-key-file f",
            "devices rotate-psk d --psk-key 01 --psk-key-file f",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_psk_key_file_is_read_as_hex_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key.hex");
        std::fs::write(&f, "  0A0b\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            psk_key_arg(None, Some(&f)).ok().flatten(),
            Some(vec![10, 11])
        );
        for mode in [0o640, 0o604] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = psk_key_arg(None, Some(&f)).err().unwrap();
            assert!(err.message.contains("chmod 600"), "{}", err.message);
        }
        let bad = dir.path().join("bad.hex");
        std::fs::write(&bad, "xyz").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = psk_key_arg(None, Some(&bad)).err().unwrap();
        assert!(err.message.contains("hex"), "{}", err.message);
        assert!(!err.message.contains("xyz"), "{}", err.message);
        assert_eq!(
            psk_key_arg(Some("0xff"), None).ok().flatten(),
            Some(vec![255])
        );
        assert_eq!(psk_key_arg(None, None).ok().flatten(), None);
    }
}
