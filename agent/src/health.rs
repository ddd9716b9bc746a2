//! Gateway health telemetry and the gateway's own commands.
//!
//! Every `health.interval` the health task samples the host ([`HostProbe`]:
//! CPU, memory, the disk holding `gateway.state_dir`, temperature) and
//! sluice's own figures (the admin status document: outbox, uplink,
//! devices, ingest), builds the health [`document`] and queues it for
//! `P/health`. Health is a live signal, not a record: it is not stored in
//! the outbox, and no document is queued while the uplink is down (so a
//! long outage does not fill the uplink's queue with stale ones).
//!
//! The same task answers the commands the cloud addresses to the gateway
//! itself (`P/commands` with `"device"` = `gateway.id`; the router hands
//! them over):
//!
//! | method | result |
//! |---|---|
//! | `gateway_ping` | `{"pong":true,"ts":MS}` |
//! | `gateway_status` | the health document |
//! | `gateway_devices` | `{"registered":N,"devices":[{"name","type","connected":["mqtt"…]}]}` |
//! | `gateway_reboot` | error `not_allowed` unless `commands.allow_reboot`; then `{"rebooting":true}`, and the daemon stops cleanly with exit code 3 so its supervisor starts it again |
//! | anything else | error `unknown_method` |

use crate::admin::AdminContext;
use crate::downlink::DeviceChannel;
use serde_json::{Value as Json, json};
use sluice_cloud_sync::DeviceName;
use sluice_cloud_sync::downlink::{self, Command, CommandError, UpMessage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where Linux exposes thermal zones.
const THERMAL_ROOT: &str = "/sys/class/thermal";
/// Most devices listed by `gateway_devices` (the reply is one MQTT message).
const MAX_LISTED_DEVICES: usize = 1000;
/// How long a permitted reboot waits for its response to be handed to the
/// uplink before the daemon stops anyway.
const REBOOT_FLUSH: Duration = Duration::from_secs(5);

/// One sample of the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// This process's CPU use since the previous sample, as a share of the
    /// whole machine (0–100, like `system_pct`).
    pub process_cpu_pct: f64,
    /// The machine's CPU use since the previous sample (0–100).
    pub system_cpu_pct: f64,
    /// This process's resident set, bytes.
    pub process_rss_bytes: u64,
    /// The machine's memory, bytes.
    pub system_total_bytes: u64,
    /// Memory available for new work (MemAvailable), bytes.
    pub system_available_bytes: u64,
    /// The state directory.
    pub disk_path: PathBuf,
    /// Size of the filesystem holding it, bytes (0 when unknown).
    pub disk_total_bytes: u64,
    /// Space available to unprivileged writers there, bytes.
    pub disk_available_bytes: u64,
    /// The hottest thermal zone, °C; `None` without thermal zones.
    pub temperature_c: Option<f64>,
}

/// Samples the host; keeps the previous CPU counters so each sample gives
/// the use since the last one.
pub struct HostProbe {
    /// (busy, total) clock ticks of all CPUs (`/proc/stat`).
    cpu: (u64, u64),
    /// utime + stime of this process, clock ticks (`/proc/self/stat`).
    process: u64,
    state_dir: PathBuf,
}

impl HostProbe {
    /// A probe reporting the disk that holds `state_dir`. Takes the first
    /// CPU reading, so the first sample already covers a real interval.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            cpu: cpu_ticks().unwrap_or_default(),
            process: process_ticks().unwrap_or_default(),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Reads the host now (a few /proc and /sys files and one statvfs:
    /// blocking, call from a blocking thread).
    pub fn sample(&mut self) -> HostSample {
        let cpu = cpu_ticks().unwrap_or(self.cpu);
        let process = process_ticks().unwrap_or(self.process);
        let busy = cpu.0.saturating_sub(self.cpu.0) as f64;
        let total = cpu.1.saturating_sub(self.cpu.1) as f64;
        let ran = process.saturating_sub(self.process) as f64;
        self.cpu = cpu;
        self.process = process;
        let pct = |ticks: f64| {
            if total > 0.0 {
                (ticks / total * 100.0).clamp(0.0, 100.0)
            } else {
                0.0
            }
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let system_total_bytes = kib_field(&meminfo, "MemTotal:").unwrap_or(0);
        let (disk_total_bytes, disk_available_bytes) = disk_of(&self.state_dir);
        HostSample {
            process_cpu_pct: pct(ran),
            system_cpu_pct: pct(busy),
            process_rss_bytes: kib_field(&status, "VmRSS:").unwrap_or(0),
            system_total_bytes,
            system_available_bytes: kib_field(&meminfo, "MemAvailable:")
                .or_else(|| kib_field(&meminfo, "MemFree:"))
                .unwrap_or(0)
                .min(system_total_bytes),
            disk_path: self.state_dir.clone(),
            disk_total_bytes,
            disk_available_bytes,
            temperature_c: temperature(Path::new(THERMAL_ROOT)),
        }
    }
}

/// (busy, total) clock ticks of all CPUs from the `cpu` line of
/// `/proc/stat`: user nice system idle iowait irq softirq steal (guest time
/// is already counted in user and nice).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    cpu_ticks_of(stat.lines().next()?)
}

fn cpu_ticks_of(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.strip_prefix("cpu ")?.split_ascii_whitespace();
    let mut t = [0u64; 8];
    for v in &mut t {
        *v = fields.next().map_or(Ok(0), str::parse).ok()?;
    }
    let total: u64 = t.iter().sum();
    Some((total - t[3] - t[4], total))
}

/// utime + stime of this process, clock ticks (fields 14 and 15 of
/// `/proc/self/stat`, counted after the parenthesised command name).
fn process_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    process_ticks_of(&stat)
}

fn process_ticks_of(stat: &str) -> Option<u64> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a `Key:   123 kB` line of `/proc/meminfo` or
/// `/proc/PID/status`, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    let kib: u64 = line.split_ascii_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// (total, available to unprivileged writers) bytes of the filesystem that
/// holds `dir` (or its nearest existing ancestor); (0, 0) when unknown.
pub(crate) fn disk_of(dir: &Path) -> (u64, u64) {
    dir.ancestors()
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find_map(|d| rustix::fs::statvfs(d).ok())
        .map_or((0, 0), |s| {
            (
                s.f_blocks.saturating_mul(s.f_frsize),
                s.f_bavail.saturating_mul(s.f_frsize),
            )
        })
}

/// The hottest `thermal_zone*/temp` under `root` in °C (the files hold
/// millidegrees); `None` when there is none.
pub fn temperature(root: &Path) -> Option<f64> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<i64>().ok())
        .map(|milli| milli as f64 / 1000.0)
        .reduce(f64::max)
}

/// Devices connected right now, per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// Live MQTT sessions.
    pub mqtt: usize,
    /// Devices with a CoAP Observe registration.
    pub coap: usize,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The health document, from a host sample and the admin `status` document
/// (which supplies the gateway id, uptime, outbox, uplink, registered
/// devices and ingest counters).
pub fn document(ts_ms: i64, host: &HostSample, connected: Connected, status: &Json) -> Json {
    let outbox = &status["outbox"];
    let stream = |s: &Json| {
        json!({
            "records": s["records"],
            "bytes": s["bytes"],
            "oldest_age_s": s["oldest_age_s"],
            "dropped": s["dropped"],
        })
    };
    let streams: serde_json::Map<String, Json> = outbox["streams"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), stream(v))).collect())
        .unwrap_or_default();
    let mut outbox_doc = stream(outbox);
    outbox_doc["streams"] = Json::Object(streams);
    if let Some(e) = outbox.get("error") {
        outbox_doc["error"] = e.clone();
    }
    json!({
        "gateway": status["gateway"]["id"],
        "ts": ts_ms,
        "uptime_s": status["uptime_s"],
        "cpu": {
            "process_pct": round2(host.process_cpu_pct),
            "system_pct": round2(host.system_cpu_pct),
        },
        "memory": {
            "process_rss_bytes": host.process_rss_bytes,
            "system_total_bytes": host.system_total_bytes,
            "system_available_bytes": host.system_available_bytes,
        },
        "disk": {
            "path": host.disk_path.display().to_string(),
            "total_bytes": host.disk_total_bytes,
            "available_bytes": host.disk_available_bytes,
        },
        "temperature_c": host.temperature_c.map(round2),
        "outbox": outbox_doc,
        "uplink": status["uplink"],
        "devices": {
            "registered": status["devices"]["registered"],
            "connected": { "mqtt": connected.mqtt, "coap": connected.coap },
        },
        "ingest": status["ingest"],
    })
}

/// A method of the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayMethod {
    /// `gateway_ping`
    Ping,
    /// `gateway_status`
    Status,
    /// `gateway_devices`
    Devices,
    /// `gateway_reboot`
    Reboot,
}

impl GatewayMethod {
    /// The method named `name`, if the gateway has it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gateway_ping" => Some(Self::Ping),
            "gateway_status" => Some(Self::Status),
            "gateway_devices" => Some(Self::Devices),
            "gateway_reboot" => Some(Self::Reboot),
            _ => None,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The health task: periodic `P/health` documents and the gateway's own
/// commands.
pub struct Health {
    /// sluice's figures (and the router, to send what it builds).
    pub ctx: Arc<AdminContext>,
    /// Where the health document's disk figures come from.
    pub state_dir: PathBuf,
    /// `health.interval`.
    pub interval: Duration,
    /// `commands.allow_reboot`.
    pub allow_reboot: bool,
}

impl Health {
    /// Runs until `cancel`. A permitted `gateway_reboot` answers, waits for
    /// the answer to reach the uplink, then cancels `reboot` (the daemon
    /// stops cleanly and exits non-zero).
    pub async fn run(
        self,
        mut commands_rx: mpsc::Receiver<Command>,
        reboot: CancellationToken,
        cancel: CancellationToken,
    ) {
        let state_dir = self.state_dir.clone();
        let mut probe = tokio::task::spawn_blocking(move || HostProbe::new(&state_dir))
            .await
            .ok();
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {
                    if !self.ctx.uplink.as_ref().is_some_and(|u| u.connected()) {
                        tracing::debug!("uplink down; health document skipped");
                        continue;
                    }
                    let doc = self.document(&mut probe).await;
                    self.ctx.router.up(UpMessage::Health(doc.to_string().into_bytes()));
                }
                c = commands_rx.recv(), if commands_open => match c {
                    Some(c) => self.command(c, &mut probe, &reboot).await,
                    None => commands_open = false,
                },
            }
        }
    }

    async fn document(&self, probe: &mut Option<HostProbe>) -> Json {
        let sampled = match probe.take() {
            Some(mut p) => tokio::task::spawn_blocking(move || {
                let s = p.sample();
                (p, s)
            })
            .await
            .ok(),
            None => None,
        };
        let host = match sampled {
            Some((p, s)) => {
                *probe = Some(p);
                s
            }
            // The probe's thread panicked: report what sluice knows.
            None => HostSample {
                process_cpu_pct: 0.0,
                system_cpu_pct: 0.0,
                process_rss_bytes: 0,
                system_total_bytes: 0,
                system_available_bytes: 0,
                disk_path: self.state_dir.clone(),
                disk_total_bytes: 0,
                disk_available_bytes: 0,
                temperature_c: None,
            },
        };
        let status = self.ctx.status().await;
        let connected = Connected {
            mqtt: self.ctx.mqtt_sessions.connected(),
            coap: self.ctx.coap_observers.devices(),
        };
        document(now_ms(), &host, connected, &status)
    }

    async fn command(&self, c: Command, probe: &mut Option<HostProbe>, reboot: &CancellationToken) {
        let router = &self.ctx.router;
        let method = GatewayMethod::parse(&c.method);
        let result = match method {
            None => Err((
                CommandError::UnknownMethod,
                format!(
                    "the gateway has no method {:?} (gateway_ping, gateway_status, \
                     gateway_devices, gateway_reboot)",
                    c.method
                ),
            )),
            Some(GatewayMethod::Ping) => Ok(json!({ "pong": true, "ts": now_ms() })),
            Some(GatewayMethod::Status) => Ok(self.document(probe).await),
            Some(GatewayMethod::Devices) => Ok(self.devices()),
            Some(GatewayMethod::Reboot) if !self.allow_reboot => Err((
                CommandError::NotAllowed,
                "gateway_reboot is disabled (set commands.allow_reboot = true)".to_owned(),
            )),
            Some(GatewayMethod::Reboot) => Ok(json!({ "rebooting": true })),
        };
        let sent_before = self.ctx.uplink.as_ref().map(|u| u.responses_sent());
        match result {
            Ok(r) => {
                router.stats.answered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(method = %c.method, "gateway command answered");
                router.up(UpMessage::CommandResponse(downlink::command_result(
                    &c.id, &c.device, r,
                )));
            }
            Err((code, message)) => {
                router.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(method = %c.method, code = code.code(), %message, "gateway command refused");
                router.up(UpMessage::CommandResponse(downlink::command_error(
                    &c.id, &c.device, code, &message,
                )));
                return;
            }
        }
        if method == Some(GatewayMethod::Reboot) {
            tracing::warn!(
                "gateway_reboot from the cloud: stopping so the supervisor restarts sluice"
            );
            if let (Some(u), Some(before)) = (&self.ctx.uplink, sent_before) {
                let end = tokio::time::Instant::now() + REBOOT_FLUSH;
                while u.responses_sent() <= before && tokio::time::Instant::now() < end {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            reboot.cancel();
        }
    }

    fn devices(&self) -> Json {
        let names = self.ctx.registry.active_devices();
        let registered = names.len();
        let channels: [(&str, &dyn DeviceChannel); 2] = [
            ("mqtt", &*self.ctx.mqtt_sessions),
            ("coap", &*self.ctx.coap_observers),
        ];
        let list: Vec<Json> = names
            .into_iter()
            .take(MAX_LISTED_DEVICES)
            .map(|(name, kind): (DeviceName, String)| {
                let via: Vec<&str> = channels
                    .iter()
                    .filter(|(_, ch)| ch.subscriptions(&name).is_some())
                    .map(|(proto, _)| *proto)
                    .collect();
                json!({ "name": name.as_str(), "type": kind, "connected": via })
            })
            .collect();
        json!({
            "registered": registered,
            "connected": {
                "mqtt": self.ctx.mqtt_sessions.connected(),
                "coap": self.ctx.coap_observers.devices(),
            },
            "truncated": registered > MAX_LISTED_DEVICES,
            "devices": list,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostSample {
        HostSample {
            process_cpu_pct: 1.234,
            system_cpu_pct: 12.5,
            process_rss_bytes: 9_000_000,
            system_total_bytes: 8_000_000_000,
            system_available_bytes: 6_000_000_000,
            disk_path: PathBuf::from("/var/lib/sluice"),
            disk_total_bytes: 32_000_000_000,
            disk_available_bytes: 20_000_000_000,
            temperature_c: Some(48.123),
        }
    }

    #[test]
    fn health_document_combines_host_and_sluice_figures() {
        let status = json!({
            "version": "0.1.0",
            "gateway": {"id": "gw-1", "epoch": "e"},
            "uptime_s": 42,
            "listeners": {"http": "127.0.0.1:1"},
            "outbox": {
                "records": 3, "bytes": 300, "oldest_age_s": 7, "dropped": 0,
                "records_acked": 10, "corrupt_set_aside": 0,
                "streams": {
                    "telemetry": {"priority": 5, "records": 2, "bytes": 200, "oldest_age_s": 7, "dropped": 0},
                    "attributes": {"priority": 5, "records": 1, "bytes": 100, "oldest_age_s": null, "dropped": 0},
                },
            },
            "uplink": {"configured": true, "connected": true, "records_acked": 10},
            "devices": {"registered": 4, "connected": 1},
            "ingest": {"accepted": 12},
            "commands": {},
        });
        let doc = document(
            1_700_000_000_000,
            &host(),
            Connected { mqtt: 1, coap: 2 },
            &status,
        );
        assert_eq!(
            doc,
            json!({
                "gateway": "gw-1",
                "ts": 1_700_000_000_000_i64,
                "uptime_s": 42,
                "cpu": {"process_pct": 1.23, "system_pct": 12.5},
                "memory": {
                    "process_rss_bytes": 9_000_000,
                    "system_total_bytes": 8_000_000_000_u64,
                    "system_available_bytes": 6_000_000_000_u64,
                },
                "disk": {
                    "path": "/var/lib/sluice",
                    "total_bytes": 32_000_000_000_u64,
                    "available_bytes": 20_000_000_000_u64,
                },
                "temperature_c": 48.12,
                "outbox": {
                    "records": 3, "bytes": 300, "oldest_age_s": 7, "dropped": 0,
                    "streams": {
                        "telemetry": {"records": 2, "bytes": 200, "oldest_age_s": 7, "dropped": 0},
                        "attributes": {"records": 1, "bytes": 100, "oldest_age_s": null, "dropped": 0},
                    },
                },
                "uplink": {"configured": true, "connected": true, "records_acked": 10},
                "devices": {"registered": 4, "connected": {"mqtt": 1, "coap": 2}},
                "ingest": {"accepted": 12},
            })
        );
    }

    #[test]
    fn health_document_without_temperature_says_null() {
        let mut h = host();
        h.temperature_c = None;
        let doc = document(0, &h, Connected { mqtt: 0, coap: 0 }, &json!({}));
        assert!(doc["temperature_c"].is_null());
        assert_eq!(doc["outbox"]["streams"], json!({}));
    }

    #[test]
    fn temperature_is_the_hottest_thermal_zone() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(temperature(dir.path()), None);
        assert_eq!(temperature(&dir.path().join("absent")), None);
        for (zone, text) in [("thermal_zone0", "41500\n"), ("thermal_zone1", "55250\n")] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), text).unwrap();
        }
        std::fs::create_dir(dir.path().join("cooling_device0")).unwrap();
        std::fs::write(dir.path().join("cooling_device0").join("temp"), "99000").unwrap();
        assert_eq!(temperature(dir.path()), Some(55.25));
    }

    #[test]
    fn host_probe_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HostProbe::new(dir.path());
        let s = probe.sample();
        assert!(s.process_rss_bytes > 0);
        assert!(s.system_total_bytes >= s.system_available_bytes);
        assert!(s.system_total_bytes > 0);
        assert!(s.disk_total_bytes > 0);
        assert!((0.0..=100.0).contains(&s.system_cpu_pct));
        assert!((0.0..=100.0).contains(&s.process_cpu_pct));
        assert_eq!(s.disk_path, dir.path());
        // A directory that does not exist yet: the filesystem that will hold it.
        assert_eq!(disk_of(&dir.path().join("a/b")).0, s.disk_total_bytes);
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            cpu_ticks_of("cpu  100 5 50 800 20 3 2 1 7 0"),
            Some((161, 981))
        );
        assert_eq!(cpu_ticks_of("cpu  1 2 3 4"), Some((6, 10)));
        assert_eq!(cpu_ticks_of("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(cpu_ticks_of("cpu  1 x 3 4"), None);
        // The command name may hold spaces and parentheses.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 17 4 0 0 20 0 3 0";
        assert_eq!(process_ticks_of(stat), Some(21));
        assert_eq!(process_ticks_of("42 (x) S 1"), None);
        let meminfo = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:     1500 kB\n";
        assert_eq!(kib_field(meminfo, "MemTotal:"), Some(2_048_000));
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(1_536_000));
        assert_eq!(kib_field(meminfo, "SwapTotal:"), None);
    }

    #[test]
    fn gateway_methods_parse_by_exact_name() {
        assert_eq!(
            GatewayMethod::parse("gateway_ping"),
            Some(GatewayMethod::Ping)
        );
        assert_eq!(
            GatewayMethod::parse("gateway_reboot"),
            Some(GatewayMethod::Reboot)
        );
        assert_eq!(GatewayMethod::parse("gateway_config"), None);
        assert_eq!(GatewayMethod::parse("GATEWAY_PING"), None);
    }
}
