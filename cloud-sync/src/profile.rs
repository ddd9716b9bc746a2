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
    /// `P/health` (up).
    pub health: String,
    /// `P/config` (down, retained).
    pub config: String,
    /// `P/config/state` (up, retained).
    pub config_state: String,
    /// `P/firmware` (down): signed firmware manifests.
    pub firmware: String,
    /// `P/firmware/state` (up): per-target firmware progress.
    pub firmware_state: String,
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
            health: format!("{p}/health"),
            config: format!("{p}/config"),
            config_state: format!("{p}/config/state"),
            firmware: format!("{p}/firmware"),
            firmware_state: format!("{p}/firmware/state"),
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

/// Which upstream API the uplink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileKind {
    /// sluice's own topics under `P/` (DESIGN.md).
    Generic,
    /// The ThingsBoard gateway MQTT API (`v1/gateway/*`).
    ThingsBoard,
}

/// The ThingsBoard gateway MQTT API, as the ThingsBoard gateway itself
/// uses it (shapes from ../shared/notes/thingsboard-api.md §2).
pub mod tb {
    use super::{JsonValue, Values};
    use crate::downlink::{CloudRequest, Command, DownlinkError};
    use crate::outbox::Leased;
    use serde_json::{Map, Value as Json, json};

    /// Device telemetry, up.
    pub const TELEMETRY: &str = "v1/gateway/telemetry";
    /// Device client attributes up; shared attributes down.
    pub const ATTRIBUTES: &str = "v1/gateway/attributes";
    /// A device appears.
    pub const CONNECT: &str = "v1/gateway/connect";
    /// Commands down, answers up.
    pub const RPC: &str = "v1/gateway/rpc";
    /// The gateway's own telemetry (health).
    pub const ME_TELEMETRY: &str = "v1/devices/me/telemetry";
    /// The gateway's own attributes (shared down: `sluice_config`).
    pub const ME_ATTRIBUTES: &str = "v1/devices/me/attributes";
    /// Server-side RPC to the gateway itself.
    pub const ME_RPC_REQUEST: &str = "v1/devices/me/rpc/request/";
    /// Answers to the gateway's own RPCs (and its client-side ones).
    pub const ME_RPC_RESPONSE: &str = "v1/devices/me/rpc/response/";
    /// Answers to the gateway's own attribute requests.
    pub const ME_ATTRIBUTES_RESPONSE: &str = "v1/devices/me/attributes/response/";
    /// The gateway's request for its `sluice_config` at connect.
    pub const ME_ATTRIBUTES_REQUEST: &str = "v1/devices/me/attributes/request/1";
    /// The gateway's request for its `sluice_firmware` at connect.
    pub const ME_FIRMWARE_REQUEST: &str = "v1/devices/me/attributes/request/2";
    /// The shared attribute carrying a fleet configuration envelope.
    pub const CONFIG_ATTRIBUTE: &str = "sluice_config";
    /// The shared attribute carrying a firmware manifest envelope.
    pub const FIRMWARE_ATTRIBUTE: &str = "sluice_firmware";
    /// The gateway telemetry key reporting firmware progress.
    pub const FIRMWARE_STATE_KEY: &str = "sluice_firmware_state";
    /// The client attribute reporting fleet configuration outcomes.
    pub const CONFIG_STATE_ATTRIBUTE: &str = "sluice_config_state";
    /// The request id of the gateway's own `getSessionLimits`.
    pub const SESSION_LIMITS_ID: &str = "1";

    /// `v1/gateway/telemetry` (`with_ts`) or `v1/gateway/attributes` for the
    /// longest prefix of `leased` within `max_bytes` (at least one record):
    /// `{"dev":[{"ts":…,"values":{…}},…],…}` / `{"dev":{…},…}`, devices in
    /// order of first appearance.
    ///
    /// Fails only if serde_json fails to write.
    pub fn batch_payload(
        leased: &[Leased],
        max_bytes: usize,
        with_ts: bool,
    ) -> Result<(Vec<u8>, usize), serde_json::Error> {
        // Grow one record at a time; rebuild the object (small batches).
        let mut best: Option<(Vec<u8>, usize)> = None;
        let mut by_dev: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, l) in leased.iter().enumerate() {
            let dev = l.record.device.as_str();
            match by_dev.iter_mut().find(|(d, _)| d == dev) {
                Some((_, v)) => v.push(i),
                None => by_dev.push((dev.to_owned(), vec![i])),
            }
            let mut out = Vec::with_capacity(256);
            out.push(b'{');
            for (k, (dev, idx)) in by_dev.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut out, dev)?;
                out.push(b':');
                if with_ts {
                    out.push(b'[');
                    for (j, &ix) in idx.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        let r = &leased[ix].record;
                        out.extend_from_slice(br#"{"ts":"#);
                        serde_json::to_writer(&mut out, &r.ts_ms)?;
                        out.extend_from_slice(br#","values":"#);
                        serde_json::to_writer(&mut out, &Values(&r.values))?;
                        out.push(b'}');
                    }
                    out.push(b']');
                } else {
                    // Attributes: the keys of the device's records merged.
                    let mut m = Map::new();
                    for &ix in idx {
                        for (k, v) in &leased[ix].record.values {
                            m.insert(k.clone(), serde_json::to_value(JsonValue(v))?);
                        }
                    }
                    serde_json::to_writer(&mut out, &m)?;
                }
            }
            out.push(b'}');
            if best.is_some() && out.len() > max_bytes {
                break;
            }
            best = Some((out, i + 1));
        }
        Ok(best.unwrap_or_else(|| (b"{}".to_vec(), 0)))
    }

    /// `v1/gateway/connect` for `device` of `kind`.
    pub fn connect_payload(device: &str, kind: &str) -> Vec<u8> {
        json!({"device": device, "type": kind})
            .to_string()
            .into_bytes()
    }

    /// Parses a downlink message: `v1/gateway/rpc`, `v1/gateway/attributes`,
    /// the gateway's own `v1/devices/me/rpc/request/{id}` (a command for
    /// `gateway_id`) and `v1/devices/me/attributes` (`sluice_config`). A
    /// `getSessionLimits` answer is the caller's (see [`session_limits`]).
    ///
    /// Fails on other topics and on shapes it does not know.
    pub fn parse(
        gateway_id: &str,
        topic: &str,
        payload: &[u8],
    ) -> Result<CloudRequest, DownlinkError> {
        let shape = |m: &str| DownlinkError::Shape(m.to_owned());
        let json: Json =
            serde_json::from_slice(payload).map_err(|e| DownlinkError::Syntax(e.to_string()))?;
        let device = || -> Result<String, DownlinkError> {
            json.get("device")
                .and_then(Json::as_str)
                .filter(|d| !d.is_empty() && d.len() <= 64)
                .map(str::to_owned)
                .ok_or_else(|| shape("\"device\" (a 1-64 character string) is required"))
        };
        if topic == RPC {
            let data = json
                .get("data")
                .ok_or_else(|| shape("\"data\" is required"))?;
            let id = match data.get("id") {
                Some(id @ (Json::Number(_) | Json::String(_))) => id.clone(),
                _ => return Err(shape("\"data.id\" is required")),
            };
            let method = data
                .get("method")
                .and_then(Json::as_str)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| shape("\"data.method\" is required"))?;
            let params = data.get("params").cloned().unwrap_or(Json::Null);
            let expires_ms = params
                .get("timeout")
                .and_then(Json::as_u64)
                .filter(|t| *t > 0);
            return Ok(CloudRequest::Command(Command {
                id,
                device: device()?,
                method: method.to_owned(),
                params,
                expires_ms,
            }));
        }
        if topic == ATTRIBUTES {
            return match json.get("data") {
                Some(Json::Object(values)) if !values.is_empty() => {
                    Ok(CloudRequest::SharedAttributes {
                        device: device()?,
                        values: values.clone(),
                    })
                }
                _ => Err(shape("\"data\" must be a non-empty object")),
            };
        }
        if let Some(id) = topic.strip_prefix(ME_RPC_REQUEST) {
            let method = json
                .get("method")
                .and_then(Json::as_str)
                .ok_or_else(|| shape("\"method\" is required"))?;
            let id: Json = id.parse::<u64>().map_or_else(|_| json!(id), Json::from);
            return Ok(CloudRequest::Command(Command {
                id,
                device: gateway_id.to_owned(),
                method: method.to_owned(),
                params: json.get("params").cloned().unwrap_or(Json::Null),
                expires_ms: None,
            }));
        }
        if topic == ME_ATTRIBUTES || topic.starts_with(ME_ATTRIBUTES_RESPONSE) {
            // A push is the bare object; an attribute response wraps it in
            // "shared".
            let attrs = json.get("shared").unwrap_or(&json);
            let envelope = |key: &str| match attrs.get(key) {
                Some(Json::String(s)) => Some(s.clone().into_bytes()),
                Some(env @ Json::Object(_)) => Some(env.to_string().into_bytes()),
                _ => None,
            };
            if let Some(env) = envelope(CONFIG_ATTRIBUTE) {
                return Ok(CloudRequest::Config(env));
            }
            return match envelope(FIRMWARE_ATTRIBUTE) {
                Some(env) => Ok(CloudRequest::Firmware(env)),
                None => Err(shape("no sluice_config or sluice_firmware attribute")),
            };
        }
        Err(DownlinkError::Topic(topic.to_owned()))
    }

    /// A generic `P/commands/response` payload turned into the ThingsBoard
    /// answer: `(topic, payload)` — `v1/gateway/rpc`
    /// `{"device","id","data"}` for a device, or the gateway's own
    /// `v1/devices/me/rpc/response/{id}` when `device` is `gateway_id`.
    /// Errors become `{"error":message,"code":N}` (408 timeout, 404 unknown
    /// device, 503 offline, 500 otherwise), as the ThingsBoard gateway
    /// answers.
    pub fn response(gateway_id: &str, generic: &[u8]) -> Option<(String, Vec<u8>)> {
        let v: Json = serde_json::from_slice(generic).ok()?;
        let device = v.get("device")?.as_str()?;
        let id = v.get("id")?.clone();
        let data = match (v.get("result"), v.get("error")) {
            (Some(r), _) => r.clone(),
            (None, Some(e)) => {
                let code = match e.get("code").and_then(Json::as_str) {
                    Some("timeout") => 408,
                    Some("unknown_device") => 404,
                    Some("offline") => 503,
                    _ => 500,
                };
                json!({"error": e.get("message").cloned().unwrap_or(Json::Null), "code": code})
            }
            (None, None) => return None,
        };
        if device == gateway_id {
            let id = match &id {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            return Some((
                format!("{ME_RPC_RESPONSE}{id}"),
                data.to_string().into_bytes(),
            ));
        }
        Some((
            RPC.to_owned(),
            json!({"device": device, "id": id, "data": data})
                .to_string()
                .into_bytes(),
        ))
    }

    /// The limits in a `getSessionLimits` answer: (max payload bytes, max
    /// in-flight messages), each `None` when absent or 0.
    pub fn session_limits(payload: &[u8]) -> (Option<usize>, Option<usize>) {
        let v: Json = serde_json::from_slice(payload).unwrap_or_default();
        let n = |k: &str| {
            v.get(k)
                .and_then(Json::as_u64)
                .filter(|n| *n > 0)
                .and_then(|n| usize::try_from(n).ok())
        };
        (n("maxPayloadSize"), n("maxInflightMessages"))
    }

    /// Whether a message is the gateway's own publish coming back (a plain
    /// broker echoes what a client publishes on a topic it subscribed to;
    /// ThingsBoard does not): its getSessionLimits request, its upstream
    /// attributes (no `"device"` key) or its RPC answers (no `data.id`).
    pub fn is_own_echo(topic: &str, payload: &[u8]) -> bool {
        if topic == format!("{ME_RPC_REQUEST}{SESSION_LIMITS_ID}") {
            return true;
        }
        let Ok(v) = serde_json::from_slice::<Json>(payload) else {
            return false;
        };
        match topic {
            ATTRIBUTES => v.get("device").is_none(),
            RPC => {
                v.get("device").is_some()
                    && v.get("id").is_some()
                    && v.pointer("/data/id").is_none()
            }
            _ => false,
        }
    }

    /// The gateway's `getSessionLimits` request.
    pub fn session_limits_request() -> Vec<u8> {
        json!({"method": "getSessionLimits", "params": {"timeout": 5000}})
            .to_string()
            .into_bytes()
    }

    /// A `P/firmware/state` report as the gateway's own telemetry
    /// (`{"sluice_firmware_state":…}`).
    pub fn firmware_state(report: &[u8]) -> Vec<u8> {
        let r: Json = serde_json::from_slice(report).unwrap_or(Json::Null);
        json!({ FIRMWARE_STATE_KEY: r }).to_string().into_bytes()
    }

    /// A `P/config/state` report as the gateway's client attribute.
    pub fn config_state(report: &[u8]) -> Vec<u8> {
        let r: Json = serde_json::from_slice(report).unwrap_or(Json::Null);
        json!({ CONFIG_STATE_ATTRIBUTE: r })
            .to_string()
            .into_bytes()
    }
}

#[cfg(test)]
mod tb_tests {
    use super::tb;
    use crate::downlink::CloudRequest;
    use crate::outbox::Leased;
    use crate::record::{DeviceName, Record, Seq, Value};
    use serde_json::{Value as Json, json};

    fn rec(dev: &str, ts: i64, v: i64) -> Leased {
        Leased {
            seq: Seq(ts as u64),
            stream: "telemetry".into(),
            accepted_ms: 1,
            len: 10,
            record: Record {
                device: DeviceName::new(dev),
                ts_ms: ts,
                ts_trusted: true,
                values: vec![("t".into(), Value::I64(v))],
            },
        }
    }

    #[test]
    fn gateway_telemetry_groups_records_by_device() {
        let l = vec![rec("a", 1, 10), rec("b", 2, 20), rec("a", 3, 30)];
        let (p, n) = tb::batch_payload(&l, 1 << 16, true).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            serde_json::from_slice::<Json>(&p).unwrap(),
            json!({"a":[{"ts":1,"values":{"t":10}},{"ts":3,"values":{"t":30}}],"b":[{"ts":2,"values":{"t":20}}]})
        );
        let (p, n) = tb::batch_payload(&l, 1 << 16, false).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            serde_json::from_slice::<Json>(&p).unwrap(),
            json!({"a":{"t":30},"b":{"t":20}})
        );
        let (_, n) = tb::batch_payload(&l, 20, true).unwrap();
        assert_eq!(n, 1, "at least one record, within the bound after that");
        assert_eq!(
            serde_json::from_slice::<Json>(&tb::connect_payload("a", "sensor")).unwrap(),
            json!({"device":"a","type":"sensor"})
        );
    }

    #[test]
    fn gateway_downlink_and_answers_follow_the_thingsboard_shapes() {
        let r = tb::parse(
            "gw",
            tb::RPC,
            br#"{"device":"d1","data":{"id":42,"method":"setGpio","params":{"pin":7,"timeout":3000}}}"#,
        )
        .unwrap();
        let CloudRequest::Command(c) = r else {
            panic!()
        };
        assert_eq!(
            (c.id, c.device.as_str(), c.method.as_str(), c.expires_ms),
            (json!(42), "d1", "setGpio", Some(3000))
        );
        let r = tb::parse(
            "gw",
            tb::ATTRIBUTES,
            br#"{"device":"d1","data":{"targetTemp":23}}"#,
        )
        .unwrap();
        assert!(matches!(r, CloudRequest::SharedAttributes { device, .. } if device == "d1"));
        let r = tb::parse(
            "gw",
            "v1/devices/me/rpc/request/77",
            br#"{"method":"gateway_ping","params":{}}"#,
        )
        .unwrap();
        assert!(matches!(r, CloudRequest::Command(c) if c.device == "gw" && c.id == json!(77)));
        let r = tb::parse(
            "gw",
            tb::ME_ATTRIBUTES,
            br#"{"sluice_config":"{\"payload\":\"x\"}"}"#,
        )
        .unwrap();
        assert!(matches!(r, CloudRequest::Config(b) if b == br#"{"payload":"x"}"#));
        // A firmware manifest envelope, pushed or answered, as text or JSON.
        let r = tb::parse(
            "gw",
            "v1/devices/me/attributes/response/2",
            br#"{"shared":{"sluice_firmware":{"payload":"y"}}}"#,
        )
        .unwrap();
        assert!(matches!(r, CloudRequest::Firmware(b) if b == br#"{"payload":"y"}"#));
        assert!(tb::parse("gw", tb::ME_ATTRIBUTES, br#"{"other":1}"#).is_err());
        assert_eq!(
            serde_json::from_slice::<Json>(&tb::firmware_state(br#"{"state":"idle"}"#)).unwrap(),
            json!({"sluice_firmware_state": {"state": "idle"}})
        );
        assert!(tb::parse("gw", "other", b"{}").is_err());
        let (t, p) =
            tb::response("gw", br#"{"id":42,"device":"d1","result":{"ok":true}}"#).unwrap();
        assert_eq!(t, tb::RPC);
        assert_eq!(
            serde_json::from_slice::<Json>(&p).unwrap(),
            json!({"device":"d1","id":42,"data":{"ok":true}})
        );
        let (_, p) = tb::response(
            "gw",
            br#"{"id":43,"device":"x","error":{"code":"timeout","message":"no answer"}}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Json>(&p).unwrap(),
            json!({"device":"x","id":43,"data":{"error":"no answer","code":408}})
        );
        let (t, p) =
            tb::response("gw", br#"{"id":77,"device":"gw","result":{"pong":true}}"#).unwrap();
        assert_eq!(
            (t.as_str(), p.as_slice()),
            ("v1/devices/me/rpc/response/77", &br#"{"pong":true}"#[..])
        );
        assert_eq!(
            tb::session_limits(br#"{"maxPayloadSize":65536,"maxInflightMessages":100}"#),
            (Some(65536), Some(100))
        );
        assert_eq!(tb::session_limits(b"{}"), (None, None));
        // What the gateway itself publishes, echoed by a plain broker.
        assert!(tb::is_own_echo("v1/devices/me/rpc/request/1", b"{}"));
        assert!(tb::is_own_echo(
            tb::ATTRIBUTES,
            br#"{"dev-1":{"model":"x"}}"#
        ));
        assert!(tb::is_own_echo(
            tb::RPC,
            br#"{"device":"d","id":42,"data":{"ok":true}}"#
        ));
        assert!(!tb::is_own_echo(
            tb::RPC,
            br#"{"device":"d","data":{"id":42,"method":"m"}}"#
        ));
        assert!(!tb::is_own_echo(
            tb::ATTRIBUTES,
            br#"{"device":"d","data":{"a":1}}"#
        ));
    }
}
