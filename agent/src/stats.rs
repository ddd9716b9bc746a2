//! Ingest counters, shared by the listeners, `sluice status` and
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

/// Why an MQTT connection was closed for breaking the protocol (each close
/// counts once, under the first reason that applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// Undecodable packet: bad remaining length, bad UTF-8 topic, invalid
    /// QoS bits, truncated fields.
    Malformed = 0,
    /// A frame over `max_packet_size`.
    TooLarge = 1,
    /// Anything but a CONNECT first, or a CONNECT of an unsupported
    /// protocol name or level.
    NotConnectFirst = 2,
    /// A second CONNECT, or a packet a client must not send to a server.
    ProtocolViolation = 3,
    /// No CONNECT within `connect_timeout`.
    ConnectTimeout = 4,
    /// Silence past 1.5 × the keep-alive.
    KeepaliveTimeout = 5,
}

/// `reason` label values, in `ProtocolError` order.
pub const PROTOCOL_ERROR_LABELS: [&str; 6] = [
    "malformed",
    "too_large",
    "not_connect_first",
    "protocol_violation",
    "connect_timeout",
    "keepalive_timeout",
];

const PROTOCOLS: [&str; 3] = ["mqtt", "coap", "http"];
const RESULTS: [&str; 5] = ["ok", "bad_payload", "unauthorized", "too_large", "rejected"];

/// The counters.
#[derive(Debug)]
pub struct IngestStats {
    messages: [[AtomicU64; 5]; 3],
    records: AtomicU64,
    auth_failures: [AtomicU64; 3],
    mqtt_protocol_errors: [AtomicU64; 6],
    /// From a listener's append call to the commit's answer.
    pub commit_seconds: Histogram,
}

impl Default for IngestStats {
    fn default() -> Self {
        Self {
            messages: Default::default(),
            records: AtomicU64::new(0),
            auth_failures: Default::default(),
            mqtt_protocol_errors: Default::default(),
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
    /// reason → MQTT connections closed for a protocol error.
    pub mqtt_protocol_errors: BTreeMap<&'static str, u64>,
}

impl IngestStats {
    /// Counts one message.
    pub fn count(&self, p: Protocol, r: IngestResult) {
        self.messages[p as usize][r as usize].fetch_add(1, Ordering::Relaxed);
        if r == IngestResult::Unauthorized {
            self.auth_failures[p as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one MQTT connection closed for a protocol error.
    pub fn count_protocol_error(&self, reason: ProtocolError) {
        self.mqtt_protocol_errors[reason as usize].fetch_add(1, Ordering::Relaxed);
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
            mqtt_protocol_errors: PROTOCOL_ERROR_LABELS
                .iter()
                .zip(&self.mqtt_protocol_errors)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_error_reason_starts_at_zero_and_counts_under_its_label() {
        let stats = IngestStats::default();
        let zero = stats.snapshot().mqtt_protocol_errors;
        assert_eq!(zero.len(), PROTOCOL_ERROR_LABELS.len());
        assert!(zero.values().all(|n| *n == 0));
        for (reason, label) in [
            (ProtocolError::Malformed, "malformed"),
            (ProtocolError::TooLarge, "too_large"),
            (ProtocolError::NotConnectFirst, "not_connect_first"),
            (ProtocolError::ProtocolViolation, "protocol_violation"),
            (ProtocolError::ConnectTimeout, "connect_timeout"),
            (ProtocolError::KeepaliveTimeout, "keepalive_timeout"),
        ] {
            stats.count_protocol_error(reason);
            assert_eq!(stats.snapshot().mqtt_protocol_errors[label], 1, "{label}");
        }
    }
}
