//! Declarative telemetry rules (`[[rules]]`, issue 6 item 2): filter,
//! transform, route and aggregate readings between decode and the outbox.
//! A pure state machine: no I/O, no clock of its own; the caller feeds it
//! decoded records ([`Rules::apply`]) and wall time ([`Rules::tick`]) and
//! stores what comes out.
//!
//! ```
//! use sluice_agent::rules::{self, RawRule, Rules};
//! use sluice_cloud_sync::{DeviceName, OutboxConfig, Record, Value};
//!
//! let raw: Vec<RawRule> = toml::from_str::<std::collections::BTreeMap<String, Vec<RawRule>>>(r#"
//!     [[rules]]
//!     name = "temps"
//!     keys = "temp*"
//!     actions = [{ type = "range", min = -400, max = 850 }, { type = "scale", factor = 0.1 }]
//! "#).unwrap().remove("rules").unwrap();
//! let mut rules = Rules::new(rules::validate(&raw, &OutboxConfig::default().effective_streams()).unwrap());
//! let rec = Record {
//!     device: DeviceName::new("d1"), ts_ms: 0, ts_trusted: true,
//!     values: vec![("temp".into(), Value::I64(215)), ("temp2".into(), Value::I64(999))],
//! };
//! let applied = rules.apply("thermometer", vec![rec]);
//! assert_eq!(applied.out[0].1.values, vec![("temp".to_string(), Value::F64(21.5))]);
//! assert_eq!(applied.dropped[0].0, "temps");
//! ```
//!
//! # Semantics
//!
//! * **Matching.** A rule matches a record when `devices` (glob, `*` and `?`)
//!   matches the device name and `device_type`, if set, equals the device's
//!   type; it then takes each of the record's keys that `keys` matches. Each
//!   key is handled by the **first** rule that takes it (order rules from
//!   specific to general); keys no rule takes pass through unchanged to the
//!   [`DEFAULT_STREAM`], as do whole records no rule matches (moved, not
//!   copied). A rule with no actions passes its keys unchanged and shields them
//!   from later rules.
//! * **Actions** run in order on one reading (device, ts, key, value); a
//!   reading that survives them all goes to the rule's stream (its last
//!   `stream` action, else [`DEFAULT_STREAM`]). Readings of one record that
//!   end on the same stream stay in one record.
//! * **Numbers.** `range`, `deadband`, `scale` and `aggregate` act on `I64`
//!   and finite `F64` values only; any other value (bool, string, JSON, NaN,
//!   ±inf) passes them untouched. `scale` and aggregates yield `F64` (`count`:
//!   `I64`; `first`/`last`: the reading's own value). `clamp` keeps an `I64`
//!   an `I64` when the bound is a whole number.
//! * **Time.** Windows and intervals are aligned to the epoch on the record's
//!   `ts_ms` (`start = ts - ts mod window`), per device and key (the key as it
//!   is at that action, i.e. after any earlier `rename`). Wall time only
//!   enters through [`Rules::tick`].
//! * **`deadband`**: a reading passes when it differs from the last reading
//!   this action passed (per device and key) by more than `abs`, or by more
//!   than `pct` % of that value's magnitude (so any change passes after a 0);
//!   the first reading always passes.
//! * **`dedupe`**: a reading equal (same type and value) to the last one that
//!   passed is dropped while its ts is less than `window` after that one's ts;
//!   so a constant value still passes once per window, as a heartbeat.
//! * **`throttle`**: at most one reading per device, key and aligned interval
//!   passes. `keep = "first"`: the first to arrive passes at once, the rest are
//!   dropped. `keep = "last"`: readings are held, not passed; of an interval's
//!   readings the one with the greatest ts (the later arrival on a tie) is
//!   kept and passed with its own ts when the interval closes: when a reading
//!   of a later interval arrives, or when `tick(now)` sees `now >= interval
//!   end + grace`. Each replaced reading is dropped.
//! * **`aggregate`**: numeric readings feed a tumbling window per device and
//!   key; when it closes, one reading per function (`key_min`, `key_avg`, …,
//!   in the configured order) carries on through the remaining actions with
//!   ts = window end, trusted only if every contribution was. A window closes
//!   when a reading of a later window arrives for that device and key, or when
//!   `tick(now)` sees `now >= window end + grace`. A window without readings
//!   emits nothing. `avg` is sum / count, `stddev` the population standard
//!   deviation (0 for one reading), `first`/`last` the readings with the
//!   least/greatest ts (the earlier/later arrival on a tie). The raw reading is
//!   consumed unless `emit_raw = true`.
//! * **Late data.** One window (interval) per device and key is open at a
//!   time. A reading whose window is older than the open one, or not newer
//!   than the last closed one, is *late*: it is dropped and counted `late`
//!   (with `emit_raw = true` its raw value still passes on, but feeds no
//!   window). Out-of-order readings within the open window are fine.
//!
//! # Durability of open windows (DESIGN.md invariant 1)
//!
//! Everything a rule remembers lives in one entry per (rule, action, device,
//! key): a [`StateKey`] and a small postcard blob. A reading acked to a device
//! must have its contribution committed, so the integrator does, per batch,
//! in the same transaction as the records it appends:
//!
//! 1. `let applied = rules.apply(device_type, records);`
//! 2. append `applied.out` and upsert / delete each entry of
//!    `rules.take_dirty()` (the entries changed since the last call; `None`
//!    means delete), then commit, then ack.
//! 3. If the commit fails, the engine is ahead of the disk: rebuild it from
//!    the stored entries ([`Rules::with_state`]) before the devices retry.
//!
//! ([`Rules::drain_dirty`] hands out the same entries borrowed, allocating
//! nothing per entry.) [`Rules::tick`] output is committed the same way. At
//! start-up the stored entries are loaded into [`Rules::with_state`] (or
//! [`Rules::restore`] one by one); a config reload keeps what still fits
//! with `Rules::with_state(new, &old.state())`. A crash therefore loses nothing that was acked, and re-emits
//! nothing that was committed. After a config change an entry whose rule or
//! action index no longer exists, or whose action changed kind, interval or
//! window, is refused with a [`StateError`] and should be deleted; the
//! counters ([`Rules::counters`]) are process metrics and are not stored.
//!
//! Entries are never evicted today: memory and stored state grow with the
//! number of (device, key) pairs that stateful actions have seen.

use crate::config::{DurationValue, parse_duration};
use crate::tbjson::MAX_KEY_LEN;
use serde::{Deserialize, Serialize};
use sluice_cloud_sync::{DeviceName, Record, StreamConfig, Value};
use std::collections::HashMap;
use std::fmt;

#[cfg(test)]
mod tests;

/// The stream of readings that no rule routes elsewhere.
pub const DEFAULT_STREAM: &str = "telemetry";

/// Most rules in a configuration.
pub const MAX_RULES: usize = 1000;
/// Most actions in one rule.
pub const MAX_ACTIONS: usize = 32;
/// Longest window, interval or grace (30 days).
const MAX_SPAN_MS: i64 = 30 * 86_400_000;
/// Grace after a window's end before `tick` closes it, when not configured.
const DEFAULT_GRACE_MS: i64 = 2_000;

// ---------------------------------------------------------------------------
// Configuration

/// `[[rules]]`, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Unique name (counters, state, `sluice tail --dropped`). Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Device name glob; default `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
    /// Device type (registry profile) that must match exactly; default any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Key glob; default `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<String>,
    /// Actions, in order.
    #[serde(default)]
    pub actions: Vec<RawAction>,
}

/// One action of a `[[rules]]` entry, as written: `type` and the fields that
/// type takes (any other field is refused by [`validate`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// `drop`, `range`, `deadband`, `dedupe`, `throttle`, `scale`, `rename`,
    /// `stream` or `aggregate`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `range`: lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// `range`: upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `range`: `drop` (default) or `clamp` out-of-range readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `deadband`: absolute band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abs: Option<f64>,
    /// `deadband`: band in percent of the last passed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pct: Option<f64>,
    /// `dedupe`, `aggregate`: window length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationValue>,
    /// `throttle`: interval length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<DurationValue>,
    /// `throttle`: `first` (default) or `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    /// `aggregate`, `throttle` with `keep = "last"`: wall time past a window's
    /// end before `tick` closes it; default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<DurationValue>,
    /// `scale`: multiplier (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `scale`: added after the multiplication (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
    /// `rename`: the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `stream`: the outbox stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `aggregate`: functions to emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// `aggregate`: also pass the raw readings on (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_raw: Option<bool>,
}

/// A `[[rules]]` problem, naming the key: `rules[0].actions[2].max: …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct RuleConfigError {
    /// The key, with indexes: `rules[1].actions[0].window`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(key: impl Into<String>, problem: impl Into<String>) -> RuleConfigError {
    RuleConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A name or key pattern: `*` matches any run of characters, `?` one
/// character; everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    kind: GlobKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobKind {
    Any,
    Exact,
    /// `abc*`: the text before the star.
    Prefix(String),
    /// `*abc`: the text after the star.
    Suffix(String),
    Pattern(Vec<char>),
}

impl Glob {
    /// Parses a pattern.
    ///
    /// Fails when it is empty, longer than 256 bytes, or uses `[`, `]`, `{`,
    /// `}` or `\`, which are reserved for richer patterns later.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 256 {
            return Err(format!("{text:?} must be a pattern of 1-256 bytes"));
        }
        if let Some(c) = text
            .chars()
            .find(|c| matches!(c, '[' | ']' | '{' | '}' | '\\'))
        {
            return Err(format!(
                "{text:?}: {c:?} is reserved (only * and ? are wildcards)"
            ));
        }
        let kind = if text.chars().all(|c| c == '*') {
            GlobKind::Any
        } else if !text.contains(['*', '?']) {
            GlobKind::Exact
        } else if let Some(p) = text.strip_suffix('*')
            && !p.contains(['*', '?'])
        {
            GlobKind::Prefix(p.to_owned())
        } else if let Some(p) = text.strip_prefix('*')
            && !p.contains(['*', '?'])
        {
            GlobKind::Suffix(p.to_owned())
        } else {
            GlobKind::Pattern(text.chars().collect())
        };
        Ok(Self {
            text: text.to_owned(),
            kind,
        })
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        match &self.kind {
            GlobKind::Any => true,
            GlobKind::Exact => self.text == s,
            GlobKind::Prefix(p) => s.starts_with(p.as_str()),
            GlobKind::Suffix(p) => s.ends_with(p.as_str()),
            GlobKind::Pattern(p) if s.is_ascii() => wildcard(p, s.as_bytes()),
            GlobKind::Pattern(p) => wildcard(p, &s.chars().collect::<Vec<char>>()),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Iterative `*`/`?` matching with one backtrack point: linear in practice,
/// O(pattern × subject) at worst.
fn wildcard<T: Copy>(p: &[char], s: &[T]) -> bool
where
    char: From<T>,
{
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let c = char::from(s[si]);
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&pc) if pc == '?' || pc == c => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    star = Some((sp, ss + 1));
                    pi = sp + 1;
                    si = ss + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleConfig {
    /// Unique name.
    pub name: String,
    /// Device name pattern.
    pub devices: Glob,
    /// Device type that must match, if any.
    pub device_type: Option<String>,
    /// Key pattern.
    pub keys: Glob,
    /// Actions, in order.
    pub actions: Vec<Action>,
}

/// What `range` does with a reading outside its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfRange {
    /// Drop it.
    Drop,
    /// Replace it by the bound it crossed.
    Clamp,
}

/// A deadband's width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Band {
    /// Absolute difference.
    Abs(f64),
    /// Percent of the last passed value's magnitude.
    Pct(f64),
}

/// Which reading of a throttle interval passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The first to arrive, at once.
    First,
    /// The one with the greatest ts, when the interval closes.
    Last,
}

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    /// Least value.
    Min,
    /// Greatest value.
    Max,
    /// Sum / count.
    Avg,
    /// Sum.
    Sum,
    /// Number of readings.
    Count,
    /// Reading with the least ts.
    First,
    /// Reading with the greatest ts.
    Last,
    /// Population standard deviation.
    Stddev,
}

impl AggFn {
    const ALL: [(&'static str, AggFn); 8] = [
        ("min", AggFn::Min),
        ("max", AggFn::Max),
        ("avg", AggFn::Avg),
        ("sum", AggFn::Sum),
        ("count", AggFn::Count),
        ("first", AggFn::First),
        ("last", AggFn::Last),
        ("stddev", AggFn::Stddev),
    ];

    /// The function's name, also the suffix of its output key (`temp_avg`).
    pub fn as_str(self) -> &'static str {
        match self {
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Avg => "avg",
            AggFn::Sum => "sum",
            AggFn::Count => "count",
            AggFn::First => "first",
            AggFn::Last => "last",
            AggFn::Stddev => "stddev",
        }
    }
}

/// A validated action (see the module docs for the semantics).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Drop the reading.
    Drop,
    /// Keep numbers within `[min, max]`.
    Range {
        /// Lower bound, if any.
        min: Option<f64>,
        /// Upper bound, if any.
        max: Option<f64>,
        /// What happens outside.
        outside: OutOfRange,
    },
    /// Pass a number only when it moved beyond the band.
    Deadband(Band),
    /// Drop repeats of the last passed value within a window.
    Dedupe {
        /// Window, ms.
        window_ms: i64,
    },
    /// At most one reading per aligned interval.
    Throttle {
        /// Interval, ms.
        interval_ms: i64,
        /// Which reading passes.
        keep: Keep,
        /// `keep = last`: wall time past the end before `tick` closes it, ms.
        grace_ms: i64,
    },
    /// `value * factor + offset`.
    Scale {
        /// Multiplier.
        factor: f64,
        /// Added after.
        offset: f64,
    },
    /// Change the key.
    Rename {
        /// The new key.
        to: String,
    },
    /// Route to an outbox stream.
    Stream {
        /// The stream.
        name: String,
    },
    /// Tumbling-window aggregates.
    Aggregate {
        /// Window, ms.
        window_ms: i64,
        /// Functions, in output order.
        functions: Vec<AggFn>,
        /// Also pass the raw readings on.
        emit_raw: bool,
        /// Wall time past the end before `tick` closes a window, ms.
        grace_ms: i64,
    },
}

const TYPES: &str = "drop, range, deadband, dedupe, throttle, scale, rename, stream, aggregate";

/// Validates `[[rules]]` against the outbox's streams (built-in and
/// configured: [`sluice_cloud_sync::OutboxConfig::effective_streams`]).
///
/// Fails on the first problem, naming its key: a missing or duplicate name,
/// a bad glob, an unknown action type, a field the type does not take, a
/// missing or bad field (min > max, a zero window, an unknown function, an
/// unknown stream…).
pub fn validate(
    raw: &[RawRule],
    streams: &[StreamConfig],
) -> Result<Vec<RuleConfig>, RuleConfigError> {
    if raw.len() > MAX_RULES {
        return Err(bad("rules", format!("more than {MAX_RULES} rules")));
    }
    let mut out: Vec<RuleConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("rules[{i}].{field}");
        let name = r
            .name
            .clone()
            .ok_or_else(|| bad(at("name"), "is required"))?;
        if !valid_ident(&name) {
            return Err(bad(
                at("name"),
                format!("{name:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        if let Some(j) = out.iter().position(|o| o.name == name) {
            return Err(bad(
                at("name"),
                format!("{name:?} is already the name of rules[{j}]"),
            ));
        }
        let devices =
            Glob::new(r.devices.as_deref().unwrap_or("*")).map_err(|e| bad(at("devices"), e))?;
        let keys = Glob::new(r.keys.as_deref().unwrap_or("*")).map_err(|e| bad(at("keys"), e))?;
        if let Some(t) = &r.device_type
            && !valid_ident(t)
        {
            return Err(bad(
                at("device_type"),
                format!("{t:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        if r.actions.len() > MAX_ACTIONS {
            return Err(bad(
                at("actions"),
                format!("more than {MAX_ACTIONS} actions"),
            ));
        }
        let mut actions = Vec::with_capacity(r.actions.len());
        for (j, a) in r.actions.iter().enumerate() {
            let key = format!("rules[{i}].actions[{j}]");
            if actions.last() == Some(&Action::Drop) {
                return Err(bad(key, "follows a drop action, so it would never run"));
            }
            actions.push(validate_action(a, &key, streams)?);
        }
        out.push(RuleConfig {
            name,
            devices,
            device_type: r.device_type.clone(),
            keys,
            actions,
        });
    }
    Ok(out)
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RawAction {
    fn present_fields(&self) -> [(&'static str, bool); 16] {
        [
            ("min", self.min.is_some()),
            ("max", self.max.is_some()),
            ("action", self.action.is_some()),
            ("abs", self.abs.is_some()),
            ("pct", self.pct.is_some()),
            ("window", self.window.is_some()),
            ("interval", self.interval.is_some()),
            ("keep", self.keep.is_some()),
            ("grace", self.grace.is_some()),
            ("factor", self.factor.is_some()),
            ("offset", self.offset.is_some()),
            ("to", self.to.is_some()),
            ("name", self.name.is_some()),
            ("functions", self.functions.is_some()),
            ("emit_raw", self.emit_raw.is_some()),
            ("type", self.kind.is_some()),
        ]
    }
}

fn validate_action(
    a: &RawAction,
    key: &str,
    streams: &[StreamConfig],
) -> Result<Action, RuleConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let kind = a
        .kind
        .as_deref()
        .ok_or_else(|| bad(at("type"), format!("is required: one of {TYPES}")))?;
    let takes: &[&str] = match kind {
        "drop" => &[],
        "range" => &["min", "max", "action"],
        "deadband" => &["abs", "pct"],
        "dedupe" => &["window"],
        "throttle" => &["interval", "keep", "grace"],
        "scale" => &["factor", "offset"],
        "rename" => &["to"],
        "stream" => &["name"],
        "aggregate" => &["window", "functions", "emit_raw", "grace"],
        other => {
            return Err(bad(
                at("type"),
                format!("{other:?} is not an action type: one of {TYPES}"),
            ));
        }
    };
    for (field, present) in a.present_fields() {
        if present && field != "type" && !takes.contains(&field) {
            let takes = if takes.is_empty() {
                "no other fields".to_owned()
            } else {
                takes.join(", ")
            };
            return Err(bad(
                at(field),
                format!("is not a field of type {kind:?} (it takes {takes})"),
            ));
        }
    }
    let number = |field: &str, v: Option<f64>| -> Result<Option<f64>, RuleConfigError> {
        match v {
            Some(x) if !x.is_finite() => Err(bad(at(field), format!("{x} is not a finite number"))),
            v => Ok(v),
        }
    };
    let span = |field: &str, v: &Option<DurationValue>| -> Result<Option<i64>, RuleConfigError> {
        let Some(v) = v else { return Ok(None) };
        parse_duration(v)
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .filter(|ms| *ms <= MAX_SPAN_MS)
            .map(Some)
            .ok_or_else(|| {
                bad(
                    at(field),
                    format!("{v} is not a duration like \"10s\" (at most 30d)"),
                )
            })
    };
    let positive_span = |field: &str, v: &Option<DurationValue>| -> Result<i64, RuleConfigError> {
        match span(field, v)? {
            None => Err(bad(at(field), "is required (a duration like \"10s\")")),
            Some(0) => Err(bad(at(field), "must be longer than 0")),
            Some(ms) => Ok(ms),
        }
    };
    Ok(match kind {
        "drop" => Action::Drop,
        "range" => {
            let min = number("min", a.min)?;
            let max = number("max", a.max)?;
            if min.is_none() && max.is_none() {
                return Err(bad(at("min"), "range needs min, max or both"));
            }
            if let (Some(lo), Some(hi)) = (min, max)
                && lo > hi
            {
                return Err(bad(at("min"), format!("{lo} is greater than max {hi}")));
            }
            let outside = match a.action.as_deref() {
                None | Some("drop") => OutOfRange::Drop,
                Some("clamp") => OutOfRange::Clamp,
                Some(other) => {
                    return Err(bad(
                        at("action"),
                        format!("{other:?} is not \"drop\" or \"clamp\""),
                    ));
                }
            };
            Action::Range { min, max, outside }
        }
        "deadband" => match (number("abs", a.abs)?, number("pct", a.pct)?) {
            (Some(x), None) if x > 0.0 => Action::Deadband(Band::Abs(x)),
            (None, Some(x)) if x > 0.0 => Action::Deadband(Band::Pct(x)),
            (Some(x), None) => return Err(bad(at("abs"), format!("{x} must be > 0"))),
            (None, Some(x)) => return Err(bad(at("pct"), format!("{x} must be > 0"))),
            _ => return Err(bad(at("abs"), "deadband takes exactly one of abs and pct")),
        },
        "dedupe" => Action::Dedupe {
            window_ms: positive_span("window", &a.window)?,
        },
        "throttle" => {
            let keep = match a.keep.as_deref() {
                None | Some("first") => Keep::First,
                Some("last") => Keep::Last,
                Some(other) => {
                    return Err(bad(
                        at("keep"),
                        format!("{other:?} is not \"first\" or \"last\""),
                    ));
                }
            };
            if keep == Keep::First && a.grace.is_some() {
                return Err(bad(at("grace"), "applies only to keep = \"last\""));
            }
            Action::Throttle {
                interval_ms: positive_span("interval", &a.interval)?,
                keep,
                grace_ms: span("grace", &a.grace)?.unwrap_or(DEFAULT_GRACE_MS),
            }
        }
        "scale" => {
            if a.factor.is_none() && a.offset.is_none() {
                return Err(bad(at("factor"), "scale needs factor, offset or both"));
            }
            Action::Scale {
                factor: number("factor", a.factor)?.unwrap_or(1.0),
                offset: number("offset", a.offset)?.unwrap_or(0.0),
            }
        }
        "rename" => {
            let to =
                a.to.clone()
                    .ok_or_else(|| bad(at("to"), "is required (the new key)"))?;
            if to.is_empty() || to.len() > MAX_KEY_LEN {
                return Err(bad(
                    at("to"),
                    format!("{to:?} must be a key of 1-{MAX_KEY_LEN} bytes"),
                ));
            }
            Action::Rename { to }
        }
        "stream" => {
            let name = a
                .name
                .clone()
                .ok_or_else(|| bad(at("name"), "is required (an outbox stream)"))?;
            if !streams.iter().any(|s| s.name == name) {
                let known: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
                return Err(bad(
                    at("name"),
                    format!(
                        "{name:?} is not an outbox stream (built in or [[outbox.streams]]: {})",
                        known.join(", ")
                    ),
                ));
            }
            Action::Stream { name }
        }
        "aggregate" => {
            let window_ms = positive_span("window", &a.window)?;
            let names = a.functions.as_ref().ok_or_else(|| {
                bad(
                    at("functions"),
                    "is required, e.g. [\"min\", \"max\", \"avg\"]",
                )
            })?;
            if names.is_empty() {
                return Err(bad(at("functions"), "must name at least one function"));
            }
            let mut functions = Vec::with_capacity(names.len());
            for n in names {
                let f = AggFn::ALL
                    .iter()
                    .find(|(s, _)| s == n)
                    .map(|(_, f)| *f)
                    .ok_or_else(|| {
                        bad(
                            at("functions"),
                            format!(
                                "{n:?} is not a function: min, max, avg, sum, count, first, last, stddev"
                            ),
                        )
                    })?;
                if functions.contains(&f) {
                    return Err(bad(at("functions"), format!("{n:?} is listed twice")));
                }
                functions.push(f);
            }
            Action::Aggregate {
                window_ms,
                functions,
                emit_raw: a.emit_raw.unwrap_or(false),
                grace_ms: span("grace", &a.grace)?.unwrap_or(DEFAULT_GRACE_MS),
            }
        }
        // `takes` above already refused every other type.
        _ => return Err(bad(at("type"), format!("{kind:?} is not an action type"))),
    })
}

// ---------------------------------------------------------------------------
// Engine

/// What [`Rules::apply`] made of a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// Records to append, with their outbox stream.
    pub out: Vec<(String, Record)>,
    /// Readings that rules dropped (as they were when dropped), with the
    /// dropping rule's name: for `sluice tail --dropped`.
    pub dropped: Vec<(String, Record)>,
}

/// One rule's counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleCounters {
    /// The rule.
    pub rule: String,
    /// Readings the rule took.
    pub matched: u64,
    /// Readings it dropped (late ones included).
    pub dropped: u64,
    /// Readings that came too late for their window or interval.
    pub late: u64,
    /// Readings consumed by an aggregate window (they come out as aggregates).
    pub absorbed: u64,
    /// Readings it sent to a stream, aggregates included.
    pub emitted: u64,
}

/// Where one entry of a rule's state belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateKey {
    /// The rule's name.
    pub rule: String,
    /// The action's index within the rule.
    pub action: u32,
    /// The device.
    pub device: String,
    /// The key, as it is at that action.
    pub key: String,
}

/// A [`StateKey`], borrowed: what [`Rules::drain_dirty`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateKeyRef<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// The action's index within the rule.
    pub action: u32,
    /// The device.
    pub device: &'a str,
    /// The key, as it is at that action.
    pub key: &'a str,
}

/// An entry's stored form: a version byte, then postcard.
pub type StateBytes = Vec<u8>;

/// Every entry of the engine's state: what must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// Entries, sorted by key.
    pub entries: Vec<(StateKey, StateBytes)>,
}

/// Why a stored state entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No rule of that name is configured.
    #[error("state for rule {0:?}, which is not configured")]
    UnknownRule(String),
    /// The rule has no stateful action at that index.
    #[error("state for action {action} of rule {rule:?}, which keeps no state there")]
    NoSuchAction {
        /// The rule.
        rule: String,
        /// The action index.
        action: u32,
    },
    /// The bytes do not decode.
    #[error("state of rule {rule:?} action {action} is damaged: {reason}")]
    Damaged {
        /// The rule.
        rule: String,
        /// The action index.
        action: u32,
        /// What is wrong.
        reason: String,
    },
    /// The entry was written for a differently configured action.
    #[error("state of rule {rule:?} action {action} was written for another configuration")]
    Mismatch {
        /// The rule.
        rule: String,
        /// The action index.
        action: u32,
    },
}

const STATE_VERSION: u8 = 1;

/// One (device, key)'s memory at one action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum KeyState {
    Deadband {
        last: f64,
    },
    Dedupe {
        value: Value,
        since_ms: i64,
    },
    ThrottleFirst {
        start_ms: i64,
    },
    ThrottleLast {
        pending: Option<Held>,
        closed_start_ms: Option<i64>,
    },
    Aggregate {
        open: Option<Window>,
        closed_start_ms: Option<i64>,
    },
}

/// A throttled reading waiting for its interval to close.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Held {
    start_ms: i64,
    end_ms: i64,
    ts_ms: i64,
    ts_trusted: bool,
    value: Value,
}

/// An open aggregate window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    start_ms: i64,
    end_ms: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// Welford's running mean and sum of squared deviations.
    mean: f64,
    m2: f64,
    first_ts_ms: i64,
    first: Value,
    last_ts_ms: i64,
    last: Value,
    trusted: bool,
}

impl Window {
    fn new(start_ms: i64, end_ms: i64, x: f64, r: &Reading) -> Self {
        Self {
            start_ms,
            end_ms,
            count: 1,
            sum: x,
            min: x,
            max: x,
            mean: x,
            m2: 0.0,
            first_ts_ms: r.ts_ms,
            first: r.value.clone(),
            last_ts_ms: r.ts_ms,
            last: r.value.clone(),
            trusted: r.ts_trusted,
        }
    }

    fn add(&mut self, x: f64, r: &Reading) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
        if r.ts_ms < self.first_ts_ms {
            self.first_ts_ms = r.ts_ms;
            self.first = r.value.clone();
        }
        if r.ts_ms >= self.last_ts_ms {
            self.last_ts_ms = r.ts_ms;
            self.last = r.value.clone();
        }
        self.trusted &= r.ts_trusted;
    }

    fn outputs(self, key: &str, functions: &[AggFn]) -> Vec<Reading> {
        let n = self.count as f64;
        functions
            .iter()
            .map(|f| Reading {
                key: format!("{key}_{}", f.as_str()),
                value: match f {
                    AggFn::Min => Value::F64(self.min),
                    AggFn::Max => Value::F64(self.max),
                    AggFn::Avg => Value::F64(self.sum / n),
                    AggFn::Sum => Value::F64(self.sum),
                    AggFn::Count => Value::I64(i64::try_from(self.count).unwrap_or(i64::MAX)),
                    AggFn::First => self.first.clone(),
                    AggFn::Last => self.last.clone(),
                    AggFn::Stddev => Value::F64((self.m2 / n).max(0.0).sqrt()),
                },
                ts_ms: self.end_ms,
                ts_trusted: self.trusted,
            })
            .collect()
    }
}

fn encode_state(s: &KeyState) -> StateBytes {
    let mut out = Vec::new();
    encode_state_into(s, &mut out);
    out
}

/// Replaces `buf`'s contents by the entry's stored form.
fn encode_state_into(s: &KeyState, buf: &mut Vec<u8>) {
    let mut b = std::mem::take(buf);
    b.clear();
    b.push(STATE_VERSION);
    // Postcard fails only on types it cannot express (maps of unknown
    // length, `deserialize_any` shapes); KeyState has none, so this is an
    // invariant.
    #[allow(clippy::expect_used)]
    let b = postcard::to_extend(s, b).expect("KeyState is postcard-encodable");
    *buf = b;
}

#[derive(Debug)]
struct Slot {
    /// `device NUL key`.
    id: String,
    state: Option<KeyState>,
    dirty: bool,
}

/// The state of one stateful action, per device and key. Entries are keyed
/// by `device NUL key` (registry names never hold a NUL, so the first NUL
/// splits them): a lookup hashes one string built in a reused buffer, and
/// the index holds positions, so a hit costs one lookup and marking an entry
/// dirty allocates nothing.
#[derive(Debug, Default)]
struct KeyMap {
    index: HashMap<String, usize>,
    slots: Vec<Slot>,
    /// Positions of the entries changed since the last `take_dirty`, each once.
    dirty: Vec<usize>,
    /// No window or interval is due before this (may be early, never late).
    next_due_ms: i64,
    scratch: String,
}

fn entry_id(device: &str, key: &str) -> String {
    let mut id = String::with_capacity(device.len() + 1 + key.len());
    id.push_str(device);
    id.push('\0');
    id.push_str(key);
    id
}

fn split_id(id: &str) -> (&str, &str) {
    id.split_once('\0').unwrap_or((id, ""))
}

impl KeyMap {
    fn new() -> Self {
        Self {
            next_due_ms: i64::MAX,
            ..Self::default()
        }
    }

    fn position(&mut self, id: &str) -> usize {
        match self.index.get(id) {
            Some(&i) => i,
            None => {
                let i = self.slots.len();
                self.slots.push(Slot {
                    id: id.to_owned(),
                    state: None,
                    dirty: false,
                });
                self.index.insert(id.to_owned(), i);
                i
            }
        }
    }

    fn slot(&mut self, device: &str, key: &str) -> Entry<'_> {
        let mut id = std::mem::take(&mut self.scratch);
        id.clear();
        id.push_str(device);
        id.push('\0');
        id.push_str(key);
        let at = self.position(&id);
        self.scratch = id;
        Entry {
            slot: &mut self.slots[at],
            dirty: &mut self.dirty,
            next_due_ms: &mut self.next_due_ms,
            at,
        }
    }
}

struct Entry<'a> {
    slot: &'a mut Slot,
    dirty: &'a mut Vec<usize>,
    next_due_ms: &'a mut i64,
    at: usize,
}

impl Entry<'_> {
    fn set(&mut self, s: KeyState) {
        self.slot.state = Some(s);
        mark(self.slot, self.dirty, self.at);
    }

    fn due(&mut self, deadline_ms: i64) {
        *self.next_due_ms = (*self.next_due_ms).min(deadline_ms);
    }
}

fn mark(slot: &mut Slot, dirty: &mut Vec<usize>, at: usize) {
    if !slot.dirty {
        slot.dirty = true;
        dirty.push(at);
    }
}

/// One value on its way through a rule.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    key: String,
    value: Value,
    ts_ms: i64,
    ts_trusted: bool,
}

/// What one action did with a reading.
enum Fate {
    Continue(Reading),
    Drop(Reading),
    /// Consumed: by an aggregate window, or held by `throttle keep = last`.
    Taken,
}

struct Step {
    /// Readings released by this action (a closed window's aggregates, a
    /// held reading), to run through the actions after it first.
    released: Vec<Reading>,
    /// A reading this action discarded in favour of the current one.
    replaced: Option<Reading>,
    fate: Fate,
    late: bool,
    absorbed: bool,
}

impl Step {
    fn fate(fate: Fate) -> Self {
        Self {
            released: Vec::new(),
            replaced: None,
            fate,
            late: false,
            absorbed: false,
        }
    }
}

/// Collects output records, merging readings of the same device, ts and
/// stream into one record when they come out together.
#[derive(Default)]
struct Sink {
    out: Vec<(String, Record)>,
    dropped: Vec<(String, Record)>,
    out_from: usize,
    dropped_from: usize,
}

/// How far back a reading looks for a record to join.
const MERGE_LOOKBACK: usize = 8;

impl Sink {
    fn group(&mut self) {
        self.out_from = self.out.len();
        self.dropped_from = self.dropped.len();
    }

    fn emit(&mut self, stream: &str, device: &DeviceName, r: Reading) {
        push_merged(&mut self.out, self.out_from, stream, device, r);
    }

    fn drop(&mut self, rule: &str, device: &DeviceName, r: Reading) {
        push_merged(&mut self.dropped, self.dropped_from, rule, device, r);
    }
}

fn push_merged(
    list: &mut Vec<(String, Record)>,
    from: usize,
    label: &str,
    device: &DeviceName,
    r: Reading,
) {
    let lo = from.max(list.len().saturating_sub(MERGE_LOOKBACK));
    let same = list[lo..].iter_mut().rev().find(|(l, rec)| {
        rec.ts_ms == r.ts_ms
            && rec.ts_trusted == r.ts_trusted
            && l == label
            && rec.device == *device
    });
    match same {
        Some((_, rec)) => rec.values.push((r.key, r.value)),
        None => {
            let mut values = Vec::with_capacity(4);
            values.push((r.key, r.value));
            list.push((
                label.to_owned(),
                Record {
                    device: device.clone(),
                    ts_ms: r.ts_ms,
                    ts_trusted: r.ts_trusted,
                    values,
                },
            ));
        }
    }
}

fn numeric(v: &Value) -> Option<f64> {
    match v {
        Value::I64(i) => Some(*i as f64),
        Value::F64(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

/// The start and end of the aligned span of `len_ms` holding `ts_ms`.
fn span_of(ts_ms: i64, len_ms: i64) -> (i64, i64) {
    let start = ts_ms - ts_ms.rem_euclid(len_ms);
    (start, start.saturating_add(len_ms))
}

fn clamp_to(v: &Value, bound: f64) -> Value {
    match v {
        Value::I64(_) if bound.fract() == 0.0 && bound.abs() < 9.2e18 => Value::I64(bound as i64),
        _ => Value::F64(bound),
    }
}

#[derive(Debug, Default, Clone)]
struct Counts {
    matched: u64,
    dropped: u64,
    late: u64,
    absorbed: u64,
    emitted: u64,
}

/// A rule with its state.
#[derive(Debug)]
struct Compiled {
    cfg: RuleConfig,
    /// Where its surviving readings go.
    stream: String,
    /// Per action: its state, for the stateful ones.
    states: Vec<Option<KeyMap>>,
    counts: Counts,
}

impl Compiled {
    fn new(cfg: RuleConfig) -> Self {
        let stream = cfg
            .actions
            .iter()
            .rev()
            .find_map(|a| match a {
                Action::Stream { name } => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_else(|| DEFAULT_STREAM.to_owned());
        let states = cfg
            .actions
            .iter()
            .map(|a| match a {
                Action::Deadband(_)
                | Action::Dedupe { .. }
                | Action::Throttle { .. }
                | Action::Aggregate { .. } => Some(KeyMap::new()),
                _ => None,
            })
            .collect();
        Self {
            cfg,
            stream,
            states,
            counts: Counts::default(),
        }
    }

    fn takes(&self, device: &DeviceName, device_type: &str) -> bool {
        self.cfg
            .device_type
            .as_deref()
            .is_none_or(|t| t == device_type)
            && self.cfg.devices.matches(device.as_str())
    }

    /// Runs `r` through actions `from..`.
    fn run(&mut self, from: usize, device: &DeviceName, mut r: Reading, sink: &mut Sink) {
        for j in from..self.cfg.actions.len() {
            let step = self.step(j, device, r);
            for rel in step.released {
                self.run(j + 1, device, rel, sink);
            }
            if let Some(old) = step.replaced {
                self.counts.dropped += 1;
                sink.drop(&self.cfg.name, device, old);
            }
            self.counts.late += u64::from(step.late);
            self.counts.absorbed += u64::from(step.absorbed);
            r = match step.fate {
                Fate::Continue(r) => r,
                Fate::Drop(r) => {
                    self.counts.dropped += 1;
                    sink.drop(&self.cfg.name, device, r);
                    return;
                }
                Fate::Taken => return,
            };
        }
        self.counts.emitted += 1;
        sink.emit(&self.stream, device, r);
    }

    fn step(&mut self, j: usize, device: &DeviceName, mut r: Reading) -> Step {
        let action = &self.cfg.actions[j];
        let map = self.states[j].as_mut();
        let fate = match (action, map) {
            (Action::Drop, _) => Fate::Drop(r),
            (Action::Range { min, max, outside }, _) => match numeric(&r.value) {
                None => Fate::Continue(r),
                Some(x) => {
                    let lo = min.unwrap_or(f64::NEG_INFINITY);
                    let hi = max.unwrap_or(f64::INFINITY);
                    if (lo..=hi).contains(&x) {
                        Fate::Continue(r)
                    } else if *outside == OutOfRange::Clamp {
                        r.value = clamp_to(&r.value, if x < lo { lo } else { hi });
                        Fate::Continue(r)
                    } else {
                        Fate::Drop(r)
                    }
                }
            },
            (Action::Scale { factor, offset }, _) => {
                if let Some(x) = numeric(&r.value) {
                    r.value = Value::F64(x * factor + offset);
                }
                Fate::Continue(r)
            }
            (Action::Rename { to }, _) => {
                // Reuses the key's buffer: no allocation when it fits.
                r.key.clear();
                r.key.push_str(to);
                Fate::Continue(r)
            }
            (Action::Stream { .. }, _) => Fate::Continue(r),
            (Action::Deadband(band), Some(map)) => {
                let Some(x) = numeric(&r.value) else {
                    return Step::fate(Fate::Continue(r));
                };
                let mut e = map.slot(device.as_str(), &r.key);
                let pass = match e.slot.state {
                    Some(KeyState::Deadband { last }) => {
                        let width = match band {
                            Band::Abs(a) => *a,
                            Band::Pct(p) => last.abs() * p / 100.0,
                        };
                        (x - last).abs() > width
                    }
                    _ => true,
                };
                if pass {
                    e.set(KeyState::Deadband { last: x });
                    Fate::Continue(r)
                } else {
                    Fate::Drop(r)
                }
            }
            (Action::Dedupe { window_ms }, Some(map)) => {
                let mut e = map.slot(device.as_str(), &r.key);
                let repeat = matches!(&e.slot.state,
                    Some(KeyState::Dedupe { value, since_ms })
                        if *value == r.value && r.ts_ms.saturating_sub(*since_ms) < *window_ms);
                if repeat {
                    Fate::Drop(r)
                } else {
                    e.set(KeyState::Dedupe {
                        value: r.value.clone(),
                        since_ms: r.ts_ms,
                    });
                    Fate::Continue(r)
                }
            }
            (
                Action::Throttle {
                    interval_ms,
                    keep: Keep::First,
                    ..
                },
                Some(map),
            ) => {
                let (start, _) = span_of(r.ts_ms, *interval_ms);
                let mut e = map.slot(device.as_str(), &r.key);
                match e.slot.state {
                    Some(KeyState::ThrottleFirst { start_ms }) if start <= start_ms => {
                        let mut s = Step::fate(Fate::Drop(r));
                        s.late = start < start_ms;
                        return s;
                    }
                    _ => {
                        e.set(KeyState::ThrottleFirst { start_ms: start });
                        Fate::Continue(r)
                    }
                }
            }
            (
                Action::Throttle {
                    interval_ms,
                    keep: Keep::Last,
                    grace_ms,
                },
                Some(map),
            ) => return throttle_last(map, device, r, *interval_ms, *grace_ms),
            (
                Action::Aggregate {
                    window_ms,
                    functions,
                    emit_raw,
                    grace_ms,
                },
                Some(map),
            ) => {
                let Some(x) = numeric(&r.value) else {
                    return Step::fate(Fate::Continue(r));
                };
                return aggregate(
                    map,
                    device,
                    r,
                    x,
                    (*window_ms, *grace_ms),
                    functions,
                    *emit_raw,
                );
            }
            // Stateful actions always have a map (Compiled::new).
            (_, None) => Fate::Continue(r),
        };
        Step::fate(fate)
    }

    /// Closes the windows and intervals due at `now_ms`, in (end, device,
    /// key) order per action.
    fn tick(&mut self, now_ms: i64, sink: &mut Sink) {
        for j in 0..self.cfg.actions.len() {
            let (grace_ms, functions) = match &self.cfg.actions[j] {
                Action::Aggregate {
                    grace_ms,
                    functions,
                    ..
                } => (*grace_ms, Some(functions.clone())),
                Action::Throttle {
                    keep: Keep::Last,
                    grace_ms,
                    ..
                } => (*grace_ms, None),
                _ => continue,
            };
            let Some(map) = self.states[j].as_mut() else {
                continue;
            };
            if map.next_due_ms > now_ms {
                continue;
            }
            let mut due: Vec<(i64, usize)> = Vec::new();
            let mut next = i64::MAX;
            for (at, slot) in map.slots.iter().enumerate() {
                let end = match &slot.state {
                    Some(KeyState::Aggregate { open: Some(w), .. }) => w.end_ms,
                    Some(KeyState::ThrottleLast {
                        pending: Some(h), ..
                    }) => h.end_ms,
                    _ => continue,
                };
                let deadline = end.saturating_add(grace_ms);
                if deadline <= now_ms {
                    due.push((end, at));
                } else {
                    next = next.min(deadline);
                }
            }
            map.next_due_ms = next;
            let slots = &mut map.slots;
            due.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| slots[a.1].id.cmp(&slots[b.1].id))
            });
            let mut released: Vec<(DeviceName, Vec<Reading>)> = Vec::with_capacity(due.len());
            for (_, at) in due {
                let slot = &mut slots[at];
                let (dev, key) = split_id(&slot.id);
                let readings = match &mut slot.state {
                    Some(KeyState::Aggregate {
                        open,
                        closed_start_ms,
                    }) => match (open.take(), &functions) {
                        (Some(w), Some(f)) => {
                            *closed_start_ms = Some(w.start_ms);
                            w.outputs(key, f)
                        }
                        _ => continue,
                    },
                    Some(KeyState::ThrottleLast {
                        pending,
                        closed_start_ms,
                    }) => match pending.take() {
                        Some(h) => {
                            *closed_start_ms = Some(h.start_ms);
                            vec![Reading {
                                key: key.to_owned(),
                                value: h.value,
                                ts_ms: h.ts_ms,
                                ts_trusted: h.ts_trusted,
                            }]
                        }
                        None => continue,
                    },
                    _ => continue,
                };
                let device = DeviceName::new(dev);
                mark(slot, &mut map.dirty, at);
                released.push((device, readings));
            }
            for (device, readings) in released {
                sink.group();
                for r in readings {
                    self.run(j + 1, &device, r, sink);
                }
            }
        }
    }

    fn next_due_ms(&self) -> i64 {
        self.states
            .iter()
            .flatten()
            .map(|m| m.next_due_ms)
            .min()
            .unwrap_or(i64::MAX)
    }
}

fn throttle_last(
    map: &mut KeyMap,
    device: &DeviceName,
    r: Reading,
    interval_ms: i64,
    grace_ms: i64,
) -> Step {
    let (start, end) = span_of(r.ts_ms, interval_ms);
    let mut e = map.slot(device.as_str(), &r.key);
    let (pending, closed) = match e.slot.state.take() {
        Some(KeyState::ThrottleLast {
            pending,
            closed_start_ms,
        }) => (pending, closed_start_ms),
        _ => (None, None),
    };
    let late = match &pending {
        Some(h) => start < h.start_ms,
        None => closed.is_some_and(|c| start <= c),
    };
    let restore = |e: &mut Entry<'_>, pending, closed| {
        e.slot.state = Some(KeyState::ThrottleLast {
            pending,
            closed_start_ms: closed,
        });
    };
    if late {
        restore(&mut e, pending, closed);
        let mut s = Step::fate(Fate::Drop(r));
        s.late = true;
        return s;
    }
    let hold = |r: Reading| Held {
        start_ms: start,
        end_ms: end,
        ts_ms: r.ts_ms,
        ts_trusted: r.ts_trusted,
        value: r.value,
    };
    let as_reading = |h: Held, key: &str| Reading {
        key: key.to_owned(),
        value: h.value,
        ts_ms: h.ts_ms,
        ts_trusted: h.ts_trusted,
    };
    match pending {
        Some(h) if h.start_ms == start => {
            if r.ts_ms >= h.ts_ms {
                let old = as_reading(h, &r.key);
                e.set(KeyState::ThrottleLast {
                    pending: Some(hold(r)),
                    closed_start_ms: closed,
                });
                let mut s = Step::fate(Fate::Taken);
                s.replaced = Some(old);
                s
            } else {
                restore(&mut e, Some(h), closed);
                Step::fate(Fate::Drop(r))
            }
        }
        prior => {
            let released: Vec<Reading> = prior
                .iter()
                .map(|h| as_reading(h.clone(), &r.key))
                .collect();
            let closed = prior.map(|h| h.start_ms).or(closed);
            e.set(KeyState::ThrottleLast {
                pending: Some(hold(r)),
                closed_start_ms: closed,
            });
            e.due(end.saturating_add(grace_ms));
            let mut s = Step::fate(Fate::Taken);
            s.released = released;
            s
        }
    }
}

fn aggregate(
    map: &mut KeyMap,
    device: &DeviceName,
    r: Reading,
    x: f64,
    (window_ms, grace_ms): (i64, i64),
    functions: &[AggFn],
    emit_raw: bool,
) -> Step {
    let (start, end) = span_of(r.ts_ms, window_ms);
    let mut e = map.slot(device.as_str(), &r.key);
    let mut released = Vec::new();
    let late = match &mut e.slot.state {
        Some(KeyState::Aggregate {
            open,
            closed_start_ms,
        }) => match open {
            Some(w) if w.start_ms == start => {
                w.add(x, &r);
                false
            }
            Some(w) if w.start_ms > start => true,
            None if closed_start_ms.is_some_and(|c| start <= c) => true,
            _ => {
                if let Some(w) = open.take() {
                    *closed_start_ms = Some(w.start_ms);
                    released = w.outputs(&r.key, functions);
                }
                *open = Some(Window::new(start, end, x, &r));
                *e.next_due_ms = (*e.next_due_ms).min(end.saturating_add(grace_ms));
                false
            }
        },
        _ => {
            e.slot.state = Some(KeyState::Aggregate {
                open: Some(Window::new(start, end, x, &r)),
                closed_start_ms: None,
            });
            e.due(end.saturating_add(grace_ms));
            false
        }
    };
    if !late {
        mark(e.slot, e.dirty, e.at);
    }
    let fate = match (late, emit_raw) {
        (_, true) => Fate::Continue(r),
        (true, false) => Fate::Drop(r),
        (false, false) => Fate::Taken,
    };
    Step {
        released,
        replaced: None,
        fate,
        late,
        absorbed: !late && !emit_raw,
    }
}

/// The rules engine: configured rules and everything they remember.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Compiled>,
    /// Reused per record: the rules that take its device.
    takers: Vec<usize>,
}

impl Rules {
    /// An engine with empty state.
    pub fn new(rules: Vec<RuleConfig>) -> Self {
        Self {
            rules: rules.into_iter().map(Compiled::new).collect(),
            takers: Vec::new(),
        }
    }

    /// An engine that continues from `state` (as [`Rules::state`] or the
    /// integrator's stored [`Rules::take_dirty`] entries left it). Entries
    /// that no longer fit the configuration are skipped and returned with
    /// the reason, for the caller to log and delete.
    pub fn with_state(
        rules: Vec<RuleConfig>,
        state: &EngineState,
    ) -> (Self, Vec<(StateKey, StateError)>) {
        let mut engine = Self::new(rules);
        let mut refused = Vec::new();
        for (key, bytes) in &state.entries {
            if let Err(e) = engine.restore(key, bytes) {
                refused.push((key.clone(), e));
            }
        }
        (engine, refused)
    }

    /// Whether there are no rules (every record passes unchanged).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs a device's decoded records through the rules.
    ///
    /// `device_type` is the device's registry type (for `device_type`
    /// matches). Records no rule matches are moved to `out` unchanged on
    /// [`DEFAULT_STREAM`]. Closing a window because a later reading arrived
    /// happens here too; closing by wall time is [`Rules::tick`]'s.
    pub fn apply(&mut self, device_type: &str, records: Vec<Record>) -> Applied {
        let mut sink = Sink {
            out: Vec::with_capacity(records.len()),
            ..Sink::default()
        };
        let mut takers = std::mem::take(&mut self.takers);
        for mut rec in records {
            takers.clear();
            takers.extend(
                self.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.takes(&rec.device, device_type))
                    .map(|(i, _)| i),
            );
            if takers.is_empty() {
                sink.out.push((DEFAULT_STREAM.to_owned(), rec));
                continue;
            }
            sink.group();
            for (key, value) in std::mem::take(&mut rec.values) {
                let r = Reading {
                    key,
                    value,
                    ts_ms: rec.ts_ms,
                    ts_trusted: rec.ts_trusted,
                };
                match takers
                    .iter()
                    .find(|&&i| self.rules[i].cfg.keys.matches(&r.key))
                {
                    Some(&i) => {
                        let rule = &mut self.rules[i];
                        rule.counts.matched += 1;
                        rule.run(0, &rec.device, r, &mut sink);
                    }
                    None => sink.emit(DEFAULT_STREAM, &rec.device, r),
                }
            }
        }
        self.takers = takers;
        Applied {
            out: sink.out,
            dropped: sink.dropped,
        }
    }

    /// Closes every aggregate window and `keep = "last"` throttle interval
    /// whose end + grace is at or before `now_ms` (wall time, unix ms) and
    /// returns what they emit, with its stream, in (rule, action, window end,
    /// device, key) order.
    pub fn tick(&mut self, now_ms: i64) -> Vec<(String, Record)> {
        let mut sink = Sink::default();
        for rule in &mut self.rules {
            rule.tick(now_ms, &mut sink);
        }
        sink.out
    }

    /// The earliest wall time at which [`Rules::tick`] may have something to
    /// close (possibly earlier than needed, never later); `None` when nothing
    /// is open.
    pub fn next_tick_ms(&self) -> Option<i64> {
        let t = self
            .rules
            .iter()
            .map(Compiled::next_due_ms)
            .min()
            .unwrap_or(i64::MAX);
        (t != i64::MAX).then_some(t)
    }

    /// Counters per rule, in configuration order.
    pub fn counters(&self) -> Vec<RuleCounters> {
        self.rules
            .iter()
            .map(|r| RuleCounters {
                rule: r.cfg.name.clone(),
                matched: r.counts.matched,
                dropped: r.counts.dropped,
                late: r.counts.late,
                absorbed: r.counts.absorbed,
                emitted: r.counts.emitted,
            })
            .collect()
    }

    /// Every state entry, sorted by key: a full snapshot for
    /// [`Rules::with_state`].
    pub fn state(&self) -> EngineState {
        let mut entries = Vec::new();
        for (rule, j, map) in self.maps() {
            for slot in &map.slots {
                if let Some(s) = &slot.state {
                    entries.push((state_key(rule, j, &slot.id), encode_state(s)));
                }
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        EngineState { entries }
    }

    /// The entries changed since the last call (each once), with their new
    /// bytes, or `None` for an entry to delete: what to write in the same
    /// transaction as the records that changed them.
    pub fn take_dirty(&mut self) -> Vec<(StateKey, Option<StateBytes>)> {
        let mut out = Vec::new();
        self.drain_dirty(|k, bytes| {
            out.push((
                StateKey {
                    rule: k.rule.to_owned(),
                    action: k.action,
                    device: k.device.to_owned(),
                    key: k.key.to_owned(),
                },
                bytes.map(<[u8]>::to_vec),
            ));
        });
        out
    }

    /// [`Rules::take_dirty`] without allocating per entry: calls `write`
    /// with each changed entry's key and bytes (`None`: delete), borrowed, in
    /// the order `take_dirty` would list them; bind them straight into the
    /// SQLite statement.
    pub fn drain_dirty(&mut self, mut write: impl FnMut(StateKeyRef<'_>, Option<&[u8]>)) {
        let mut buf = Vec::new();
        for rule in &mut self.rules {
            for (j, map) in rule.states.iter_mut().enumerate() {
                let Some(map) = map else { continue };
                let dirty = std::mem::take(&mut map.dirty);
                for &at in &dirty {
                    let Some(slot) = map.slots.get_mut(at) else {
                        continue;
                    };
                    slot.dirty = false;
                    let (device, key) = split_id(&slot.id);
                    let k = StateKeyRef {
                        rule: &rule.cfg.name,
                        action: u32::try_from(j).unwrap_or(u32::MAX),
                        device,
                        key,
                    };
                    match &slot.state {
                        Some(s) => {
                            encode_state_into(s, &mut buf);
                            write(k, Some(&buf));
                        }
                        None => write(k, None),
                    }
                }
                // Keep the list's capacity for the next round.
                map.dirty = dirty;
                map.dirty.clear();
            }
        }
    }

    /// Loads one stored entry.
    ///
    /// Fails when its rule or stateful action is no longer configured, its
    /// bytes do not decode, or it was written for another kind of action or
    /// another interval or window length.
    pub fn restore(&mut self, key: &StateKey, bytes: &[u8]) -> Result<(), StateError> {
        let rule = self
            .rules
            .iter_mut()
            .find(|r| r.cfg.name == key.rule)
            .ok_or_else(|| StateError::UnknownRule(key.rule.clone()))?;
        let j = key.action as usize;
        let no_action = || StateError::NoSuchAction {
            rule: key.rule.clone(),
            action: key.action,
        };
        let (Some(action), Some(Some(map))) = (rule.cfg.actions.get(j), rule.states.get_mut(j))
        else {
            return Err(no_action());
        };
        let damaged = |reason: String| StateError::Damaged {
            rule: key.rule.clone(),
            action: key.action,
            reason,
        };
        let state: KeyState = match bytes.split_first() {
            Some((&STATE_VERSION, body)) => {
                postcard::from_bytes(body).map_err(|e| damaged(e.to_string()))?
            }
            Some((v, _)) => return Err(damaged(format!("unknown version {v}"))),
            None => return Err(damaged("empty".into())),
        };
        let aligned = |t: i64, len: i64| t.rem_euclid(len) == 0;
        let (fits, deadline) = match (&state, action) {
            (KeyState::Deadband { .. }, Action::Deadband(_))
            | (KeyState::Dedupe { .. }, Action::Dedupe { .. }) => (true, None),
            (
                KeyState::ThrottleFirst { start_ms },
                Action::Throttle {
                    interval_ms,
                    keep: Keep::First,
                    ..
                },
            ) => (aligned(*start_ms, *interval_ms), None),
            (
                KeyState::ThrottleLast {
                    pending,
                    closed_start_ms,
                },
                Action::Throttle {
                    interval_ms,
                    keep: Keep::Last,
                    grace_ms,
                },
            ) => (
                pending.as_ref().is_none_or(|h| {
                    aligned(h.start_ms, *interval_ms) && h.end_ms - h.start_ms == *interval_ms
                }) && closed_start_ms.is_none_or(|c| aligned(c, *interval_ms)),
                pending.as_ref().map(|h| h.end_ms.saturating_add(*grace_ms)),
            ),
            (
                KeyState::Aggregate {
                    open,
                    closed_start_ms,
                },
                Action::Aggregate {
                    window_ms,
                    grace_ms,
                    ..
                },
            ) => (
                open.as_ref().is_none_or(|w| {
                    aligned(w.start_ms, *window_ms) && w.end_ms - w.start_ms == *window_ms
                }) && closed_start_ms.is_none_or(|c| aligned(c, *window_ms)),
                open.as_ref().map(|w| w.end_ms.saturating_add(*grace_ms)),
            ),
            _ => (false, None),
        };
        if !fits {
            return Err(StateError::Mismatch {
                rule: key.rule.clone(),
                action: key.action,
            });
        }
        if let Some(d) = deadline {
            map.next_due_ms = map.next_due_ms.min(d);
        }
        let at = map.position(&entry_id(&key.device, &key.key));
        map.slots[at].state = Some(state);
        Ok(())
    }

    fn maps(&self) -> impl Iterator<Item = (&str, usize, &KeyMap)> {
        self.rules.iter().flat_map(|r| {
            r.states
                .iter()
                .enumerate()
                .filter_map(move |(j, m)| m.as_ref().map(|m| (r.cfg.name.as_str(), j, m)))
        })
    }
}

fn state_key(rule: &str, action: usize, id: &str) -> StateKey {
    let (device, key) = split_id(id);
    StateKey {
        rule: rule.to_owned(),
        action: u32::try_from(action).unwrap_or(u32::MAX),
        device: device.to_owned(),
        key: key.to_owned(),
    }
}

impl fmt::Display for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] {}/{}",
            self.rule, self.action, self.device, self.key
        )
    }
}
