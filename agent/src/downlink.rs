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
    responses: Option<mpsc::Sender<UpMessage>>,
    uplink: Option<Arc<UplinkStatus>>,
    default_timeout: Duration,
    pending: Mutex<HashMap<(DeviceName, u32), Pending>>,
    fleet: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
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
            fleet: Mutex::new(None),
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

    struct Fixture {
        _dir: tempfile::TempDir,
        router: Router,
        device_pushes: Arc<Recorder>,
        up_rx: mpsc::Receiver<UpMessage>,
    }

    fn fixture(devices: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let reg = crate::registry::RegistryDb::open(&db).unwrap();
        for d in devices {
            reg.add(d, "sensor", None).unwrap();
        }
        let registry = Arc::new(Registry::load(&db).unwrap());
        let attributes = Arc::new(AttributeStore::load(&db, &dir.path().join("fw")).unwrap());
        let device_pushes = Arc::new(Recorder::default());
        let (up_tx, up_rx) = mpsc::channel(8);
        let router = Router::new(
            registry,
            attributes,
            vec![device_pushes.clone()],
            Some((up_tx, Arc::new(UplinkStatus::default()))),
            Duration::from_secs(5),
        );
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
