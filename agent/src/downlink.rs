//! The downlink router: what the cloud sends for devices (commands, shared
//! attributes) goes to the device's live session; the device's answers go
//! back up.
//!
//! Commands (`P/commands`): the target must be an active device, else the
//! cloud gets `unknown_device` at once. Each command has one deadline,
//! `expires_ms` (else `cloud.command_timeout`) from its arrival. A device
//! that is not listening for commands on any channel (MQTT subscribed to
//! `v1/devices/me/rpc/request/+`, CoAP Observe of `rpc`, HTTP long poll of
//! `rpc`) has its commands parked, in arrival order and bounded (per device
//! and in all; past a cap the command is refused with `offline` at once);
//! every expiry tick retries them, so one is delivered within a tick of
//! the device starting to listen, and one still parked at its deadline
//! fails with `offline`. A delivered command gets a device-facing integer
//! id (a gateway-wide counter, so ids never repeat while a command is
//! pending) and waits for `v1/devices/me/rpc/response/{id}` from that same
//! device until the same deadline; then the cloud gets `timeout`.
//! Parked and pending commands live in memory only. The answer goes up as
//! `result` when it is JSON, else as a
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
//! ([`crate::mqtt::Sessions`]), CoAP observers ([`crate::coap::Observers`])
//! and HTTP long polls ([`crate::http::LongPolls`]); a command goes to the
//! first channel where the device listens for commands, shared attributes
//! to every channel where it listens for them.

use crate::attributes::AttributeStore;
use crate::mqtt::PushError;
use crate::mqtt::session::{Push, Subscriptions};
use crate::registry::Registry;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use sluice_cloud_sync::downlink::{self, CloudRequest, Command, CommandError, UpMessage};
use sluice_cloud_sync::{DeviceName, UplinkStatus};
use std::collections::{HashMap, VecDeque};
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
/// Most commands waiting for one device to start listening.
const MAX_PARKED_PER_DEVICE: usize = 64;
/// Most commands waiting for devices to start listening, in all.
const MAX_PARKED: usize = 4096;

/// A command waiting for its device to listen for commands.
struct Parked {
    command: Command,
    deadline: Instant,
    timeout: Duration,
}

/// Commands waiting for their devices, in arrival order per device.
#[derive(Default)]
struct ParkedCommands {
    by_device: HashMap<DeviceName, VecDeque<Parked>>,
    len: usize,
}

struct Pending {
    cloud_id: Json,
    deadline: Instant,
    timeout: Duration,
}

/// How one delivery attempt went.
enum Delivery {
    Sent,
    /// Not deliverable at all: fail the command with this message.
    Refused(&'static str),
    /// The channel took nothing (a session closing): try again later.
    NotReading,
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
    /// Commands that had to wait for their device to start listening.
    pub parked: AtomicU64,
    /// Device answers that matched no pending command.
    pub stray_answers: AtomicU64,
    /// Shared-attribute updates taken (from the cloud or the CLI).
    pub attribute_updates: AtomicU64,
    /// Shared-attribute pushes delivered to a live session.
    pub attribute_pushes: AtomicU64,
    /// Firmware bytes served to devices (MQTT chunks, CoAP blocks).
    pub firmware_bytes_served: AtomicU64,
    /// Firmware manifests accepted (signature, fields, anti-rollback).
    pub manifests_accepted: AtomicU64,
    /// Firmware manifests refused (each reported on `P/firmware/state`).
    pub manifests_rejected: AtomicU64,
}

/// The router.
pub struct Router {
    registry: Arc<Registry>,
    attributes: Arc<AttributeStore>,
    channels: Vec<Arc<dyn DeviceChannel>>,
    responses: Option<mpsc::Sender<UpMessage>>,
    uplink: Option<Arc<UplinkStatus>>,
    default_timeout: Duration,
    pending: Mutex<HashMap<(DeviceName, u32), Pending>>,
    parked: Mutex<ParkedCommands>,
    fleet: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    firmware: Mutex<Option<crate::ota::OtaHandle>>,
    /// The gateway id and where commands addressed to it go.
    gateway: Mutex<Option<(String, mpsc::Sender<Command>)>>,
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
        responses: Option<(mpsc::Sender<UpMessage>, Arc<UplinkStatus>)>,
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
            parked: Mutex::new(ParkedCommands::default()),
            fleet: Mutex::new(None),
            firmware: Mutex::new(None),
            gateway: Mutex::new(None),
            next_id: AtomicU32::new(1),
            stats: RouterStats::default(),
        }
    }

    /// The attribute store (answers attribute requests).
    pub fn attributes(&self) -> &AttributeStore {
        &self.attributes
    }

    fn respond(&self, payload: Vec<u8>) {
        self.up(UpMessage::CommandResponse(payload));
    }

    /// Queues a message for the cloud (dropped and counted when the queue
    /// is full or there is no cloud).
    pub fn up(&self, msg: UpMessage) {
        let Some(tx) = &self.responses else {
            return;
        };
        if tx.try_send(msg).is_err() {
            if let Some(u) = &self.uplink {
                u.count_response_dropped();
            }
            tracing::warn!("uplink queue full; a response/health/state message was dropped");
        }
    }

    /// Where fleet configuration envelopes from `P/config` go.
    pub fn set_fleet(&self, tx: mpsc::Sender<Vec<u8>>) {
        if let Ok(mut g) = self.fleet.lock() {
            *g = Some(tx);
        }
    }

    /// Where firmware manifest envelopes from `P/firmware` go.
    pub fn set_firmware(&self, ota: crate::ota::OtaHandle) {
        if let Ok(mut g) = self.firmware.lock() {
            *g = Some(ota);
        }
    }

    /// What the firmware task last summarised for `sluice status`
    /// (`null` before it ran).
    pub fn firmware_summary(&self) -> Json {
        self.firmware
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(crate::ota::OtaHandle::summary))
            .unwrap_or(Json::Null)
    }

    /// Tells the firmware task that state.db changed (local staging).
    pub fn wake_firmware(&self) {
        if let Some(ota) = self.firmware.lock().ok().and_then(|g| g.clone()) {
            ota.send(crate::ota::Event::Wake);
        }
    }

    /// Commands whose `device` is `gateway_id` go to `tx` (the gateway's
    /// own methods, [`crate::health`]) instead of a device, even when a
    /// device of that name is registered.
    pub fn set_gateway(&self, gateway_id: String, tx: mpsc::Sender<Command>) {
        if let Ok(mut g) = self.gateway.lock() {
            *g = Some((gateway_id, tx));
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
            CloudRequest::Config(envelope) => {
                let tx = self.fleet.lock().ok().and_then(|g| g.clone());
                match tx {
                    Some(tx) => {
                        if tx.try_send(envelope).is_err() {
                            tracing::warn!("fleet configuration queue full; envelope dropped");
                        }
                    }
                    None => tracing::warn!(
                        "a fleet configuration arrived on P/config but [fleet] is not configured; ignored"
                    ),
                }
            }
            CloudRequest::Firmware(envelope) => {
                match self.firmware.lock().ok().and_then(|g| g.clone()) {
                    Some(ota) => ota.send(crate::ota::Event::Envelope(envelope)),
                    None => tracing::warn!(
                        "a firmware manifest arrived but the firmware task is not running; ignored"
                    ),
                }
            }
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
        let to_gateway = self.gateway.lock().ok().and_then(|g| {
            g.as_ref()
                .filter(|(id, _)| *id == c.device)
                .map(|(_, tx)| tx.clone())
        });
        if let Some(tx) = to_gateway {
            let (id, device) = (c.id.clone(), c.device.clone());
            if tx.try_send(c).is_err() {
                self.fail(
                    &id,
                    &device,
                    CommandError::Offline,
                    "the gateway is busy with other commands",
                );
            }
            return;
        }
        let device = DeviceName::new(&c.device);
        if !self.registry.is_active(&device) {
            return self.fail(
                &c.id,
                &c.device,
                CommandError::UnknownDevice,
                "no active device of that name",
            );
        }
        let timeout = c
            .expires_ms
            .map_or(self.default_timeout, Duration::from_millis);
        if self.command_channel(&device).0.is_none() {
            self.stats.parked.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%device, method = %c.method, "command waits for the device to listen");
        }
        let parked = Parked {
            command: c,
            deadline: Instant::now() + timeout,
            timeout,
        };
        let refused = match self.parked.lock() {
            Ok(mut g) => {
                let total = g.len;
                let queue = g.by_device.entry(device.clone()).or_default();
                if queue.len() >= MAX_PARKED_PER_DEVICE {
                    Some((
                        parked,
                        "too many commands are waiting for this device to come online",
                    ))
                } else if total >= MAX_PARKED {
                    Some((
                        parked,
                        "too many commands are waiting for devices to come online",
                    ))
                } else {
                    queue.push_back(parked);
                    g.len += 1;
                    None
                }
            }
            Err(_) => Some((parked, "the gateway's command queue is unusable")),
        };
        if let Some((p, message)) = refused {
            // An entry made for a device that could take nothing is
            // dropped by the next retry.
            return self.fail(
                &p.command.id,
                &p.command.device,
                CommandError::Offline,
                message,
            );
        }
        // Delivered now when the device listens; behind its older commands
        // otherwise, so a device sees its commands in arrival order.
        self.retry_parked(Some(&device), Instant::now());
    }

    /// The first channel where `device` listens for commands, and whether it
    /// is connected at all (for the message when it never listens).
    fn command_channel(&self, device: &DeviceName) -> (Option<Arc<dyn DeviceChannel>>, bool) {
        let mut connected = false;
        for ch in &self.channels {
            if let Some(s) = ch.subscriptions(device) {
                if s.rpc {
                    return (Some(ch.clone()), true);
                }
                connected = true;
            }
        }
        (None, connected)
    }

    /// Delivers the parked commands of `only` (else of every device) whose
    /// device now listens, fails those past their deadline (`offline`) or
    /// whose device is no longer active (`unknown_device`).
    fn retry_parked(&self, only: Option<&DeviceName>, now: Instant) {
        let mut failed: Vec<(Parked, CommandError, String)> = Vec::new();
        let mut delivered = Vec::new();
        {
            let Ok(mut g) = self.parked.lock() else {
                return;
            };
            let devices: Vec<DeviceName> = match only {
                Some(d) => vec![d.clone()],
                None => g.by_device.keys().cloned().collect(),
            };
            for device in devices {
                let Some(mut queue) = g.by_device.remove(&device) else {
                    continue;
                };
                let before = queue.len();
                if !self.registry.is_active(&device) {
                    failed.extend(queue.drain(..).map(|p| {
                        (
                            p,
                            CommandError::UnknownDevice,
                            "the device was revoked or removed while the command waited".into(),
                        )
                    }));
                } else {
                    let (mut channel, connected) = self.command_channel(&device);
                    while let Some(p) = queue.pop_front() {
                        if p.deadline <= now {
                            let message = if connected {
                                format!(
                                    "the device is connected but did not listen for commands \
                                     (MQTT v1/devices/me/rpc/request/+, CoAP Observe on rpc, \
                                     HTTP GET rpc) within {} ms",
                                    p.timeout.as_millis()
                                )
                            } else {
                                format!(
                                    "the device did not come online within {} ms",
                                    p.timeout.as_millis()
                                )
                            };
                            failed.push((p, CommandError::Offline, message));
                            continue;
                        }
                        let Some(ch) = &channel else {
                            queue.push_front(p);
                            break;
                        };
                        match self.deliver(&device, ch.as_ref(), &p) {
                            Delivery::Sent => delivered.push(device.clone()),
                            Delivery::Refused(message) => {
                                failed.push((p, CommandError::Offline, message.into()));
                            }
                            Delivery::NotReading => {
                                // Its session is going away: wait for the next.
                                queue.push_front(p);
                                channel = None;
                            }
                        }
                    }
                }
                g.len -= before - queue.len();
                if !queue.is_empty() {
                    g.by_device.insert(device, queue);
                }
            }
        }
        for (p, error, message) in failed {
            self.fail(&p.command.id, &p.command.device, error, &message);
        }
        for device in delivered {
            tracing::debug!(%device, "command delivered");
        }
    }

    /// Pushes one command to `device` on `channel`, pending its answer.
    fn deliver(&self, device: &DeviceName, channel: &dyn DeviceChannel, p: &Parked) -> Delivery {
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        {
            let Ok(mut g) = self.pending.lock() else {
                return Delivery::Refused("the gateway's command table is unusable");
            };
            if g.len() >= MAX_PENDING {
                return Delivery::Refused("too many commands pending at the gateway");
            }
            g.insert(
                (device.clone(), id),
                Pending {
                    cloud_id: p.command.id.clone(),
                    deadline: p.deadline,
                    timeout: p.timeout,
                },
            );
        }
        let body = serde_json::json!({"method": p.command.method, "params": p.command.params});
        if channel.push(device, Push::Rpc { id, body }).is_err() {
            if let Ok(mut g) = self.pending.lock() {
                g.remove(&(device.clone(), id));
            }
            return Delivery::NotReading;
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        Delivery::Sent
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

    /// Commands waiting for their device to start listening.
    pub fn parked(&self) -> usize {
        self.parked.lock().map_or(0, |g| g.len)
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
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.retry_parked(None, now);
                    self.expire(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A channel where every device listens for commands and nothing is
    /// ever delivered (counts attempts).
    #[derive(Default)]
    struct Recorder(AtomicU64);

    impl DeviceChannel for Recorder {
        fn subscriptions(&self, _: &DeviceName) -> Option<Subscriptions> {
            Some(Subscriptions {
                rpc: true,
                ..Subscriptions::default()
            })
        }
        fn push(&self, _: &DeviceName, _: Push) -> Result<(), PushError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// A channel where devices listen for commands only while `listening`;
    /// records the methods it delivers.
    #[derive(Default)]
    struct Switch {
        listening: std::sync::atomic::AtomicBool,
        methods: Mutex<Vec<String>>,
    }

    impl DeviceChannel for Switch {
        fn subscriptions(&self, _: &DeviceName) -> Option<Subscriptions> {
            self.listening
                .load(Ordering::Relaxed)
                .then(|| Subscriptions {
                    rpc: true,
                    ..Subscriptions::default()
                })
        }
        fn push(&self, _: &DeviceName, push: Push) -> Result<(), PushError> {
            if let Push::Rpc { body, .. } = push {
                let method = body["method"].as_str().unwrap_or_default().to_owned();
                self.methods.lock().unwrap().push(method);
            }
            Ok(())
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        router: Router,
        device_pushes: Arc<Recorder>,
        up_rx: mpsc::Receiver<UpMessage>,
    }

    /// A router over a fresh state.db with `devices` registered and
    /// `channel` as its only delivery channel; the uplink queue holds `cap`.
    fn router_with(
        devices: &[&str],
        channel: Arc<dyn DeviceChannel>,
        cap: usize,
    ) -> (tempfile::TempDir, Router, mpsc::Receiver<UpMessage>) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let reg = crate::registry::RegistryDb::open(&db).unwrap();
        for d in devices {
            reg.add(d, "sensor", None).unwrap();
        }
        let registry = Arc::new(Registry::load(&db).unwrap());
        let attributes = Arc::new(AttributeStore::load(&db, &dir.path().join("fw")).unwrap());
        let (up_tx, up_rx) = mpsc::channel(cap);
        let router = Router::new(
            registry,
            attributes,
            vec![channel],
            Some((up_tx, Arc::new(UplinkStatus::default()))),
            Duration::from_secs(5),
        );
        (dir, router, up_rx)
    }

    /// A router whose only channel is a [`Switch`], devices offline.
    fn switched(
        devices: &[&str],
    ) -> (
        tempfile::TempDir,
        Router,
        Arc<Switch>,
        mpsc::Receiver<UpMessage>,
    ) {
        let switch = Arc::new(Switch::default());
        let (dir, router, up_rx) = router_with(devices, switch.clone(), 256);
        (dir, router, switch, up_rx)
    }

    fn expiring(id: &str, device: &str, method: &str, expires_ms: u64) -> CloudRequest {
        CloudRequest::Command(Command {
            id: json!(id),
            device: device.into(),
            method: method.into(),
            params: Json::Null,
            expires_ms: Some(expires_ms),
        })
    }

    #[test]
    fn commands_for_an_offline_device_wait_and_arrive_in_order_when_it_listens() {
        let (_dir, router, switch, mut up_rx) = switched(&["d1"]);
        router.handle(expiring("c1", "d1", "first", 5000));
        router.handle(expiring("c2", "d1", "second", 5000));
        assert!(
            up_rx.try_recv().is_err(),
            "no error while within the timeout"
        );
        assert_eq!((router.parked(), router.pending()), (2, 0));
        router.retry_parked(None, Instant::now());
        assert_eq!(router.parked(), 2, "still not listening");

        switch.listening.store(true, Ordering::Relaxed);
        router.retry_parked(None, Instant::now());
        assert_eq!(*switch.methods.lock().unwrap(), ["first", "second"]);
        assert_eq!((router.parked(), router.pending()), (0, 2));
        assert_eq!(router.stats.parked.load(Ordering::Relaxed), 2);
        // A later command while it listens goes straight through.
        router.handle(expiring("c3", "d1", "third", 5000));
        assert_eq!(switch.methods.lock().unwrap().len(), 3);
        assert!(up_rx.try_recv().is_err());
    }

    #[test]
    fn a_command_still_waiting_at_its_deadline_fails_offline() {
        let (_dir, router, switch, mut up_rx) = switched(&["d1"]);
        router.handle(expiring("c1", "d1", "m", 200));
        router.handle(expiring("c2", "d1", "m", 5000));
        router.retry_parked(None, Instant::now() + Duration::from_millis(150));
        assert!(up_rx.try_recv().is_err());
        router.retry_parked(None, Instant::now() + Duration::from_millis(250));
        let r = response(up_rx.try_recv().unwrap());
        assert_eq!(
            (&r["id"], &r["device"], &r["error"]["code"]),
            (&json!("c1"), &json!("d1"), &json!("offline"))
        );
        assert_eq!(
            r["error"]["message"],
            "the device did not come online within 200 ms"
        );
        assert_eq!(router.parked(), 1, "the other command keeps waiting");
        switch.listening.store(true, Ordering::Relaxed);
        router.retry_parked(None, Instant::now());
        assert_eq!(switch.methods.lock().unwrap().len(), 1);
    }

    #[test]
    fn unknown_devices_fail_at_once_and_parked_commands_are_bounded() {
        let (_dir, router, _switch, mut up_rx) = switched(&["d1"]);
        router.handle(expiring("u", "ghost", "m", 5000));
        let r = response(up_rx.try_recv().unwrap());
        assert_eq!(r["error"]["code"], "unknown_device");
        for i in 0..MAX_PARKED_PER_DEVICE {
            router.handle(expiring(&format!("c{i}"), "d1", "m", 5000));
        }
        assert!(up_rx.try_recv().is_err());
        router.handle(expiring("over", "d1", "m", 5000));
        let r = response(up_rx.try_recv().unwrap());
        assert_eq!(
            (&r["id"], &r["error"]["code"]),
            (&json!("over"), &json!("offline"))
        );
        assert_eq!(router.parked(), MAX_PARKED_PER_DEVICE);
    }

    fn fixture(devices: &[&str]) -> Fixture {
        let device_pushes = Arc::new(Recorder::default());
        let (dir, router, up_rx) = router_with(devices, device_pushes.clone(), 8);
        Fixture {
            _dir: dir,
            router,
            device_pushes,
            up_rx,
        }
    }

    fn command(id: &str, device: &str, method: &str) -> CloudRequest {
        CloudRequest::Command(Command {
            id: json!(id),
            device: device.into(),
            method: method.into(),
            params: Json::Null,
            expires_ms: None,
        })
    }

    fn response(msg: UpMessage) -> Json {
        match msg {
            UpMessage::CommandResponse(p) => serde_json::from_slice(&p).unwrap(),
            other => panic!("not a command response: {other:?}"),
        }
    }

    #[test]
    fn commands_for_the_gateway_id_go_to_the_gateway_not_a_device() {
        // A device registered under the gateway's own name does not shadow it.
        let mut f = fixture(&["gw-1", "d1"]);
        let (tx, mut rx) = mpsc::channel(4);
        f.router.set_gateway("gw-1".into(), tx);
        f.router.handle(command("g1", "gw-1", "gateway_ping"));
        let c = rx.try_recv().unwrap();
        assert_eq!((c.id, c.method.as_str()), (json!("g1"), "gateway_ping"));
        assert!(
            f.up_rx.try_recv().is_err(),
            "the router itself answers nothing"
        );
        assert_eq!(f.device_pushes.0.load(Ordering::Relaxed), 0);

        f.router.handle(command("c1", "d1", "setGpio"));
        assert!(rx.try_recv().is_err());
        assert_eq!(f.device_pushes.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn without_a_gateway_handler_its_id_is_an_unknown_device() {
        let mut f = fixture(&[]);
        f.router.handle(command("g1", "gw-1", "gateway_ping"));
        let r = response(f.up_rx.try_recv().unwrap());
        assert_eq!(r["error"]["code"], "unknown_device");
    }

    #[test]
    fn a_full_gateway_queue_answers_offline_at_once() {
        let mut f = fixture(&[]);
        let (tx, _rx) = mpsc::channel(1);
        f.router.set_gateway("gw-1".into(), tx);
        f.router.handle(command("g1", "gw-1", "gateway_status"));
        f.router.handle(command("g2", "gw-1", "gateway_status"));
        let r = response(f.up_rx.try_recv().unwrap());
        assert_eq!(
            (&r["id"], &r["device"], &r["error"]["code"]),
            (&json!("g2"), &json!("gw-1"), &json!("offline"))
        );
        assert!(f.up_rx.try_recv().is_err());
    }
}
