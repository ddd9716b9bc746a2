//! HTTP long polls as a delivery channel of the downlink router.
//!
//! A device polling `GET attributes/updates` or `GET rpc` registers a
//! waiter for that kind; [`DeviceChannel::push`] hands the next
//! shared-attribute change or command to it and the poll answers 200.
//! There is one waiter per device and kind: a newer poll replaces an older
//! one, which is woken with [`Wake::Replaced`] (answered 409).
//!
//! Long polling leaves gaps: the ThingsBoard HTTP SDK polls again 100 ms
//! after each answer. So a device still counts as listening for `linger`
//! after its last poll ended (answered, timed out or gone), and a push in
//! that gap waits in a small mailbox (`MAILBOX` per kind) that the next
//! poll takes first. Past the linger, or with the mailbox full, a push is
//! refused: the router answers the cloud `offline` for a command, and a
//! shared attribute stays stored for the next `GET attributes`.
//!
//! A push handed to a waiter whose client then goes away is lost (a
//! command then times out upstream), except at the deadline race, which
//! [`Waiting::wait`] closes: the waiter is unregistered before the last
//! look at its slot.

use crate::downlink::DeviceChannel;
use crate::mqtt::PushError;
use crate::mqtt::session::{Push, Subscriptions};
use sluice_cloud_sync::DeviceName;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Pushes kept per device and kind between two polls.
const MAILBOX: usize = 16;
/// How long a device counts as listening after a poll ended.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);

/// What a long poll waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET attributes/updates`: shared-attribute changes.
    Attributes,
    /// `GET rpc`: commands.
    Rpc,
}

impl Kind {
    fn of(push: &Push) -> Self {
        match push {
            Push::Attributes(_) => Self::Attributes,
            Push::Rpc { .. } => Self::Rpc,
        }
    }
}

/// Why a waiting poll woke up.
#[derive(Debug, Clone, PartialEq)]
pub enum Wake {
    /// Something to deliver.
    Push(Push),
    /// A newer poll of the same device and kind took over.
    Replaced,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Wake>,
}

#[derive(Default)]
struct Slot {
    waiter: Option<Waiter>,
    mailbox: VecDeque<Push>,
    linger_until: Option<Instant>,
}

impl Slot {
    fn listening(&self, now: Instant) -> bool {
        self.waiter.is_some() || self.linger_until.is_some_and(|t| now < t)
    }

    fn idle(&self, now: Instant) -> bool {
        !self.listening(now) && self.mailbox.is_empty()
    }
}

#[derive(Default)]
struct Slots {
    attributes: Slot,
    rpc: Slot,
}

impl Slots {
    fn get(&mut self, kind: Kind) -> &mut Slot {
        match kind {
            Kind::Attributes => &mut self.attributes,
            Kind::Rpc => &mut self.rpc,
        }
    }
}

/// The long polls of all devices (a [`DeviceChannel`] of the router).
pub struct LongPolls {
    devices: Mutex<HashMap<DeviceName, Slots>>,
    next_id: AtomicU64,
    linger: Duration,
}

impl Default for LongPolls {
    fn default() -> Self {
        Self::new(DEFAULT_LINGER)
    }
}

/// A registered poll.
pub enum Poll {
    /// A push was waiting in the mailbox: answer at once.
    Ready(Push),
    /// Wait for one.
    Waiting(Waiting),
}

/// A waiter in the registry; dropping it unregisters it.
pub struct Waiting {
    polls: Arc<LongPolls>,
    device: DeviceName,
    kind: Kind,
    id: u64,
    rx: oneshot::Receiver<Wake>,
}

impl Waiting {
    /// Waits up to `timeout` for a push (or for a newer poll to take
    /// over); `None` on timeout.
    pub async fn wait(mut self, timeout: Duration) -> Option<Wake> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(wake)) => Some(wake),
            // The sender is only dropped by a replacement that failed to
            // send (we were gone), so this is not reached while we wait.
            Ok(Err(_)) => Some(Wake::Replaced),
            Err(_) => {
                // Leave the registry first, then look once more: a push
                // that raced with the deadline is delivered, not lost.
                self.polls.finish(&self.device, self.kind, self.id);
                self.rx.try_recv().ok()
            }
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.polls.finish(&self.device, self.kind, self.id);
    }
}

impl LongPolls {
    /// A registry where a device counts as listening for `linger` after
    /// its last poll.
    pub fn new(linger: Duration) -> Self {
        Self {
            devices: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            linger,
        }
    }

    /// Registers a poll of `device` for `kind`: the oldest mailbox entry if
    /// there is one, else a waiter (waking the one it replaces).
    pub fn register(self: &Arc<Self>, device: &DeviceName, kind: Kind) -> Poll {
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(mut g) = self.devices.lock() else {
            // A poisoned registry delivers nothing; the poll times out.
            return Poll::Waiting(Waiting {
                polls: self.clone(),
                device: device.clone(),
                kind,
                id,
                rx,
            });
        };
        g.retain(|_, s| !(s.attributes.idle(now) && s.rpc.idle(now)));
        let slot = g.entry(device.clone()).or_default().get(kind);
        if let Some(p) = slot.mailbox.pop_front() {
            slot.linger_until = Some(now + self.linger);
            return Poll::Ready(p);
        }
        if let Some(old) = slot.waiter.replace(Waiter { id, tx }) {
            let _ = old.tx.send(Wake::Replaced);
        }
        Poll::Waiting(Waiting {
            polls: self.clone(),
            device: device.clone(),
            kind,
            id,
            rx,
        })
    }

    /// Unregisters waiter `id` (if it is still the one registered) and
    /// starts the linger.
    fn finish(&self, device: &DeviceName, kind: Kind, id: u64) {
        let Ok(mut g) = self.devices.lock() else {
            return;
        };
        let Some(slots) = g.get_mut(device) else {
            return;
        };
        let slot = slots.get(kind);
        if slot.waiter.as_ref().is_some_and(|w| w.id == id) {
            slot.waiter = None;
        }
        if slot.waiter.is_none() {
            slot.linger_until = Some(Instant::now() + self.linger);
        }
    }

    /// Polls waiting now (both kinds).
    pub fn waiting(&self) -> usize {
        self.devices.lock().map_or(0, |g| {
            g.values()
                .map(|s| {
                    usize::from(s.attributes.waiter.is_some()) + usize::from(s.rpc.waiter.is_some())
                })
                .sum()
        })
    }
}

impl DeviceChannel for LongPolls {
    fn subscriptions(&self, device: &DeviceName) -> Option<Subscriptions> {
        let now = Instant::now();
        let g = self.devices.lock().ok()?;
        let s = g.get(device)?;
        let subs = Subscriptions {
            attributes: s.attributes.listening(now),
            rpc: s.rpc.listening(now),
        };
        (subs.attributes || subs.rpc).then_some(subs)
    }

    fn push(&self, device: &DeviceName, push: Push) -> Result<(), PushError> {
        let now = Instant::now();
        let mut g = self.devices.lock().map_err(|_| PushError::NoSession)?;
        let slot = g
            .get_mut(device)
            .ok_or(PushError::NoSession)?
            .get(Kind::of(&push));
        let mut push = push;
        if let Some(w) = slot.waiter.take() {
            slot.linger_until = Some(now + self.linger);
            match w.tx.send(Wake::Push(push)) {
                Ok(()) => return Ok(()),
                // The poll is going away this instant: keep it for the
                // next one.
                Err(Wake::Push(p)) => push = p,
                Err(Wake::Replaced) => return Err(PushError::NotReading),
            }
        }
        if !slot.listening(now) {
            return Err(PushError::NoSession);
        }
        if slot.mailbox.len() >= MAILBOX {
            return Err(PushError::NotReading);
        }
        slot.mailbox.push_back(push);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dev(name: &str) -> DeviceName {
        DeviceName::new(name)
    }

    fn rpc(id: u32) -> Push {
        Push::Rpc {
            id,
            body: json!({"method": "reboot", "params": {}}),
        }
    }

    fn waiting(p: Poll) -> Waiting {
        match p {
            Poll::Waiting(w) => w,
            Poll::Ready(p) => panic!("expected a waiter, got {p:?}"),
        }
    }

    #[tokio::test]
    async fn a_device_that_never_polled_is_not_reachable() {
        let polls = Arc::new(LongPolls::default());
        assert_eq!(polls.subscriptions(&dev("a")), None);
        assert_eq!(polls.push(&dev("a"), rpc(1)), Err(PushError::NoSession));
    }

    #[tokio::test]
    async fn a_waiting_poll_receives_the_push_for_its_kind_only() {
        let polls = Arc::new(LongPolls::default());
        let w = waiting(polls.register(&dev("a"), Kind::Rpc));
        assert_eq!(
            polls.subscriptions(&dev("a")),
            Some(Subscriptions {
                attributes: false,
                rpc: true
            })
        );
        assert_eq!(
            polls.push(&dev("a"), Push::Attributes(json!({"x": 1}))),
            Err(PushError::NoSession)
        );
        assert_eq!(polls.push(&dev("b"), rpc(1)), Err(PushError::NoSession));
        polls.push(&dev("a"), rpc(7)).unwrap();
        assert_eq!(
            w.wait(Duration::from_secs(30)).await,
            Some(Wake::Push(rpc(7)))
        );
        assert_eq!(polls.waiting(), 0);
    }

    #[tokio::test]
    async fn a_poll_times_out_without_a_push() {
        let polls = Arc::new(LongPolls::default());
        let w = waiting(polls.register(&dev("a"), Kind::Attributes));
        assert_eq!(polls.waiting(), 1);
        assert_eq!(w.wait(Duration::from_millis(50)).await, None);
        assert_eq!(polls.waiting(), 0);
    }

    #[tokio::test]
    async fn a_newer_poll_replaces_the_older_one() {
        let polls = Arc::new(LongPolls::default());
        let old = waiting(polls.register(&dev("a"), Kind::Rpc));
        let new = waiting(polls.register(&dev("a"), Kind::Rpc));
        assert_eq!(
            old.wait(Duration::from_secs(30)).await,
            Some(Wake::Replaced)
        );
        assert_eq!(polls.waiting(), 1, "the old poll's end leaves the new one");
        polls.push(&dev("a"), rpc(2)).unwrap();
        assert_eq!(
            new.wait(Duration::from_secs(30)).await,
            Some(Wake::Push(rpc(2)))
        );
    }

    #[tokio::test]
    async fn pushes_between_polls_wait_in_the_mailbox_for_the_next_poll() {
        let polls = Arc::new(LongPolls::new(Duration::from_secs(10)));
        let w = waiting(polls.register(&dev("a"), Kind::Attributes));
        assert_eq!(w.wait(Duration::from_millis(20)).await, None);
        // Between two polls: still listening, the push is kept.
        assert!(polls.subscriptions(&dev("a")).unwrap().attributes);
        polls
            .push(&dev("a"), Push::Attributes(json!({"x": 1})))
            .unwrap();
        polls
            .push(&dev("a"), Push::Attributes(json!({"deleted": ["y"]})))
            .unwrap();
        match polls.register(&dev("a"), Kind::Attributes) {
            Poll::Ready(p) => assert_eq!(p, Push::Attributes(json!({"x": 1}))),
            Poll::Waiting(_) => panic!("the mailbox was not served first"),
        }
        match polls.register(&dev("a"), Kind::Attributes) {
            Poll::Ready(p) => assert_eq!(p, Push::Attributes(json!({"deleted": ["y"]}))),
            Poll::Waiting(_) => panic!("the mailbox was not served in order"),
        }
    }

    #[tokio::test]
    async fn the_device_stops_counting_as_listening_when_the_linger_ends() {
        let polls = Arc::new(LongPolls::new(Duration::from_millis(50)));
        drop(waiting(polls.register(&dev("a"), Kind::Rpc)));
        assert!(polls.subscriptions(&dev("a")).unwrap().rpc);
        let deadline = Instant::now() + Duration::from_secs(5);
        while polls.subscriptions(&dev("a")).is_some() {
            assert!(Instant::now() < deadline, "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(polls.push(&dev("a"), rpc(1)), Err(PushError::NoSession));
    }

    #[tokio::test]
    async fn a_full_mailbox_refuses_more() {
        let polls = Arc::new(LongPolls::default());
        drop(waiting(polls.register(&dev("a"), Kind::Rpc)));
        for id in 0..MAILBOX as u32 {
            polls.push(&dev("a"), rpc(id)).unwrap();
        }
        assert_eq!(polls.push(&dev("a"), rpc(99)), Err(PushError::NotReading));
    }

    #[tokio::test]
    async fn without_linger_a_poll_that_went_away_leaves_the_device_unreachable() {
        let polls = Arc::new(LongPolls::new(Duration::ZERO));
        let w = waiting(polls.register(&dev("a"), Kind::Rpc));
        drop(w);
        assert_eq!(polls.waiting(), 0);
        assert_eq!(polls.subscriptions(&dev("a")), None);
        assert_eq!(polls.push(&dev("a"), rpc(1)), Err(PushError::NoSession));
    }
}
