//! The admin socket: newline-delimited JSON requests and responses on a unix
//! socket (mode 0660), used by the CLI.
//!
//! Requests: `{"cmd":"status"}` → the status document (see DESIGN.md);
//! `{"cmd":"reload_devices"}` → re-read the registry (the CLI sends it after
//! changing devices). `{"cmd":"reload_attributes","devices":[…]}` → re-read
//! those devices' attributes and the firmware index, pushing changed shared
//! attributes to live sessions (the CLI sends it after staging firmware).
//! `{"cmd":"log_level","filter":F?}` → show or replace the log filter
//! (`sluice log-level`). Responses: `{"ok":true,"result":…}` or
//! `{"ok":false,"error":"…"}`.

use crate::registry::Registry;
use crate::stats::IngestStats;
use serde_json::{Value as Json, json};
use sluice_cloud_sync::{Outbox, UplinkStatus};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Why the admin socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another daemon answers on this socket.
    #[error("another sluice daemon is running (its admin socket {0} answers)")]
    InUse(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("admin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// No daemon answers.
    #[error("no running sluice daemon answers on {path} ({source})")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The daemon answered with an error or garbage.
    #[error("admin request failed: {0}")]
    Failed(String),
}

/// Everything `status` reports.
pub struct AdminContext {
    /// When the daemon started.
    pub started: Instant,
    /// Gateway id.
    pub gateway_id: String,
    /// Gateway epoch.
    pub epoch: String,
    /// listener name → bound address.
    pub listeners: BTreeMap<&'static str, String>,
    /// The outbox.
    pub outbox: Outbox,
    /// The uplink's figures, when a cloud is configured.
    pub uplink: Option<Arc<UplinkStatus>>,
    /// The downlink router (commands, attributes).
    pub router: Arc<crate::downlink::Router>,
    /// The rules pipeline.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// CoAP listener counters (zero when it is off).
    pub coap: Arc<crate::coap::CoapStats>,
    /// CoAP Observe registrations.
    pub coap_observers: Arc<crate::coap::Observers>,
    /// The coaps listener's DTLS sessions and counters, if it runs.
    pub coaps: Option<Arc<crate::coaps::DtlsSide>>,
    /// The registry.
    pub registry: Arc<Registry>,
    /// Ingest counters.
    pub stats: Arc<IngestStats>,
    /// Live MQTT sessions (empty when the MQTT listener is off).
    pub mqtt_sessions: Arc<crate::mqtt::Sessions>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl AdminContext {
    /// The status document.
    pub async fn status(&self) -> Json {
        let now = now_ms();
        let outbox = match self.outbox.stats().await {
            Ok(s) => {
                let age = |t: Option<i64>| t.map(|t| (now - t).max(0) / 1000);
                let streams: serde_json::Map<String, Json> = s
                    .streams
                    .iter()
                    .map(|(name, st)| {
                        (
                            name.clone(),
                            json!({
                                "priority": st.priority,
                                "records": st.records,
                                "bytes": st.bytes,
                                "oldest_age_s": age(st.oldest_accepted_ms),
                                "dropped": st.dropped,
                            }),
                        )
                    })
                    .collect();
                json!({
                    "records": s.records,
                    "bytes": s.bytes,
                    "oldest_age_s": age(s.oldest_accepted_ms),
                    "dropped": s.dropped,
                    "records_acked": s.records_acked,
                    "corrupt_set_aside": s.corrupt_set_aside,
                    "streams": streams,
                })
            }
            Err(e) => json!({ "error": e.to_string() }),
        };
        let uplink = match &self.uplink {
            None => json!({ "configured": false, "connected": false,
                            "last_ack_age_s": null, "records_acked": 0 }),
            Some(u) => json!({
                "configured": true,
                "connected": u.connected(),
                "last_ack_age_s": u.last_ack_ms().map(|t| (now - t).max(0) / 1000),
                "records_acked": u.records_acked(),
                "error": u.last_error(),
                "downlink_received": u.downlink_received(),
                "downlink_refused": u.downlink_refused(),
                "responses_sent": u.responses_sent(),
                "responses_dropped": u.responses_dropped(),
                "client_cert_not_after": u.client_cert_not_after(),
                "client_cert_expires_in_s": u.client_cert_not_after().map(|t| t - now.div_euclid(1000)),
                "tls_reloads": u.tls_reloads(),
                "tls_reload_failures": u.tls_reload_failures(),
            }),
        };
        let commands = serde_json::to_value(&self.router.stats).unwrap_or(Json::Null);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "gateway": { "id": self.gateway_id, "epoch": self.epoch },
            "uptime_s": self.started.elapsed().as_secs(),
            "listeners": self.listeners,
            "outbox": outbox,
            "uplink": uplink,
            "devices": { "registered": self.registry.active_count(), "connected": self.mqtt_sessions.connected() },
            "ingest": self.stats.snapshot(),
            "commands": commands,
            "coap": {
                "counters": serde_json::to_value(&*self.coap).unwrap_or(Json::Null),
                "observers": self.coap_observers.count(),
            },
            "coaps": self.coaps.as_ref().map(|c| serde_json::to_value(&*c.stats).unwrap_or(Json::Null)),
            "commands_pending": self.router.pending(),
            "commands_parked": self.router.parked(),
            "rules": serde_json::to_value(self.pipeline.counters().await).unwrap_or(Json::Null),
            "firmware": self.router.firmware_summary(),
        })
    }
}

/// Binds the admin socket, removing a stale one left by a killed daemon.
///
/// Fails when another daemon answers on it or the socket cannot be created.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Serves admin requests until `cancel` fires.
pub async fn serve(listener: UnixListener, ctx: Arc<AdminContext>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &ctx).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn handle(stream: UnixStream, ctx: &AdminContext) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = AsyncBufReader::new(read.take(MAX_REQUEST as u64 * 16)).lines();
    while let Some(line) = lines.next_line().await? {
        if let Ok(req) = serde_json::from_str::<Json>(&line)
            && req.get("cmd").and_then(Json::as_str) == Some("tail")
        {
            return tail(&req, ctx, &mut write).await;
        }
        let reply = if line.len() > MAX_REQUEST {
            json!({"ok": false, "error": "request too long"})
        } else {
            answer(&line, ctx).await
        };
        let mut out = reply.to_string();
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// `{"cmd":"tail","device":NAME?,"dropped":bool}`: one JSON line per
/// record leaving the rules (and, with `dropped`, per reading a rule
/// dropped) until the client goes away; `{"lagged":N}` when it read too
/// slowly and N events were skipped.
async fn tail(
    req: &Json,
    ctx: &AdminContext,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let device = req.get("device").and_then(Json::as_str).map(str::to_owned);
    let dropped = req.get("dropped").and_then(Json::as_bool).unwrap_or(false);
    let mut rx = ctx.pipeline.watch();
    write
        .write_all(b"{\"ok\":true,\"result\":\"tailing\"}\n")
        .await?;
    loop {
        let line = match rx.recv().await {
            Ok(ev) => {
                if device.as_deref().is_some_and(|d| d != ev.device)
                    || (ev.dropped_by.is_some() && !dropped)
                {
                    continue;
                }
                serde_json::to_string(&ev).unwrap_or_default()
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                json!({"lagged": n}).to_string()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        };
        write.write_all(line.as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
}

async fn answer(line: &str, ctx: &AdminContext) -> Json {
    let req: Json = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req.get("cmd").and_then(Json::as_str) {
        Some("status") => json!({"ok": true, "result": ctx.status().await}),
        Some("reload_devices") => {
            let reg = ctx.registry.clone();
            match tokio::task::spawn_blocking(move || reg.reload()).await {
                Ok(Ok(n)) => {
                    tracing::info!(active = n, "device registry reloaded");
                    json!({"ok": true, "result": {"active": n}})
                }
                Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("reload_attributes") => {
            let devices: Vec<sluice_cloud_sync::DeviceName> = req
                .get("devices")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_str)
                        .map(sluice_cloud_sync::DeviceName::new)
                        .collect()
                })
                .unwrap_or_default();
            let router = ctx.router.clone();
            let reloaded = tokio::task::spawn_blocking(move || {
                router.attributes().reload(&devices).map(|changes| {
                    let n = changes.len();
                    for (d, set, deleted) in changes {
                        router.push_shared(&d, set, deleted);
                    }
                    n
                })
            })
            .await;
            ctx.router.wake_firmware();
            match reloaded {
                Ok(Ok(n)) => json!({"ok": true, "result": {"changed": n}}),
                Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("log_level") => log_level(&req),
        Some("queue_check") => match ctx.outbox.check().await {
            Ok(report) => json!({"ok": true, "result": report}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("queue_purge") => {
            let Some(older_than_ms) = req.get("older_than_ms").and_then(Json::as_u64) else {
                return json!({"ok": false, "error": "queue_purge needs \"older_than_ms\""});
            };
            let stream = req.get("stream").and_then(Json::as_str);
            match ctx
                .outbox
                .purge(stream, Duration::from_millis(older_than_ms))
                .await
            {
                Ok(n) => json!({"ok": true, "result": {"purged": n}}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some(other) => json!({"ok": false, "error": format!("unknown command {other:?}")}),
        None => json!({"ok": false, "error": "missing \"cmd\""}),
    }
}

/// `{"cmd":"log_level"}` → `{"filter":F}`, the log filter in force;
/// `{"cmd":"log_level","filter":F}` → F replaces it until a restart:
/// `{"previous":…,"filter":…}`.
fn log_level(req: &Json) -> Json {
    let Some(wanted) = req.get("filter") else {
        return match crate::cli::log_filter() {
            Ok(f) => json!({"ok": true, "result": {"filter": f}}),
            Err(e) => json!({"ok": false, "error": e}),
        };
    };
    let Some(wanted) = wanted.as_str().filter(|f| !f.trim().is_empty()) else {
        return json!({"ok": false,
            "error": "\"filter\" must be a non-empty string (\"off\" turns logging off)"});
    };
    if let Err(e) = crate::config::parse_log_filter(wanted) {
        return json!({"ok": false, "error": format!("{wanted:?} is not a log filter: {e}")});
    }
    match crate::cli::set_log_filter(wanted) {
        Ok(previous) => {
            let filter = crate::cli::log_filter().unwrap_or_else(|_| wanted.to_owned());
            tracing::info!(%previous, %filter, "log filter changed");
            json!({"ok": true, "result": {"previous": previous, "filter": filter}})
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Sends `{"cmd": cmd}` to a running daemon and returns its `result`
/// (blocking; for the CLI).
///
/// Fails when no daemon answers, or it answers with an error.
pub fn request(path: &Path, cmd: &str) -> Result<Json, AdminError> {
    request_with(path, json!({ "cmd": cmd }))
}

/// Sends one request document to a running daemon and returns its `result`
/// (blocking; for the CLI).
///
/// Fails when no daemon answers, or it answers with an error.
pub fn request_with(path: &Path, req: Json) -> Result<Json, AdminError> {
    let not_running = |source| AdminError::NotRunning {
        path: path.to_owned(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(not_running)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(not_running)?;
    let mut line = req.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(not_running)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(not_running)?;
    let v: Json = serde_json::from_str(&reply)
        .map_err(|e| AdminError::Failed(format!("unreadable reply: {e}")))?;
    if v.get("ok") == Some(&Json::Bool(true)) {
        Ok(v.get("result").cloned().unwrap_or(Json::Null))
    } else {
        Err(AdminError::Failed(
            v.get("error")
                .and_then(Json::as_str)
                .unwrap_or("unknown error")
                .to_owned(),
        ))
    }
}
