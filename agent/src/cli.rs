//! The `sluice` command line: `run` is the daemon, every other command is
//! local diagnostics (over the admin socket, or straight on the state dir when
//! the daemon may be stopped). Exit codes: 0 ok, 1 runtime failure, 2 bad
//! configuration or usage.

use crate::admin;
use crate::config::{self, Config, LogFormat};
use crate::daemon::{self, Exit};
use crate::registry::RegistryDb;
use clap::{Parser, Subcommand};
use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Log format: human or json (overrides log.format).
    #[arg(long, global = true, value_parser = ["human", "json"])]
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
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Records, bytes, oldest age and drops of the outbox.
    Stats {
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

fn init_logging(cfg: &Config, cli_format: Option<&str>) {
    let format = match cli_format {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Human,
        None => cfg.log_format,
    };
    let filter = std::env::var("SLUICE_LOG").unwrap_or_else(|_| cfg.log_level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v)?);
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
    let cfg = load_config(&cli.config)?;
    match cli.command {
        Command::Run => {
            init_logging(&cfg, cli.log_format.as_deref());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sluice")
                .build()?;
            match rt.block_on(daemon::run(cfg)) {
                Ok(Exit::Stopped) => Ok(()),
                Ok(Exit::TaskFailed(name)) => Err(Failure {
                    code: 1,
                    message: format!("{name} ended unexpectedly"),
                }),
                Err(e) => Err(Failure {
                    code: 1,
                    message: format!("{e:#}"),
                }),
            }
        }
        Command::CheckConfig => {
            print!("{}", config::effective_toml(&cfg)?);
            Ok(())
        }
        Command::Status { json } => {
            let st = admin::request(&cfg.admin_socket, "status")?;
            if json {
                print_json(&st)
            } else {
                print_status(&st);
                Ok(())
            }
        }
        Command::Devices(cmd) => devices(&cfg, cmd),
        Command::Queue(QueueCmd::Stats { json }) => {
            let path = cfg.outbox_path();
            if !path.exists() {
                return Err(Failure {
                    code: 1,
                    message: format!("no outbox at {} (has the daemon ever run?)", path.display()),
                });
            }
            let st = sluice_cloud_sync::outbox::read_stats(&path)?;
            if json {
                print_json(&st)
            } else {
                let age = st.oldest_accepted_ms.map(|t| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    (now - t).max(0) / 1000
                });
                println!("records        {}", st.records);
                println!("bytes          {}", st.bytes);
                println!(
                    "oldest age     {}",
                    age.map_or("-".into(), |a| format!("{a}s"))
                );
                println!("records acked  {}", st.records_acked);
                let drops: Vec<String> =
                    st.dropped.iter().map(|(r, n)| format!("{r}={n}")).collect();
                println!("dropped        {}", drops.join(" "));
                Ok(())
            }
        }
    }
}

fn devices(cfg: &Config, cmd: DevicesCmd) -> Result<(), Failure> {
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("gateway.state_dir {}: {e}", cfg.state_dir.display()))?;
    let db = RegistryDb::open(&cfg.state_db_path())?;
    match cmd {
        DevicesCmd::Add { name, kind, token } => {
            let token = db.add(&name, &kind, token.as_deref())?;
            println!("{token}");
            notify_registry_change(cfg);
        }
        DevicesCmd::List { json } => {
            let list = db.list()?;
            if json {
                print_json(&list)?;
            } else {
                println!("{:<24} {:<16} STATE", "NAME", "TYPE");
                for d in list {
                    let state = if d.revoked { "revoked" } else { "active" };
                    println!("{:<24} {:<16} {state}", d.name, d.kind);
                }
            }
        }
        DevicesCmd::Show { name, json } => {
            let d = db.show(&name)?;
            if json {
                print_json(&d)?;
            } else {
                println!("name     {}", d.name);
                println!("type     {}", d.kind);
                println!("state    {}", if d.revoked { "revoked" } else { "active" });
                println!("created  {} (unix ms)", d.created_ms);
            }
        }
        DevicesCmd::Revoke { name } => {
            db.revoke(&name)?;
            println!("revoked {name}");
            notify_registry_change(cfg);
        }
        DevicesCmd::RotateToken { name } => {
            println!("{}", db.rotate_token(&name)?);
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
    println!(
        "sluice {}  gateway {} (epoch {})  up {}s",
        s("/version"),
        s("/gateway/id"),
        s("/gateway/epoch"),
        s("/uptime_s")
    );
    if let Some(Json::Object(l)) = st.get("listeners") {
        for (name, addr) in l {
            println!("listener {name:<6} {}", addr.as_str().unwrap_or("-"));
        }
    }
    println!(
        "outbox   {} records, {} bytes, oldest {}s, dropped {}",
        s("/outbox/records"),
        s("/outbox/bytes"),
        s("/outbox/oldest_age_s"),
        s("/outbox/dropped")
    );
    if st.pointer("/uplink/configured") == Some(&Json::Bool(true)) {
        println!(
            "uplink   connected={} last ack {}s ago, {} records acked{}",
            s("/uplink/connected"),
            s("/uplink/last_ack_age_s"),
            s("/uplink/records_acked"),
            st.pointer("/uplink/error")
                .and_then(Json::as_str)
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    } else {
        println!("uplink   offline mode (no [cloud] configured)");
    }
    println!("devices  {} registered", s("/devices/registered"));
}
