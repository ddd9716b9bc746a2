//! The SenML JSON telemetry decoder (RFC 8428, `application/senml+json`,
//! CoAP content-format 110): a JSON array of SenML records whose base fields
//! carry forward to later records until a record changes them (§4.1).
//!
//! How SenML maps onto [`Record`]s:
//! - key = resolved name: base name `bn` + name `n`, checked against §4.5.1
//!   (first character a letter or digit, then only `A-Z a-z 0-9 - : . / _`).
//! - ts = resolved time: base time `bt` + time `t`, in seconds, rounded to
//!   milliseconds. A resolved time below 2^28 s is relative to now (§4.5.3):
//!   `now_ms + t`, stamped with the gateway clock's trust, as is a record
//!   with no time at all (it resolves to 0, i.e. "now"). An absolute time is
//!   the device's word and trusted, as in [`tbjson`](crate::tbjson).
//! - value: `v` plus base value `bv` (an integer when both are integers and
//!   the sum fits in an `i64`, else a float), `vs` as text, `vb` as a bool,
//!   `vd` kept as its base64 text (a [`Value::Str`]; not decoded, so it is
//!   indistinguishable from a `vs` downstream).
//! - sum: `s` plus base sum `bs`. A record with a sum and no value stores the
//!   sum under the name itself; a record with both stores the value under the
//!   name and the sum under `name#sum` (`#` is not a SenML name character, so
//!   this key cannot collide with a real name). `bv`/`bs` only adjust a `v`/`s`
//!   the record carries; they never create one.
//! - One [`Record`] per distinct resolved time (and trust), in the order the
//!   times first appear; keys keep their first-seen order, and a later record
//!   with the same name and time overwrites the earlier value in place.
//!
//! Dropped: the units `u` and `bu` (type-checked, not kept — records that
//! differ only by unit therefore collapse onto one key), the update time
//! `ut`, and unknown fields, which RFC 8428 §4.4 says to ignore unless their
//! label ends in `_` ("must understand"), which is refused. A record that
//! carries only base fields (RFC 8428 §5.2 opens a pack that way) sets them
//! and yields no reading. The version `bver` must be 10 (the only version
//! RFC 8428 defines).

use crate::tbjson::{MAX_KEY_LEN, MAX_KEYS, MAX_RECORDS, PayloadError};
use serde_json::{Map, Value as Json};
use sluice_cloud_sync::{DeviceName, Record, Value};
use std::collections::HashMap;

/// The only `bver` this decoder understands.
pub const SENML_VERSION: u64 = 10;
/// Resolved times below this many seconds are relative to now (2^28,
/// RFC 8428 §4.5.3).
pub const RELATIVE_BELOW_S: f64 = 268_435_456.0;
/// Appended to a record's name to key its sum when it also has a value.
pub const SUM_SUFFIX: &str = "#sum";
/// Latest time accepted, 9999-12-31T23:59:59.999Z in unix milliseconds, so
/// every accepted time converts to `i64` exactly.
const MAX_TS_MS: f64 = 253_402_300_799_999.0;

const BASE_FIELDS: [&str; 6] = ["bn", "bt", "bu", "bv", "bs", "bver"];
const REGULAR_FIELDS: [&str; 9] = ["n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"];
const VALUE_FIELDS: [&str; 4] = ["v", "vs", "vb", "vd"];

fn shape(msg: impl Into<String>) -> PayloadError {
    PayloadError::Shape(msg.into())
}

/// A JSON number as the device wrote it: integers stay exact.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(j: &Json) -> Option<Num> {
        j.as_i64()
            .map(Num::Int)
            .or_else(|| j.as_f64().map(Num::Float))
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    /// `base + self` as a telemetry value; `None` if a float sum overflows.
    fn plus(self, base: Num) -> Option<Value> {
        if let (Num::Int(a), Num::Int(b)) = (self, base)
            && let Some(sum) = a.checked_add(b)
        {
            return Some(Value::I64(sum));
        }
        let sum = self.as_f64() + base.as_f64();
        sum.is_finite().then_some(Value::F64(sum))
    }
}

/// The base fields in force (RFC 8428 §4.1).
struct Base {
    name: String,
    time_s: f64,
    value: Num,
    sum: Num,
}

/// Where readings are gathered: one record per resolved time.
struct Packer<'a> {
    device: &'a DeviceName,
    out: Vec<Record>,
    by_time: HashMap<(i64, bool), usize>,
    by_key: HashMap<(usize, String), usize>,
}

impl Packer<'_> {
    fn put(&mut self, ts: (i64, bool), key: String, value: Value) -> Result<(), PayloadError> {
        let record = *self.by_time.entry(ts).or_insert_with(|| {
            self.out.push(Record {
                device: self.device.clone(),
                ts_ms: ts.0,
                ts_trusted: ts.1,
                values: Vec::new(),
            });
            self.out.len() - 1
        });
        let values = &mut self.out[record].values;
        match self.by_key.get(&(record, key.clone())) {
            Some(&at) => values[at].1 = value,
            None => {
                if self.by_key.len() >= MAX_KEYS {
                    return Err(shape(format!("more than {MAX_KEYS} keys in one message")));
                }
                self.by_key.insert((record, key.clone()), values.len());
                values.push((key, value));
            }
        }
        Ok(())
    }
}

/// Decodes one SenML JSON pack of `device`; `now_ms`/`now_trusted` (the
/// gateway's clock) stamp records without a time and anchor relative times.
/// An empty array yields no record.
///
/// Fails on invalid JSON; a top level other than an array of objects; more
/// than [`MAX_RECORDS`] records or [`MAX_KEYS`] keys; a `bver` other than 10;
/// an unknown field ending in `_`; a field of the wrong JSON type; an empty,
/// over-long ([`MAX_KEY_LEN`]) or ill-formed resolved name; more than one of
/// `v`/`vs`/`vb`/`vd`; a record with neither value nor sum; or a resolved
/// time outside 1970–9999. The error names the record (`entry N`, from 0).
pub fn decode(
    body: &[u8],
    device: &DeviceName,
    now_ms: i64,
    now_trusted: bool,
) -> Result<Vec<Record>, PayloadError> {
    let json: Json =
        serde_json::from_slice(body).map_err(|e| PayloadError::Syntax(e.to_string()))?;
    let Json::Array(items) = json else {
        return Err(shape("SenML must be a JSON array of records"));
    };
    if items.len() > MAX_RECORDS {
        return Err(shape(format!(
            "more than {MAX_RECORDS} entries in one message"
        )));
    }
    let mut base = Base {
        name: String::new(),
        time_s: 0.0,
        value: Num::Int(0),
        sum: Num::Int(0),
    };
    let mut packer = Packer {
        device,
        out: Vec::new(),
        by_time: HashMap::new(),
        by_key: HashMap::new(),
    };
    for (i, item) in items.iter().enumerate() {
        let Json::Object(map) = item else {
            return Err(shape(format!("entry {i}: expected a JSON object")));
        };
        entry(map, &mut base, (now_ms, now_trusted), &mut packer).map_err(|e| match e {
            PayloadError::Shape(why) => shape(format!("entry {i}: {why}")),
            other => other,
        })?;
    }
    Ok(packer.out)
}

fn entry(
    map: &Map<String, Json>,
    base: &mut Base,
    now: (i64, bool),
    packer: &mut Packer<'_>,
) -> Result<(), PayloadError> {
    // No label this decoder knows ends in `_`.
    if let Some(label) = map.keys().find(|k| k.ends_with('_')) {
        return Err(shape(format!(
            "field {label:?} must be understood (it ends in \"_\") and sluice does not know it"
        )));
    }
    if let Some(v) = map.get("bver")
        && v.as_f64() != Some(SENML_VERSION as f64)
    {
        return Err(shape(format!(
            "SenML version \"bver\" {v} is not supported (only {SENML_VERSION})"
        )));
    }
    if let Some(bn) = map.get("bn") {
        base.name = text(bn, "bn")?.to_owned();
    }
    if let Some(bt) = map.get("bt") {
        base.time_s = number(bt, "bt")?.as_f64();
    }
    if let Some(bv) = map.get("bv") {
        base.value = number(bv, "bv")?;
    }
    if let Some(bs) = map.get("bs") {
        base.sum = number(bs, "bs")?;
    }
    if let Some(bu) = map.get("bu") {
        text(bu, "bu")?;
    }
    if let Some(u) = map.get("u") {
        text(u, "u")?;
    }
    if let Some(ut) = map.get("ut") {
        number(ut, "ut")?;
    }

    let has_base = BASE_FIELDS.iter().any(|f| map.contains_key(*f));
    let has_regular = REGULAR_FIELDS.iter().any(|f| map.contains_key(*f));
    if has_base && !has_regular {
        return Ok(());
    }

    let present: Vec<(&str, &Json)> = VALUE_FIELDS
        .iter()
        .filter_map(|f| map.get(*f).map(|v| (*f, v)))
        .collect();
    if present.len() > 1 {
        let labels: Vec<&str> = present.iter().map(|(f, _)| *f).collect();
        return Err(shape(format!(
            "more than one value field ({})",
            labels.join(", ")
        )));
    }
    let out_of_range = || shape("value out of range");
    let value = match present.first().copied() {
        None => None,
        Some(("v", v)) => Some(number(v, "v")?.plus(base.value).ok_or_else(out_of_range)?),
        Some(("vb", v)) => Some(Value::Bool(
            v.as_bool()
                .ok_or_else(|| shape("\"vb\" must be true or false"))?,
        )),
        Some((label, v)) => Some(Value::Str(text(v, label)?.to_owned())),
    };
    let sum = match map.get("s") {
        None => None,
        Some(s) => Some(number(s, "s")?.plus(base.sum).ok_or_else(out_of_range)?),
    };

    let (value, sum) = match (value, sum) {
        (None, None) => return Err(shape("no value and no sum")),
        // A sum alone is keyed by the name itself.
        (None, Some(s)) => (s, None),
        (Some(v), s) => (v, s),
    };
    let name = match map.get("n") {
        Some(n) => format!("{}{}", base.name, text(n, "n")?),
        None => base.name.clone(),
    };
    check_name(&name)?;
    let t = match map.get("t") {
        Some(t) => number(t, "t")?.as_f64(),
        None => 0.0,
    };
    let ts = resolve_time(base.time_s + t, now)?;

    let Some(sum) = sum else {
        return packer.put(ts, name, value);
    };
    let sum_key = format!("{name}{SUM_SUFFIX}");
    if sum_key.len() > MAX_KEY_LEN {
        return Err(shape(format!(
            "sum key {:?} must be 1-{MAX_KEY_LEN} bytes",
            shown(&sum_key)
        )));
    }
    packer.put(ts, name, value)?;
    packer.put(ts, sum_key, sum)
}

fn text<'j>(j: &'j Json, label: &str) -> Result<&'j str, PayloadError> {
    j.as_str()
        .ok_or_else(|| shape(format!("{label:?} must be a string")))
}

fn number(j: &Json, label: &str) -> Result<Num, PayloadError> {
    Num::of(j).ok_or_else(|| shape(format!("{label:?} must be a number")))
}

/// RFC 8428 §4.5.1 and the key limits shared with ThingsBoard JSON.
fn check_name(name: &str) -> Result<(), PayloadError> {
    let Some(first) = name.chars().next() else {
        return Err(shape("name is empty (neither \"bn\" nor \"n\" gives one)"));
    };
    if name.len() > MAX_KEY_LEN {
        return Err(shape(format!(
            "name {:?} must be 1-{MAX_KEY_LEN} bytes",
            shown(name)
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_'))
    {
        return Err(shape(format!(
            "name {:?} has characters SenML forbids (allowed: A-Z a-z 0-9 - : . / _)",
            shown(name)
        )));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(shape(format!(
            "name {:?} must start with a letter or digit",
            shown(name)
        )));
    }
    Ok(())
}

/// A name short enough to quote in an error.
fn shown(name: &str) -> String {
    const MAX_CHARS: usize = 40;
    if name.chars().count() <= MAX_CHARS {
        name.to_owned()
    } else {
        format!("{}…", name.chars().take(MAX_CHARS).collect::<String>())
    }
}

/// Resolved seconds → (unix ms, trusted); relative times hang off the
/// gateway's clock and inherit its trust.
fn resolve_time(
    secs: f64,
    (now_ms, now_trusted): (i64, bool),
) -> Result<(i64, bool), PayloadError> {
    let (ms, trusted) = if secs < RELATIVE_BELOW_S {
        (now_ms as f64 + secs * 1000.0, now_trusted)
    } else {
        (secs * 1000.0, true)
    };
    let ms = ms.round();
    if !(0.0..=MAX_TS_MS).contains(&ms) {
        return Err(shape(format!("time {secs} s resolves outside 1970-9999")));
    }
    // Exact: `ms` is a whole number within ±2^53.
    Ok((ms as i64, trusted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// Stands in for a cargo-fuzz target: any bytes decode or say why.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes, &DeviceName::new("d"), 1, true);
        }

        /// JSON-shaped noise reaches the shape checks.
        #[test]
        fn json_shaped_noise_never_panics(s in r#"[\[\]{}:,"a-z0-9.\-_ ]{0,200}"#) {
            let _ = decode(s.as_bytes(), &DeviceName::new("d"), 1, true);
        }

        /// Noise made of SenML labels and values reaches the resolution rules.
        #[test]
        fn senml_shaped_noise_never_panics(
            entries in proptest::collection::vec(
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("bn"), Just("bt"), Just("bu"), Just("bv"), Just("bs"),
                            Just("bver"), Just("n"), Just("u"), Just("v"), Just("vs"),
                            Just("vb"), Just("vd"), Just("s"), Just("t"), Just("ut"),
                            Just("x_"), Just("x"),
                        ],
                        prop_oneof![
                            Just("10".to_owned()), Just("true".to_owned()),
                            Just("null".to_owned()), Just("\"a\"".to_owned()),
                            Just("\"\"".to_owned()), Just("1e308".to_owned()),
                            Just("-1e308".to_owned()), Just("9223372036854775807".to_owned()),
                            any::<i64>().prop_map(|i| i.to_string()),
                            any::<f64>().prop_filter("finite", |f| f.is_finite())
                                .prop_map(|f| format!("{f:e}")),
                            "[a-z:./_ -]{0,8}".prop_map(|s| format!("\"{s}\"")),
                        ],
                    ),
                    0..6,
                ),
                0..8,
            ),
            now_ms in any::<i64>(),
        ) {
            let body = format!(
                "[{}]",
                entries
                    .iter()
                    .map(|e| format!(
                        "{{{}}}",
                        e.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let _ = decode(body.as_bytes(), &DeviceName::new("d"), now_ms, true);
        }
    }

    const NOW_MS: i64 = 1_700_000_000_000;

    fn dec(s: &str) -> Result<Vec<Record>, PayloadError> {
        decode(s.as_bytes(), &DeviceName::new("d"), NOW_MS, true)
    }

    /// Records as (ts_ms, [(key, value)]) for compact expectations.
    fn flat(records: &[Record]) -> Vec<(i64, Vec<(&str, Value)>)> {
        records
            .iter()
            .map(|r| {
                (
                    r.ts_ms,
                    r.values
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    const URN: &str = "urn:dev:ow:10e2073a01080063";

    #[test]
    fn rfc8428_5_1_1_single_datapoint_is_stamped_now() {
        let r = dec(r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#).unwrap();
        assert_eq!(flat(&r), vec![(NOW_MS, vec![(URN, Value::F64(23.1))])]);
        assert!(r[0].ts_trusted);
        assert_eq!(r[0].device, DeviceName::new("d"));
    }

    #[test]
    fn rfc8428_5_1_2_multiple_datapoints_share_the_base_name() {
        let r = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
            {"n":"current","u":"A","v":1.2}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![(
                NOW_MS,
                vec![
                    ("urn:dev:ow:10e2073a01080063:voltage", Value::F64(120.1)),
                    ("urn:dev:ow:10e2073a01080063:current", Value::F64(1.2)),
                ]
            )]
        );
    }

    /// The RFC's second §5.1.2 example, with `"bver":5` (a leftover from the
    /// drafts) changed to the version RFC 8428 defines.
    #[test]
    fn rfc8428_5_1_2_datapoints_with_times_before_the_base_time() {
        let r = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
             "bu":"A","bver":10,"n":"voltage","u":"V","v":120.1},
            {"n":"current","t":-5,"v":1.2},
            {"n":"current","t":-4,"v":1.3},
            {"n":"current","t":-3,"v":1.4},
            {"n":"current","t":-2,"v":1.5},
            {"n":"current","t":-1,"v":1.6},
            {"n":"current","v":1.7}
        ]"#)
        .unwrap();
        let v = |s| "urn:dev:ow:10e2073a0108006:".to_owned() + s;
        let got: Vec<(i64, Vec<(String, Value)>)> =
            r.iter().map(|r| (r.ts_ms, r.values.clone())).collect();
        assert_eq!(
            got,
            vec![
                (
                    1_276_020_076_001,
                    vec![
                        (v("voltage"), Value::F64(120.1)),
                        (v("current"), Value::F64(1.7)),
                    ]
                ),
                (1_276_020_071_001, vec![(v("current"), Value::F64(1.2))]),
                (1_276_020_072_001, vec![(v("current"), Value::F64(1.3))]),
                (1_276_020_073_001, vec![(v("current"), Value::F64(1.4))]),
                (1_276_020_074_001, vec![(v("current"), Value::F64(1.5))]),
                (1_276_020_075_001, vec![(v("current"), Value::F64(1.6))]),
            ]
        );
        assert!(r.iter().all(|r| r.ts_trusted));
        let as_printed = dec(r#"[{"bn":"x:","bt":1.276020076001e+09,"bver":5,"n":"v","v":1}]"#);
        assert!(
            as_printed
                .unwrap_err()
                .to_string()
                .contains("entry 0: SenML version \"bver\" 5 is not supported (only 10)")
        );
    }

    /// Units are dropped, so the RFC's %RH/lon/lat readings (same name, same
    /// time, different unit) collapse onto one key and the last one wins.
    #[test]
    fn rfc8428_5_1_3_multiple_measurements_group_by_time_and_collapse_on_units() {
        let r = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},
            {"u":"lat","v":60.07965},
            {"t":60,"v":20.3},
            {"u":"lon","t":60,"v":24.30622},
            {"u":"lat","t":60,"v":60.07965},
            {"t":120,"v":20.7},
            {"u":"lon","t":120,"v":24.30623},
            {"u":"lat","t":120,"v":60.07966},
            {"u":"%EL","t":150,"v":98},
            {"t":180,"v":21.2},
            {"u":"lon","t":180,"v":24.30628},
            {"u":"lat","t":180,"v":60.07967}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![
                (1_320_067_464_000, vec![(URN, Value::F64(60.07965))]),
                (1_320_067_524_000, vec![(URN, Value::F64(60.07965))]),
                (1_320_067_584_000, vec![(URN, Value::F64(60.07966))]),
                (1_320_067_614_000, vec![(URN, Value::I64(98))]),
                (1_320_067_644_000, vec![(URN, Value::F64(60.07967))]),
            ]
        );
    }

    #[test]
    fn rfc8428_5_1_4_resolved_data_decodes_like_the_packed_form() {
        let resolved = dec(r#"[
            {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,"v":20},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,"v":24.30621},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,"v":60.07965},
            {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,"v":20.3},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,"v":24.30622},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,"v":60.07965},
            {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,"v":20.7},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,"v":24.30623},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,"v":60.07966},
            {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,"v":98},
            {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,"v":21.2},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,"v":24.30628},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,"v":60.07967}
        ]"#)
        .unwrap();
        let packed = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},{"u":"lat","v":60.07965},
            {"t":60,"v":20.3},{"u":"lon","t":60,"v":24.30622},{"u":"lat","t":60,"v":60.07965},
            {"t":120,"v":20.7},{"u":"lon","t":120,"v":24.30623},{"u":"lat","t":120,"v":60.07966},
            {"u":"%EL","t":150,"v":98},
            {"t":180,"v":21.2},{"u":"lon","t":180,"v":24.30628},{"u":"lat","t":180,"v":60.07967}
        ]"#)
        .unwrap();
        assert_eq!(resolved, packed);
        assert_eq!(resolved.len(), 5);
    }

    #[test]
    fn rfc8428_5_1_5_multiple_data_types_map_to_values() {
        let r = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
            {"n":"label","vs":"Machine Room"},
            {"n":"open","vb":false},
            {"n":"nfc-reader","vd":"aGkgCg"}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![(
                NOW_MS,
                vec![
                    ("urn:dev:ow:10e2073a01080063:temp", Value::F64(23.1)),
                    (
                        "urn:dev:ow:10e2073a01080063:label",
                        Value::Str("Machine Room".into())
                    ),
                    ("urn:dev:ow:10e2073a01080063:open", Value::Bool(false)),
                    (
                        "urn:dev:ow:10e2073a01080063:nfc-reader",
                        Value::Str("aGkgCg".into())
                    ),
                ]
            )]
        );
    }

    /// The last record uses the third record's base name and the first
    /// record's base time.
    #[test]
    fn rfc8428_5_1_6_collection_of_resources_carries_bases_forward() {
        let r = dec(r#"[
            {"bn":"2001:db8::2/","bt":1.320078429e+09,"n":"temperature","u":"Cel","v":25.2},
            {"n":"humidity","u":"%RH","v":30},
            {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
            {"n":"humidity","u":"%RH","v":67}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![(
                1_320_078_429_000,
                vec![
                    ("2001:db8::2/temperature", Value::F64(25.2)),
                    ("2001:db8::2/humidity", Value::I64(30)),
                    ("2001:db8::1/temperature", Value::F64(12.3)),
                    ("2001:db8::1/humidity", Value::I64(67)),
                ]
            )]
        );
        assert!(r[0].ts_trusted);
    }

    #[test]
    fn relative_times_hang_off_now_and_inherit_the_clocks_trust() {
        let d = DeviceName::new("d");
        let r = decode(
            br#"[{"n":"a","v":1},{"n":"b","t":-5,"v":2},{"n":"c","bt":10,"t":0.5,"v":3},
                 {"n":"d","t":1.7e9,"v":4}]"#,
            &d,
            NOW_MS,
            false,
        )
        .unwrap();
        let stamps: Vec<(i64, bool)> = r.iter().map(|r| (r.ts_ms, r.ts_trusted)).collect();
        assert_eq!(
            stamps,
            vec![
                (NOW_MS, false),
                (NOW_MS - 5_000, false),
                (NOW_MS + 10_500, false),
                // bt 10 + t 1.7e9 is absolute: the device's word.
                (1_700_000_010_000, true),
            ]
        );
        // Just below and at 2^28 seconds.
        let r = dec(r#"[{"n":"a","t":268435455,"v":1},{"n":"a","t":268435456,"v":1}]"#).unwrap();
        assert_eq!(r[0].ts_ms, NOW_MS + 268_435_455_000);
        assert_eq!((r[1].ts_ms, r[1].ts_trusted), (268_435_456_000, true));
    }

    #[test]
    fn same_time_records_group_and_a_later_duplicate_overwrites_in_place() {
        let r = dec(r#"[
            {"bn":"x:","bt":1.6e9,"n":"a","v":1},
            {"n":"b","v":2},
            {"n":"a","t":1,"v":3},
            {"n":"a","v":4}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![
                (
                    1_600_000_000_000,
                    vec![("x:a", Value::I64(4)), ("x:b", Value::I64(2))]
                ),
                (1_600_000_001_000, vec![("x:a", Value::I64(3))]),
            ]
        );
    }

    #[test]
    fn base_value_and_base_sum_add_and_keep_integers_exact() {
        let r = dec(r#"[
            {"bn":"m:","bv":100,"bs":1000,"n":"a","v":5},
            {"n":"b","v":0.5},
            {"n":"c","s":7},
            {"n":"d","v":1,"s":2},
            {"n":"e","vs":"bv does not touch text"},
            {"bv":9223372036854775807,"n":"f","v":1}
        ]"#)
        .unwrap();
        assert_eq!(
            flat(&r),
            vec![(
                NOW_MS,
                vec![
                    ("m:a", Value::I64(105)),
                    ("m:b", Value::F64(100.5)),
                    ("m:c", Value::I64(1007)),
                    ("m:d", Value::I64(101)),
                    ("m:d#sum", Value::I64(1002)),
                    ("m:e", Value::Str("bv does not touch text".into())),
                    ("m:f", Value::F64(9_223_372_036_854_775_808.0)),
                ]
            )]
        );
    }

    #[test]
    fn base_only_records_set_context_and_yield_no_reading() {
        // RFC 8428 §5.2's actuator example opens this way.
        let r = dec(r#"[
            {"bn":"urn:dev:ow:10e2073a01080063:"},
            {"n":"temp","u":"Cel","v":23.1},
            {"n":"heat","u":"/","v":1},
            {"n":"fan","u":"/","v":0}
        ]"#)
        .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].values.len(), 3);
        assert_eq!(dec("[]").unwrap(), vec![]);
    }

    #[test]
    fn unknown_fields_are_ignored_unless_they_must_be_understood() {
        let r = dec(r#"[{"n":"a","v":1,"ct":"60","extra":{"x":[1]}}]"#).unwrap();
        assert_eq!(flat(&r), vec![(NOW_MS, vec![("a", Value::I64(1))])]);
        let e = dec(r#"[{"n":"a","v":1},{"n":"a","v":1,"ct_":"60"}]"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("entry 1: field \"ct_\" must be understood"),
            "{e}"
        );
    }

    #[test]
    fn bad_packs_say_which_rule_they_broke() {
        let long = format!(r#"[{{"n":"{}","v":1}}]"#, "a".repeat(MAX_KEY_LEN + 1));
        let long_sum = format!(r#"[{{"n":"{}","v":1,"s":1}}]"#, "a".repeat(MAX_KEY_LEN));
        for (body, why) in [
            ("[", "not valid JSON"),
            (
                r#"{"n":"a","v":1}"#,
                "SenML must be a JSON array of records",
            ),
            ("[1]", "entry 0: expected a JSON object"),
            (
                r#"[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3},{"n":"a b","v":4}]"#,
                "entry 3: name \"a b\" has characters SenML forbids",
            ),
            (
                r#"[{"n":"-a","v":1}]"#,
                "entry 0: name \"-a\" must start with a letter or digit",
            ),
            (
                r#"[{"n":"é","v":1}]"#,
                "entry 0: name \"é\" has characters SenML forbids",
            ),
            (r#"[{"v":1}]"#, "entry 0: name is empty"),
            (r#"[{"bn":"","n":"","v":1}]"#, "entry 0: name is empty"),
            (&long, "entry 0: name \"aaaa"),
            (&long, "must be 1-256 bytes"),
            (&long_sum, "entry 0: sum key"),
            (
                r#"[{"n":"a","v":1,"vs":"x"}]"#,
                "entry 0: more than one value field (v, vs)",
            ),
            (
                r#"[{"n":"a","vb":true,"vd":"AA"}]"#,
                "entry 0: more than one value field (vb, vd)",
            ),
            (
                r#"[{"n":"a","v":1},{"n":"b","v":1},{"n":"c","u":"Cel"}]"#,
                "entry 2: no value and no sum",
            ),
            (r#"[{"n":"a","bs":5}]"#, "entry 0: no value and no sum"),
            (r#"[{}]"#, "entry 0: no value and no sum"),
            (
                r#"[{"bver":11,"n":"a","v":1}]"#,
                "entry 0: SenML version \"bver\" 11 is not supported",
            ),
            (
                r#"[{"bver":"10","n":"a","v":1}]"#,
                "is not supported (only 10)",
            ),
            (r#"[{"n":"a","v":"1"}]"#, "entry 0: \"v\" must be a number"),
            (r#"[{"n":"a","vs":1}]"#, "entry 0: \"vs\" must be a string"),
            (
                r#"[{"n":"a","vd":false}]"#,
                "entry 0: \"vd\" must be a string",
            ),
            (
                r#"[{"n":"a","vb":1}]"#,
                "entry 0: \"vb\" must be true or false",
            ),
            (r#"[{"n":"a","s":"1"}]"#, "entry 0: \"s\" must be a number"),
            (r#"[{"n":1,"v":1}]"#, "entry 0: \"n\" must be a string"),
            (
                r#"[{"bn":null,"n":"a","v":1}]"#,
                "entry 0: \"bn\" must be a string",
            ),
            (
                r#"[{"bt":"now","n":"a","v":1}]"#,
                "entry 0: \"bt\" must be a number",
            ),
            (
                r#"[{"n":"a","t":"now","v":1}]"#,
                "entry 0: \"t\" must be a number",
            ),
            (
                r#"[{"n":"a","u":5,"v":1}]"#,
                "entry 0: \"u\" must be a string",
            ),
            (
                r#"[{"n":"a","ut":"x","v":1}]"#,
                "entry 0: \"ut\" must be a number",
            ),
            (
                r#"[{"n":"a","bv":1e308,"v":1e308}]"#,
                "entry 0: value out of range",
            ),
            (
                r#"[{"n":"a","t":-1e10,"v":1}]"#,
                "entry 0: time -10000000000 s resolves outside 1970-9999",
            ),
            (
                r#"[{"n":"a","t":1e15,"v":1}]"#,
                "resolves outside 1970-9999",
            ),
            (
                r#"[{"n":"a","bt":1e308,"t":1e308,"v":1}]"#,
                "resolves outside 1970-9999",
            ),
        ] {
            let e = dec(body).unwrap_err().to_string();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn a_bad_entry_refuses_the_whole_pack() {
        assert!(dec(r#"[{"n":"a","v":1},{"n":"a b","v":2}]"#).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!(
            "[{{\"n\":\"a\",\"v\":1,\"x\":{}1{}}}]",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(dec(&deep).is_err());
    }

    #[test]
    fn too_many_entries_and_keys_are_refused() {
        let entries = |n: usize| {
            format!(
                "[{}]",
                (0..n)
                    .map(|i| format!(r#"{{"n":"k{i}","v":1,"s":1}}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        let e = dec(&entries(MAX_RECORDS + 1)).unwrap_err().to_string();
        assert!(e.contains("more than 1000 entries"), "{e}");
        // 501 entries with a value and a sum each: 1002 keys.
        let e = dec(&entries(MAX_KEYS / 2 + 1)).unwrap_err().to_string();
        assert!(e.contains("entry 500: more than 1000 keys"), "{e}");
        // Overwrites do not count twice.
        let same = format!("[{}]", vec![r#"{"n":"k","v":1}"#; MAX_RECORDS].join(","));
        assert_eq!(dec(&same).unwrap()[0].values.len(), 1);
    }
}
