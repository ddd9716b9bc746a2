//! Legacy MQTT topic mapping (`[[mqtt.mappings]]`): devices that cannot
//! speak the ThingsBoard API publish on their own topics, and a mapping
//! turns those publishes into telemetry records.
//!
//! ```toml
//! [[mqtt.mappings]]
//! topic = "sensors/+/temp"   # MQTT filter: `+` one level, `#` the rest
//! device = "{1}"             # `{N}` = the N-th wildcard's level; default "{me}"
//! format = "number"          # "number" | "text" | "json"
//! key = "temp"               # number/text: the key (may use `{N}` too)
//!
//! [[mqtt.mappings]]
//! topic = "legacy/#"
//! format = "json"
//! keys = { t = "/temperature", h = "/env/humidity" }  # key = JSON pointer
//! ```
//!
//! The first mapping whose filter matches wins. `json` without `keys` takes
//! the payload as ThingsBoard JSON. The records belong to the device the
//! template names, which must be the authenticated device itself unless
//! its registry entry allows it to speak for that name
//! (`sluice devices add … --bridge-for GLOB`); anything else is refused
//! (MQTT 5 PUBACK 0x87, 3.1.1 close) and counted as unauthorized. Readings
//! get the receive time.

use crate::tbjson::{self, PayloadError};
use serde::{Deserialize, Serialize};
use sluice_cloud_sync::{DeviceName, Record, Value};
use std::collections::BTreeMap;

/// `[mqtt]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqttSection {
    /// `[[mqtt.mappings]]`
    pub mappings: Vec<RawMapping>,
}

/// One `[[mqtt.mappings]]` entry as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    /// MQTT topic filter.
    pub topic: String,
    /// Device template (default `{me}`).
    #[serde(default)]
    pub device: Option<String>,
    /// `number`, `text` or `json`.
    pub format: String,
    /// Key template for `number` / `text`.
    #[serde(default)]
    pub key: Option<String>,
    /// For `json`: key → JSON pointer.
    #[serde(default)]
    pub keys: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Format {
    Number {
        key: String,
    },
    Text {
        key: String,
    },
    Json {
        keys: Option<BTreeMap<String, String>>,
    },
}

/// A validated mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    filter: Vec<String>,
    device: String,
    format: Format,
}

/// Why a mapped publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapRefusal {
    /// The authenticated device may not publish for the named device.
    #[error("device {device:?} may not publish for {target:?} (see devices add --bridge-for)")]
    NotAllowed {
        /// Who published.
        device: String,
        /// For whom.
        target: String,
    },
    /// The payload does not fit the mapping's format.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

fn bad(i: usize, field: &str, problem: impl std::fmt::Display) -> (String, String) {
    (format!("mqtt.mappings[{i}].{field}"), problem.to_string())
}

/// Checks a `{N}` / `{me}` template against the filter's wildcard count.
fn check_template(t: &str, wildcards: usize) -> Result<(), String> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("{t:?}: unclosed '{{'"));
        };
        let name = &rest[open + 1..open + close];
        match name {
            "me" => {}
            n => match n.parse::<usize>() {
                Ok(k) if (1..=wildcards).contains(&k) => {}
                _ => {
                    return Err(format!(
                        "{t:?}: {{{n}}} is not {{me}} or a wildcard number 1..={wildcards}"
                    ));
                }
            },
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Validates the mappings; errors are (key, problem).
///
/// Fails on the first bad entry.
pub fn validate(raw: &[RawMapping]) -> Result<Vec<Mapping>, (String, String)> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let filter: Vec<String> = m.topic.split('/').map(str::to_owned).collect();
        let hash_ok = filter
            .iter()
            .enumerate()
            .all(|(j, l)| l != "#" || j == filter.len() - 1);
        let levels_ok = filter
            .iter()
            .all(|l| l == "+" || l == "#" || !l.contains(['+', '#']));
        if m.topic.is_empty() || !hash_ok || !levels_ok {
            return Err(bad(
                i,
                "topic",
                format!("{:?} is not an MQTT topic filter", m.topic),
            ));
        }
        if m.topic.starts_with("v1/") || m.topic.starts_with("v2/") {
            return Err(bad(
                i,
                "topic",
                "the ThingsBoard API's own topics (v1/…, v2/…) cannot be mapped",
            ));
        }
        let wildcards = filter.iter().filter(|l| *l == "+" || *l == "#").count();
        let device = m.device.clone().unwrap_or_else(|| "{me}".into());
        check_template(&device, wildcards).map_err(|e| bad(i, "device", e))?;
        let format = match (m.format.as_str(), &m.key, &m.keys) {
            ("number" | "text", Some(k), None) => {
                check_template(k, wildcards).map_err(|e| bad(i, "key", e))?;
                if k.is_empty() {
                    return Err(bad(i, "key", "must not be empty"));
                }
                if m.format == "number" {
                    Format::Number { key: k.clone() }
                } else {
                    Format::Text { key: k.clone() }
                }
            }
            ("number" | "text", None, _) => {
                return Err(bad(i, "key", "is required for this format"));
            }
            ("number" | "text", _, Some(_)) => {
                return Err(bad(i, "keys", "is only for format = \"json\""));
            }
            ("json", None, keys) => {
                if let Some(keys) = keys {
                    for (k, ptr) in keys {
                        if k.is_empty() || !(ptr.is_empty() || ptr.starts_with('/')) {
                            return Err(bad(
                                i,
                                "keys",
                                format!(
                                    "{k:?} = {ptr:?}: keys map a name to a JSON pointer like \"/a/b\""
                                ),
                            ));
                        }
                    }
                }
                Format::Json { keys: keys.clone() }
            }
            ("json", Some(_), _) => {
                return Err(bad(
                    i,
                    "key",
                    "use keys = { name = \"/pointer\" } with json",
                ));
            }
            (other, _, _) => {
                return Err(bad(
                    i,
                    "format",
                    format!("{other:?} is not \"number\", \"text\" or \"json\""),
                ));
            }
        };
        out.push(Mapping {
            filter,
            device,
            format,
        });
    }
    Ok(out)
}

impl Mapping {
    /// The wildcard captures when `topic` matches the filter.
    fn captures(&self, topic: &str) -> Option<Vec<String>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut caps = Vec::new();
        for (i, f) in self.filter.iter().enumerate() {
            match f.as_str() {
                "#" => {
                    caps.push(levels.get(i..).map(|l| l.join("/")).unwrap_or_default());
                    return Some(caps);
                }
                "+" => caps.push((*levels.get(i)?).to_owned()),
                lit => {
                    if levels.get(i) != Some(&lit) {
                        return None;
                    }
                }
            }
        }
        (levels.len() == self.filter.len()).then_some(caps)
    }
}

fn expand(t: &str, caps: &[String], me: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
        let name = &rest[open + 1..close.min(rest.len())];
        match name {
            "me" => out.push_str(me),
            n => {
                if let Some(c) = n
                    .parse::<usize>()
                    .ok()
                    .and_then(|k| caps.get(k.wrapping_sub(1)))
                {
                    out.push_str(c);
                }
            }
        }
        rest = rest.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

fn json_value(v: serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::I64(i),
            None => Value::F64(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::Str(s),
        nested => Value::Json(nested.to_string()),
    })
}

/// Maps a publish of `device` on `topic`; `None` when no mapping matches.
/// `may_speak_for(target)` says whether `device` may publish for `target`.
pub fn map(
    mappings: &[Mapping],
    device: &DeviceName,
    topic: &str,
    payload: &[u8],
    (now_ms, trusted): (i64, bool),
    may_speak_for: impl Fn(&str) -> bool,
) -> Option<Result<Vec<Record>, MapRefusal>> {
    let (m, caps) = mappings
        .iter()
        .find_map(|m| m.captures(topic).map(|c| (m, c)))?;
    let me = device.as_str();
    let target = expand(&m.device, &caps, me);
    let valid_name = !target.is_empty()
        && target.len() <= 64
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name || !may_speak_for(&target) {
        return Some(Err(MapRefusal::NotAllowed {
            device: me.to_owned(),
            target,
        }));
    }
    let target = DeviceName::new(&target);
    let shape = |m: String| MapRefusal::Payload(PayloadError::Shape(m));
    let text = || std::str::from_utf8(payload).map(str::trim);
    let one = |key: String, value: Value| {
        vec![Record {
            device: target.clone(),
            ts_ms: now_ms,
            ts_trusted: trusted,
            values: vec![(key, value)],
        }]
    };
    Some(match &m.format {
        Format::Number { key } => {
            let key = expand(key, &caps, me);
            match text() {
                Ok(t) => match (t.parse::<i64>(), t.parse::<f64>()) {
                    (Ok(i), _) => Ok(one(key, Value::I64(i))),
                    (_, Ok(f)) if f.is_finite() => Ok(one(key, Value::F64(f))),
                    _ => Err(shape(format!(
                        "payload {t:?} is not a number (format = \"number\")"
                    ))),
                },
                Err(_) => Err(shape("payload is not UTF-8 text".into())),
            }
        }
        Format::Text { key } => {
            let key = expand(key, &caps, me);
            match text() {
                Ok(t) if t.len() <= 4096 => Ok(one(key, Value::Str(t.to_owned()))),
                Ok(_) => Err(shape("text payload over 4096 bytes".into())),
                Err(_) => Err(shape("payload is not UTF-8 text".into())),
            }
        }
        Format::Json { keys: None } => {
            tbjson::decode(payload, &target, now_ms, trusted).map_err(MapRefusal::Payload)
        }
        Format::Json { keys: Some(keys) } => {
            match serde_json::from_slice::<serde_json::Value>(payload) {
                Err(e) => Err(MapRefusal::Payload(PayloadError::Syntax(e.to_string()))),
                Ok(doc) => {
                    let values: Vec<(String, Value)> = keys
                        .iter()
                        .filter_map(|(k, ptr)| {
                            doc.pointer(ptr)
                                .cloned()
                                .and_then(json_value)
                                .map(|v| (k.clone(), v))
                        })
                        .collect();
                    if values.is_empty() {
                        Err(shape(
                            "none of the mapping's JSON pointers found a value".into(),
                        ))
                    } else {
                        Ok(vec![Record {
                            device: target.clone(),
                            ts_ms: now_ms,
                            ts_trusted: trusted,
                            values,
                        }])
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(topic: &str, device: Option<&str>, format: &str, key: Option<&str>) -> RawMapping {
        RawMapping {
            topic: topic.into(),
            device: device.map(str::to_owned),
            format: format.into(),
            key: key.map(str::to_owned),
            keys: None,
        }
    }

    #[test]
    fn topics_map_to_records_of_the_named_device() {
        let mut json = raw("legacy/#", None, "json", None);
        json.keys = Some(BTreeMap::from([
            ("t".into(), "/temperature".into()),
            ("h".into(), "/env/humidity".into()),
        ]));
        let maps = validate(&[
            raw("sensors/+/temp", Some("{1}"), "number", Some("temp")),
            raw("status/+", None, "text", Some("state_{1}")),
            json,
            raw("tb/+", Some("{1}"), "json", None),
        ])
        .unwrap();
        let me = DeviceName::new("bridge-1");
        let all = |_: &str| true;
        let r = map(&maps, &me, "sensors/s-7/temp", b" 21.5 ", (5, true), all)
            .unwrap()
            .unwrap();
        assert_eq!(r[0].device.as_str(), "s-7");
        assert_eq!(r[0].values, vec![("temp".into(), Value::F64(21.5))]);
        assert_eq!(r[0].ts_ms, 5);
        let r = map(&maps, &me, "status/door", b"open", (5, true), all)
            .unwrap()
            .unwrap();
        assert_eq!(r[0].device.as_str(), "bridge-1");
        assert_eq!(
            r[0].values,
            vec![("state_door".into(), Value::Str("open".into()))]
        );
        let r = map(
            &maps,
            &me,
            "legacy/a/b",
            br#"{"temperature":3,"env":{"humidity":40.5}}"#,
            (5, true),
            all,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            r[0].values,
            vec![("h".into(), Value::F64(40.5)), ("t".into(), Value::I64(3))]
        );
        let r = map(
            &maps,
            &me,
            "tb/x-1",
            br#"{"ts":9,"values":{"a":1}}"#,
            (5, true),
            all,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r[0].device.as_str(), r[0].ts_ms), ("x-1", 9));
        assert!(map(&maps, &me, "other/topic", b"1", (5, true), all).is_none());
        assert!(map(&maps, &me, "sensors/a/b/temp", b"1", (5, true), all).is_none());
    }

    #[test]
    fn speaking_for_others_needs_permission_and_bad_payloads_say_why() {
        let maps = validate(&[raw("sensors/+/temp", Some("{1}"), "number", Some("temp"))]).unwrap();
        let me = DeviceName::new("dev-1");
        let only_me = |t: &str| t == "dev-1";
        assert_eq!(
            map(&maps, &me, "sensors/dev-2/temp", b"1", (5, true), only_me).unwrap(),
            Err(MapRefusal::NotAllowed {
                device: "dev-1".into(),
                target: "dev-2".into()
            })
        );
        assert!(
            map(&maps, &me, "sensors/dev-1/temp", b"1", (5, true), only_me)
                .unwrap()
                .is_ok()
        );
        assert!(matches!(
            map(&maps, &me, "sensors/bad name/temp", b"1", (5, true), |_| {
                true
            })
            .unwrap(),
            Err(MapRefusal::NotAllowed { .. })
        ));
        let e = map(
            &maps,
            &me,
            "sensors/dev-1/temp",
            b"warm",
            (5, true),
            only_me,
        )
        .unwrap()
        .unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn bad_mappings_are_refused_naming_the_key() {
        for (m, key) in [
            (
                raw("a/#/b", None, "number", Some("k")),
                "mqtt.mappings[0].topic",
            ),
            (
                raw("v1/devices/me/x", None, "number", Some("k")),
                "mqtt.mappings[0].topic",
            ),
            (
                raw("a/+", Some("{2}"), "number", Some("k")),
                "mqtt.mappings[0].device",
            ),
            (raw("a/+", None, "number", None), "mqtt.mappings[0].key"),
            (
                raw("a/+", None, "xml", Some("k")),
                "mqtt.mappings[0].format",
            ),
            (raw("a/+", None, "json", Some("k")), "mqtt.mappings[0].key"),
            (
                raw("a/b+", None, "number", Some("k")),
                "mqtt.mappings[0].topic",
            ),
        ] {
            assert_eq!(validate(&[m]).unwrap_err().0, key);
        }
    }
}
