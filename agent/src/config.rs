//! Configuration: TOML layered defaults → file → `conf.d/*.toml` beside it →
//! environment (`SLUICE__SECTION__KEY`), deserialised into [`RawConfig`]
//! (unknown keys refused) and validated into [`Config`], whose errors name the
//! key: `outbox.max_bytes: "12XB" is not a size`.

use serde::{Deserialize, Serialize};
use sluice_cloud_sync::drain::DrainMode;
use sluice_cloud_sync::{ClockMode, Durability, OutboxConfig, StreamConfig, UplinkTls, WhenFull};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sluice/sluice.toml";

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layered sources could not be read or parsed, or hold unknown keys.
    #[error("{0}")]
    Load(String),
    /// A key holds a bad value.
    #[error("{key}: {problem}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A `[[rules]]` entry is invalid; the key carries its indexes
    /// (`rules[0].actions[1].max: …`).
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleConfigError),
    /// A `[[devices]]` entry is invalid (`devices[0].token_sha256: …`).
    #[error("{key}: {problem}")]
    Device {
        /// The dotted key with its index.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A `[[mqtt.mappings]]` entry is invalid (`mqtt.mappings[0].topic: …`).
    #[error("{key}: {problem}")]
    Mapping {
        /// The dotted key with its index.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// A byte size: an integer, or text like `"64KiB"`, `"256MiB"`, `"1GB"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Plain bytes.
    Bytes(u64),
    /// Text with a unit.
    Text(String),
}

/// A duration: text like `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`, or seconds
/// as an integer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    /// Whole seconds.
    Seconds(u64),
    /// Text with a unit.
    Text(String),
}

impl fmt::Display for SizeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "{b}"),
            Self::Text(t) => write!(f, "{t:?}"),
        }
    }
}

impl fmt::Display for DurationValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seconds(s) => write!(f, "{s}"),
            Self::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Parses a byte size; `None` when it is not one.
pub fn parse_size(v: &SizeValue) -> Option<u64> {
    let text = match v {
        SizeValue::Bytes(b) => return Some(*b),
        SizeValue::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses a duration; `None` when it is not one.
pub fn parse_duration(v: &DurationValue) -> Option<Duration> {
    let text = match v {
        DurationValue::Seconds(s) => return Some(Duration::from_secs(*s)),
        DurationValue::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms).map(Duration::from_millis)
}

/// The file's shape, before validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[gateway]`
    pub gateway: RawGateway,
    /// `[listeners.*]`
    pub listeners: RawListeners,
    /// `[outbox]`
    pub outbox: RawOutbox,
    /// `[cloud]`; absent means offline mode.
    pub cloud: Option<RawCloud>,
    /// `[admin]`
    pub admin: RawAdmin,
    /// `[metrics]`; absent means off.
    pub metrics: Option<RawMetrics>,
    /// `[log]`
    pub log: RawLog,
    /// `[health]`: health telemetry on `P/health`.
    pub health: RawHealth,
    /// `[commands]`: commands the cloud addresses to the gateway itself.
    pub commands: RawCommands,
    /// `[[rules]]`: telemetry rules, in order.
    pub rules: Vec<crate::rules::RawRule>,
    /// `[mqtt]`: legacy topic mappings.
    pub mqtt: crate::mqtt::mapping::RawMqttSection,
    /// `[fleet]`; absent means fleet configuration is off.
    pub fleet: Option<RawFleet>,
    /// `[[devices]]`: devices provisioned by configuration (merged into the
    /// registry at start).
    pub devices: Vec<RawDevice>,
    /// `[firmware]`: firmware manifests, downloads, device campaigns and the
    /// gateway's self-update hooks.
    pub firmware: RawFirmware,
}

/// A `[[devices]]` entry: a device provisioned by configuration (the local
/// file or a signed fleet configuration). Only hashes, never a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    /// Device name.
    pub name: String,
    /// Type (device profile).
    #[serde(rename = "type", default = "default_device_type")]
    pub kind: String,
    /// SHA-256 of the access token, 64 hex digits.
    pub token_sha256: String,
    /// SHA-256 of the device's TLS client certificate (DER), for mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Glob of device names it may publish for on mapped legacy topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_for: Option<String>,
}

fn default_device_type() -> String {
    "default".into()
}

/// Validates `[[devices]]`: names, types and globs as the CLI takes them,
/// hashes as 64 hex digits, no name, token hash or fingerprint twice.
fn validate_devices(raw: &[RawDevice]) -> Result<Vec<crate::registry::ConfigDevice>, ConfigError> {
    use crate::registry::{parse_cert_sha256, valid_glob, valid_ident};
    let mut out: Vec<crate::registry::ConfigDevice> = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        let bad = |field: &str, problem: String| ConfigError::Device {
            key: format!("devices[{i}].{field}"),
            problem,
        };
        if !valid_ident(&d.name) {
            return Err(bad(
                "name",
                format!("{:?} must be 1-64 characters of A-Z a-z 0-9 - _ .", d.name),
            ));
        }
        if !valid_ident(&d.kind) {
            return Err(bad(
                "type",
                format!("{:?} must be 1-64 characters of A-Z a-z 0-9 - _ .", d.kind),
            ));
        }
        // Colons are not taken here: a token hash is sha256sum's output.
        let token_sha256 = (d.token_sha256.len() == 64)
            .then(|| parse_cert_sha256(&d.token_sha256).ok())
            .flatten()
            .ok_or_else(|| {
                bad(
                    "token_sha256",
                    "must be the SHA-256 of the access token as 64 hex digits \
                     (printf %s TOKEN | sha256sum), never the token itself"
                        .into(),
                )
            })?;
        let cert_sha256 = match &d.cert_sha256 {
            None => None,
            Some(c) => Some(parse_cert_sha256(c).map_err(|_| {
                bad(
                    "cert_sha256",
                    format!("{c:?} is not a SHA-256 fingerprint of 64 hex digits (colons allowed)"),
                )
            })?),
        };
        if let Some(g) = &d.bridge_for
            && !valid_glob(g)
        {
            return Err(bad(
                "bridge_for",
                format!("{g:?} must be 1-64 characters of A-Z a-z 0-9 - _ . * ?"),
            ));
        }
        if let Some(j) = out.iter().position(|o| o.name == d.name) {
            return Err(bad("name", format!("{:?} is also devices[{j}]", d.name)));
        }
        if let Some(j) = out.iter().position(|o| o.token_sha256 == token_sha256) {
            return Err(bad(
                "token_sha256",
                format!("the same token as devices[{j}]"),
            ));
        }
        if let Some(fp) = cert_sha256
            && let Some(j) = out.iter().position(|o| o.cert_sha256 == Some(fp))
        {
            return Err(bad(
                "cert_sha256",
                format!("the same certificate as devices[{j}]"),
            ));
        }
        out.push(crate::registry::ConfigDevice {
            name: d.name.clone(),
            kind: d.kind.clone(),
            token_sha256,
            cert_sha256,
            bridge_for: d.bridge_for.clone(),
        });
    }
    Ok(out)
}

/// `[fleet]`: signed configuration pushed from the cloud.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    /// Ed25519 public keys (standard base64, raw 32 bytes) that may sign.
    pub trusted_keys: Vec<String>,
    /// How long a newly applied configuration has to get the uplink
    /// connected before it is rolled back.
    pub confirm_timeout: DurationValue,
}

impl Default for RawFleet {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            confirm_timeout: DurationValue::Text("5m".into()),
        }
    }
}

/// The validated `[fleet]` section.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Trusted public keys.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Confirmation window after applying.
    pub confirm_timeout: Duration,
}

fn validate_fleet(f: &RawFleet) -> Result<FleetConfig, ConfigError> {
    use base64::Engine as _;
    let mut keys = Vec::new();
    for k in &f.trusted_keys {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                invalid(
                    "fleet.trusted_keys",
                    format!("{k:?} is not a base64 raw 32-byte Ed25519 public key"),
                )
            })?;
        keys.push(raw);
    }
    if keys.is_empty() {
        return Err(invalid(
            "fleet.trusted_keys",
            "at least one key is needed (sluice fleet keygen writes one)",
        ));
    }
    let confirm_timeout = parse_duration(&f.confirm_timeout)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "fleet.confirm_timeout",
                format!("{} is not a duration like \"60s\"", f.confirm_timeout),
            )
        })?;
    Ok(FleetConfig {
        trusted_keys: keys,
        confirm_timeout,
    })
}

/// `[firmware]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFirmware {
    /// Ready images kept besides the ones a campaign or the gateway uses.
    pub keep: u32,
    /// Devices fetching an image at the same time (the others wait their
    /// turn: their `fw_*` attributes are set when a slot frees).
    pub max_concurrent_devices: u32,
    /// A device with no progress this long is marked FAILED (timeout) and
    /// its slot freed.
    pub device_timeout: DurationValue,
    /// Attempts per download before it is reported failed.
    pub download_retries: u32,
    /// A download that receives nothing this long is retried.
    pub idle_timeout: DurationValue,
    /// Free space required beyond the image's size before downloading.
    pub free_space_margin: SizeValue,
    /// Largest image a manifest may announce.
    pub max_size: SizeValue,
    /// CA bundle (PEM) trusted for manifest URLs.
    pub ca_file: PathBuf,
    /// The version the gateway runs ("" = sluice's own version): the
    /// anti-rollback floor for manifests that target the gateway.
    pub gateway_version: String,
    /// How a verified gateway image reaches the installer: `systemd`
    /// (`systemctl start sluice-update@SHA.service`) or `direct` (the daemon
    /// runs `install_command` itself; for systems without systemd).
    pub handoff: String,
    /// Installer for gateway images, `{path}` = the verified image (e.g.
    /// `rauc install {path}`); empty = gateway self-update off.
    pub install_command: String,
    /// Run after the restart that follows an install once the uplink is
    /// healthy (e.g. `rauc status mark-good`).
    pub commit_command: String,
    /// Run when the uplink does not come up within `confirm_timeout` after
    /// that restart (e.g. `rauc status mark-bad && systemctl reboot`).
    pub rollback_command: String,
    /// How long the restarted gateway has to reach the cloud.
    pub confirm_timeout: DurationValue,
}

impl Default for RawFirmware {
    fn default() -> Self {
        Self {
            keep: 3,
            max_concurrent_devices: 10,
            device_timeout: DurationValue::Text("30m".into()),
            download_retries: 5,
            idle_timeout: DurationValue::Text("30s".into()),
            free_space_margin: SizeValue::Text("16MiB".into()),
            max_size: SizeValue::Text("1GiB".into()),
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            gateway_version: String::new(),
            handoff: "systemd".into(),
            install_command: String::new(),
            commit_command: String::new(),
            rollback_command: String::new(),
            confirm_timeout: DurationValue::Text("10m".into()),
        }
    }
}

/// How a gateway image reaches its installer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// `systemctl start --no-block sluice-update@SHA.service`.
    Systemd,
    /// The daemon runs `install_command` itself.
    Direct,
}

/// The validated `[firmware]` section.
#[derive(Debug, Clone)]
pub struct FirmwareConfig {
    /// Ready images kept besides those in use.
    pub keep: usize,
    /// Devices fetching at the same time.
    pub max_concurrent_devices: usize,
    /// No progress this long → FAILED (timeout).
    pub device_timeout: Duration,
    /// Attempts per download.
    pub download_retries: u32,
    /// Idle-read timeout of a download.
    pub idle_timeout: Duration,
    /// Free space needed beyond the image.
    pub free_space_margin: u64,
    /// Largest image accepted.
    pub max_size: u64,
    /// Trust for manifest URLs.
    pub ca_file: PathBuf,
    /// The gateway's installed version.
    pub gateway_version: String,
    /// How the installer is started.
    pub handoff: Handoff,
    /// Installer template (`{path}`); `None` = self-update off.
    pub install_command: Option<String>,
    /// Commit command (`None` = nothing to run).
    pub commit_command: Option<String>,
    /// Rollback command (`None` = nothing to run).
    pub rollback_command: Option<String>,
    /// Window for the uplink after a self-update restart.
    pub confirm_timeout: Duration,
}

fn validate_firmware(f: &RawFirmware) -> Result<FirmwareConfig, ConfigError> {
    let duration = |key: &'static str, v: &DurationValue| {
        parse_duration(v)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(key, format!("{v} is not a duration like \"60s\"")))
    };
    if f.max_concurrent_devices == 0 {
        return Err(invalid(
            "firmware.max_concurrent_devices",
            "must be at least 1",
        ));
    }
    if f.download_retries == 0 {
        return Err(invalid("firmware.download_retries", "must be at least 1"));
    }
    let handoff = match f.handoff.as_str() {
        "systemd" => Handoff::Systemd,
        "direct" => Handoff::Direct,
        other => {
            return Err(invalid(
                "firmware.handoff",
                format!("{other:?} is not \"systemd\" or \"direct\""),
            ));
        }
    };
    let command = |key: &'static str, v: &str| -> Result<Option<String>, ConfigError> {
        let v = v.trim();
        if v.is_empty() {
            Ok(None)
        } else if v.contains('\n') || v.contains('\0') {
            Err(invalid(key, "must be one line"))
        } else {
            Ok(Some(v.to_owned()))
        }
    };
    let install_command = command("firmware.install_command", &f.install_command)?;
    if install_command
        .as_deref()
        .is_some_and(|c| !c.contains("{path}"))
    {
        return Err(invalid(
            "firmware.install_command",
            "must contain {path} (the verified image), e.g. \"rauc install {path}\"",
        ));
    }
    let gateway_version = if f.gateway_version.trim().is_empty() {
        env!("CARGO_PKG_VERSION").to_owned()
    } else {
        f.gateway_version.trim().to_owned()
    };
    Ok(FirmwareConfig {
        keep: f.keep as usize,
        max_concurrent_devices: f.max_concurrent_devices as usize,
        device_timeout: duration("firmware.device_timeout", &f.device_timeout)?,
        download_retries: f.download_retries,
        idle_timeout: duration("firmware.idle_timeout", &f.idle_timeout)?,
        free_space_margin: parse_size(&f.free_space_margin).ok_or_else(|| {
            invalid(
                "firmware.free_space_margin",
                format!("{} is not a size", f.free_space_margin),
            )
        })?,
        max_size: parse_size(&f.max_size)
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("firmware.max_size", format!("{} is not a size", f.max_size)))?,
        ca_file: f.ca_file.clone(),
        gateway_version,
        handoff,
        install_command,
        commit_command: command("firmware.commit_command", &f.commit_command)?,
        rollback_command: command("firmware.rollback_command", &f.rollback_command)?,
        confirm_timeout: duration("firmware.confirm_timeout", &f.confirm_timeout)?,
    })
}

/// `[gateway]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    /// Gateway id; default `gw-` + the first 12 hex digits of /etc/machine-id.
    pub id: Option<String>,
    /// Where outbox.db, state.db and firmware/ live.
    pub state_dir: PathBuf,
    /// Wall-clock trust: `auto`, `trusted` or `untrusted`.
    pub clock: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        Self {
            id: None,
            state_dir: PathBuf::from("/var/lib/sluice"),
            clock: "auto".into(),
        }
    }
}

/// `[listeners]`: a listener whose section is absent is off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListeners {
    /// `[listeners.http]`
    pub http: Option<RawHttp>,
    /// `[listeners.mqtt]`
    pub mqtt: Option<RawMqtt>,
    /// `[listeners.mqtts]`
    pub mqtts: Option<RawMqtts>,
    /// `[listeners.coap]`
    pub coap: Option<RawCoap>,
    /// `[listeners.coaps]`
    pub coaps: Option<RawCoaps>,
}

/// `[listeners.coaps]`: CoAP over DTLS 1.2 with per-device pre-shared
/// keys; its CoAP limits are those of `[listeners.coap]` (or their
/// defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCoaps {
    /// Address to bind (UDP).
    pub bind: String,
    /// Largest datagram we send (DTLS record included), bytes.
    pub mtu: usize,
    /// Sessions in all (each costs about 2.7 kB).
    pub max_sessions: usize,
    /// Handshakes in progress (cookie proven, not finished), in all.
    pub max_handshakes: usize,
    /// Handshakes in progress per source IP address.
    pub max_handshakes_per_ip: usize,
    /// A handshake must finish within this.
    pub handshake_timeout: DurationValue,
    /// A session silent this long is dropped (the device handshakes again).
    pub idle_timeout: DurationValue,
}

impl Default for RawCoaps {
    fn default() -> Self {
        Self {
            bind: "[::]:5684".into(),
            mtu: 1200,
            max_sessions: 10_000,
            max_handshakes: 1000,
            max_handshakes_per_ip: 64,
            handshake_timeout: DurationValue::Text("10s".into()),
            idle_timeout: DurationValue::Text("30m".into()),
        }
    }
}

/// The validated coaps listener.
#[derive(Debug, Clone)]
pub struct CoapsListenerConfig {
    /// Address and CoAP limits (the limits are `[listeners.coap]`'s).
    pub coap: CoapListenerConfig,
    /// Session caps and timeouts.
    pub limits: crate::coaps::sessions::Limits,
    /// Largest datagram sent.
    pub mtu: usize,
}

/// The largest Block2 SZX whose answers fit one DTLS record within `mtu`:
/// record overhead up to 37 bytes (header, explicit nonce, 16-byte tag),
/// 48 for the CoAP header, token and options.
fn coaps_max_szx(mtu: usize) -> u8 {
    let budget = mtu.saturating_sub(37 + 48).max(16);
    let block = 1usize << budget.ilog2();
    u8::try_from(block.trailing_zeros().saturating_sub(4)).map_or(6, |s| s.min(6))
}

fn validate_coaps(
    c: &RawCoaps,
    coap: Option<&RawCoap>,
) -> Result<CoapsListenerConfig, ConfigError> {
    let bind: SocketAddr = c.bind.parse().map_err(|_| {
        invalid(
            "listeners.coaps.bind",
            format!("{:?} is not an address like [::]:5684", c.bind),
        )
    })?;
    let limits = validate_coap(coap.unwrap_or(&RawCoap::default()))?;
    if !(256..=9000).contains(&c.mtu) {
        return Err(invalid(
            "listeners.coaps.mtu",
            format!("{} is not between 256 and 9000 bytes", c.mtu),
        ));
    }
    for (key, v) in [
        ("listeners.coaps.max_sessions", c.max_sessions),
        ("listeners.coaps.max_handshakes", c.max_handshakes),
        (
            "listeners.coaps.max_handshakes_per_ip",
            c.max_handshakes_per_ip,
        ),
    ] {
        if v == 0 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    let duration = |v: &DurationValue, key: &'static str| {
        parse_duration(v)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(key, "is not a positive duration like \"10s\""))
    };
    Ok(CoapsListenerConfig {
        coap: CoapListenerConfig {
            bind,
            block_szx: limits.block_szx.min(coaps_max_szx(c.mtu)),
            max_block_szx: coaps_max_szx(c.mtu),
            ..limits
        },
        limits: crate::coaps::sessions::Limits {
            max_sessions: c.max_sessions,
            max_handshakes: c.max_handshakes,
            max_handshakes_per_ip: c.max_handshakes_per_ip,
            handshake_timeout: duration(&c.handshake_timeout, "listeners.coaps.handshake_timeout")?,
            idle_timeout: duration(&c.idle_timeout, "listeners.coaps.idle_timeout")?,
        },
        mtu: c.mtu,
    })
}

/// `[listeners.coap]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCoap {
    /// Address to bind (UDP); `[::]` takes IPv4 and IPv6.
    pub bind: String,
    /// Largest request body (Block1 reassembled), bytes.
    pub max_body: SizeValue,
    /// Block size of Block2 answers when the client names none (16…1024).
    pub block_size: SizeValue,
    /// Requests remembered for deduplication, per client endpoint.
    pub dedup_per_endpoint: usize,
    /// Requests remembered for deduplication, in all.
    pub dedup_max: usize,
    /// A CON request whose commit takes longer gets an empty ACK first and
    /// its answer as a separate CON response (0 = always).
    pub separate_after: DurationValue,
    /// Requests per second per device (token bucket); 0 = no limit.
    pub rate_limit_per_device: f64,
    /// Requests per second in all; 0 = no limit.
    pub rate_limit_global: f64,
    /// Failed authentications per source IP per `auth_fail_window`; 0 = off.
    pub auth_fail_limit: u32,
    /// The window of `auth_fail_limit`.
    pub auth_fail_window: DurationValue,
}

impl Default for RawCoap {
    fn default() -> Self {
        Self {
            bind: "[::]:5683".into(),
            max_body: SizeValue::Text("64KiB".into()),
            block_size: SizeValue::Text("1KiB".into()),
            dedup_per_endpoint: 256,
            dedup_max: 100_000,
            separate_after: DurationValue::Text("1s".into()),
            rate_limit_per_device: 0.0,
            rate_limit_global: 0.0,
            auth_fail_limit: 10,
            auth_fail_window: DurationValue::Text("60s".into()),
        }
    }
}

/// The validated CoAP listener.
#[derive(Debug, Clone)]
pub struct CoapListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Largest request body.
    pub max_body: usize,
    /// SZX of default Block2 answers.
    pub block_szx: u8,
    /// Largest Block2 SZX answered (6 = 1024 bytes; coaps: what fits the
    /// MTU). A client asking for larger blocks gets these (RFC 7959 §2.4).
    pub max_block_szx: u8,
    /// Dedup cap per endpoint.
    pub dedup_per_endpoint: usize,
    /// Dedup cap in all.
    pub dedup_max: usize,
    /// Empty ACK + separate response past this commit time.
    pub separate_after: Duration,
    /// Per-device rate, req/s (0 = off).
    pub rate_limit_per_device: f64,
    /// Global rate, req/s (0 = off).
    pub rate_limit_global: f64,
    /// Failed authentications per IP per window (0 = off).
    pub auth_fail_limit: u32,
    /// The throttle's window.
    pub auth_fail_window: Duration,
}

fn validate_coap(c: &RawCoap) -> Result<CoapListenerConfig, ConfigError> {
    let bind: SocketAddr = c.bind.parse().map_err(|_| {
        invalid(
            "listeners.coap.bind",
            format!("{:?} is not an address like [::]:5683", c.bind),
        )
    })?;
    let max_body = parse_size(&c.max_body)
        .filter(|n| (64..=16 * 1024 * 1024).contains(n))
        .ok_or_else(|| {
            invalid(
                "listeners.coap.max_body",
                format!("{} is not a size between 64 bytes and 16MiB", c.max_body),
            )
        })?;
    let block = parse_size(&c.block_size)
        .filter(|n| [16, 32, 64, 128, 256, 512, 1024].contains(n))
        .ok_or_else(|| {
            invalid(
                "listeners.coap.block_size",
                format!(
                    "{} is not one of 16, 32, 64, 128, 256, 512, 1024 bytes",
                    c.block_size
                ),
            )
        })?;
    if c.dedup_per_endpoint == 0 || c.dedup_max == 0 || c.dedup_max > 10_000_000 {
        return Err(invalid(
            "listeners.coap.dedup_max",
            "dedup_per_endpoint and dedup_max must be at least 1 (dedup_max at most 10000000)",
        ));
    }
    let separate_after = parse_duration(&c.separate_after).ok_or_else(|| {
        invalid(
            "listeners.coap.separate_after",
            format!("{} is not a duration like \"1s\"", c.separate_after),
        )
    })?;
    for (key, v) in [
        (
            "listeners.coap.rate_limit_per_device",
            c.rate_limit_per_device,
        ),
        ("listeners.coap.rate_limit_global", c.rate_limit_global),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(invalid(
                key,
                format!("{v} must be a rate >= 0 (0 = no limit)"),
            ));
        }
    }
    let auth_fail_window = parse_duration(&c.auth_fail_window)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "listeners.coap.auth_fail_window",
                format!("{} is not a duration like \"60s\"", c.auth_fail_window),
            )
        })?;
    Ok(CoapListenerConfig {
        bind,
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        block_szx: u8::try_from(block.trailing_zeros().saturating_sub(4)).unwrap_or(6),
        max_block_szx: 6,
        dedup_per_endpoint: c.dedup_per_endpoint,
        dedup_max: c.dedup_max,
        separate_after,
        rate_limit_per_device: c.rate_limit_per_device,
        rate_limit_global: c.rate_limit_global,
        auth_fail_limit: c.auth_fail_limit,
        auth_fail_window,
    })
}

/// `[listeners.mqtts]`: MQTT over TLS; its limits are those of
/// `[listeners.mqtt]` (or their defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtts {
    /// Address to bind; port 0 picks a free port.
    pub bind: String,
    /// Server certificate chain (PEM), leaf first. Required.
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM). Required.
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) for device client certificates; set, it turns on mTLS.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for RawMqtts {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8883".into(),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
        }
    }
}

/// `[listeners.mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    /// Address to bind; port 0 picks a free port.
    pub bind: String,
    /// Largest MQTT packet accepted (fixed header included).
    pub max_packet_size: SizeValue,
    /// Most simultaneous connections; more are closed at accept.
    pub max_connections: usize,
    /// How long a new connection may take to send its CONNECT.
    pub connect_timeout: DurationValue,
    /// Failed authentications allowed per source IP per
    /// `auth_fail_window` before its attempts are refused unchecked; 0 = off.
    pub auth_fail_limit: u32,
    /// The window of `auth_fail_limit`.
    pub auth_fail_window: DurationValue,
}

impl Default for RawMqtt {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:1883".into(),
            max_packet_size: SizeValue::Text("256KiB".into()),
            max_connections: 1000,
            connect_timeout: DurationValue::Text("10s".into()),
            auth_fail_limit: 10,
            auth_fail_window: DurationValue::Text("60s".into()),
        }
    }
}

/// `[listeners.http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address to bind; port 0 picks a free port.
    pub bind: String,
    /// Largest request body accepted.
    pub max_body: SizeValue,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8080".into(),
            max_body: SizeValue::Text("64KiB".into()),
        }
    }
}

/// `[outbox]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutbox {
    /// Upper bound on stored bytes.
    pub max_bytes: SizeValue,
    /// Records older than this are expired.
    pub max_age: DurationValue,
    /// `drop_oldest` or `reject`.
    pub when_full: String,
    /// `power` or `process`.
    pub durability: String,
    /// `[[outbox.streams]]`: streams beyond or overriding the built-in ones.
    pub streams: Vec<RawStream>,
}

impl Default for RawOutbox {
    fn default() -> Self {
        Self {
            max_bytes: SizeValue::Text("256MiB".into()),
            max_age: DurationValue::Text("7d".into()),
            when_full: "drop_oldest".into(),
            durability: "power".into(),
            streams: Vec::new(),
        }
    }
}

/// `[[outbox.streams]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    /// Stream name (A-Z a-z 0-9 - _).
    pub name: String,
    /// 0 (lowest) to 9 (highest).
    pub priority: u8,
    /// Age limit; default `outbox.max_age`.
    #[serde(default)]
    pub max_age: Option<DurationValue>,
    /// Fraction of `outbox.max_bytes` this stream may fill (0 < share <= 1).
    #[serde(default = "one")]
    pub max_bytes_share: f64,
}

fn one() -> f64 {
    1.0
}

/// `[cloud]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCloud {
    /// `mqtts://host[:port]` (or `mqtt://` for a broker without TLS).
    pub url: String,
    /// Upstream encoding: `generic`.
    pub profile: String,
    /// Topic prefix; `{gateway_id}` is replaced.
    pub topic_prefix: String,
    /// CA bundle for the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// Client key (mutual TLS).
    pub key_file: Option<PathBuf>,
    /// ALPN protocols offered in the TLS handshake (`x-amzn-mqtt-ca` for AWS
    /// IoT Core on port 443); empty offers none.
    pub alpn: Vec<String>,
    /// MQTT client id; default the gateway id.
    pub client_id: Option<String>,
    /// MQTT username.
    pub username: Option<String>,
    /// File holding the MQTT password.
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive.
    pub keep_alive: DurationValue,
    /// Most records per publish.
    pub batch_max_records: usize,
    /// Largest telemetry payload per publish.
    pub batch_max_bytes: SizeValue,
    /// Most publishes awaiting PUBACK.
    pub max_inflight: usize,
    /// Drain order within a stream: `fifo` or `live_first`.
    pub drain: String,
    /// `live_first`: share of a stream's turns given to the backlog (0–1).
    pub backfill_share: f64,
    /// Cap on upstream telemetry bytes per second; absent = no cap.
    pub max_bytes_per_sec: Option<SizeValue>,
    /// First reconnect delay.
    pub backoff_min: DurationValue,
    /// Longest reconnect delay.
    pub backoff_max: DurationValue,
    /// How long shutdown waits for outstanding PUBACKs.
    pub shutdown_grace: DurationValue,
    /// How long a command from `P/commands` waits for the device's answer
    /// when it carries no `expires_ms`.
    pub command_timeout: DurationValue,
    /// MQTT version to the broker: "3.1.1" or "5".
    pub mqtt_version: String,
}

impl Default for RawCloud {
    fn default() -> Self {
        Self {
            url: String::new(),
            profile: "generic".into(),
            topic_prefix: "sluice/{gateway_id}".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            alpn: Vec::new(),
            client_id: None,
            username: None,
            password_file: None,
            keep_alive: DurationValue::Text("30s".into()),
            batch_max_records: 500,
            batch_max_bytes: SizeValue::Text("64KiB".into()),
            max_inflight: 16,
            drain: "fifo".into(),
            backfill_share: 0.25,
            max_bytes_per_sec: None,
            backoff_min: DurationValue::Text("500ms".into()),
            backoff_max: DurationValue::Text("60s".into()),
            shutdown_grace: DurationValue::Text("5s".into()),
            command_timeout: DurationValue::Text("30s".into()),
            mqtt_version: "3.1.1".into(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Address of /metrics, /healthz and /readyz.
    pub bind: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9464".into(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// The admin unix socket.
    pub socket: PathBuf,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/sluice/admin.sock"),
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// How often the health document goes up on `P/health` (at least 1s).
    pub interval: DurationValue,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            interval: DurationValue::Text("60s".into()),
        }
    }
}

/// `[commands]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCommands {
    /// Whether the cloud's `gateway_reboot` may restart the daemon.
    pub allow_reboot: bool,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `text` (alias `human`) or `json`.
    pub format: String,
    /// A tracing filter (`info`, `sluice_agent=debug,info`…).
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// The validated HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Largest body accepted, in bytes.
    pub max_body: usize,
}

/// The validated MQTT listener.
#[derive(Debug, Clone)]
pub struct MqttListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Largest packet accepted, in bytes (at most 268 435 460, MQTT's own
    /// limit).
    pub max_packet_size: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Time allowed between accept and CONNECT.
    pub connect_timeout: Duration,
    /// Failed authentications per source IP per window (0 = no throttle).
    pub auth_fail_limit: u32,
    /// The throttle's window.
    pub auth_fail_window: Duration,
}

/// The validated MQTT-over-TLS listener.
#[derive(Debug, Clone)]
pub struct MqttsListenerConfig {
    /// Address and limits (the limits are `[listeners.mqtt]`'s).
    pub listener: MqttListenerConfig,
    /// Certificate, key and optional client CA files (read at start).
    pub tls: crate::tls::ServerTlsFiles,
}

/// The validated uplink settings (the agent fills in identity at start).
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS settings, `None` for `mqtt://`.
    pub tls: Option<UplinkTls>,
    /// Client id.
    pub client_id: String,
    /// Username.
    pub username: Option<String>,
    /// Password file.
    pub password_file: Option<PathBuf>,
    /// Expanded topic prefix.
    pub topic_prefix: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Records per publish.
    pub batch_max_records: usize,
    /// Largest telemetry payload per publish.
    pub batch_max_bytes: usize,
    /// Publishes in flight.
    pub max_inflight: usize,
    /// Upstream byte-rate cap.
    pub max_bytes_per_sec: Option<u64>,
    /// Drain order within a stream.
    pub drain: DrainMode,
    /// Reconnect delay bounds.
    pub backoff: (Duration, Duration),
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// Default command answer timeout.
    pub command_timeout: Duration,
    /// Upstream API.
    pub profile: sluice_cloud_sync::profile::ProfileKind,
    /// MQTT version to the broker.
    pub mqtt_version: sluice_cloud_sync::uplink::MqttVersion,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (without timestamps under systemd, whose
    /// journal adds its own).
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Gateway id.
    pub gateway_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// HTTP listener, if on.
    pub http: Option<HttpListenerConfig>,
    /// MQTT listener, if on.
    pub mqtt: Option<MqttListenerConfig>,
    /// MQTT-over-TLS listener, if on.
    pub mqtts: Option<MqttsListenerConfig>,
    /// CoAP listener, if on.
    pub coap: Option<CoapListenerConfig>,
    /// The coaps listener, if on.
    pub coaps: Option<CoapsListenerConfig>,
    /// Legacy MQTT topic mappings.
    pub mqtt_mappings: Vec<crate::mqtt::mapping::Mapping>,
    /// Fleet configuration, if on.
    pub fleet: Option<FleetConfig>,
    /// Devices provisioned by configuration (`[[devices]]`).
    pub devices: Vec<crate::registry::ConfigDevice>,
    /// The file this was loaded from (empty when built in code).
    pub source: PathBuf,
    /// The version of the fleet configuration layered in, if any.
    pub fleet_version: Option<u64>,
    /// Outbox bounds and policy.
    pub outbox: OutboxConfig,
    /// Wall-clock trust.
    pub clock: ClockMode,
    /// Cloud uplink, if configured.
    pub cloud: Option<CloudConfig>,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Observability listener address, if on.
    pub metrics_bind: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// How often health telemetry goes up.
    pub health_interval: Duration,
    /// Whether the cloud's `gateway_reboot` may restart the daemon.
    pub allow_reboot: bool,
    /// Telemetry rules, validated (not yet wired into the listeners).
    pub rules: Vec<crate::rules::RuleConfig>,
    /// Firmware manifests, downloads, campaigns, self-update.
    pub firmware: FirmwareConfig,
    /// The effective raw configuration (for `check-config`).
    pub raw: RawConfig,
}

impl Config {
    /// Path of the outbox file.
    pub fn outbox_path(&self) -> PathBuf {
        self.state_dir.join("outbox.db")
    }
    /// Path of the state file.
    pub fn state_db_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }
    /// Root of the firmware store (`staging/`, `ready/`).
    pub fn firmware_dir(&self) -> PathBuf {
        self.state_dir.join("firmware")
    }
}

/// Loads the layered configuration from `path` (plus `conf.d/*.toml` beside
/// it and the environment) and validates it.
///
/// Fails when a source cannot be read or parsed, a key is unknown, or a value
/// is invalid; the error names the key.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let base = load_raw(path, None)?;
    // A fleet configuration applied earlier (state_dir/fleet/applied.json)
    // is layered over the files, under the environment.
    let fleet = crate::fleet::applied(&base.gateway.state_dir);
    let mut cfg = match &fleet {
        Some((version, json)) => {
            let mut cfg = validate(load_raw(path, Some(json))?)?;
            cfg.fleet_version = Some(*version);
            cfg
        }
        None => validate(base)?,
    };
    cfg.source = path.to_owned();
    Ok(cfg)
}

/// Loads and validates `path` with `fleet_json` (the `config` object of a
/// fleet payload) layered over the files: the check a fleet configuration
/// must pass before it is applied.
///
/// Fails as [`load`] does.
pub fn load_with_fleet(path: &Path, fleet_json: &str) -> Result<Config, ConfigError> {
    let mut cfg = validate(load_raw(path, Some(fleet_json))?)?;
    cfg.source = path.to_owned();
    Ok(cfg)
}

/// When the configuration with `new_fleet` layered differs from the one
/// with `old_fleet` only in `[[rules]]`, the new rules (validated): a fleet
/// change that can be applied in place. `None` when anything else differs.
///
/// Fails when either configuration does not load or validate.
pub fn rules_only_change(
    path: &Path,
    old_fleet: Option<&str>,
    new_fleet: &str,
) -> Result<Option<Vec<crate::rules::RuleConfig>>, ConfigError> {
    let mut old = load_raw(path, old_fleet)?;
    let mut new = load_raw(path, Some(new_fleet))?;
    let new_cfg = validate(new.clone())?;
    old.rules.clear();
    new.rules.clear();
    let same = serde_json::to_value(&old).ok() == serde_json::to_value(&new).ok();
    Ok(same.then_some(new_cfg.rules))
}

fn load_raw(path: &Path, fleet_json: Option<&str>) -> Result<RawConfig, ConfigError> {
    use config::{Environment, File, FileFormat};
    if !path.exists() {
        return Err(ConfigError::Load(format!(
            "config file {} does not exist (use --config PATH or SLUICE_CONFIG)",
            path.display()
        )));
    }
    let mut builder = config::Config::builder()
        .add_source(File::from(path).format(FileFormat::Toml).required(true));
    let confd = path.parent().unwrap_or(Path::new(".")).join("conf.d");
    if let Ok(entries) = std::fs::read_dir(&confd) {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            builder = builder.add_source(File::from(f).format(FileFormat::Toml).required(true));
        }
    }
    if let Some(json) = fleet_json {
        // The fleet layer arrives as JSON; the loader reads TOML.
        let text = serde_json::from_str::<serde_json::Value>(json)
            .map_err(|e| e.to_string())
            .and_then(|v| toml::to_string(&v).map_err(|e| e.to_string()))
            .map_err(|e| ConfigError::Load(format!("fleet configuration: {e}")))?;
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
    }
    builder = builder.add_source(
        Environment::with_prefix("SLUICE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    let built = builder
        .build()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    built
        .try_deserialize::<RawConfig>()
        .map_err(|e| ConfigError::Load(e.to_string()))
}

fn machine_gateway_id() -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let id = id.trim();
    (id.len() >= 12 && id.is_ascii()).then(|| format!("gw-{}", &id[..12]))
}

/// Parses a log filter (`log.level`, `SLUICE_LOG`): comma-separated
/// `level`, `target` or `target=level` directives, e.g.
/// `"sluice_agent::mqtt=debug,info"`. The most specific matching target
/// wins; a bare level is the default for every other target (none: off).
/// `RUST_LOG` syntax without span or field filters (`target[span]=level`).
pub fn parse_log_filter(s: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    fn target(t: &str) -> Result<&str, String> {
        if t.is_empty() {
            Err("a directive has an empty target".into())
        } else if t.contains(['[', ']', '{', '}']) {
            Err(format!("{t:?}: span and field filters are not supported"))
        } else if t.contains(char::is_whitespace) || t.contains('"') {
            Err(format!("{t:?} is not a target"))
        } else {
            Ok(t)
        }
    }
    let mut filter = Targets::new();
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        filter = match d.split_once('=') {
            Some((t, level)) => {
                let level = level
                    .trim()
                    .parse::<LevelFilter>()
                    .map_err(|_| format!("{:?} is not a level", level.trim()))?;
                filter.with_target(target(t.trim())?, level)
            }
            None => match d.parse::<LevelFilter>() {
                Ok(level) => filter.with_default(level),
                Err(_) => filter.with_target(target(d)?, LevelFilter::TRACE),
            },
        };
    }
    Ok(filter)
}

fn valid_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Validates a raw configuration into typed values.
///
/// Fails on the first invalid key, naming it.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let gateway_id = match &raw.gateway.id {
        Some(id) => id.clone(),
        None => machine_gateway_id()
            .ok_or_else(|| invalid("gateway.id", "not set, and /etc/machine-id cannot be read"))?,
    };
    if !valid_topic_level(&gateway_id) {
        return Err(invalid(
            "gateway.id",
            format!("{gateway_id:?} must be 1-128 characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    if raw.gateway.state_dir.as_os_str().is_empty() {
        return Err(invalid("gateway.state_dir", "must not be empty"));
    }

    let http = match &raw.listeners.http {
        None => None,
        Some(h) => {
            let bind: SocketAddr = h.bind.parse().map_err(|_| {
                invalid(
                    "listeners.http.bind",
                    format!("{:?} is not an address like 0.0.0.0:8080", h.bind),
                )
            })?;
            let max_body = parse_size(&h.max_body).filter(|n| *n > 0).ok_or_else(|| {
                invalid(
                    "listeners.http.max_body",
                    format!("{} is not a size", h.max_body),
                )
            })?;
            Some(HttpListenerConfig {
                bind,
                max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            })
        }
    };

    let mqtt = match &raw.listeners.mqtt {
        None => None,
        Some(m) => Some(validate_mqtt(m)?),
    };
    let mqtts = match &raw.listeners.mqtts {
        None => None,
        Some(m) => Some(validate_mqtts(m, raw.listeners.mqtt.as_ref())?),
    };
    let coap = match &raw.listeners.coap {
        None => None,
        Some(c) => Some(validate_coap(c)?),
    };
    let coaps = match &raw.listeners.coaps {
        None => None,
        Some(c) => Some(validate_coaps(c, raw.listeners.coap.as_ref())?),
    };
    let mqtt_mappings = crate::mqtt::mapping::validate(&raw.mqtt.mappings)
        .map_err(|(key, problem)| ConfigError::Mapping { key, problem })?;
    let fleet = match &raw.fleet {
        None => None,
        Some(f) => Some(validate_fleet(f)?),
    };
    let devices = validate_devices(&raw.devices)?;
    let firmware = validate_firmware(&raw.firmware)?;

    let o = &raw.outbox;
    let max_bytes = parse_size(&o.max_bytes)
        .filter(|n| *n >= 4096)
        .ok_or_else(|| {
            invalid(
                "outbox.max_bytes",
                format!("{} is not a size of at least 4KiB", o.max_bytes),
            )
        })?;
    let max_age = parse_duration(&o.max_age)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "outbox.max_age",
                format!("{} is not a duration like \"7d\"", o.max_age),
            )
        })?;
    let when_full = match o.when_full.as_str() {
        "drop_oldest" => WhenFull::DropOldest,
        "reject" => WhenFull::Reject,
        other => {
            return Err(invalid(
                "outbox.when_full",
                format!("{other:?} is not \"drop_oldest\" or \"reject\""),
            ));
        }
    };
    let durability = match o.durability.as_str() {
        "power" => Durability::Power,
        "process" => Durability::Process,
        other => {
            return Err(invalid(
                "outbox.durability",
                format!("{other:?} is not \"power\" or \"process\""),
            ));
        }
    };

    let mut streams = Vec::new();
    for (i, st) in o.streams.iter().enumerate() {
        if !valid_topic_level(&st.name) || st.name.len() > 64 {
            return Err(invalid(
                "outbox.streams.name",
                format!(
                    "{:?} (entry {i}) must be 1-64 characters of A-Z a-z 0-9 - _ .",
                    st.name
                ),
            ));
        }
        if streams.iter().any(|s: &StreamConfig| s.name == st.name) {
            return Err(invalid(
                "outbox.streams.name",
                format!("{:?} is configured twice", st.name),
            ));
        }
        if st.priority > 9 {
            return Err(invalid(
                "outbox.streams.priority",
                format!("{} (stream {:?}) must be 0-9", st.priority, st.name),
            ));
        }
        if !(st.max_bytes_share > 0.0 && st.max_bytes_share <= 1.0) {
            return Err(invalid(
                "outbox.streams.max_bytes_share",
                format!(
                    "{} (stream {:?}) must be > 0 and <= 1",
                    st.max_bytes_share, st.name
                ),
            ));
        }
        let age = match &st.max_age {
            None => max_age,
            Some(v) => parse_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| {
                invalid(
                    "outbox.streams.max_age",
                    format!("{v} (stream {:?}) is not a duration", st.name),
                )
            })?,
        };
        streams.push(StreamConfig {
            name: st.name.clone(),
            priority: st.priority,
            max_age: age,
            max_bytes: ((max_bytes as f64) * st.max_bytes_share) as u64,
        });
    }
    let clock = match raw.gateway.clock.as_str() {
        "auto" => ClockMode::Auto,
        "trusted" => ClockMode::Trusted,
        "untrusted" => ClockMode::Untrusted,
        other => {
            return Err(invalid(
                "gateway.clock",
                format!("{other:?} is not \"auto\", \"trusted\" or \"untrusted\""),
            ));
        }
    };

    let cloud = match &raw.cloud {
        None => None,
        Some(c) => Some(validate_cloud(c, &gateway_id)?),
    };

    let metrics_bind = match &raw.metrics {
        None => None,
        Some(m) => Some(m.bind.parse().map_err(|_| {
            invalid(
                "metrics.bind",
                format!("{:?} is not an address like 127.0.0.1:9464", m.bind),
            )
        })?),
    };
    if raw.admin.socket.as_os_str().is_empty() {
        return Err(invalid("admin.socket", "must not be empty"));
    }
    let log_format = match raw.log.format.as_str() {
        "text" | "human" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                "log.format",
                format!("{other:?} is not \"text\" or \"json\""),
            ));
        }
    };
    if let Err(e) = parse_log_filter(&raw.log.level) {
        return Err(invalid(
            "log.level",
            format!("{:?} is not a log filter: {e}", raw.log.level),
        ));
    }

    let health_interval = parse_duration(&raw.health.interval)
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            invalid(
                "health.interval",
                format!("{} is not a duration of at least 1s", raw.health.interval),
            )
        })?;

    let outbox = OutboxConfig {
        max_bytes,
        max_age,
        when_full,
        durability,
        streams,
    };
    let rules = crate::rules::validate(&raw.rules, &outbox.effective_streams())?;

    Ok(Config {
        gateway_id,
        state_dir: raw.gateway.state_dir.clone(),
        http,
        mqtt,
        mqtts,
        coap,
        coaps,
        mqtt_mappings,
        fleet,
        devices,
        source: PathBuf::new(),
        fleet_version: None,
        outbox,
        clock,
        cloud,
        admin_socket: raw.admin.socket.clone(),
        metrics_bind,
        log_format,
        log_level: raw.log.level.clone(),
        health_interval,
        allow_reboot: raw.commands.allow_reboot,
        rules,
        firmware,
        raw,
    })
}

/// MQTT's largest packet: a 4-byte remaining length (268 435 455) plus the
/// fixed header.
const MQTT_MAX_PACKET: u64 = 268_435_460;

fn validate_mqtt(m: &RawMqtt) -> Result<MqttListenerConfig, ConfigError> {
    let bind: SocketAddr = m.bind.parse().map_err(|_| {
        invalid(
            "listeners.mqtt.bind",
            format!("{:?} is not an address like 0.0.0.0:1883", m.bind),
        )
    })?;
    let max_packet_size = parse_size(&m.max_packet_size)
        .filter(|n| (1024..=MQTT_MAX_PACKET).contains(n))
        .ok_or_else(|| {
            invalid(
                "listeners.mqtt.max_packet_size",
                format!(
                    "{} is not a size between 1KiB and 268435460 bytes",
                    m.max_packet_size
                ),
            )
        })?;
    if m.max_connections == 0 || m.max_connections > 1_000_000 {
        return Err(invalid(
            "listeners.mqtt.max_connections",
            format!("{} must be 1..=1000000", m.max_connections),
        ));
    }
    let connect_timeout = parse_duration(&m.connect_timeout)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "listeners.mqtt.connect_timeout",
                format!("{} is not a duration like \"10s\"", m.connect_timeout),
            )
        })?;
    let auth_fail_window = parse_duration(&m.auth_fail_window)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "listeners.mqtt.auth_fail_window",
                format!("{} is not a duration like \"60s\"", m.auth_fail_window),
            )
        })?;
    Ok(MqttListenerConfig {
        bind,
        max_packet_size: usize::try_from(max_packet_size).unwrap_or(usize::MAX),
        max_connections: m.max_connections,
        connect_timeout,
        auth_fail_limit: m.auth_fail_limit,
        auth_fail_window,
    })
}

fn validate_mqtts(
    m: &RawMqtts,
    mqtt: Option<&RawMqtt>,
) -> Result<MqttsListenerConfig, ConfigError> {
    let bind: SocketAddr = m.bind.parse().map_err(|_| {
        invalid(
            "listeners.mqtts.bind",
            format!("{:?} is not an address like 0.0.0.0:8883", m.bind),
        )
    })?;
    let limits = validate_mqtt(mqtt.unwrap_or(&RawMqtt::default()))?;
    let required = |v: &Option<PathBuf>, key: &'static str| {
        v.clone()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| invalid(key, "is required (a PEM file)"))
    };
    Ok(MqttsListenerConfig {
        listener: MqttListenerConfig { bind, ..limits },
        tls: crate::tls::ServerTlsFiles {
            cert_file: required(&m.cert_file, "listeners.mqtts.cert_file")?,
            key_file: required(&m.key_file, "listeners.mqtts.key_file")?,
            client_ca_file: m.client_ca_file.clone(),
        },
    })
}

fn validate_cloud(c: &RawCloud, gateway_id: &str) -> Result<CloudConfig, ConfigError> {
    let (scheme, rest) = c.url.split_once("://").ok_or_else(|| {
        invalid(
            "cloud.url",
            format!("{:?} is not a URL like mqtts://broker:8883", c.url),
        )
    })?;
    let tls = match scheme {
        "mqtts" => true,
        "mqtt" => false,
        other => {
            return Err(invalid(
                "cloud.url",
                format!("scheme {other:?} is not mqtts or mqtt"),
            ));
        }
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('@') {
        return Err(invalid(
            "cloud.url",
            "credentials do not belong in the URL: use cloud.username and cloud.password_file",
        ));
    }
    if hostport.contains('/') || hostport.is_empty() {
        return Err(invalid(
            "cloud.url",
            format!("{:?} must be scheme://host[:port] with no path", c.url),
        ));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port: u16 = p
                .parse()
                .map_err(|_| invalid("cloud.url", format!("{p:?} is not a port number")))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
            )
        }
        _ => (hostport.to_owned(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(invalid("cloud.url", "host is empty"));
    }
    if c.profile != "generic" && c.profile != "thingsboard" {
        return Err(invalid(
            "cloud.profile",
            format!("{:?} is not \"generic\" or \"thingsboard\"", c.profile),
        ));
    }
    let topic_prefix = c.topic_prefix.replace("{gateway_id}", gateway_id);
    if topic_prefix.is_empty() || topic_prefix.contains(['+', '#']) || topic_prefix.ends_with('/') {
        return Err(invalid(
            "cloud.topic_prefix",
            format!("{topic_prefix:?} must be a topic without wildcards or a trailing /"),
        ));
    }
    let tls = if tls {
        let ca_file = c
            .ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        let client_cert = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "cloud.key_file",
                    "cloud.cert_file needs a key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "cloud.cert_file",
                    "cloud.key_file needs a cert_file",
                ));
            }
        };
        if let Some(p) = c.alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
            return Err(invalid(
                "cloud.alpn",
                format!("{p:?} must be 1 to 255 bytes long"),
            ));
        }
        Some(UplinkTls {
            ca_file,
            client_cert,
            alpn: c.alpn.clone(),
        })
    } else {
        if c.cert_file.is_some() || c.key_file.is_some() {
            return Err(invalid(
                "cloud.cert_file",
                "a client certificate needs an mqtts:// URL",
            ));
        }
        if !c.alpn.is_empty() {
            return Err(invalid("cloud.alpn", "ALPN needs an mqtts:// URL"));
        }
        None
    };
    if c.password_file.is_some() && c.username.is_none() {
        return Err(invalid(
            "cloud.username",
            "cloud.password_file needs a username",
        ));
    }
    let dur = |key: &'static str, v: &DurationValue| {
        parse_duration(v).ok_or_else(|| invalid(key, format!("{v} is not a duration")))
    };
    let keep_alive = dur("cloud.keep_alive", &c.keep_alive)?;
    if keep_alive < Duration::from_secs(5) {
        return Err(invalid("cloud.keep_alive", "must be at least 5s"));
    }
    let backoff_min = dur("cloud.backoff_min", &c.backoff_min)?;
    let backoff_max = dur("cloud.backoff_max", &c.backoff_max)?;
    if backoff_min.is_zero() || backoff_max < backoff_min {
        return Err(invalid(
            "cloud.backoff_max",
            "backoff_min must be > 0 and backoff_max >= backoff_min",
        ));
    }
    if c.batch_max_records == 0 || c.batch_max_records > 100_000 {
        return Err(invalid("cloud.batch_max_records", "must be 1..=100000"));
    }
    let batch_max_bytes = parse_size(&c.batch_max_bytes)
        .filter(|n| *n >= 1024)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            invalid(
                "cloud.batch_max_bytes",
                format!("{} is not a size of at least 1KiB", c.batch_max_bytes),
            )
        })?;
    if c.max_inflight == 0 || c.max_inflight > 1000 {
        return Err(invalid("cloud.max_inflight", "must be 1..=1000"));
    }
    if !(0.0..=1.0).contains(&c.backfill_share) {
        return Err(invalid(
            "cloud.backfill_share",
            format!("{} must be between 0 and 1", c.backfill_share),
        ));
    }
    let drain = match c.drain.as_str() {
        "fifo" => DrainMode::Fifo,
        "live_first" => DrainMode::LiveFirst {
            backfill_share: c.backfill_share,
        },
        other => {
            return Err(invalid(
                "cloud.drain",
                format!("{other:?} is not \"fifo\" or \"live_first\""),
            ));
        }
    };
    let max_bytes_per_sec = match &c.max_bytes_per_sec {
        None => None,
        Some(v) => Some(parse_size(v).filter(|n| *n >= 1024).ok_or_else(|| {
            invalid(
                "cloud.max_bytes_per_sec",
                format!("{v} is not a size of at least 1KiB"),
            )
        })?),
    };
    Ok(CloudConfig {
        host,
        port,
        tls,
        client_id: c.client_id.clone().unwrap_or_else(|| gateway_id.to_owned()),
        username: c.username.clone(),
        password_file: c.password_file.clone(),
        topic_prefix,
        keep_alive,
        batch_max_records: c.batch_max_records,
        batch_max_bytes,
        max_inflight: c.max_inflight,
        max_bytes_per_sec,
        drain,
        backoff: (backoff_min, backoff_max),
        shutdown_grace: dur("cloud.shutdown_grace", &c.shutdown_grace)?,
        mqtt_version: match c.mqtt_version.as_str() {
            "3.1.1" | "4" => sluice_cloud_sync::uplink::MqttVersion::V311,
            "5" | "5.0" => sluice_cloud_sync::uplink::MqttVersion::V5,
            other => {
                return Err(invalid(
                    "cloud.mqtt_version",
                    format!("{other:?} is not \"3.1.1\" or \"5\""),
                ));
            }
        },
        profile: if c.profile == "thingsboard" {
            sluice_cloud_sync::profile::ProfileKind::ThingsBoard
        } else {
            sluice_cloud_sync::profile::ProfileKind::Generic
        },
        command_timeout: {
            let t = dur("cloud.command_timeout", &c.command_timeout)?;
            if t.is_zero() {
                return Err(invalid("cloud.command_timeout", "must be > 0"));
            }
            t
        },
    })
}

/// The effective configuration as TOML. Secrets are only ever file paths
/// (`cloud.password_file`), so nothing secret is printed.
///
/// Fails only if TOML serialisation fails.
pub fn effective_toml(cfg: &Config) -> Result<String, toml::ser::Error> {
    let mut raw = cfg.raw.clone();
    raw.gateway.id = Some(cfg.gateway_id.clone());
    toml::to_string_pretty(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        let s = |t: &str| parse_size(&SizeValue::Text(t.into()));
        assert_eq!(s("64KiB"), Some(65536));
        assert_eq!(s("256MiB"), Some(256 << 20));
        assert_eq!(s("1GB"), Some(1_000_000_000));
        assert_eq!(s("12XB"), None);
        assert_eq!(s(""), None);
        let d = |t: &str| parse_duration(&DurationValue::Text(t.into()));
        assert_eq!(d("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("30"), Some(Duration::from_secs(30)));
        assert_eq!(d("3 weeks"), None);
    }

    fn raw(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = raw("[gateway]\nid = \"g\"\n[outbox]\nmax_bytes = \"12XB\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "outbox.max_bytes: \"12XB\" is not a size of at least 4KiB"
        );
    }

    #[test]
    fn health_interval_defaults_to_a_minute_and_must_be_a_second_or_more() {
        let c = raw("[gateway]\nid = \"g\"\n").unwrap();
        assert_eq!(c.health_interval, Duration::from_secs(60));
        assert!(!c.allow_reboot);
        let c = raw(
            "[gateway]\nid = \"g\"\n[health]\ninterval = \"1s\"\n[commands]\nallow_reboot = true\n",
        )
        .unwrap();
        assert_eq!(c.health_interval, Duration::from_secs(1));
        assert!(c.allow_reboot);
        let e = raw("[gateway]\nid = \"g\"\n[health]\ninterval = \"500ms\"\n").unwrap_err();
        assert!(e.to_string().starts_with("health.interval:"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let e = raw("[gateway]\nid = \"g\"\n[outbox]\nmax_byte = \"1MiB\"\n").unwrap_err();
        assert!(e.to_string().contains("max_byte"), "{e}");
    }

    #[test]
    fn devices_carry_token_hashes_and_bad_entries_name_their_index_and_field() {
        let h = |c: char| c.to_string().repeat(64);
        let c = raw(&format!(
            "[gateway]\nid = \"g\"\n[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\n\
             [[devices]]\nname = \"d2\"\ntype = \"sensor\"\ntoken_sha256 = \"{}\"\n\
             cert_sha256 = \"{}\"\nbridge_for = \"room-*\"\n",
            h('a'),
            h('B'),
            h('c')
        ))
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(
            (c.devices[0].kind.as_str(), c.devices[0].token_sha256),
            ("default", [0xaa; 32])
        );
        assert_eq!(c.devices[1].token_sha256, [0xbb; 32]);
        assert_eq!(c.devices[1].cert_sha256, Some([0xcc; 32]));
        assert_eq!(c.devices[1].bridge_for.as_deref(), Some("room-*"));

        let err = |entries: &str| {
            raw(&format!("[gateway]\nid = \"g\"\n{entries}"))
                .unwrap_err()
                .to_string()
        };
        let e = err("[[devices]]\nname = \"d1\"\ntoken_sha256 = \"plain-token\"\n");
        assert!(
            e.starts_with("devices[0].token_sha256: must be the SHA-256"),
            "{e}"
        );
        let e = err(&format!(
            "[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\n\
             [[devices]]\nname = \"d 2\"\ntoken_sha256 = \"{}\"\n",
            h('a'),
            h('b')
        ));
        assert!(e.starts_with("devices[1].name:"), "{e}");
        let e = err(&format!(
            "[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\n\
             [[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\n",
            h('a'),
            h('b')
        ));
        assert_eq!(e, "devices[1].name: \"d1\" is also devices[0]");
        let e = err(&format!(
            "[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\n\
             [[devices]]\nname = \"d2\"\ntoken_sha256 = \"{}\"\n",
            h('a'),
            h('A')
        ));
        assert_eq!(e, "devices[1].token_sha256: the same token as devices[0]");
        let e = err(&format!(
            "[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\ncert_sha256 = \"xyz\"\n",
            h('a')
        ));
        assert!(e.starts_with("devices[0].cert_sha256:"), "{e}");
        let e = err(&format!(
            "[[devices]]\nname = \"d1\"\ntoken_sha256 = \"{}\"\ntoken = \"t\"\n",
            h('a')
        ));
        assert!(e.contains("token"), "unknown keys are refused: {e}");
    }

    #[test]
    fn fleet_devices_replace_the_files_devices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.toml");
        std::fs::write(
            &p,
            format!(
                "[gateway]\nid = \"g\"\n[[devices]]\nname = \"local\"\ntoken_sha256 = \"{}\"\n",
                "a".repeat(64)
            ),
        )
        .unwrap();
        let fleet = serde_json::json!({"devices": [
            {"name": "cloud", "type": "sensor", "token_sha256": "b".repeat(64)}
        ]});
        let c = load_with_fleet(&p, &fleet.to_string()).unwrap();
        let names: Vec<&str> = c.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["cloud"]);
    }

    #[test]
    fn streams_are_validated_and_take_their_share() {
        let c = raw(
            "[gateway]\nid = \"g\"\n[outbox]\nmax_bytes = \"100MiB\"\n\
             [[outbox.streams]]\nname = \"bulk\"\npriority = 1\nmax_bytes_share = 0.25\nmax_age = \"1d\"\n",
        )
        .unwrap();
        let s = &c.outbox.streams[0];
        assert_eq!(
            (s.name.as_str(), s.priority, s.max_bytes),
            ("bulk", 1, 25 << 20)
        );
        assert_eq!(s.max_age, Duration::from_secs(86_400));
        let e = raw("[gateway]\nid = \"g\"\n[[outbox.streams]]\nname = \"x\"\npriority = 12\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("outbox.streams.priority:"), "{e}");
        let e = raw("[gateway]\nid = \"g\"\nclock = \"sometimes\"\n").unwrap_err();
        assert!(e.to_string().starts_with("gateway.clock:"), "{e}");
    }

    #[test]
    fn the_mqtt_listener_is_off_unless_configured_and_its_keys_are_checked() {
        assert!(raw("[gateway]\nid = \"g\"\n").unwrap().mqtt.is_none());
        let m = raw("[gateway]\nid = \"g\"\n[listeners.mqtt]\n")
            .unwrap()
            .mqtt
            .unwrap();
        assert_eq!(m.bind.to_string(), "0.0.0.0:1883");
        assert_eq!(m.max_packet_size, 256 << 10);
        assert_eq!(m.max_connections, 1000);
        assert_eq!(m.connect_timeout, Duration::from_secs(10));
        for (body, key) in [
            ("bind = \"nowhere\"", "listeners.mqtt.bind:"),
            (
                "max_packet_size = \"12XB\"",
                "listeners.mqtt.max_packet_size:",
            ),
            (
                "max_packet_size = \"1GiB\"",
                "listeners.mqtt.max_packet_size:",
            ),
            ("max_connections = 0", "listeners.mqtt.max_connections:"),
            (
                "connect_timeout = \"soon\"",
                "listeners.mqtt.connect_timeout:",
            ),
        ] {
            let e = raw(&format!(
                "[gateway]\nid = \"g\"\n[listeners.mqtt]\n{body}\n"
            ))
            .unwrap_err();
            assert!(e.to_string().starts_with(key), "{e}");
        }
    }

    #[test]
    fn the_coaps_listener_shares_the_coap_limits_and_fits_blocks_to_its_mtu() {
        let c = raw(
            "[gateway]\nid = \"g\"\n[listeners.coap]\nmax_body = \"1KiB\"\n[listeners.coaps]\n",
        )
        .unwrap()
        .coaps
        .unwrap();
        assert_eq!(c.coap.bind.port(), 5684);
        assert_eq!(c.coap.max_body, 1024, "from [listeners.coap]");
        assert_eq!(
            (c.mtu, c.coap.block_szx, c.coap.max_block_szx),
            (1200, 6, 6)
        );
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(1800));
        let c = raw("[gateway]\nid = \"g\"\n[listeners.coaps]\nmtu = 256\n")
            .unwrap()
            .coaps
            .unwrap();
        // 256 - 85 = 171 bytes: 128-byte blocks (SZX 3).
        assert_eq!((c.coap.block_szx, c.coap.max_block_szx), (3, 3));
        for (body, key) in [
            ("mtu = 100", "listeners.coaps.mtu:"),
            ("max_handshakes = 0", "listeners.coaps.max_handshakes:"),
            ("idle_timeout = \"0s\"", "listeners.coaps.idle_timeout:"),
            ("bind = \"nope\"", "listeners.coaps.bind:"),
        ] {
            let e = raw(&format!(
                "[gateway]\nid = \"g\"\n[listeners.coaps]\n{body}\n"
            ))
            .unwrap_err();
            assert!(e.to_string().starts_with(key), "{body}: {e}");
        }
    }

    #[test]
    fn the_mqtts_listener_needs_its_cert_and_key_and_shares_the_mqtt_limits() {
        assert!(raw("[gateway]\nid = \"g\"\n").unwrap().mqtts.is_none());
        let m = raw(
            "[gateway]\nid = \"g\"\n[listeners.mqtt]\nmax_connections = 7\n\
             [listeners.mqtts]\ncert_file = \"/s.crt\"\nkey_file = \"/s.key\"\n",
        )
        .unwrap()
        .mqtts
        .unwrap();
        assert_eq!(m.listener.bind.to_string(), "0.0.0.0:8883");
        assert_eq!(m.listener.max_connections, 7);
        assert_eq!(m.tls.cert_file, PathBuf::from("/s.crt"));
        assert!(m.tls.client_ca_file.is_none());
        for (body, key) in [
            ("key_file = \"/k\"", "listeners.mqtts.cert_file:"),
            ("cert_file = \"/c\"", "listeners.mqtts.key_file:"),
            (
                "cert_file = \"/c\"\nkey_file = \"/k\"\nbind = \"x\"",
                "listeners.mqtts.bind:",
            ),
        ] {
            let e = raw(&format!(
                "[gateway]\nid = \"g\"\n[listeners.mqtts]\n{body}\n"
            ))
            .unwrap_err();
            assert!(e.to_string().starts_with(key), "{e}");
        }
    }

    #[test]
    fn cloud_url_forms() {
        let c = raw("[gateway]\nid = \"g1\"\n[cloud]\nurl = \"mqtts://[::1]:1234\"\n")
            .unwrap()
            .cloud
            .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 1234));
        assert_eq!(c.topic_prefix, "sluice/g1");
        let c = raw("[gateway]\nid = \"g1\"\n[cloud]\nurl = \"mqtt://broker\"\n")
            .unwrap()
            .cloud
            .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls.is_none()),
            ("broker", 1883, true)
        );
        let e = raw("[gateway]\nid = \"g1\"\n[cloud]\nurl = \"http://x\"\n").unwrap_err();
        assert!(e.to_string().starts_with("cloud.url:"), "{e}");
    }

    #[test]
    fn cloud_alpn_is_checked_and_passed_to_tls() {
        let c = raw("[gateway]\nid = \"g1\"\n[cloud]\nurl = \"mqtts://b:443\"\nalpn = [\"x-amzn-mqtt-ca\"]\n")
            .unwrap()
            .cloud
            .unwrap();
        assert_eq!(c.tls.unwrap().alpn, vec!["x-amzn-mqtt-ca".to_owned()]);
        let long = "a".repeat(256);
        for (url, alpn) in [
            ("mqtts://b", "\"\""),
            ("mqtts://b", &format!("\"{long}\"")),
            ("mqtt://b", "\"mqtt\""),
        ] {
            let e = raw(&format!(
                "[gateway]\nid = \"g1\"\n[cloud]\nurl = \"{url}\"\nalpn = [{alpn}]\n"
            ))
            .unwrap_err();
            assert!(e.to_string().starts_with("cloud.alpn:"), "{e}");
        }
    }

    #[test]
    fn log_filters_parse_like_rust_log_without_spans() {
        use tracing::Level;
        let f = parse_log_filter("sluice_agent::mqtt=debug, warn ,hyper=off").unwrap();
        assert!(f.would_enable("sluice_agent::mqtt::session", &Level::DEBUG));
        assert!(!f.would_enable("sluice_agent::mqtt", &Level::TRACE));
        assert!(!f.would_enable("sluice_agent::http", &Level::INFO));
        assert!(f.would_enable("sluice_agent::http", &Level::WARN));
        assert!(!f.would_enable("hyper::proto", &Level::ERROR));
        let f = parse_log_filter("sluice_cloud_sync").unwrap();
        assert!(f.would_enable("sluice_cloud_sync::uplink", &Level::TRACE));
        assert!(!f.would_enable("sluice_agent", &Level::ERROR));
        assert!(parse_log_filter("INFO").is_ok());
        for bad in [
            "a=loud",
            "a[span]=debug",
            "[{x}]=info",
            "=info",
            "a=b=c",
            "a b",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad}");
        }
        let e = raw("[gateway]\nid = \"g1\"\n[log]\nlevel = \"x[s]=debug\"\n").unwrap_err();
        assert!(e.to_string().starts_with("log.level:"), "{e}");
    }

    #[test]
    fn log_format_is_text_by_default_with_human_as_its_alias() {
        let format = |f: &str| {
            raw(&format!(
                "[gateway]\nid = \"g1\"\n[log]\nformat = \"{f}\"\n"
            ))
        };
        assert_eq!(
            raw("[gateway]\nid = \"g1\"\n").unwrap().log_format,
            LogFormat::Text
        );
        assert_eq!(format("text").unwrap().log_format, LogFormat::Text);
        assert_eq!(format("human").unwrap().log_format, LogFormat::Text);
        assert_eq!(format("json").unwrap().log_format, LogFormat::Json);
        let e = format("pretty").unwrap_err();
        assert!(e.to_string().starts_with("log.format:"), "{e}");
    }
}
