//! The downlink router: what the cloud sends for devices (commands, shared
//! attributes) goes to the device's live session; the device's answers go
//! back up.
//!
//! Commands (`P/commands`): the target must be an active device with a live
//! MQTT session subscribed to `v1/devices/me/rpc/request/+`; otherwise the
//! cloud gets an error at once (`unknown_device`, or `offline`). A
//! delivered command gets a device-facing integer id (a gateway-wide
//! counter, so ids never repeat while a command is pending) and waits for
//! `v1/devices/me/rpc/response/{id}` from that same device until its
//! deadline (`expires_ms`, else `cloud.command_timeout`); then the cloud
//! gets `timeout`. The answer goes up as `result` when it is JSON, else as a
//! `device_error` carrying the text. Answers from a different device, for an
//! unknown id, or after the deadline are dropped (counted).
//!
//! Shared attributes (`P/attributes/shared`) are stored for the device
//! (state.db, answered to attribute requests even while it is offline) and
//! pushed to its live session when it subscribed to
//! `v1/devices/me/attributes`; changes the CLI makes (firmware staging) are
//! pushed the same way after a reload.
//!
//! Delivery goes through [`DeviceChannel`]s: MQTT sessions
//! ([`crate::mqtt::Sessions`]) and CoAP observers ([`crate::coap::Observers`]);
//! a command goes to the first channel where the device listens for
//! commands, shared attributes to every channel where it listens for them.
//! HTTP long-poll is not built yet.

use crate::attributes::AttributeStore;
use crate::mqtt::PushError;
use crate::mqtt::session::{Push, Subscriptions};
use crate::registry::Registry;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use sluice_cloud_sync::downlink::{self, CloudRequest, Command, CommandError};
use sluice_cloud_sync::{DeviceName, UplinkStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often pending commands are checked for their deadline.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Most commands waiting for answers at once; more are refused as offline.
const MAX_PENDING: usize = 10_000;

struct Pending {
    cloud_id: Json,
    deadline: Instant,
    timeout: Duration,
}

/// A way to reach connected devices (one per protocol).
pub trait DeviceChannel: Send + Sync {
    /// What `device` listens for on this channel; `None` when it is not
    /// connected through it.
    fn subscriptions(&self, device: &DeviceName) -> Option<Subscriptions>;
    /// Queues `push` for `device`.
    ///
    /// Fails when the device is not reachable through this channel now.
    fn push(&self, device: &DeviceName, push: Push) -> Result<(), PushError>;
}

/// Router counters (in `sluice status`).
#[derive(Debug, Default, Serialize)]
pub struct RouterStats {
    /// Commands taken from the cloud.
    pub commands: AtomicU64,
    /// Commands delivered to a device.
    pub delivered: AtomicU64,
    /// Answers routed back.
    pub answered: AtomicU64,
    /// Commands that ended in an error reply (offline, unknown, timeout…).
    pub failed: AtomicU64,
    /// Device answers that matched no pending command.
    pub stray_answers: AtomicU64,
    /// Shared-attribute updates taken (from the cloud or the CLI).
    pub attribute_updates: AtomicU64,
    /// Shared-attribute pushes delivered to a live session.
    pub attribute_pushes: AtomicU64,
    /// Firmware bytes served to devices (MQTT chunks, CoAP blocks).
    pub firmware_bytes_served: AtomicU64,
}

/// The router.
pub struct Router {
    registry: Arc<Registry>,
    attributes: Arc<AttributeStore>,
    channels: Vec<Arc<dyn DeviceChannel>>,
    responses: Option<mpsc::Sender<Vec<u8>>>,
    uplink: Option<Arc<UplinkStatus>>,
    default_timeout: Duration,
    pending: Mutex<HashMap<(DeviceName, u32), Pending>>,
    next_id: AtomicU32,
    /// Counters.
    pub stats: RouterStats,
}

impl Router {
    /// A router delivering through `channels`; `responses` (with the
    /// uplink's status, for counting drops) is where command responses go,
    /// `None` without a cloud.
    pub fn new(
        registry: Arc<Registry>,
        attributes: Arc<AttributeStore>,
        channels: Vec<Arc<dyn DeviceChannel>>,
        responses: Option<(mpsc::Sender<Vec<u8>>, Arc<UplinkStatus>)>,
        default_timeout: Duration,
    ) -> Self {
        let (responses, uplink) = match responses {
            Some((r, u)) => (Some(r), Some(u)),
            None => (None, None),
        };
        Self {
            registry,
            attributes,
            channels,
            responses,
            uplink,
            default_timeout,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            stats: RouterStats::default(),
        }
    }

    /// The attribute store (answers attribute requests).
    pub fn attributes(&self) -> &AttributeStore {
        &self.attributes
    }

    fn respond(&self, payload: Vec<u8>) {
        let Some(tx) = &self.responses else {
            return;
        };
        if tx.try_send(payload).is_err() {
            if let Some(u) = &self.uplink {
                u.count_response_dropped();
            }
            tracing::warn!("command response queue full; a response was dropped");
        }
    }

    fn fail(&self, cloud_id: &Json, device: &str, error: CommandError, message: &str) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(device, code = error.code(), message, "command failed");
        self.respond(downlink::command_error(cloud_id, device, error, message));
    }

    /// Takes one request from the cloud.
    pub fn handle(&self, req: CloudRequest) {
        match req {
            CloudRequest::Command(c) => self.command(c),
            CloudRequest::SharedAttributes { device, values } => {
                let name = DeviceName::new(&device);
                if !self.registry.is_active(&name) {
                    tracing::warn!(%device, "shared attributes for a device that is not registered; ignored");
                    return;
                }
                self.stats.attribute_updates.fetch_add(1, Ordering::Relaxed);
                let (set, deleted) = self.attributes.set_shared(&name, &values);
                self.push_shared(&name, set, deleted);
            }
        }
    }

    /// Pushes shared-attribute changes to the device's live session (set
    /// keys in one message, deletions as `{"deleted":[…]}`).
    pub fn push_shared(&self, device: &DeviceName, set: Map<String, Json>, deleted: Vec<String>) {
        let mut pushes = Vec::new();
        if !set.is_empty() {
            pushes.push(Push::Attributes(Json::Object(set)));
        }
        if !deleted.is_empty() {
            pushes.push(Push::Attributes(serde_json::json!({ "deleted": deleted })));
        }
        for p in pushes {
            for ch in &self.channels {
                if ch.subscriptions(device).is_some_and(|s| s.attributes)
                    && ch.push(device, p.clone()).is_ok()
                {
                    self.stats.attribute_pushes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn command(&self, c: Command) {
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        let device = DeviceName::new(&c.device);
        if !self.registry.is_active(&device) {
            return self.fail(
                &c.id,
                &c.device,
                CommandError::UnknownDevice,
                "no active device of that name",
            );
        }
        let subs: Vec<(usize, Subscriptions)> = self
            .channels
            .iter()
            .enumerate()
            .filter_map(|(i, ch)| ch.subscriptions(&device).map(|s| (i, s)))
            .collect();
        let Some(channel) = subs
            .iter()
            .find(|(_, s)| s.rpc)
            .map(|(i, _)| self.channels[*i].clone())
        else {
            let message = if subs.is_empty() {
                "the device has no live session"
            } else {
                "the device is connected but does not listen for commands \
                 (MQTT v1/devices/me/rpc/request/+, CoAP Observe on rpc)"
            };
            return self.fail(&c.id, &c.device, CommandError::Offline, message);
        };
        let timeout = c
            .expires_ms
            .map_or(self.default_timeout, Duration::from_millis);
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        {
            let Ok(mut g) = self.pending.lock() else {
                return;
            };
            if g.len() >= MAX_PENDING {
                drop(g);
                return self.fail(
                    &c.id,
                    &c.device,
                    CommandError::Offline,
                    "too many commands pending at the gateway",
                );
            }
            g.insert(
                (device.clone(), id),
                Pending {
                    cloud_id: c.id.clone(),
                    deadline: Instant::now() + timeout,
                    timeout,
                },
            );
        }
        let body = serde_json::json!({"method": c.method, "params": c.params});
        if channel.push(&device, Push::Rpc { id, body }).is_err() {
            if let Ok(mut g) = self.pending.lock() {
                g.remove(&(device.clone(), id));
            }
            return self.fail(
                &c.id,
                &c.device,
                CommandError::Offline,
                "the device's session closed or is not reading",
            );
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%device, id, method = %c.method, "command delivered");
    }

    /// A device's answer to command `id`; `false` when none is pending.
    pub fn device_reply(&self, device: &DeviceName, id: u32, payload: &[u8]) -> bool {
        let pending = self
            .pending
            .lock()
            .ok()
            .and_then(|mut g| g.remove(&(device.clone(), id)));
        let Some(p) = pending else {
            self.stats.stray_answers.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        match serde_json::from_slice::<Json>(payload) {
            Ok(result) => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                self.respond(downlink::command_result(
                    &p.cloud_id,
                    device.as_str(),
                    result,
                ));
            }
            Err(_) => self.fail(
                &p.cloud_id,
                device.as_str(),
                CommandError::DeviceError,
                &format!(
                    "the device answered with something that is not JSON: {}",
                    String::from_utf8_lossy(&payload[..payload.len().min(200)])
                ),
            ),
        }
        true
    }

    /// Fails the commands past their deadline.
    fn expire(&self, now: Instant) {
        let expired: Vec<((DeviceName, u32), Pending)> = match self.pending.lock() {
            Ok(mut g) => {
                let keys: Vec<_> = g
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.into_iter()
                    .filter_map(|k| g.remove(&k).map(|p| (k, p)))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for ((device, _), p) in expired {
            self.fail(
                &p.cloud_id,
                device.as_str(),
                CommandError::Timeout,
                &format!("no answer within {} ms", p.timeout.as_millis()),
            );
        }
    }

    /// Commands waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.lock().map_or(0, |g| g.len())
    }

    /// Routes `requests` until `cancel` (or until the uplink drops its end),
    /// and times out pending commands.
    pub async fn run(
        self: Arc<Self>,
        mut requests: mpsc::Receiver<CloudRequest>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                r = requests.recv(), if open => match r {
                    Some(req) => self.handle(req),
                    None => open = false,
                },
                _ = tick.tick() => self.expire(Instant::now()),
            }
        }
    }
}
