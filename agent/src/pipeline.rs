//! Between decoding and the outbox: the telemetry rules ([`crate::rules`]).
//!
//! Every listener hands its decoded telemetry to [`Pipeline::submit`],
//! which runs it through the rules and submits what comes out (per outbox
//! stream) together with the rules' state changes, in one outbox command
//! per stream and the state on the last one — committed in the same
//! transaction as those records, so a reading acknowledged to a device has
//! its contribution to an open aggregation window on disk even when it
//! produced no record yet (`kill -9` mid-window loses nothing). The engine
//! is restored from that state at start-up. The returned
//! [`PendingAppend`] resolves when every part is committed, with the first
//! failure among them.
//!
//! The engine sits behind one lock, held from `apply` until the outbox has
//! queued the result, so state changes reach the outbox in the order they
//! were made. Without `[[rules]]` the pipeline is a straight pass to the
//! outbox (no lock, no copy). Client attributes are not subject to rules.
//!
//! A commit that fails (outbox full under `reject`) leaves the engine's
//! memory ahead of the disk for that reading: the device retries and the
//! reading counts twice in its window. Documented, not prevented.
//!
//! `sluice tail` watches what comes out (and, with `--dropped`, what the
//! rules dropped) through [`Pipeline::watch`].

use crate::registry::Registry;
use crate::rules::{EngineState, RuleConfig, RuleCounters, Rules, StateKey};
use serde::Serialize;
use sluice_cloud_sync::outbox::{self, StateChange};
use sluice_cloud_sync::{AppendError, DEFAULT_STREAM, Outbox, PendingAppend, Record};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{Mutex, broadcast};

/// Tail events buffered per watcher before it lags.
const TAIL_BUFFER: usize = 1024;

/// One record as `sluice tail` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TailEvent {
    /// Outbox stream (`None` for a dropped reading).
    pub stream: Option<String>,
    /// The rule that dropped it, for dropped readings.
    pub dropped_by: Option<String>,
    /// The device.
    pub device: String,
    /// Its ts.
    pub ts: i64,
    /// Its values as the cloud would see them.
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl TailEvent {
    fn new(stream: Option<&str>, dropped_by: Option<&str>, r: &Record) -> Self {
        Self {
            stream: stream.map(str::to_owned),
            dropped_by: dropped_by.map(str::to_owned),
            device: r.device.as_str().to_owned(),
            ts: r.ts_ms,
            values: r
                .values
                .iter()
                .map(|(k, v)| (k.clone(), sluice_cloud_sync::profile::value_json(v)))
                .collect(),
        }
    }
}

/// The pipeline.
pub struct Pipeline {
    outbox: Outbox,
    registry: Arc<Registry>,
    rules: Mutex<Rules>,
    /// Whether any rule is configured (else the fast path: no lock).
    active: std::sync::atomic::AtomicBool,
    tail: broadcast::Sender<TailEvent>,
    /// The firmware task, fed the devices' OTA telemetry.
    firmware: std::sync::OnceLock<crate::ota::OtaHandle>,
}

fn encode_key(k: &StateKey) -> Vec<u8> {
    // A StateKey is strings and a u32: postcard cannot fail on it.
    postcard::to_allocvec(k).unwrap_or_default()
}

impl Pipeline {
    /// A pipeline for `rules`, continuing from the state stored in
    /// `outbox_path` (entries that no longer fit the rules are dropped with
    /// a warning).
    ///
    /// Fails when the stored state cannot be read.
    pub fn new(
        outbox: Outbox,
        outbox_path: &Path,
        registry: Arc<Registry>,
        rules: Vec<RuleConfig>,
    ) -> Result<Self, outbox::OutboxError> {
        let (tail, _) = broadcast::channel(TAIL_BUFFER);
        let active = !rules.is_empty();
        let rules = if rules.is_empty() {
            Rules::new(Vec::new())
        } else {
            let stored = outbox::read_rule_state(outbox_path)?;
            let mut state = EngineState::default();
            for (k, v) in stored {
                match postcard::from_bytes::<StateKey>(&k) {
                    Ok(key) => state.entries.push((key, v)),
                    Err(e) => tracing::warn!(error = %e, "unreadable rule state key; ignored"),
                }
            }
            let n = state.entries.len();
            let (engine, refused) = Rules::with_state(rules, &state);
            for (key, e) in refused {
                tracing::warn!(rule = %key.rule, device = %key.device, key = %key.key, error = %e, "stored rule state no longer fits the rules; ignored");
            }
            if n > 0 {
                tracing::info!(entries = n, "rules resumed from their stored state");
            }
            engine
        };
        Ok(Self {
            outbox,
            registry,
            rules: Mutex::new(rules),
            active: std::sync::atomic::AtomicBool::new(active),
            tail,
            firmware: std::sync::OnceLock::new(),
        })
    }

    /// Sends devices' OTA telemetry (`fw_state`, `current_fw_*`) to the
    /// firmware task as well (set once at start).
    pub fn set_firmware(&self, ota: crate::ota::OtaHandle) {
        let _ = self.firmware.set(ota);
    }

    /// Watches what leaves the rules (for `sluice tail`).
    pub fn watch(&self) -> broadcast::Receiver<TailEvent> {
        self.tail.subscribe()
    }

    /// Per-rule counters (empty without rules).
    pub async fn counters(&self) -> Vec<RuleCounters> {
        self.rules.lock().await.counters()
    }

    fn tail_out(&self, out: &[(String, Record)], dropped: &[(String, Record)]) {
        if self.tail.receiver_count() == 0 {
            return;
        }
        for (s, r) in out {
            let _ = self.tail.send(TailEvent::new(Some(s), None, r));
        }
        for (rule, r) in dropped {
            let _ = self.tail.send(TailEvent::new(None, Some(rule), r));
        }
    }

    /// Runs `records` (of `stream`) through the rules and submits the
    /// result; resolves once all of it is committed.
    ///
    /// Fails as [`Outbox::submit_to`] does.
    pub async fn submit(
        &self,
        stream: &str,
        records: Vec<Record>,
    ) -> Result<PendingAppend, AppendError> {
        if let Some(ota) = self.firmware.get() {
            ota.tap(&records);
        }
        if !self.has_rules() {
            if self.tail.receiver_count() > 0 {
                let out: Vec<(String, Record)> = records
                    .iter()
                    .map(|r| (stream.to_owned(), r.clone()))
                    .collect();
                self.tail_out(&out, &[]);
            }
            return self.outbox.submit_to(stream, &records).await;
        }
        if stream != DEFAULT_STREAM {
            return self.outbox.submit_to(stream, &records).await;
        }
        let mut engine = self.rules.lock().await;
        let mut out: Vec<(String, Record)> = Vec::with_capacity(records.len());
        let mut dropped = Vec::new();
        // Rules match on the device type: one apply per run of one device.
        let mut i = 0;
        while i < records.len() {
            let device = records[i].device.clone();
            let j = records[i..]
                .iter()
                .position(|r| r.device != device)
                .map_or(records.len(), |k| i + k);
            let kind = self.registry.device_type(&device).unwrap_or_default();
            let applied = engine.apply(&kind, records[i..j].to_vec());
            out.extend(applied.out);
            dropped.extend(applied.dropped);
            i = j;
        }
        let state = dirty(&mut engine);
        self.tail_out(&out, &dropped);
        let pending = self.submit_parts(out, state).await;
        drop(engine);
        pending
    }

    /// Submits `out` grouped by stream (keeping order within each), with
    /// `state` on the last part.
    async fn submit_parts(
        &self,
        out: Vec<(String, Record)>,
        state: Vec<StateChange>,
    ) -> Result<PendingAppend, AppendError> {
        let mut parts: Vec<(String, Vec<Record>)> = Vec::new();
        for (s, r) in out {
            match parts.iter_mut().find(|(name, _)| *name == s) {
                Some((_, v)) => v.push(r),
                None => parts.push((s, vec![r])),
            }
        }
        if parts.is_empty() {
            parts.push((DEFAULT_STREAM.to_owned(), Vec::new()));
        }
        let last = parts.len() - 1;
        let mut earlier = Vec::new();
        let mut state = Some(state);
        for (i, (s, recs)) in parts.into_iter().enumerate() {
            let st = if i == last {
                state.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            let p = self.outbox.submit_with_state(&s, &recs, st).await?;
            if i == last {
                return Ok(p.after(earlier));
            }
            earlier.push(p);
        }
        // `parts` is never empty (see above): the loop always returns.
        Err(AppendError::Closed)
    }

    /// Closes windows and intervals due by `now_ms` and submits what they
    /// emit with the state changes. Returns how many records came out.
    ///
    /// Fails as [`Outbox::submit_to`] does.
    pub async fn tick(&self, now_ms: i64) -> Result<usize, AppendError> {
        if !self.has_rules() {
            return Ok(0);
        }
        let mut engine = self.rules.lock().await;
        if engine.next_tick_ms().is_none_or(|t| t > now_ms) {
            return Ok(0);
        }
        let out = engine.tick(now_ms);
        let state = dirty(&mut engine);
        if out.is_empty() && state.is_empty() {
            return Ok(0);
        }
        let n = out.len();
        self.tail_out(&out, &[]);
        let pending = self.submit_parts(out, state).await;
        drop(engine);
        pending?.await?;
        Ok(n)
    }

    /// Whether rules are configured.
    pub fn has_rules(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the rules in place (a fleet configuration that changes only
    /// rules): the engine continues with the state that still fits the new
    /// rules (windows of unchanged rules stay open); entries that no longer
    /// fit are dropped with a warning.
    pub async fn set_rules(&self, rules: Vec<RuleConfig>) {
        let mut engine = self.rules.lock().await;
        let state = engine.state();
        let (fresh, refused) = Rules::with_state(rules, &state);
        for (key, e) in refused {
            tracing::info!(rule = %key.rule, device = %key.device, key = %key.key, error = %e, "rule state dropped by the new rules");
        }
        self.active
            .store(!fresh.is_empty(), std::sync::atomic::Ordering::Release);
        *engine = fresh;
    }
}

fn dirty(engine: &mut Rules) -> Vec<StateChange> {
    engine
        .take_dirty()
        .into_iter()
        .map(|(k, v)| (encode_key(&k), v))
        .collect()
}
