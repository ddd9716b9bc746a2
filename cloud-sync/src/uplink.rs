//! The uplink: drains the outbox to the cloud MQTT broker (3.1.1, QoS 1, TLS
//! via rustls with the ring provider). Before each connection attempt the
//! TLS files are read again if they changed on disk ([`crate::tls`]), so a
//! rotated client certificate is used without a restart.
//!
//! Exactness of acks: every connection uses a clean session and a fresh rumqttc
//! event loop, so rumqttc never replays anything itself and the outbox is the
//! only source of resends. rumqttc assigns packet ids in the order it takes
//! requests from its channel and reports each as `Outgoing::Publish(pkid)`; we
//! keep our publishes in a FIFO in the same order and move each to the
//! in-flight map under that pkid when the event arrives. A PUBACK for a pkid
//! deletes exactly the records of the publish that carried them. When the
//! connection drops, everything in flight is forgotten and the next connection
//! leases from the head of the outbox again (same seqs: at-least-once).
//!
//! What is sent next is decided by [`DrainSchedule`]: streams in weighted
//! round robin by priority, each in seq order, within `cloud.max_bytes_per_sec`.
//! The `attributes` stream goes to `P/attributes`, every other to
//! `P/telemetry`.
//!
//! Downlink: with [`Uplink::with_downlink`] every connection subscribes
//! (QoS 1) to `P/commands` and `P/attributes/shared`, hands what arrives to
//! the agent's router as [`CloudRequest`]s, and publishes the router's
//! command responses on `P/commands/response` (QoS 1, not stored: see
//! [`crate::downlink`]).

use crate::downlink::{self, CloudRequest, UpMessage};
use crate::drain::{DrainMode, DrainSchedule};
use crate::outbox::{Leased, Outbox};
use crate::profile::{self, GenericTopics, ProfileKind, tb};
use crate::record::Seq;
use crate::tls::{Material, Refreshed};
pub mod client;

pub use client::MqttVersion;
use client::{Client, Ev, Loop};
use rumqttc::{QoS, TlsConfiguration, Transport};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

pub use crate::tls::tls_client_config;

/// TLS settings of the uplink. The files are read again before a
/// connection attempt when they changed on disk (see [`crate::tls`]).
#[derive(Debug, Clone)]
pub struct UplinkTls {
    /// PEM bundle of the CAs that may sign the broker's certificate.
    pub ca_file: PathBuf,
    /// Optional client certificate chain and key (PEM) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// ALPN protocols offered in the handshake (e.g. `x-amzn-mqtt-ca` for
    /// AWS IoT Core on port 443); empty offers none.
    pub alpn: Vec<String>,
}

/// Everything the uplink needs to know.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Broker host name or IP (also the TLS server name).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS, or `None` for plain MQTT (`mqtt://` URLs only).
    pub tls: Option<UplinkTls>,
    /// MQTT client id.
    pub client_id: String,
    /// MQTT username and password, if any.
    pub credentials: Option<(String, String)>,
    /// Topic prefix with `{gateway_id}` already expanded.
    pub topic_prefix: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Most records in one publish.
    pub batch_max_records: usize,
    /// Largest telemetry payload in one publish (at least one record is
    /// always sent, even if it alone is larger).
    pub batch_max_bytes: usize,
    /// Most publishes awaiting PUBACK.
    pub max_inflight: usize,
    /// Cap on telemetry payload bytes per second, if any.
    pub max_bytes_per_sec: Option<u64>,
    /// Drain order within each stream.
    pub drain: DrainMode,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How long shutdown waits for outstanding PUBACKs.
    pub shutdown_grace: Duration,
    /// The gateway id (in every batch).
    pub gateway_id: String,
    /// The gateway epoch (in every batch).
    pub epoch: String,
    /// sluice's version (in the status message).
    pub version: String,
    /// Which upstream API.
    pub profile: ProfileKind,
    /// MQTT 3.1.1 or 5.
    pub mqtt_version: MqttVersion,
    /// A device's type (profile) for `v1/gateway/connect`.
    pub device_type: DeviceTypes,
}

/// How the uplink learns a device's type (the registry's).
#[derive(Clone)]
pub struct DeviceTypes(pub Arc<dyn Fn(&str) -> String + Send + Sync>);

impl std::fmt::Debug for DeviceTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceTypes")
    }
}

impl Default for DeviceTypes {
    fn default() -> Self {
        Self(Arc::new(|_| "default".to_owned()))
    }
}

/// How long the `thingsboard` profile waits for the cloud's
/// `getSessionLimits` answer before draining with its own limits.
const SESSION_LIMITS_WAIT: Duration = Duration::from_secs(5);

/// Why the uplink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// A PEM file could not be read or parsed.
    #[error("{what} {path}: {message}")]
    Pem {
        /// Which file it is (`cloud.ca_file`…).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Live figures of the uplink, shared with `sluice status`.
#[derive(Debug, Default)]
pub struct UplinkStatus {
    connected: AtomicBool,
    last_ack_ms: AtomicI64,
    records_acked: AtomicU64,
    last_error: Mutex<Option<String>>,
    downlink_received: AtomicU64,
    downlink_refused: AtomicU64,
    responses_sent: AtomicU64,
    responses_dropped: AtomicU64,
    client_cert_not_after: Mutex<Option<i64>>,
    tls_reloads: AtomicU64,
    tls_reload_failures: AtomicU64,
}

impl UplinkStatus {
    /// Whether a broker session is up (CONNACK received).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// When the last PUBACK for telemetry arrived (unix ms), if ever.
    pub fn last_ack_ms(&self) -> Option<i64> {
        match self.last_ack_ms.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }
    /// Records acknowledged by the broker since start.
    pub fn records_acked(&self) -> u64 {
        self.records_acked.load(Ordering::Relaxed)
    }
    /// The last connection error, if the link is down.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
    /// Downlink messages (commands, shared attributes) taken from the cloud.
    pub fn downlink_received(&self) -> u64 {
        self.downlink_received.load(Ordering::Relaxed)
    }
    /// Downlink messages refused (bad shape, or the router was busy).
    pub fn downlink_refused(&self) -> u64 {
        self.downlink_refused.load(Ordering::Relaxed)
    }
    /// Command responses published.
    pub fn responses_sent(&self) -> u64 {
        self.responses_sent.load(Ordering::Relaxed)
    }
    /// Command responses that could not be published.
    pub fn responses_dropped(&self) -> u64 {
        self.responses_dropped.load(Ordering::Relaxed)
    }
    /// The `notAfter` (unix seconds) of the client certificate in use, when
    /// there is one and it could be read.
    pub fn client_cert_not_after(&self) -> Option<i64> {
        self.client_cert_not_after.lock().ok().and_then(|t| *t)
    }
    /// Times the TLS files were reloaded after changing on disk.
    pub fn tls_reloads(&self) -> u64 {
        self.tls_reloads.load(Ordering::Relaxed)
    }
    /// Times changed TLS files failed to load (the previous ones stayed).
    pub fn tls_reload_failures(&self) -> u64 {
        self.tls_reload_failures.load(Ordering::Relaxed)
    }
    fn set_client_cert_not_after(&self, t: Option<i64>) {
        if let Ok(mut g) = self.client_cert_not_after.lock() {
            *g = t;
        }
    }
    /// Counts a response that never reached the uplink (its queue was full).
    pub fn count_response_dropped(&self) {
        self.responses_dropped.fetch_add(1, Ordering::Relaxed);
    }
    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
}

enum Sent {
    Status,
    Response,
    Batch(Vec<Seq>),
}

/// The uplink's ends of the downlink channels.
struct Downlink {
    requests: tokio::sync::mpsc::Sender<CloudRequest>,
    responses: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<UpMessage>>,
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// The uplink task.
pub struct Uplink {
    config: UplinkConfig,
    tls: Option<Material>,
    topics: GenericTopics,
    outbox: Outbox,
    status: Arc<UplinkStatus>,
    downlink: Option<Downlink>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 4];
    let r = if getrandom::fill(&mut b).is_ok() {
        u32::from_le_bytes(b)
    } else {
        u32::MAX / 2
    };
    // Full jitter in [d/2, d].
    d / 2 + d.mul_f64(f64::from(r) / f64::from(u32::MAX) / 2.0)
}

impl Uplink {
    /// Prepares the uplink (reads the TLS files).
    ///
    /// Fails when the TLS configuration cannot be built.
    pub fn new(
        config: UplinkConfig,
        outbox: Outbox,
        status: Arc<UplinkStatus>,
    ) -> Result<Self, UplinkError> {
        let tls = match &config.tls {
            Some(t) => Some(Material::load(t)?),
            None => None,
        };
        status.set_client_cert_not_after(tls.as_ref().and_then(|m| m.not_after));
        let topics = GenericTopics::new(&config.topic_prefix);
        Ok(Self {
            config,
            tls,
            topics,
            outbox,
            status,
            downlink: None,
        })
    }

    /// Turns the downlink on: requests from the cloud go to `requests`
    /// (dropped and counted when it is full), and payloads received on
    /// `responses` are published on `P/commands/response`.
    #[must_use]
    pub fn with_downlink(
        mut self,
        requests: tokio::sync::mpsc::Sender<CloudRequest>,
        responses: tokio::sync::mpsc::Receiver<UpMessage>,
    ) -> Self {
        self.downlink = Some(Downlink {
            requests,
            responses: tokio::sync::Mutex::new(responses),
        });
        self
    }

    /// Takes one message the broker delivered.
    fn on_downlink(&self, topic: &str, payload: &[u8]) {
        let Some(d) = &self.downlink else {
            return;
        };
        let parsed = if self.config.profile == ProfileKind::ThingsBoard {
            tb::parse(&self.config.gateway_id, topic, payload)
        } else if topic == self.topics.config {
            Ok(CloudRequest::Config(payload.to_vec()))
        } else if topic == self.topics.firmware {
            Ok(CloudRequest::Firmware(payload.to_vec()))
        } else {
            downlink::parse(
                &self.topics.commands,
                &self.topics.attributes_shared,
                topic,
                payload,
            )
        };
        match parsed {
            Ok(req) => {
                if d.requests.try_send(req).is_ok() {
                    self.status
                        .downlink_received
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    self.status.downlink_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%topic, "downlink router busy; message dropped");
                }
            }
            Err(e) => {
                self.status.downlink_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%topic, error = %e, "refused a downlink message");
            }
        }
    }

    fn settings(&self) -> client::Settings {
        let c = &self.config;
        client::Settings {
            version: c.mqtt_version,
            client_id: c.client_id.clone(),
            host: c.host.clone(),
            port: c.port,
            keep_alive: c.keep_alive,
            inflight: u16::try_from(c.max_inflight + 2).unwrap_or(u16::MAX),
            // ThingsBoard shows a gateway's state itself; it has no status
            // topic.
            will: (c.profile == ProfileKind::Generic).then(|| {
                (
                    self.topics.status.clone(),
                    profile::status_offline(&c.epoch),
                )
            }),
            credentials: c.credentials.clone(),
            transport: match &self.tls {
                Some(tls) => {
                    Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone()))
                }
                None => Transport::tcp(),
            },
        }
    }

    /// Runs until `cancel` fires: connects, drains, reconnects with capped,
    /// jittered exponential backoff. On cancel it stops taking new records and
    /// waits up to `shutdown_grace` for outstanding PUBACKs.
    pub async fn run(mut self, cancel: CancellationToken) {
        let span = tracing::info_span!("uplink", broker = %format!("{}:{}", self.config.host, self.config.port));
        let _g = span.enter();
        let mut backoff = self.config.backoff_min;
        let mut last_warned: Option<(String, Instant)> = None;
        loop {
            self.refresh_tls().await;
            let started = Instant::now();
            match self.session(&cancel).await {
                Ended::Shutdown => break,
                Ended::Lost(err) => {
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.status.set_error(Some(err.clone()));
                    let repeat = last_warned
                        .as_ref()
                        .is_some_and(|(e, at)| *e == err && at.elapsed() < Duration::from_secs(60));
                    if repeat {
                        tracing::debug!(error = %err, "cloud connection failed");
                    } else {
                        tracing::warn!(error = %err, retry_in = ?backoff, "cloud connection lost or refused");
                        last_warned = Some((err, Instant::now()));
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.config.backoff_min;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        self.status.connected.store(false, Ordering::Relaxed);
    }

    /// Rebuilds the TLS configuration if its files changed on disk; files
    /// that do not load keep the previous configuration.
    async fn refresh_tls(&mut self) {
        let (Some(files), Some(current)) = (&self.config.tls, &self.tls) else {
            return;
        };
        let (files, mut material) = (files.clone(), current.clone());
        let refreshed = tokio::task::spawn_blocking(move || {
            let r = material.refresh(&files);
            (material, r)
        })
        .await;
        match refreshed {
            Ok((_, Refreshed::Unchanged)) => {}
            Ok((material, Refreshed::Reloaded)) => {
                self.status.tls_reloads.fetch_add(1, Ordering::Relaxed);
                self.status.set_client_cert_not_after(material.not_after);
                tracing::info!(
                    client_cert_not_after = ?material.not_after,
                    "TLS files changed on disk; reloaded for the next connection"
                );
                self.tls = Some(material);
            }
            Ok((material, Refreshed::Failed(e))) => {
                self.status
                    .tls_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "TLS files changed on disk but do not load; keeping the previous ones");
                self.tls = Some(material);
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS reload task failed; keeping the previous files");
            }
        }
    }

    async fn session(&self, cancel: &CancellationToken) -> Ended {
        let cap = self.config.max_inflight * 2 + 8;
        let (client, mut el) = client::connect(self.settings(), cap);
        let mut pending: VecDeque<Sent> = VecDeque::new();
        let mut inflight: HashMap<u16, Sent> = HashMap::new();
        let mut committed = self.outbox.committed();
        let mut schedule = DrainSchedule::new(
            &self.outbox.streams(),
            self.config.drain,
            self.config.max_bytes_per_sec,
            Instant::now(),
        );
        let mut throttled: Option<tokio::time::Instant> = None;
        let mut connected = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut responses = match &self.downlink {
            Some(d) => Some(d.responses.lock().await),
            None => None,
        };
        let thingsboard = self.config.profile == ProfileKind::ThingsBoard;
        // Limits in force: ours, lowered by what ThingsBoard answers to
        // getSessionLimits (80 % of its maxPayloadSize, as its own SDK does).
        let mut limits = (self.config.batch_max_bytes, self.config.max_inflight);
        let mut limits_until: Option<tokio::time::Instant> = None;
        let mut announced: std::collections::HashSet<String> = std::collections::HashSet::new();

        loop {
            if connected
                && deadline.is_none()
                && throttled.is_none()
                && limits_until.is_none()
                && let Err(e) = self
                    .fill(
                        &client,
                        &mut pending,
                        inflight.len(),
                        &mut schedule,
                        &mut throttled,
                        &committed,
                        limits,
                        &mut announced,
                    )
                    .await
            {
                return Ended::Lost(e);
            }
            if deadline.is_some() && pending.is_empty() && inflight.is_empty() {
                self.goodbye(&client, &mut el).await;
                return Ended::Shutdown;
            }
            let room = pending.len() + inflight.len() < limits.1;
            tokio::select! {
                ev = el.poll() => match ev {
                    Ok(Ev::ConnAck) => {
                        connected = true;
                        self.status.connected.store(true, Ordering::Relaxed);
                        self.status.set_error(None);
                        tracing::info!("connected to the cloud broker");
                        if let DrainMode::LiveFirst { .. } = self.config.drain {
                            let boundary = *committed.borrow();
                            for (stream, _) in self.outbox.streams() {
                                match self.outbox.devices_in(&stream).await {
                                    Ok(devs) => schedule.set_backlog(&stream, devs, boundary),
                                    Err(e) => return Ended::Lost(format!("outbox read failed: {e}")),
                                }
                            }
                        }
                        announced.clear();
                        if thingsboard {
                            let filters = [tb::RPC, tb::ATTRIBUTES, tb::ME_ATTRIBUTES, "v1/devices/me/attributes/response/+", "v1/devices/me/rpc/request/+", "v1/devices/me/rpc/response/+"]
                                .map(str::to_owned);
                            if let Err(e) = client.try_subscribe_many(&filters) {
                                return Ended::Lost(format!("cannot subscribe to the gateway API: {e}"));
                            }
                            // As ThingsBoard's own gateway does: nothing is
                            // forwarded until the limits are known (or a
                            // few seconds passed).
                            let topic = format!("v1/devices/me/rpc/request/{}", tb::SESSION_LIMITS_ID);
                            if client.try_publish(topic, QoS::AtLeastOnce, false, tb::session_limits_request()).is_ok() {
                                pending.push_back(Sent::Status);
                                limits_until = Some(tokio::time::Instant::now() + SESSION_LIMITS_WAIT);
                            }
                            // The fleet configuration, if one is set for
                            // this gateway (shared attribute sluice_config).
                            for (topic, key) in [(tb::ME_ATTRIBUTES_REQUEST, tb::CONFIG_ATTRIBUTE), (tb::ME_FIRMWARE_REQUEST, tb::FIRMWARE_ATTRIBUTE)] {
                                let ask = serde_json::json!({"sharedKeys": key}).to_string();
                                if client.try_publish(topic, QoS::AtLeastOnce, false, ask.into_bytes()).is_ok() {
                                    pending.push_back(Sent::Status);
                                }
                            }
                        } else {
                            if self.downlink.is_some() {
                                let filters = [&self.topics.commands, &self.topics.attributes_shared, &self.topics.config, &self.topics.firmware]
                                    .map(|t| t.clone());
                                if let Err(e) = client.try_subscribe_many(&filters) {
                                    return Ended::Lost(format!("cannot subscribe to the downlink: {e}"));
                                }
                            }
                            let online = profile::status_online(&self.config.version, &self.config.epoch);
                            if client.try_publish(self.topics.status.clone(), QoS::AtLeastOnce, true, online).is_ok() {
                                pending.push_back(Sent::Status);
                            }
                        }
                    }
                    Ok(Ev::Published(pkid)) => {
                        // rumqttc reports QoS 0 publishes too, with pkid 0:
                        // they take their place in the FIFO but await no ack.
                        if let Some(sent) = pending.pop_front()
                            && pkid != 0
                        {
                            inflight.insert(pkid, sent);
                        }
                    }
                    Ok(Ev::PubAck { pkid, accepted: false, reason }) => {
                        // MQTT 5: the broker refused the message; its records
                        // stay in the outbox and go again on the next
                        // connection (this one is dropped so nothing is
                        // skipped).
                        if let Some(Sent::Batch(_)) = inflight.remove(&pkid) {
                            return Ended::Lost(format!("the broker refused a batch: {reason}"));
                        }
                    }
                    Ok(Ev::PubAck { pkid, .. }) => {
                        if let Some(Sent::Batch(seqs)) = inflight.remove(&pkid) {
                            let n = seqs.len() as u64;
                            if self.outbox.ack(seqs).await.is_err() {
                                return Ended::Shutdown;
                            }
                            self.status.records_acked.fetch_add(n, Ordering::Relaxed);
                            self.status.last_ack_ms.store(now_ms(), Ordering::Relaxed);
                        }
                    }
                    Ok(Ev::Message { topic, payload }) => {
                        if thingsboard && tb::is_own_echo(&topic, &payload) {
                            tracing::debug!(%topic, "own publish echoed by the broker; ignored");
                        } else if thingsboard && topic == format!("{}{}", tb::ME_RPC_RESPONSE, tb::SESSION_LIMITS_ID) {
                            let (bytes, inflight_max) = tb::session_limits(&payload);
                            if let Some(b) = bytes {
                                limits.0 = limits.0.min(b * 8 / 10).max(1024);
                            }
                            if let Some(n) = inflight_max {
                                limits.1 = limits.1.min(n).max(1);
                            }
                            tracing::info!(batch_max_bytes = limits.0, max_inflight = limits.1, "ThingsBoard session limits applied");
                            limits_until = None;
                        } else {
                            self.on_downlink(&topic, &payload);
                        }
                    }
                    Ok(Ev::SubscriptionRefused) => {
                        tracing::warn!("the broker refused a downlink subscription: commands or configuration will not arrive");
                    }
                    Ok(_) => {}
                    Err(e) => return Ended::Lost(e),
                },
                r = recv_opt(&mut responses), if connected && deadline.is_none() => {
                    if let Some(msg) = r {
                        let (topic, qos, retain, payload) = match (thingsboard, msg) {
                            (false, UpMessage::CommandResponse(p)) => (self.topics.commands_response.clone(), QoS::AtLeastOnce, false, p),
                            (false, UpMessage::Health(p)) => (self.topics.health.clone(), QoS::AtLeastOnce, false, p),
                            (false, UpMessage::ConfigState(p)) => (self.topics.config_state.clone(), QoS::AtLeastOnce, true, p),
                            (false, UpMessage::FirmwareState(p)) => (self.topics.firmware_state.clone(), QoS::AtLeastOnce, false, p),
                            (true, UpMessage::CommandResponse(p)) => match tb::response(&self.config.gateway_id, &p) {
                                Some((t, p)) => (t, QoS::AtLeastOnce, false, p),
                                None => continue,
                            },
                            (true, UpMessage::Health(p)) => (tb::ME_TELEMETRY.to_owned(), QoS::AtLeastOnce, false, p),
                            (true, UpMessage::ConfigState(p)) => (tb::ME_ATTRIBUTES.to_owned(), QoS::AtLeastOnce, false, tb::config_state(&p)),
                            (true, UpMessage::FirmwareState(p)) => (tb::ME_TELEMETRY.to_owned(), QoS::AtLeastOnce, false, tb::firmware_state(&p)),
                        };
                        match client.try_publish(topic, qos, retain, payload) {
                            Ok(()) => {
                                pending.push_back(Sent::Response);
                                self.status.responses_sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                self.status.responses_dropped.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "cannot queue a command response; dropped");
                            }
                        }
                    }
                }
                r = committed.changed(), if connected && room && deadline.is_none() => {
                    if r.is_err() {
                        // The outbox writer is gone: nothing more to send.
                        deadline = Some(tokio::time::Instant::now());
                    }
                }
                () = cancel.cancelled(), if deadline.is_none() => {
                    if !connected {
                        return Ended::Shutdown;
                    }
                    deadline = Some(tokio::time::Instant::now() + self.config.shutdown_grace);
                }
                () = sleep_until_opt(throttled), if throttled.is_some() => {
                    throttled = None;
                }
                () = sleep_until_opt(limits_until), if limits_until.is_some() => {
                    tracing::warn!("no getSessionLimits answer from ThingsBoard; draining with the configured limits");
                    limits_until = None;
                }
                () = sleep_until_opt(deadline) => {
                    tracing::warn!(unacked = inflight.len() + pending.len(), "shutdown grace over; unacked records stay in the outbox");
                    return Ended::Shutdown;
                }
            }
        }
    }

    /// Leases and publishes new records while the in-flight window has room,
    /// taking streams in the schedule's weighted order and within the byte
    /// rate cap (setting `throttled` when over it).
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        client: &Client,
        pending: &mut VecDeque<Sent>,
        inflight: usize,
        schedule: &mut DrainSchedule,
        throttled: &mut Option<tokio::time::Instant>,
        committed: &tokio::sync::watch::Receiver<Seq>,
        (batch_max_bytes, max_inflight): (usize, usize),
        announced: &mut std::collections::HashSet<String>,
    ) -> Result<(), String> {
        let thingsboard = self.config.profile == ProfileKind::ThingsBoard;
        while pending.len() + inflight < max_inflight {
            let high = *committed.borrow();
            let Some(pick) = schedule.next(high) else {
                break;
            };
            let batch = self
                .outbox
                .lease_where(
                    Some(&pick.stream),
                    pick.after,
                    self.config.batch_max_records,
                    batch_max_bytes as u64,
                    pick.filter,
                )
                .await
                .map_err(|e| format!("outbox read failed: {e}"))?;
            let leased = batch.records;
            if leased.is_empty() {
                match batch.scanned_to {
                    // Only other devices' rows so far: move past them.
                    Some(to) => schedule.advanced(&pick.stream, pick.part, to),
                    // Everything after the cursor was acked or evicted meanwhile.
                    None => schedule.exhausted(&pick.stream, pick.part, high),
                }
                continue;
            }
            let attributes = pick.stream == ATTRIBUTES_STREAM;
            let (payload, n) = if thingsboard {
                tb::batch_payload(&leased, batch_max_bytes, !attributes)
            } else if attributes {
                profile::attributes_payload(
                    &self.config.gateway_id,
                    &self.config.epoch,
                    &leased,
                    batch_max_bytes,
                )
            } else {
                profile::telemetry_payload(
                    &self.config.gateway_id,
                    &self.config.epoch,
                    &leased,
                    batch_max_bytes,
                )
            }
            .map_err(|e| format!("cannot encode a batch: {e}"))?;
            if let Err(at) = schedule.spend(payload.len(), Instant::now()) {
                *throttled = Some(tokio::time::Instant::from_std(at));
                break;
            }
            let seqs: Vec<Seq> = leased[..n].iter().map(|l: &Leased| l.seq).collect();
            let sent_to = if n == leased.len() {
                batch.scanned_to.unwrap_or(seqs[n - 1])
            } else {
                seqs[n - 1]
            };
            if thingsboard {
                // v1/gateway/connect for each device first seen on this
                // connection, before its data.
                for l in &leased[..n] {
                    let dev = l.record.device.as_str();
                    if announced.insert(dev.to_owned()) {
                        let kind = (self.config.device_type.0)(dev);
                        client
                            .try_publish(
                                tb::CONNECT,
                                QoS::AtLeastOnce,
                                false,
                                tb::connect_payload(dev, &kind),
                            )
                            .map_err(|e| format!("cannot queue a publish: {e}"))?;
                        pending.push_back(Sent::Status);
                    }
                }
            }
            let topic = match (thingsboard, attributes) {
                (true, true) => tb::ATTRIBUTES.to_owned(),
                (true, false) => tb::TELEMETRY.to_owned(),
                (false, true) => self.topics.attributes.clone(),
                (false, false) => self.topics.telemetry.clone(),
            };
            client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .map_err(|e| format!("cannot queue a publish: {e}"))?;
            pending.push_back(Sent::Batch(seqs));
            schedule.advanced(&pick.stream, pick.part, sent_to);
        }
        Ok(())
    }

    /// Publishes the offline status (the will is not sent on a clean
    /// disconnect) and disconnects, within a short bound.
    async fn goodbye(&self, client: &Client, el: &mut Loop) {
        if self.config.profile == ProfileKind::ThingsBoard {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while !matches!(el.poll().await, Ok(Ev::Disconnected) | Err(_)) {}
            })
            .await;
            self.status.connected.store(false, Ordering::Relaxed);
            return;
        }
        let offline = profile::status_offline(&self.config.epoch);
        if client
            .try_publish(self.topics.status.clone(), QoS::AtLeastOnce, true, offline)
            .is_err()
        {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut asked = false;
            loop {
                match el.poll().await {
                    Ok(Ev::PubAck { .. }) if !asked => {
                        asked = true;
                        let _ = client.try_disconnect();
                    }
                    Ok(Ev::Disconnected) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        self.status.connected.store(false, Ordering::Relaxed);
    }
}

/// The stream whose records go to `P/attributes`.
const ATTRIBUTES_STREAM: &str = "attributes";

async fn recv_opt(
    rx: &mut Option<tokio::sync::MutexGuard<'_, tokio::sync::mpsc::Receiver<UpMessage>>>,
) -> Option<UpMessage> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
