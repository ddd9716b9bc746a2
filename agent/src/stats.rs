//! Ingest counters, shared by the listeners, `sluice status` and (later)
//! `/metrics`. Every label value exists from start-up at 0.

use serde::Serialize;
use sluice_cloud_sync::histogram::{self, Histogram};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Device protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 / 5.
    Mqtt = 0,
    /// CoAP.
    Coap = 1,
    /// HTTP.
    Http = 2,
}

/// Outcome of one ingested message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestResult {
    /// Stored.
    Ok = 0,
    /// Payload refused.
    BadPayload = 1,
    /// Unknown or revoked token.
    Unauthorized = 2,
    /// Over the size limit.
    TooLarge = 3,
    /// Outbox full (reject policy) or closed.
    Rejected = 4,
}

const PROTOCOLS: [&str; 3] = ["mqtt", "coap", "http"];
const RESULTS: [&str; 5] = ["ok", "bad_payload", "unauthorized", "too_large", "rejected"];

/// The counters.
#[derive(Debug)]
pub struct IngestStats {
    messages: [[AtomicU64; 5]; 3],
    records: AtomicU64,
    auth_failures: [AtomicU64; 3],
    /// From a listener's append call to the commit's answer.
    pub commit_seconds: Histogram,
}

impl Default for IngestStats {
    fn default() -> Self {
        Self {
            messages: Default::default(),
            records: AtomicU64::new(0),
            auth_failures: Default::default(),
            commit_seconds: Histogram::new(histogram::SECONDS),
        }
    }
}

/// Protocol label values, in `Protocol` order.
pub const PROTOCOLS_LABELS: [&str; 3] = PROTOCOLS;
/// Result label values, in `IngestResult` order.
pub const RESULT_LABELS: [&str; 5] = RESULTS;

/// A snapshot for status output.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IngestSnapshot {
    /// protocol → result → messages.
    pub messages: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Records stored since start.
    pub records: u64,
    /// protocol → failed authentications.
    pub auth_failures: BTreeMap<&'static str, u64>,
}

impl IngestStats {
    /// Counts one message.
    pub fn count(&self, p: Protocol, r: IngestResult) {
        self.messages[p as usize][r as usize].fetch_add(1, Ordering::Relaxed);
        if r == IngestResult::Unauthorized {
            self.auth_failures[p as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts stored records.
    pub fn count_records(&self, n: usize) {
        self.records.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> IngestSnapshot {
        IngestSnapshot {
            messages: PROTOCOLS
                .iter()
                .zip(&self.messages)
                .map(|(p, row)| {
                    (
                        *p,
                        RESULTS
                            .iter()
                            .zip(row)
                            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                            .collect(),
                    )
                })
                .collect(),
            records: self.records.load(Ordering::Relaxed),
            auth_failures: PROTOCOLS
                .iter()
                .zip(&self.auth_failures)
                .map(|(p, n)| (*p, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}
