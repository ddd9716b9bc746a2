//! The ThingsBoard JSON telemetry decoder: `{"k": v, …}`, `{"ts": ms,
//! "values": {…}}`, or an array of those (what ThingsBoard's device API and
//! SDKs send). Values: number, bool, string, nested JSON; `null` is refused.

use serde_json::Value as Json;
use sluice_cloud_sync::{DeviceName, Record, Value};

/// Most records one message may carry.
pub const MAX_RECORDS: usize = 1000;
/// Most keys one message may carry in all.
pub const MAX_KEYS: usize = 1000;
/// Longest key.
pub const MAX_KEY_LEN: usize = 256;

/// Why a payload was refused; the text is sent back to the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON at all.
    #[error("payload is not valid JSON: {0}")]
    Syntax(String),
    /// JSON of the wrong shape.
    #[error("{0}")]
    Shape(String),
}

fn shape(msg: impl Into<String>) -> PayloadError {
    PayloadError::Shape(msg.into())
}

/// Decodes one telemetry message of `device`; readings without `ts` get
/// `now_ms`, trusted as far as `now_trusted` says (the gateway's clock);
/// readings with their own `ts` keep it as the device's word. An empty object (the ThingsBoard SDK's connection test) yields
/// no record.
///
/// Fails on invalid JSON, on a shape other than the three above, on `null`
/// values, a non-integer `ts`, an empty or over-long key, or too many
/// records/keys.
pub fn decode(
    body: &[u8],
    device: &DeviceName,
    now_ms: i64,
    now_trusted: bool,
) -> Result<Vec<Record>, PayloadError> {
    let json: Json =
        serde_json::from_slice(body).map_err(|e| PayloadError::Syntax(e.to_string()))?;
    let mut out = Vec::new();
    let mut keys = 0usize;
    match json {
        Json::Array(items) => {
            if items.len() > MAX_RECORDS {
                return Err(shape(format!(
                    "more than {MAX_RECORDS} entries in one message"
                )));
            }
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Json::Object(map) => {
                        one(map, device, (now_ms, now_trusted), &mut out, &mut keys)
                            .map_err(|e| shape(format!("entry {i}: {e}")))?
                    }
                    _ => return Err(shape(format!("entry {i}: expected a JSON object"))),
                }
            }
        }
        Json::Object(map) => one(map, device, (now_ms, now_trusted), &mut out, &mut keys)?,
        _ => return Err(shape("expected a JSON object or an array of objects")),
    }
    Ok(out)
}

fn one(
    mut map: serde_json::Map<String, Json>,
    device: &DeviceName,
    (now_ms, now_trusted): (i64, bool),
    out: &mut Vec<Record>,
    keys: &mut usize,
) -> Result<(), PayloadError> {
    let (ts_ms, ts_trusted, values) =
        if map.len() == 2 && map.contains_key("ts") && map.contains_key("values") {
            let ts = map
                .remove("ts")
                .and_then(|t| t.as_i64())
                .ok_or_else(|| shape("\"ts\" must be an integer (unix milliseconds)"))?;
            if ts < 0 {
                return Err(shape("\"ts\" must not be negative"));
            }
            match map.remove("values") {
                Some(Json::Object(v)) => (ts, true, v),
                _ => return Err(shape("\"values\" must be a JSON object")),
            }
        } else {
            (now_ms, now_trusted, map)
        };
    if values.is_empty() {
        return Ok(());
    }
    *keys += values.len();
    if *keys > MAX_KEYS {
        return Err(shape(format!("more than {MAX_KEYS} keys in one message")));
    }
    let mut record_values = Vec::with_capacity(values.len());
    for (k, v) in values {
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            return Err(shape(format!("key {k:?} must be 1-{MAX_KEY_LEN} bytes")));
        }
        let value = match v {
            Json::Null => return Err(shape(format!("key {k:?}: null is not a value"))),
            Json::Bool(b) => Value::Bool(b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::I64(i),
                None => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => Value::Str(s),
            nested @ (Json::Array(_) | Json::Object(_)) => Value::Json(nested.to_string()),
        };
        record_values.push((k, value));
    }
    if out.len() >= MAX_RECORDS {
        return Err(shape(format!(
            "more than {MAX_RECORDS} entries in one message"
        )));
    }
    out.push(Record {
        device: device.clone(),
        ts_ms,
        ts_trusted,
        values: record_values,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// Any bytes decode or say why (on every `cargo test`; the
        /// `tbjson` cargo-fuzz target in `fuzz/` goes further).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes, &DeviceName::new("d"), 1, true);
        }

        /// JSON-shaped noise reaches the shape checks.
        #[test]
        fn json_shaped_noise_never_panics(s in r#"[\[\]{}:,"a-z0-9.\- ]{0,200}"#) {
            let _ = decode(s.as_bytes(), &DeviceName::new("d"), 1, true);
        }
    }

    fn dec(s: &str) -> Result<Vec<Record>, PayloadError> {
        decode(s.as_bytes(), &DeviceName::new("d"), 42, true)
    }

    #[test]
    fn the_three_thingsboard_shapes_decode() {
        let r = dec(r#"{"t":21.5,"n":3,"on":true,"s":"x","j":{"a":[1]}}"#).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ts_ms, 42);
        assert_eq!(
            r[0].values,
            vec![
                ("t".into(), Value::F64(21.5)),
                ("n".into(), Value::I64(3)),
                ("on".into(), Value::Bool(true)),
                ("s".into(), Value::Str("x".into())),
                ("j".into(), Value::Json(r#"{"a":[1]}"#.into())),
            ]
        );
        let r = dec(r#"{"ts":1000,"values":{"t":1}}"#).unwrap();
        assert_eq!((r[0].ts_ms, r[0].values.len()), (1000, 1));
        let r = dec(r#"[{"ts":1,"values":{"a":1}},{"b":2}]"#).unwrap();
        assert_eq!(r.iter().map(|r| r.ts_ms).collect::<Vec<_>>(), [1, 42]);
    }

    #[test]
    fn receive_stamps_carry_the_clocks_trust_and_device_stamps_are_kept() {
        let d = DeviceName::new("d");
        let r = decode(br#"[{"a":1},{"ts":5,"values":{"b":2}}]"#, &d, 42, false).unwrap();
        assert_eq!((r[0].ts_ms, r[0].ts_trusted), (42, false));
        assert_eq!((r[1].ts_ms, r[1].ts_trusted), (5, true));
    }

    #[test]
    fn an_empty_object_is_a_connection_test_with_no_record() {
        assert_eq!(dec("{}").unwrap(), vec![]);
    }

    #[test]
    fn bad_payloads_say_why() {
        for (body, why) in [
            ("{", "not valid JSON"),
            ("42", "expected a JSON object"),
            (r#"{"a":null}"#, "null is not a value"),
            (
                r#"{"ts":"x","values":{"a":1}}"#,
                "\"ts\" must be an integer",
            ),
            (r#"{"ts":1,"values":3}"#, "\"values\" must be a JSON object"),
            (r#"[1]"#, "entry 0: expected a JSON object"),
            (r#"{"":1}"#, "must be 1-256 bytes"),
        ] {
            let e = dec(body).unwrap_err().to_string();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(dec(&deep).is_err());
    }

    #[test]
    fn too_many_keys_are_refused() {
        let body = format!(
            "{{{}}}",
            (0..=MAX_KEYS)
                .map(|i| format!("\"k{i}\":1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(dec(&body).unwrap_err().to_string().contains("keys"));
    }
}
