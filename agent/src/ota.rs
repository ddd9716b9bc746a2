//! The firmware task: signed manifests in, images downloaded and verified,
//! campaigns run, progress reported on `P/firmware/state`.
//!
//! Inputs (one bounded channel, [`OtaHandle`]):
//! - a manifest envelope from `P/firmware` (or the ThingsBoard shared
//!   attribute `sluice_firmware`): opened with `fleet.trusted_keys` (the same
//!   signed envelope as fleet configuration), parsed
//!   ([`sluice_firmware::manifest`]), its targets resolved (devices by name
//!   and by type through the registry, the gateway itself) and checked
//!   against anti-rollback: a target whose running version — or the version
//!   of a campaign it already has — is not older is refused unless
//!   `allow_downgrade`. A replay of a manifest already accepted is a no-op.
//!   Accepted manifests are written to `state.db` (`firmware_downloads`)
//!   before anything else, so a download interrupted by a restart resumes.
//! - a device's OTA telemetry (`fw_state`, `current_fw_*`), tapped from the
//!   pipeline: its campaign advances ([`crate::campaign`]).
//! - a wake-up after the CLI staged an image locally.
//!
//! Downloads run one at a time (HTTPS with `Range` resume, see
//! [`sluice_firmware::download`]); a ready image is indexed, its device
//! targets queued and admitted up to `firmware.max_concurrent_devices`, and a
//! gateway target handed to the installer ([`crate::selfupdate`]). Every
//! second the task reports download progress and fails devices that made
//! no progress within `firmware.device_timeout`.
//!
//! Reports (`P/firmware/state`, not stored in the outbox: lost when the link
//! is down, the state is in `sluice firmware status`):
//! `{"target":"download"|"device"|"gateway", "title", "version", "state":
//! LwM2M state name, "result": LwM2M result name, "result_code": 0-9, …}`,
//! and for manifest decisions `{"title","version","sha256","status":
//! "accepted"|"rejected","error"?,"targets"?}`.

use crate::campaign::{self, FwState};
use crate::config::Config;
use crate::downlink::Router;
use crate::registry::Registry;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};
use sluice_cloud_sync::downlink::UpMessage;
use sluice_cloud_sync::{DeviceName, Record, Value};
use sluice_firmware::Image;
use sluice_firmware::lwm2m::{UpdateResult, UpdateState};
use sluice_firmware::manifest::Manifest;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events queued for the firmware task before senders see "full".
const QUEUE: usize = 256;

/// What the firmware task takes.
#[derive(Debug)]
pub enum Event {
    /// A manifest envelope from the cloud.
    Envelope(Vec<u8>),
    /// A device's OTA telemetry.
    Report {
        /// The device.
        device: String,
        /// `fw_state`.
        fw_state: Option<String>,
        /// `current_fw_title`.
        title: Option<String>,
        /// `current_fw_version`.
        version: Option<String>,
    },
    /// Something changed in state.db (local staging): admit and report.
    Wake,
}

/// The sending side, cloned into the router and the pipeline.
#[derive(Debug, Clone)]
pub struct OtaHandle {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
    summary: Arc<std::sync::Mutex<Json>>,
    cfg: Arc<Config>,
}

impl OtaHandle {
    /// A handle and the receiver [`run`] takes.
    pub fn new(cfg: &Config) -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
                summary: Arc::new(std::sync::Mutex::new(Json::Null)),
                cfg: Arc::new(cfg.clone()),
            },
            rx,
        )
    }

    /// The firmware block of `sluice status`: the gateway's version,
    /// downloads and campaign devices by state, the running download.
    pub fn summary(&self) -> Json {
        let mut s = self.summary.lock().map(|g| g.clone()).unwrap_or(Json::Null);
        if !s.is_null() {
            s["events_dropped"] = json!(self.dropped.load(Ordering::Relaxed));
            // Read now: a self-update commits outside this task.
            s["gateway_version"] = json!(crate::selfupdate::installed_version(&self.cfg));
        }
        s
    }

    /// Queues `ev` (dropped and counted when the task is behind).
    pub fn send(&self, ev: Event) {
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("firmware task queue full; an event was dropped");
        }
    }

    /// Looks for OTA keys in `records` (cheap when there are none).
    pub fn tap(&self, records: &[Record]) {
        for r in records {
            let mut found = false;
            let (mut state, mut title, mut version) = (None, None, None);
            for (k, v) in &r.values {
                let slot = match k.as_str() {
                    "fw_state" => &mut state,
                    "current_fw_title" => &mut title,
                    "current_fw_version" => &mut version,
                    _ => continue,
                };
                found = true;
                *slot = Some(match v {
                    Value::Str(s) => s.clone(),
                    Value::I64(n) => n.to_string(),
                    Value::F64(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Json(j) => j.clone(),
                });
            }
            if found {
                self.send(Event::Report {
                    device: r.device.as_str().to_owned(),
                    fw_state: state,
                    title,
                    version,
                });
            }
        }
    }
}

fn report(router: &Router, r: &Json) {
    tracing::info!(report = %r, "firmware");
    router.up(UpMessage::FirmwareState(r.to_string().into_bytes()));
}

fn progress_report(
    target: &str,
    title: &str,
    version: &str,
    state: UpdateState,
    result: UpdateResult,
) -> Json {
    json!({
        "target": target,
        "title": title,
        "version": version,
        "state": state.name(),
        "result": result.name(),
        "result_code": result.code(),
    })
}

/// A manifest accepted for download, as kept in `firmware_downloads`.
#[derive(Debug, Clone)]
struct Job {
    manifest: Manifest,
    devices: Vec<String>,
    gateway: bool,
}

impl Job {
    fn to_json(&self) -> Json {
        let m = &self.manifest;
        json!({
            "title": m.title, "version": m.version, "url": m.url, "size": m.size,
            "sha256": m.sha256, "allow_downgrade": m.allow_downgrade,
            "targets": {"gateway": self.gateway, "devices": self.devices, "types": []},
        })
    }

    fn from_json(text: &str, max_size: u64) -> Option<Self> {
        let m = Manifest::parse(text.as_bytes(), max_size).ok()?;
        Some(Self {
            devices: m.targets.devices.clone(),
            gateway: m.targets.gateway,
            manifest: m,
        })
    }
}

/// The firmware task's state.
struct Ota {
    cfg: Config,
    router: Arc<Router>,
    registry: Arc<Registry>,
    conn: Connection,
    /// Bytes on disk of the running download (read by the reporter).
    bytes: Arc<AtomicU64>,
    reported_bytes: u64,
    /// Whether a campaign or download may need the per-second work (an
    /// idle gateway does none: no state.db access, no thread hand-off).
    busy: bool,
    summary: Arc<std::sync::Mutex<Json>>,
    running: Option<(
        Job,
        tokio::task::JoinHandle<Result<PathBuf, sluice_firmware::download::DownloadError>>,
    )>,
}

/// Runs the firmware task until `cancel`. Its state.db work (fsynced
/// writes) blocks: run it on a thread of its own, as
/// `spawn_blocking(move || handle.block_on(run(…)))` does (the download it
/// starts is an ordinary task).
pub async fn run(
    cfg: Config,
    handle: OtaHandle,
    mut rx: mpsc::Receiver<Event>,
    router: Arc<Router>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let conn = match sluice_cloud_sync::statedb::open(&cfg.state_db_path()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "firmware task cannot open state.db; firmware updates are off");
            cancel.cancelled().await;
            return;
        }
    };
    let mut ota = Ota {
        cfg,
        router,
        registry,
        conn,
        bytes: Arc::new(AtomicU64::new(0)),
        reported_bytes: 0,
        busy: true,
        summary: handle.summary.clone(),
        running: None,
    };
    drop(handle);
    ota.admit();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if ota.running.is_none() {
            ota.start_next();
        }
        let ticking = ota.busy || ota.running.is_some();
        let finished = async {
            match ota.running.as_mut() {
                Some((_, h)) => Some(h.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = rx.recv() => match ev.inspect(|_| ota.busy = true) {
                Some(Event::Envelope(env)) => ota.envelope(&env),
                Some(Event::Report { device, fw_state, title, version }) => {
                    ota.device_report(&device, fw_state.as_deref(), title.as_deref(), version.as_deref());
                }
                Some(Event::Wake) => ota.admit(),
                None => break,
            },
            r = finished => {
                if let Some(r) = r {
                    ota.finished(r);
                }
            }
            _ = tick.tick(), if ticking => {
                ota.tick();
            }
        }
    }
    if let Some((_, h)) = ota.running.take() {
        // The part file stays; the download resumes at the next start.
        h.abort();
    }
}

impl Ota {
    fn reject(&self, title: &str, version: &str, sha256: &str, error: &str) {
        self.router
            .stats
            .manifests_rejected
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(title, version, error, "firmware manifest rejected");
        let detail = json!({"title": title, "version": version, "sha256": sha256, "error": error});
        if let Err(e) = campaign::audit(&self.conn, "cloud", "manifest", "rejected", &detail) {
            tracing::warn!(error = %e, "cannot write the firmware audit");
        }
        report(
            &self.router,
            &json!({"title": title, "version": version, "sha256": sha256, "status": "rejected", "error": error}),
        );
    }

    fn envelope(&mut self, env: &[u8]) {
        let Some(keys) = self.cfg.fleet.as_ref().map(|f| f.trusted_keys.clone()) else {
            return self.reject(
                "",
                "",
                "",
                "no fleet.trusted_keys are configured: firmware manifests cannot be verified",
            );
        };
        let payload = match crate::fleet::open(env, &keys) {
            Ok(p) => p,
            Err(e) => return self.reject("", "", "", &e.to_string()),
        };
        let m = match Manifest::parse(&payload, self.cfg.firmware.max_size) {
            Ok(m) => m,
            Err(e) => return self.reject("", "", "", &e.to_string()),
        };
        let (title, version, sha) = (m.title.clone(), m.version.clone(), m.sha256.clone());
        // Targets: named devices and devices of the named types.
        let mut devices: Vec<String> = Vec::new();
        let mut refused: Vec<Json> = Vec::new();
        let active = self.registry.active_devices();
        for d in &m.targets.devices {
            if self.registry.is_active(&DeviceName::new(d)) {
                devices.push(d.clone());
            } else {
                refused.push(json!({"device": d, "error": "not a registered device"}));
            }
        }
        for (name, kind) in &active {
            if m.targets.types.iter().any(|t| t == kind)
                && !devices.iter().any(|d| d == name.as_str())
            {
                devices.push(name.as_str().to_owned());
            }
        }
        // Anti-rollback, per device; an identical campaign is a replay.
        let mut fresh = Vec::new();
        for d in devices {
            let same: bool = self
                .conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM firmware_campaigns WHERE device = ?1 AND sha256 = ?2 AND version = ?3)",
                    params![d, sha, version],
                    |r| r.get(0),
                )
                .unwrap_or(false);
            if same {
                continue;
            }
            match campaign::floor(&self.conn, &d) {
                Ok(installed) if m.admits_over(installed.as_deref()) => fresh.push(d),
                Ok(installed) => refused.push(json!({
                    "device": d,
                    "error": format!("version {version} is not newer than {} (allow_downgrade is false)", installed.unwrap_or_default()),
                })),
                Err(e) => refused.push(json!({"device": d, "error": e.to_string()})),
            }
        }
        let mut gateway = false;
        if m.targets.gateway {
            let installed = crate::selfupdate::installed_version(&self.cfg);
            let pending = crate::selfupdate::pending_sha256(&self.cfg)
                .ok()
                .flatten()
                .is_some_and(|p| p == sha);
            if self.cfg.firmware.install_command.is_none() {
                refused.push(json!({"gateway": true, "error": "firmware.install_command is not set: gateway self-update is off"}));
            } else if pending || installed == version {
                // A replay of what is installed or being installed.
            } else if m.admits_over(Some(&installed)) {
                gateway = true;
            } else {
                refused.push(json!({
                    "gateway": true,
                    "error": format!("version {version} is not newer than the installed {installed} (allow_downgrade is false)"),
                }));
            }
        }
        if fresh.is_empty() && !gateway {
            if refused.is_empty() {
                tracing::debug!(
                    title,
                    version,
                    "firmware manifest already accepted; ignored"
                );
                return;
            }
            let why = refused
                .iter()
                .filter_map(|r| r.get("error").and_then(Json::as_str))
                .collect::<Vec<_>>()
                .join("; ");
            return self.reject(&title, &version, &sha, &why);
        }
        let job = Job {
            devices: fresh.clone(),
            gateway,
            manifest: m,
        };
        let stored = (|| -> rusqlite::Result<()> {
            let tx = self.conn.unchecked_transaction()?;
            // A later manifest for the same image adds its targets.
            let previous: Option<String> = tx
                .query_row(
                    "SELECT manifest FROM firmware_downloads WHERE sha256 = ?1",
                    [&sha],
                    |r| r.get(0),
                )
                .optional()?;
            let mut merged = job.clone();
            if let Some(prev) = previous.and_then(|p| Job::from_json(&p, u64::MAX)) {
                for d in prev.devices {
                    if !merged.devices.contains(&d) {
                        merged.devices.push(d);
                    }
                }
                merged.gateway |= prev.gateway;
            }
            tx.execute(
                "INSERT INTO firmware_downloads (sha256, title, version, manifest, state, result, error, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, 'downloading', 'initial', NULL, ?5)
                 ON CONFLICT (sha256) DO UPDATE SET manifest = excluded.manifest,
                     state = CASE WHEN state = 'ready' THEN 'ready' ELSE 'downloading' END,
                     result = 'initial', error = NULL, updated_ms = excluded.updated_ms",
                params![sha, title, version, merged.to_json().to_string(), campaign::now_ms()],
            )?;
            campaign::audit(&tx, "cloud", "manifest", "accepted", &merged.to_json())?;
            tx.commit()
        })();
        if let Err(e) = stored {
            return self.reject(&title, &version, &sha, &format!("state.db: {e}"));
        }
        tracing::info!(
            title,
            version,
            devices = fresh.len(),
            gateway,
            "firmware manifest accepted"
        );
        self.router
            .stats
            .manifests_accepted
            .fetch_add(1, Ordering::Relaxed);
        report(
            &self.router,
            &json!({
                "title": title, "version": version, "sha256": sha, "status": "accepted",
                "targets": {"devices": fresh, "gateway": gateway}, "refused": refused,
            }),
        );
        // The image is here already (an earlier manifest): straight to the
        // new targets.
        let ready = self
            .cfg
            .firmware_dir()
            .join("ready")
            .join(format!("{sha}.bin"));
        if ready.exists()
            && self
                .running
                .as_ref()
                .is_none_or(|(j, _)| j.manifest.sha256 != sha)
        {
            self.complete(&job, ready);
        }
    }

    /// Starts the oldest pending download, if any (a ready image whose
    /// targets were added later goes straight to its campaign).
    fn start_next(&mut self) {
        let next: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT sha256, manifest FROM firmware_downloads WHERE state = 'downloading' ORDER BY updated_ms LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read pending firmware downloads");
                None
            });
        let Some((sha, text)) = next else {
            return;
        };
        let Some(job) = Job::from_json(&text, u64::MAX) else {
            self.fail_download(
                &sha,
                "",
                "",
                UpdateResult::UnsupportedPackage,
                "stored manifest unreadable",
            );
            return;
        };
        let m = job.manifest.clone();
        let root = self.cfg.firmware_dir();
        let (total, available) = crate::health::disk_of(&self.cfg.state_dir);
        // A filesystem statvfs cannot describe is not a reason to refuse.
        let free = if total == 0 { u64::MAX } else { available };
        let tls = match sluice_firmware::download::client_config(&self.cfg.firmware.ca_file) {
            Ok(t) => t,
            Err(e) => {
                self.fail_download(&sha, &m.title, &m.version, e.result(), &e.to_string());
                return;
            }
        };
        let bytes = self.bytes.clone();
        bytes.store(
            sluice_firmware::download::partial_len(&root, &sha),
            Ordering::Relaxed,
        );
        self.reported_bytes = u64::MAX;
        let fw = self.cfg.firmware.clone();
        report(
            &self.router,
            &json!({
                "target": "download", "title": m.title, "version": m.version, "sha256": sha,
                "state": UpdateState::Downloading.name(), "result": UpdateResult::Initial.name(),
                "result_code": UpdateResult::Initial.code(), "bytes": bytes.load(Ordering::Relaxed), "size": m.size,
            }),
        );
        let handle = tokio::spawn(async move {
            let req = sluice_firmware::download::Request {
                url: &m.url,
                size: m.size,
                sha256: &m.sha256,
                root: &root,
                tls,
                attempts: fw.download_retries,
                idle_timeout: fw.idle_timeout,
                free_bytes: free,
                margin: fw.free_space_margin,
            };
            let mut progress = |n: u64| bytes.store(n, Ordering::Relaxed);
            sluice_firmware::download::download(&req, &mut progress).await
        });
        self.running = Some((job, handle));
    }

    fn fail_download(
        &self,
        sha: &str,
        title: &str,
        version: &str,
        result: UpdateResult,
        error: &str,
    ) {
        tracing::warn!(title, version, error, "firmware download failed");
        let _ = self.conn.execute(
            "UPDATE firmware_downloads SET state = 'failed', result = ?2, error = ?3, updated_ms = ?4 WHERE sha256 = ?1",
            params![sha, result.name(), error, campaign::now_ms()],
        );
        let mut r = progress_report("download", title, version, UpdateState::Idle, result);
        r["sha256"] = json!(sha);
        r["error"] = json!(error);
        report(&self.router, &r);
    }

    fn finished(
        &mut self,
        r: Result<
            Result<PathBuf, sluice_firmware::download::DownloadError>,
            tokio::task::JoinError,
        >,
    ) {
        let Some((job, _)) = self.running.take() else {
            return;
        };
        let m = &job.manifest;
        let path = match r {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return self.fail_download(
                    &m.sha256,
                    &m.title,
                    &m.version,
                    e.result(),
                    &e.to_string(),
                );
            }
            Err(e) => {
                return self.fail_download(
                    &m.sha256,
                    &m.title,
                    &m.version,
                    UpdateResult::UpdateFailed,
                    &e.to_string(),
                );
            }
        };
        // Targets added by a later manifest while it downloaded count too.
        let stored: Option<String> = self
            .conn
            .query_row(
                "SELECT manifest FROM firmware_downloads WHERE sha256 = ?1",
                [&m.sha256],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten();
        let job = stored
            .and_then(|t| Job::from_json(&t, u64::MAX))
            .unwrap_or(job);
        self.complete(&job, path);
    }

    /// The image of `job` is verified in `ready/`: index it, start the
    /// device campaign, hand a gateway image to the installer.
    fn complete(&mut self, job: &Job, path: PathBuf) {
        let m = &job.manifest;
        let img = Image {
            title: m.title.clone(),
            version: m.version.clone(),
            size: m.size,
            sha256: m.sha256.clone(),
            path: path.clone(),
        };
        let done = (|| -> rusqlite::Result<()> {
            campaign::enqueue(&mut self.conn, &img, &job.devices)?;
            self.conn.execute(
                "UPDATE firmware_downloads SET state = 'ready', result = 'success', error = NULL, updated_ms = ?2 WHERE sha256 = ?1",
                params![m.sha256, campaign::now_ms()],
            )?;
            Ok(())
        })();
        if let Err(e) = done {
            return self.fail_download(
                &m.sha256,
                &m.title,
                &m.version,
                UpdateResult::UpdateFailed,
                &format!("state.db: {e}"),
            );
        }
        let mut r = progress_report(
            "download",
            &m.title,
            &m.version,
            UpdateState::Downloaded,
            UpdateResult::Success,
        );
        r["sha256"] = json!(m.sha256);
        r["bytes"] = json!(m.size);
        r["size"] = json!(m.size);
        report(&self.router, &r);
        self.admit();
        self.prune();
        if job.gateway {
            let cfg = self.cfg.clone();
            let router = self.router.clone();
            let (sha, title, version) = (m.sha256.clone(), m.title.clone(), m.version.clone());
            report(
                &router,
                &progress_report(
                    "gateway",
                    &title,
                    &version,
                    UpdateState::Updating,
                    UpdateResult::Initial,
                ),
            );
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::selfupdate::hand_off(&cfg, &path, &sha, &title, &version) {
                    let mut r = progress_report(
                        "gateway",
                        &title,
                        &version,
                        UpdateState::Idle,
                        UpdateResult::UpdateFailed,
                    );
                    r["error"] = json!(e.to_string());
                    report(&router, &r);
                }
            });
        }
    }

    /// Admits queued devices into free slots, pushes their `fw_*`
    /// attributes and reports them.
    fn admit(&mut self) {
        let admitted =
            match campaign::admit(&mut self.conn, self.cfg.firmware.max_concurrent_devices) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot admit devices to their firmware campaign");
                    return;
                }
            };
        if admitted.is_empty() {
            return;
        }
        let names: Vec<DeviceName> = admitted
            .iter()
            .map(|(d, _, _)| DeviceName::new(d))
            .collect();
        match self.router.attributes().reload(&names) {
            Ok(changes) => {
                for (d, set, deleted) in changes {
                    self.router.push_shared(&d, set, deleted);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the firmware attributes"),
        }
        for (d, title, version) in admitted {
            tracing::info!(device = %d, title, version, "device admitted to its firmware campaign");
            let r = campaign::device_report(
                &d,
                &title,
                &version,
                UpdateState::Idle,
                UpdateResult::Initial,
                None,
                None,
            );
            report(&self.router, &r);
        }
    }

    fn device_report(
        &mut self,
        device: &str,
        fw_state: Option<&str>,
        title: Option<&str>,
        version: Option<&str>,
    ) {
        match campaign::report(&mut self.conn, device, fw_state, title, version) {
            Ok(Some(p)) => {
                let (state, result) = p.fw_state.lwm2m();
                let r = campaign::device_report(
                    &p.device,
                    &p.title,
                    &p.version,
                    state,
                    result,
                    Some(p.fw_state.name()),
                    None,
                );
                report(&self.router, &r);
                if p.finished {
                    if p.fw_state == FwState::Updated {
                        tracing::info!(device, version = %p.version, "device updated");
                    }
                    self.admit();
                    self.prune();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(device, error = %e, "cannot record a device's firmware state"),
        }
    }

    fn summarize(&mut self) {
        let count = |sql: &str| -> Json {
            let mut out = serde_json::Map::new();
            if let Ok(mut stmt) = self.conn.prepare_cached(sql) {
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)));
                if let Ok(rows) = rows {
                    for (k, n) in rows.flatten() {
                        out.insert(k, json!(n));
                    }
                }
            }
            Json::Object(out)
        };
        let running = self.running.as_ref().map(|(job, _)| {
            json!({"title": job.manifest.title, "version": job.manifest.version,
                "bytes": self.bytes.load(Ordering::Relaxed), "size": job.manifest.size})
        });
        let campaigns = count("SELECT state, count(*) FROM firmware_campaigns GROUP BY state");
        let downloads = count("SELECT state, count(*) FROM firmware_downloads GROUP BY state");
        let open = |v: &Json, k: &str| v.get(k).and_then(Json::as_i64).unwrap_or(0) > 0;
        self.busy = running.is_some()
            || open(&campaigns, "active")
            || open(&campaigns, "queued")
            || open(&downloads, "downloading");
        let s = json!({
            "gateway_version": crate::selfupdate::installed_version(&self.cfg),
            "downloads": downloads,
            "campaigns": campaigns,
            "downloading": running,
        });
        if let Ok(mut g) = self.summary.lock() {
            *g = s;
        }
    }

    fn tick(&mut self) {
        self.summarize();
        if let Some((job, _)) = &self.running {
            let n = self.bytes.load(Ordering::Relaxed);
            if n != self.reported_bytes {
                self.reported_bytes = n;
                let m = &job.manifest;
                let mut r = progress_report(
                    "download",
                    &m.title,
                    &m.version,
                    UpdateState::Downloading,
                    UpdateResult::Initial,
                );
                r["sha256"] = json!(m.sha256);
                r["bytes"] = json!(n);
                r["size"] = json!(m.size);
                report(&self.router, &r);
            }
        }
        match campaign::expire(&mut self.conn, self.cfg.firmware.device_timeout) {
            Ok(stuck) if !stuck.is_empty() => {
                for (d, title, version) in stuck {
                    tracing::warn!(device = %d, title, version, "device made no firmware progress in time; marked failed");
                    let r = campaign::device_report(
                        &d,
                        &title,
                        &version,
                        UpdateState::Idle,
                        UpdateResult::UpdateFailed,
                        None,
                        Some("no progress within firmware.device_timeout"),
                    );
                    report(&self.router, &r);
                }
                self.admit();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check firmware campaigns for stuck devices")
            }
        }
    }

    /// Keeps `firmware.keep` ready images besides those still needed.
    fn prune(&self) {
        let mut keep: Vec<String> = campaign::in_use(&self.conn).unwrap_or_default();
        if let Ok(Some(sha)) = crate::selfupdate::pending_sha256(&self.cfg) {
            keep.push(sha);
        }
        let in_use: Vec<&str> = keep.iter().map(String::as_str).collect();
        match sluice_firmware::download::prune(
            &self.cfg.firmware_dir(),
            self.cfg.firmware.keep,
            &in_use,
        ) {
            Ok(removed) => {
                for p in removed {
                    tracing::info!(file = %p.display(), "old firmware image removed (firmware.keep)");
                    let _ = self.conn.execute(
                        "DELETE FROM firmware_images WHERE file = ?1",
                        [p.to_string_lossy()],
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot prune old firmware images"),
        }
    }
}
