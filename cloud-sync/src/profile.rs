//! Upstream encodings. Only the `generic` profile exists so far; the
//! `thingsboard` gateway profile is issue 7's work and is refused by config
//! validation until then.
//!
//! Generic topics built so far: `P/telemetry`, `P/attributes` (the
//! `attributes` stream: client attributes devices report), `P/status`, and
//! the command and shared-attribute downlink (`P/commands` →
//! `P/commands/response`, `P/attributes/shared`; see [`crate::downlink`]).

use crate::outbox::Leased;
use crate::record::Value;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

/// Topic names of the `generic` profile under one prefix.
#[derive(Debug, Clone)]
pub struct GenericTopics {
    /// `P/telemetry`.
    pub telemetry: String,
    /// `P/status` (retained; also the will).
    pub status: String,
    /// `P/attributes` (client attributes, up).
    pub attributes: String,
    /// `P/attributes/shared` (shared attribute updates, down).
    pub attributes_shared: String,
    /// `P/commands` (down).
    pub commands: String,
    /// `P/commands/response` (up).
    pub commands_response: String,
}

impl GenericTopics {
    /// Topics under `prefix` (already expanded, no trailing `/`).
    pub fn new(prefix: &str) -> Self {
        let p = prefix.trim_end_matches('/');
        Self {
            telemetry: format!("{p}/telemetry"),
            status: format!("{p}/status"),
            attributes: format!("{p}/attributes"),
            attributes_shared: format!("{p}/attributes/shared"),
            commands: format!("{p}/commands"),
            commands_response: format!("{p}/commands/response"),
        }
    }
}

struct Values<'a>(&'a [(String, Value)]);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &JsonValue(v))?;
        }
        m.end()
    }
}

/// A value as the cloud sees it (natural JSON), unlike its stored form.
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Bool(b) => s.serialize_bool(*b),
            Value::I64(i) => s.serialize_i64(*i),
            Value::F64(f) => s.serialize_f64(*f),
            Value::Str(t) => s.serialize_str(t),
            Value::Json(j) => match serde_json::from_str::<serde_json::Value>(j) {
                Ok(v) => v.serialize(s),
                // Stored JSON was validated on ingest; if it is damaged, send it
                // as text rather than lose the reading.
                Err(_) => s.serialize_str(j),
            },
        }
    }
}

/// A value as natural JSON (what the cloud receives).
pub fn value_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(JsonValue(v)).unwrap_or(serde_json::Value::Null)
}

#[derive(Serialize)]
struct WireRecord<'a> {
    seq: u64,
    device: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<i64>,
    #[serde(skip_serializing_if = "is_true")]
    ts_trusted: bool,
    values: Values<'a>,
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The `P/telemetry` payload for the longest prefix of `leased` whose
/// encoding stays within `max_bytes` (always at least one record, so an
/// oversized record still leaves):
/// `{"v":1,"gateway":ID,"epoch":E,"records":[{"seq","device","ts","values"},…]}`.
/// Returns the payload and how many records of `leased` it carries.
///
/// Fails only if serde_json fails to write (not expected: every key is text).
pub fn telemetry_payload(
    gateway: &str,
    epoch: &str,
    leased: &[Leased],
    max_bytes: usize,
) -> Result<(Vec<u8>, usize), serde_json::Error> {
    records(gateway, epoch, leased, max_bytes, true)
}

/// The `P/attributes` payload for the longest prefix of `leased` within
/// `max_bytes` (at least one record):
/// `{"v":1,"gateway":ID,"epoch":E,"records":[{"seq","device","values"},…]}`
/// (client attributes carry no timestamp).
///
/// Fails only if serde_json fails to write.
pub fn attributes_payload(
    gateway: &str,
    epoch: &str,
    leased: &[Leased],
    max_bytes: usize,
) -> Result<(Vec<u8>, usize), serde_json::Error> {
    records(gateway, epoch, leased, max_bytes, false)
}

/// `{"v":1,"gateway":…,"epoch":…,"records":[…]}` with (`with_ts`) or
/// without each record's `ts`.
fn records(
    gateway: &str,
    epoch: &str,
    leased: &[Leased],
    max_bytes: usize,
    with_ts: bool,
) -> Result<(Vec<u8>, usize), serde_json::Error> {
    let mut out = br#"{"v":1,"gateway":"#.to_vec();
    serde_json::to_writer(&mut out, gateway)?;
    out.extend_from_slice(br#","epoch":"#);
    serde_json::to_writer(&mut out, epoch)?;
    out.extend_from_slice(br#","records":["#);
    let mut n = 0;
    let mut one = Vec::new();
    for l in leased {
        one.clear();
        serde_json::to_writer(
            &mut one,
            &WireRecord {
                seq: l.seq.0,
                device: l.record.device.as_str(),
                ts: with_ts.then_some(l.record.ts_ms),
                ts_trusted: l.record.ts_trusted || !with_ts,
                values: Values(&l.record.values),
            },
        )?;
        if n > 0 && out.len() + 1 + one.len() + 2 > max_bytes {
            break;
        }
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&one);
        n += 1;
    }
    out.extend_from_slice(b"]}");
    Ok((out, n))
}

/// The retained `P/status` payload sent on connect.
pub fn status_online(version: &str, epoch: &str) -> Vec<u8> {
    serde_json::json!({"state": "online", "version": version, "epoch": epoch})
        .to_string()
        .into_bytes()
}

/// The `P/status` payload of the MQTT will and of a clean shutdown.
pub fn status_offline(epoch: &str) -> Vec<u8> {
    serde_json::json!({"state": "offline", "epoch": epoch})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DeviceName, Record, Seq};

    fn leased(n: u64) -> Vec<Leased> {
        (1..=n)
            .map(|i| Leased {
                seq: Seq(i),
                stream: "telemetry".into(),
                accepted_ms: 1,
                len: 10,
                record: Record {
                    device: DeviceName::new("dev"),
                    ts_ms: 1,
                    ts_trusted: true,
                    values: vec![("x".into(), Value::I64(i as i64))],
                },
            })
            .collect()
    }

    #[test]
    fn payload_stays_within_the_byte_bound_and_says_how_many_it_carries() {
        let all = leased(100);
        let (full, n) = telemetry_payload("gw", "e", &all, usize::MAX).unwrap();
        assert_eq!(n, 100);
        let limit = full.len() / 3;
        let (part, k) = telemetry_payload("gw", "e", &all, limit).unwrap();
        assert!(part.len() <= limit, "{} > {limit}", part.len());
        assert!(k > 0 && k < 100);
        let v: serde_json::Value = serde_json::from_slice(&part).unwrap();
        assert_eq!(v["records"].as_array().unwrap().len(), k);
        assert_eq!(v["records"][k - 1]["seq"], k as u64);
        // One record always leaves, even over the bound.
        let (_, one) = telemetry_payload("gw", "e", &all, 10).unwrap();
        assert_eq!(one, 1);
    }

    #[test]
    fn telemetry_payload_matches_the_generic_contract() {
        let leased = vec![Leased {
            seq: Seq(7),
            stream: "telemetry".into(),
            accepted_ms: 1,
            len: 10,
            record: Record {
                device: DeviceName::new("d1"),
                ts_ms: 1000,
                ts_trusted: true,
                values: vec![
                    ("t".into(), Value::F64(21.5)),
                    ("on".into(), Value::Bool(true)),
                    ("cfg".into(), Value::Json("{\"a\":1}".into())),
                ],
            },
        }];
        let (payload, n) = telemetry_payload("gw", "e1", &leased, 1 << 16).unwrap();
        assert_eq!(n, 1);
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"gateway":"gw","epoch":"e1","records":[
                {"seq":7,"device":"d1","ts":1000,"values":{"t":21.5,"on":true,"cfg":{"a":1}}}]})
        );
    }

    #[test]
    fn attributes_payload_has_no_timestamps() {
        let all = leased(2);
        let (payload, n) = attributes_payload("gw", "e1", &all, 1 << 16).unwrap();
        assert_eq!(n, 2);
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"gateway":"gw","epoch":"e1","records":[
                {"seq":1,"device":"dev","values":{"x":1}},
                {"seq":2,"device":"dev","values":{"x":2}}]})
        );
    }

    #[test]
    fn untrusted_timestamps_are_flagged() {
        let leased = vec![Leased {
            seq: Seq(1),
            stream: "telemetry".into(),
            accepted_ms: 1,
            len: 10,
            record: Record {
                device: DeviceName::new("d1"),
                ts_ms: 5,
                ts_trusted: false,
                values: vec![("x".into(), Value::I64(1))],
            },
        }];
        let (payload, _) = telemetry_payload("gw", "e", &leased, 1 << 16).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["records"][0]["ts_trusted"], serde_json::json!(false));
    }
}
