use super::*;
use proptest::prelude::*;
use sluice_cloud_sync::OutboxConfig;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
struct Doc {
    rules: Vec<RawRule>,
}

fn parse(text: &str) -> Result<Vec<RuleConfig>, RuleConfigError> {
    let doc: Doc = toml::from_str(text).unwrap();
    validate(&doc.rules, &OutboxConfig::default().effective_streams())
}

fn engine(text: &str) -> Rules {
    Rules::new(parse(text).unwrap())
}

fn rec(device: &str, ts_ms: i64, values: &[(&str, Value)]) -> Record {
    Record {
        device: DeviceName::new(device),
        ts_ms,
        ts_trusted: true,
        values: values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    }
}

/// Every value that came out, flattened: (stream, device, ts, key, value).
fn flat(out: &[(String, Record)]) -> Vec<(String, String, i64, String, Value)> {
    out.iter()
        .flat_map(|(s, r)| {
            r.values.iter().map(move |(k, v)| {
                (
                    s.clone(),
                    r.device.to_string(),
                    r.ts_ms,
                    k.clone(),
                    v.clone(),
                )
            })
        })
        .collect()
}

/// Feeds one value per record of device "d" (ts, value) and returns what
/// came out as (ts, key, value).
fn feed(rules: &mut Rules, key: &str, readings: &[(i64, Value)]) -> Vec<(i64, String, Value)> {
    let records = readings
        .iter()
        .map(|(ts, v)| rec("d", *ts, &[(key, v.clone())]))
        .collect();
    flat(&rules.apply("t", records).out)
        .into_iter()
        .map(|(_, _, ts, k, v)| (ts, k, v))
        .collect()
}

fn f(x: f64) -> Value {
    Value::F64(x)
}
fn i(x: i64) -> Value {
    Value::I64(x)
}

// ---------------------------------------------------------------------------
// Config

#[test]
fn every_action_type_parses_from_toml() {
    let rules = parse(
        r#"
        [[rules]]
        name = "all"
        devices = "greenhouse-*"
        device_type = "thermo"
        keys = "t?mp*"
        actions = [
          { type = "range", min = -40, max = 85.5, action = "clamp" },
          { type = "deadband", pct = 1.5 },
          { type = "dedupe", window = "30s" },
          { type = "throttle", interval = "10s", keep = "last", grace = "500ms" },
          { type = "scale", factor = 0.1, offset = -3 },
          { type = "rename", to = "temp_c" },
          { type = "stream", name = "alarms" },
          { type = "aggregate", window = 60, functions = ["min", "max", "avg", "sum", "count", "first", "last", "stddev"], emit_raw = true },
        ]

        [[rules]]
        name = "noise"
        actions = [{ type = "deadband", abs = 0.5 }, { type = "throttle", interval = "1m" }, { type = "drop" }]
        "#,
    )
    .unwrap();
    let r = &rules[0];
    assert_eq!(r.devices.as_str(), "greenhouse-*");
    assert_eq!(r.device_type.as_deref(), Some("thermo"));
    assert_eq!(
        r.actions,
        vec![
            Action::Range {
                min: Some(-40.0),
                max: Some(85.5),
                outside: OutOfRange::Clamp
            },
            Action::Deadband(Band::Pct(1.5)),
            Action::Dedupe { window_ms: 30_000 },
            Action::Throttle {
                interval_ms: 10_000,
                keep: Keep::Last,
                grace_ms: 500
            },
            Action::Scale {
                factor: 0.1,
                offset: -3.0
            },
            Action::Rename {
                to: "temp_c".into()
            },
            Action::Stream {
                name: "alarms".into()
            },
            Action::Aggregate {
                window_ms: 60_000,
                functions: vec![
                    AggFn::Min,
                    AggFn::Max,
                    AggFn::Avg,
                    AggFn::Sum,
                    AggFn::Count,
                    AggFn::First,
                    AggFn::Last,
                    AggFn::Stddev
                ],
                emit_raw: true,
                grace_ms: DEFAULT_GRACE_MS
            },
        ]
    );
    assert_eq!(rules[1].devices.as_str(), "*");
    assert_eq!(rules[1].keys.as_str(), "*");
    assert_eq!(
        rules[1].actions[1],
        Action::Throttle {
            interval_ms: 60_000,
            keep: Keep::First,
            grace_ms: DEFAULT_GRACE_MS
        }
    );
}

#[test]
fn bad_rules_are_refused_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        ("actions = []", "rules[0].name: is required"),
        (
            "name = \"a b\"",
            "rules[0].name: \"a b\" must be 1-64 characters",
        ),
        (
            "name = \"r\"\ndevices = \"dev[1]\"",
            "rules[0].devices: \"dev[1]\": '[' is reserved",
        ),
        (
            "name = \"r\"\nkeys = \"\"",
            "rules[0].keys: \"\" must be a pattern",
        ),
        (
            "name = \"r\"\ndevice_type = \"a/b\"",
            "rules[0].device_type: \"a/b\" must be",
        ),
        (
            "name = \"r\"\nactions = [{ min = 1 }]",
            "rules[0].actions[0].type: is required",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"explode\" }]",
            "rules[0].actions[0].type: \"explode\" is not an action type",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"range\" }]",
            "rules[0].actions[0].min: range needs min, max or both",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"drop\" }, { type = \"range\", min = 5, max = 1 }]",
            "rules[0].actions[1]: follows a drop action",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"scale\", factor = 2 }, { type = \"range\", min = 5, max = 1 }]",
            "rules[0].actions[1].min: 5 is greater than max 1",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"range\", min = 1, action = \"wrap\" }]",
            "rules[0].actions[0].action: \"wrap\" is not",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"range\", min = 1, abs = 2 }]",
            "rules[0].actions[0].abs: is not a field of type \"range\" (it takes min, max, action)",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"drop\", to = \"x\" }]",
            "rules[0].actions[0].to: is not a field of type \"drop\" (it takes no other fields)",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"deadband\" }]",
            "rules[0].actions[0].abs: deadband takes exactly one of abs and pct",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"deadband\", abs = 1, pct = 2 }]",
            "rules[0].actions[0].abs: deadband takes exactly one",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"deadband\", pct = 0 }]",
            "rules[0].actions[0].pct: 0 must be > 0",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"dedupe\" }]",
            "rules[0].actions[0].window: is required",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"dedupe\", window = \"0s\" }]",
            "rules[0].actions[0].window: must be longer than 0",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"dedupe\", window = \"soon\" }]",
            "rules[0].actions[0].window: \"soon\" is not a duration",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"throttle\", interval = \"1s\", keep = \"middle\" }]",
            "rules[0].actions[0].keep: \"middle\" is not",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"throttle\", interval = \"1s\", grace = \"1s\" }]",
            "rules[0].actions[0].grace: applies only to keep = \"last\"",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"scale\" }]",
            "rules[0].actions[0].factor: scale needs factor, offset or both",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"scale\", factor = nan }]",
            "rules[0].actions[0].factor: NaN is not a finite number",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"rename\" }]",
            "rules[0].actions[0].to: is required",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"stream\", name = \"nowhere\" }]",
            "rules[0].actions[0].name: \"nowhere\" is not an outbox stream",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = \"10s\" }]",
            "rules[0].actions[0].functions: is required",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [] }]",
            "rules[0].actions[0].functions: must name at least one",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [\"median\"] }]",
            "rules[0].actions[0].functions: \"median\" is not a function",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [\"avg\", \"avg\"] }]",
            "rules[0].actions[0].functions: \"avg\" is listed twice",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = 0, functions = [\"avg\"] }]",
            "rules[0].actions[0].window: must be longer than 0",
        ),
        (
            "name = \"r\"\nactions = [{ type = \"aggregate\", window = \"31d\", functions = [\"avg\"] }]",
            "rules[0].actions[0].window: \"31d\" is not a duration like \"10s\" (at most 30d)",
        ),
    ];
    for (body, want) in cases {
        let e = parse(&format!("[[rules]]\n{body}\n")).unwrap_err();
        assert!(
            e.to_string().starts_with(want),
            "{body}\n  got: {e}\n want: {want}"
        );
    }
    let e = parse("[[rules]]\nname = \"r\"\n[[rules]]\nname = \"q\"\n[[rules]]\nname = \"r\"\n")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rules[2].name: \"r\" is already the name of rules[0]"
    );
}

#[test]
fn unknown_keys_are_refused_by_serde() {
    let e = toml::from_str::<Doc>("[[rules]]\nname = \"r\"\ndevice = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("unknown field `device`"), "{e}");
    let e = toml::from_str::<Doc>(
        "[[rules]]\nname = \"r\"\nactions = [{ type = \"drop\", windw = 1 }]\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `windw`"), "{e}");
}

#[test]
fn rules_load_through_the_config_file_and_name_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sluice.toml");
    std::fs::write(
        &p,
        "[gateway]\nid = \"g\"\n[[outbox.streams]]\nname = \"bulk\"\npriority = 1\n\
         [[rules]]\nname = \"agg\"\nkeys = \"temp\"\n\
         actions = [{ type = \"aggregate\", window = \"10s\", functions = [\"avg\"] }, { type = \"stream\", name = \"bulk\" }]\n",
    )
    .unwrap();
    let cfg = crate::config::load(&p).unwrap();
    assert_eq!(cfg.rules.len(), 1);
    assert_eq!(
        cfg.rules[0].actions[1],
        Action::Stream {
            name: "bulk".into()
        }
    );
    let shown = crate::config::effective_toml(&cfg).unwrap();
    assert!(
        shown.contains("[[rules]]") && shown.contains("aggregate"),
        "{shown}"
    );

    std::fs::write(
        &p,
        "[gateway]\nid = \"g\"\n[[rules]]\nname = \"r\"\nactions = [{ type = \"range\", min = 10, max = 1 }]\n",
    )
    .unwrap();
    let e = crate::config::load(&p).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rules[0].actions[0].min: 10 is greater than max 1"
    );
}

#[test]
fn globs_match_stars_and_question_marks() {
    for (p, s, want) in [
        ("*", "", true),
        ("*", "anything", true),
        ("dev-?", "dev-1", true),
        ("dev-?", "dev-12", false),
        ("dev-*", "dev-", true),
        ("*-temp", "room-1-temp", true),
        ("*-temp", "room-1-temp2", false),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXcYYb", false),
        ("a*?b", "ab", false),
        ("a*?b", "axb", true),
        ("exact", "exact", true),
        ("exact", "exactly", false),
        ("t?mp", "tämp", true),
        ("**x", "x", true),
    ] {
        assert_eq!(Glob::new(p).unwrap().matches(s), want, "{p} vs {s}");
    }
}

// ---------------------------------------------------------------------------
// Actions, one table each

#[test]
fn unmatched_records_pass_unchanged_and_drop_takes_only_matched_keys() {
    let mut r = engine(
        "[[rules]]\nname = \"no-debug\"\ndevices = \"sensor-*\"\nkeys = \"debug_*\"\nactions = [{ type = \"drop\" }]\n",
    );
    let other = rec("gw-x", 5, &[("debug_x", i(1))]);
    let a = r.apply(
        "t",
        vec![
            other.clone(),
            rec(
                "sensor-1",
                7,
                &[
                    ("t", i(1)),
                    ("debug_a", Value::Str("x".into())),
                    ("h", f(2.0)),
                ],
            ),
        ],
    );
    assert_eq!(a.out[0], (DEFAULT_STREAM.to_owned(), other));
    assert_eq!(
        a.out[1],
        (
            DEFAULT_STREAM.to_owned(),
            rec("sensor-1", 7, &[("t", i(1)), ("h", f(2.0))])
        )
    );
    assert_eq!(
        a.dropped,
        vec![(
            "no-debug".to_owned(),
            rec("sensor-1", 7, &[("debug_a", Value::Str("x".into()))])
        )]
    );
    let c = &r.counters()[0];
    assert_eq!((c.matched, c.dropped, c.emitted), (1, 1, 0));
}

#[test]
fn the_first_matching_rule_takes_a_key_and_device_type_must_match() {
    let mut r = engine(
        "[[rules]]\nname = \"keep-temp\"\nkeys = \"temp\"\n\
         [[rules]]\nname = \"thermo-only\"\ndevice_type = \"thermo\"\nactions = [{ type = \"drop\" }]\n",
    );
    let a = r.apply(
        "thermo",
        vec![rec("d", 1, &[("temp", i(1)), ("hum", i(2))])],
    );
    assert_eq!(flat(&a.out).len(), 1);
    assert_eq!(flat(&a.out)[0].3, "temp");
    let a = r.apply("other", vec![rec("d", 1, &[("temp", i(1)), ("hum", i(2))])]);
    assert_eq!(flat(&a.out).len(), 2);
    let c = r.counters();
    assert_eq!((c[0].matched, c[0].emitted), (2, 2));
    assert_eq!((c[1].matched, c[1].dropped), (1, 1));
}

#[test]
fn range_drops_or_clamps_numbers_and_passes_everything_else() {
    let drop = "[[rules]]\nname = \"r\"\nactions = [{ type = \"range\", min = 0, max = 100 }]\n";
    let clamp = "[[rules]]\nname = \"r\"\nactions = [{ type = \"range\", min = 0.5, max = 100, action = \"clamp\" }]\n";
    let only_max = "[[rules]]\nname = \"r\"\nactions = [{ type = \"range\", max = 10 }]\n";
    let cases: &[(&str, Value, Option<Value>)] = &[
        (drop, i(50), Some(i(50))),
        (drop, i(0), Some(i(0))),
        (drop, f(100.0), Some(f(100.0))),
        (drop, f(100.01), None),
        (drop, i(-1), None),
        (drop, Value::Bool(true), Some(Value::Bool(true))),
        (
            drop,
            Value::Str("999".into()),
            Some(Value::Str("999".into())),
        ),
        (drop, f(f64::NAN), Some(f(f64::NAN))),
        (clamp, i(150), Some(i(100))),
        (clamp, i(-5), Some(f(0.5))),
        (clamp, f(200.5), Some(f(100.0))),
        (clamp, f(7.25), Some(f(7.25))),
        (only_max, i(-1_000_000), Some(i(-1_000_000))),
        (only_max, i(11), None),
    ];
    for (cfg, v, want) in cases {
        let mut r = engine(cfg);
        let out = feed(&mut r, "k", &[(1, v.clone())]);
        let got = out.into_iter().next().map(|(_, _, v)| v);
        match (&got, want) {
            (Some(Value::F64(a)), Some(Value::F64(b))) if a.is_nan() && b.is_nan() => {}
            _ => assert_eq!(&got, want, "{cfg} {v:?}"),
        }
    }
}

#[test]
fn deadband_passes_only_moves_beyond_the_band_since_the_last_passed_value() {
    let abs = "[[rules]]\nname = \"r\"\nactions = [{ type = \"deadband\", abs = 1.0 }]\n";
    let pct = "[[rules]]\nname = \"r\"\nactions = [{ type = \"deadband\", pct = 10 }]\n";
    let cases: &[(&str, &[f64], &[f64])] = &[
        (
            abs,
            &[20.0, 20.5, 21.0, 21.01, 20.5, 20.0, 19.9],
            &[20.0, 21.01, 20.0],
        ),
        // creeping drift is caught: the band is measured from the last passed value
        (abs, &[0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4], &[0.0, 1.2, 2.4]),
        (
            pct,
            &[100.0, 109.0, 111.0, 100.0, 99.0],
            &[100.0, 111.0, 99.0],
        ),
        (pct, &[0.0, 0.0, 0.001, 0.001], &[0.0, 0.001]),
    ];
    for (cfg, input, want) in cases {
        let mut r = engine(cfg);
        let readings: Vec<(i64, Value)> = input
            .iter()
            .enumerate()
            .map(|(t, x)| (t as i64, f(*x)))
            .collect();
        let out: Vec<f64> = feed(&mut r, "k", &readings)
            .into_iter()
            .map(|(_, _, v)| match v {
                Value::F64(x) => x,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(&out, want, "{cfg} {input:?}");
    }
    // per device and key; non-numbers pass untouched
    let mut r = engine(abs);
    let a = r.apply(
        "t",
        vec![
            rec("a", 1, &[("k", i(5)), ("j", i(5))]),
            rec("b", 1, &[("k", i(5))]),
            rec(
                "a",
                2,
                &[("k", i(5)), ("j", i(7)), ("s", Value::Bool(true))],
            ),
            rec("a", 3, &[("s", Value::Bool(true))]),
        ],
    );
    assert_eq!(flat(&a.out).len(), 6);
    assert_eq!(r.counters()[0].dropped, 1);
}

#[test]
fn dedupe_drops_repeats_within_the_window_and_lets_a_heartbeat_through() {
    let mut r =
        engine("[[rules]]\nname = \"r\"\nactions = [{ type = \"dedupe\", window = \"10s\" }]\n");
    let out = feed(
        &mut r,
        "k",
        &[
            (0, i(1)),
            (1_000, i(1)),
            (9_999, i(1)),
            (10_000, i(1)), // a full window after the one that passed
            (11_000, i(2)),
            (12_000, i(1)),
            (13_000, f(1.0)), // another type is another value
            (14_000, f(1.0)),
        ],
    );
    let ts: Vec<i64> = out.iter().map(|(t, _, _)| *t).collect();
    assert_eq!(ts, vec![0, 10_000, 11_000, 12_000, 13_000]);
    let mut r =
        engine("[[rules]]\nname = \"r\"\nactions = [{ type = \"dedupe\", window = \"1m\" }]\n");
    let s = |x: &str| Value::Str(x.into());
    let out = feed(
        &mut r,
        "k",
        &[(0, s("on")), (1, s("on")), (2, s("off")), (3, s("off"))],
    );
    assert_eq!(out.len(), 2);
}

#[test]
fn throttle_first_passes_the_first_reading_of_each_aligned_interval() {
    let mut r = engine(
        "[[rules]]\nname = \"r\"\nactions = [{ type = \"throttle\", interval = \"10s\" }]\n",
    );
    let out = feed(
        &mut r,
        "k",
        &[
            (5_000, i(1)),
            (9_999, i(2)),
            (10_000, i(3)),
            (3_000, i(4)), // interval 0 again: late
            (25_000, i(5)),
            (29_000, i(6)),
        ],
    );
    let vals: Vec<Value> = out.into_iter().map(|(_, _, v)| v).collect();
    assert_eq!(vals, vec![i(1), i(3), i(5)]);
    let c = &r.counters()[0];
    assert_eq!((c.dropped, c.late, c.emitted), (3, 1, 3));
}

#[test]
fn throttle_last_holds_the_latest_reading_until_its_interval_closes() {
    let mut r = engine(
        "[[rules]]\nname = \"r\"\nactions = [{ type = \"throttle\", interval = \"10s\", keep = \"last\", grace = \"1s\" }, { type = \"rename\", to = \"x\" }]\n",
    );
    // held, replaced by a later ts, an earlier ts is dropped at once
    assert!(feed(&mut r, "k", &[(1_000, i(1)), (8_000, i(2)), (4_000, i(3))]).is_empty());
    assert_eq!(r.counters()[0].dropped, 2);
    assert_eq!(r.next_tick_ms(), Some(11_000));
    assert!(r.tick(10_999).is_empty());
    let out = flat(&r.tick(11_000));
    assert_eq!(
        out,
        vec![(DEFAULT_STREAM.into(), "d".into(), 8_000, "x".into(), i(2))]
    );
    // closed: a reading of that interval is late; the next interval closes
    // when a reading of a later one arrives
    let out = feed(
        &mut r,
        "k",
        &[(9_000, i(9)), (12_000, i(4)), (25_000, i(5))],
    );
    assert_eq!(out, vec![(12_000, "x".into(), i(4))]);
    let c = &r.counters()[0];
    assert_eq!((c.late, c.emitted), (1, 2));
    assert_eq!(flat(&r.tick(i64::MAX))[0].4, i(5));
}

#[test]
fn scale_rename_and_stream_transform_and_route() {
    let mut r = engine(
        "[[rules]]\nname = \"r\"\nkeys = \"raw_*\"\nactions = [{ type = \"scale\", factor = 0.5, offset = 1 }, { type = \"rename\", to = \"temp\" }, { type = \"stream\", name = \"alarms\" }]\n",
    );
    let a = r.apply(
        "t",
        vec![rec(
            "d",
            3,
            &[
                ("raw_a", i(10)),
                ("other", i(10)),
                ("raw_b", Value::Str("x".into())),
            ],
        )],
    );
    assert_eq!(
        a.out,
        vec![
            (
                "alarms".to_owned(),
                rec(
                    "d",
                    3,
                    &[("temp", f(6.0)), ("temp", Value::Str("x".into()))]
                )
            ),
            (DEFAULT_STREAM.to_owned(), rec("d", 3, &[("other", i(10))])),
        ]
    );
}

#[test]
fn aggregate_turns_1hz_readings_into_10s_windows() {
    let mut r = engine(
        "[[rules]]\nname = \"agg\"\nkeys = \"t\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [\"min\", \"max\", \"avg\", \"sum\", \"count\", \"first\", \"last\", \"stddev\"] }]\n",
    );
    let t0 = 1_700_000_000_000; // a multiple of 10 s
    let readings: Vec<(i64, Value)> = (0..100).map(|s| (t0 + s * 1_000, i(s))).collect();
    let mut out = feed(&mut r, "t", &readings);
    // 9 windows closed by the next window's first reading; the 10th by tick
    assert_eq!(out.len(), 9 * 8);
    // may be early (a hint), never late; a tick that closes nothing sharpens it
    assert!(r.next_tick_ms() <= Some(t0 + 100_000 + DEFAULT_GRACE_MS));
    assert!(r.tick(t0 + 101_999).is_empty());
    assert_eq!(r.next_tick_ms(), Some(t0 + 100_000 + DEFAULT_GRACE_MS));
    out.extend(
        flat(&r.tick(t0 + 102_000))
            .into_iter()
            .map(|(_, _, ts, k, v)| (ts, k, v)),
    );
    assert_eq!(out.len(), 10 * 8);
    for w in 0..10i64 {
        let end = t0 + (w + 1) * 10_000;
        let got: BTreeMap<String, Value> = out
            .iter()
            .filter(|(ts, _, _)| *ts == end)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        let lo = w * 10;
        let want: BTreeMap<String, Value> = [
            ("t_min", f(lo as f64)),
            ("t_max", f((lo + 9) as f64)),
            ("t_avg", f(lo as f64 + 4.5)),
            ("t_sum", f((lo * 10 + 45) as f64)),
            ("t_count", i(10)),
            ("t_first", i(lo)),
            ("t_last", i(lo + 9)),
            ("t_stddev", f(8.25f64.sqrt())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(got.len(), 8);
        for (k, v) in &want {
            match (&got[k], v) {
                (Value::F64(a), Value::F64(b)) => assert!((a - b).abs() < 1e-9, "{k}: {a} vs {b}"),
                (a, b) => assert_eq!(a, b, "{k}"),
            }
        }
    }
    let c = &r.counters()[0];
    assert_eq!(
        (c.matched, c.absorbed, c.emitted, c.dropped),
        (100, 100, 80, 0)
    );
}

#[test]
fn aggregate_outputs_of_one_window_share_a_record_and_go_through_later_actions() {
    let mut r = engine(
        "[[rules]]\nname = \"agg\"\nactions = [{ type = \"aggregate\", window = \"1s\", functions = [\"avg\", \"count\"], emit_raw = true }, { type = \"stream\", name = \"alarms\" }]\n",
    );
    let a = r.apply(
        "t",
        vec![rec("d", 500, &[("a", i(1)), ("b", Value::Bool(true))])],
    );
    // raw values (the bool passes the numeric-only aggregate untouched)
    assert_eq!(
        a.out,
        vec![(
            "alarms".to_owned(),
            rec("d", 500, &[("a", i(1)), ("b", Value::Bool(true))])
        )]
    );
    let mut untrusted = rec("d", 700, &[("a", i(3))]);
    untrusted.ts_trusted = false;
    r.apply("t", vec![untrusted]);
    let out = r.tick(3_000);
    assert_eq!(out.len(), 1);
    let (stream, record) = &out[0];
    assert_eq!(stream, "alarms");
    assert_eq!((record.ts_ms, record.ts_trusted), (1_000, false));
    assert_eq!(
        record.values,
        vec![("a_avg".into(), f(2.0)), ("a_count".into(), i(2))]
    );
}

#[test]
fn a_reading_for_a_closed_window_is_late_and_dropped() {
    let mut r = engine(
        "[[rules]]\nname = \"agg\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [\"sum\"] }]\n",
    );
    feed(&mut r, "k", &[(15_000, i(1)), (12_000, i(2))]); // out of order, same window: fine
    let closed = feed(&mut r, "k", &[(21_000, i(4))]);
    assert_eq!(closed, vec![(20_000, "k_sum".into(), f(3.0))]);
    let a = r.apply(
        "t",
        vec![
            rec("d", 19_000, &[("k", i(8))]),
            rec("d", 5_000, &[("k", i(8))]),
        ],
    );
    assert!(a.out.is_empty());
    assert_eq!(a.dropped.len(), 2);
    let c = &r.counters()[0];
    assert_eq!((c.late, c.dropped, c.absorbed), (2, 2, 3));
    // closed by tick, the window refuses later readings too
    assert_eq!(flat(&r.tick(32_000)).len(), 1);
    assert!(feed(&mut r, "k", &[(29_999, i(1))]).is_empty());
    assert_eq!(r.counters()[0].late, 3);
}

#[test]
fn a_stored_entry_for_another_configuration_is_refused() {
    let cfg = "[[rules]]\nname = \"agg\"\nactions = [{ type = \"aggregate\", window = \"10s\", functions = [\"sum\"] }]\n";
    let mut r = engine(cfg);
    feed(&mut r, "k", &[(15_000, i(1))]);
    let state = r.state();
    assert_eq!(state.entries.len(), 1);
    assert_eq!(
        state.entries[0].0,
        StateKey {
            rule: "agg".into(),
            action: 0,
            device: "d".into(),
            key: "k".into()
        }
    );
    let (_, refused) = Rules::with_state(parse(cfg).unwrap(), &state);
    assert!(refused.is_empty());
    let (_, refused) = Rules::with_state(parse(&cfg.replace("10s", "60s")).unwrap(), &state);
    assert!(
        matches!(refused[0].1, StateError::Mismatch { .. }),
        "{refused:?}"
    );
    let (_, refused) = Rules::with_state(
        parse(&cfg.replace("name = \"agg\"", "name = \"other\"")).unwrap(),
        &state,
    );
    assert!(matches!(refused[0].1, StateError::UnknownRule(_)));
    let other = "[[rules]]\nname = \"agg\"\nactions = [{ type = \"deadband\", abs = 1 }]\n";
    let (_, refused) = Rules::with_state(parse(other).unwrap(), &state);
    assert!(matches!(refused[0].1, StateError::Mismatch { .. }));
    let mut r = engine(cfg);
    assert!(matches!(
        r.restore(&state.entries[0].0, &[1, 0xff]),
        Err(StateError::Damaged { .. })
    ));
    assert!(matches!(
        r.restore(&state.entries[0].0, &[]),
        Err(StateError::Damaged { .. })
    ));
}

#[test]
fn take_dirty_lists_each_changed_entry_once() {
    let mut r = engine(
        "[[rules]]\nname = \"r\"\nactions = [{ type = \"deadband\", abs = 1 }, { type = \"aggregate\", window = \"10s\", functions = [\"sum\"] }]\n",
    );
    feed(&mut r, "k", &[(1, i(1)), (2, i(5)), (3, i(5))]);
    let d = r.take_dirty();
    let keys: Vec<(u32, &str)> = d.iter().map(|(k, _)| (k.action, k.key.as_str())).collect();
    assert_eq!(keys, vec![(0, "k"), (1, "k")]);
    assert!(d.iter().all(|(_, b)| b.is_some()));
    assert!(r.take_dirty().is_empty());
    feed(&mut r, "k", &[(4, i(5))]); // dropped by the deadband: nothing changed
    assert!(r.take_dirty().is_empty());
}

// ---------------------------------------------------------------------------
// Property tests

const WINDOW_MS: i64 = 10_000;

#[derive(Debug, Clone)]
enum Ev {
    /// device, key, ts, value
    Read(u8, u8, i64, Value),
    /// wall time
    Tick(i64),
}

fn numeric_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-1000i64..1000).prop_map(Value::I64),
        (-1000.0f64..1000.0).prop_map(Value::F64),
    ]
}

/// Mostly increasing time with jitter of up to 1.5 windows (so out of order
/// and late readings happen), gaps (empty windows), and wall-clock ticks.
fn events() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            0u8..2,
            0u8..2,
            0i64..2_500,
            -15_000i64..15_000,
            numeric_value(),
            0u8..10,
        ),
        0..150,
    )
    .prop_map(|raw| {
        let mut t = 100_000i64;
        let mut now = 0i64;
        raw.into_iter()
            .map(|(d, k, step, jitter, v, tick)| {
                t += step;
                if tick == 0 {
                    now = now.max(t + jitter);
                    Ev::Tick(now)
                } else {
                    Ev::Read(d, k, t + jitter, v)
                }
            })
            .collect()
    })
}

fn name(d: u8) -> String {
    format!("d{d}")
}

fn run_events(r: &mut Rules, evs: &[Ev]) -> Applied {
    let mut all = Applied::default();
    for ev in evs {
        match ev {
            Ev::Read(d, k, ts, v) => {
                let a = r.apply(
                    "t",
                    vec![rec(&name(*d), *ts, &[(&format!("k{k}"), v.clone())])],
                );
                all.out.extend(a.out);
                all.dropped.extend(a.dropped);
            }
            Ev::Tick(now) => all.out.extend(r.tick(*now)),
        }
    }
    all
}

fn close_enough(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F64(x), Value::F64(y)) => (x - y).abs() <= 1e-9 * (1.0 + x.abs().max(y.abs())),
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn aggregates_equal_a_naive_recomputation(evs in events(), emit_raw in any::<bool>(), grace in 0i64..5_000) {
        let cfg = format!(
            "[[rules]]\nname = \"agg\"\nactions = [{{ type = \"aggregate\", window = \"10s\", grace = \"{grace}ms\", emit_raw = {emit_raw}, functions = [\"min\", \"max\", \"avg\", \"sum\", \"count\", \"first\", \"last\", \"stddev\"] }}]\n"
        );
        let mut r = engine(&cfg);
        let mut evs = evs;
        evs.push(Ev::Tick(i64::MAX));
        let applied = run_events(&mut r, &evs);

        // The model: the documented late-data policy, then each window's
        // readings recomputed from scratch.
        type Win = (i64, Vec<(i64, Value)>);
        let mut open: BTreeMap<(u8, u8), Win> = BTreeMap::new();
        let mut closed: BTreeMap<(u8, u8), i64> = BTreeMap::new();
        let mut windows: Vec<((u8, u8), Win)> = Vec::new();
        let (mut late, mut raws) = (0u64, 0usize);
        for ev in &evs {
            match ev {
                Ev::Read(d, k, ts, v) => {
                    let start = ts - ts.rem_euclid(WINDOW_MS);
                    let id = (*d, *k);
                    let is_late = match open.get(&id) {
                        Some((s, _)) => start < *s,
                        None => closed.get(&id).is_some_and(|c| start <= *c),
                    };
                    raws += usize::from(emit_raw);
                    if is_late {
                        late += 1;
                        continue;
                    }
                    match open.get_mut(&id) {
                        Some((s, vals)) if *s == start => vals.push((*ts, v.clone())),
                        _ => {
                            if let Some(w) = open.remove(&id) {
                                closed.insert(id, w.0);
                                windows.push((id, w));
                            }
                            open.insert(id, (start, vec![(*ts, v.clone())]));
                        }
                    }
                }
                Ev::Tick(now) => {
                    let due: Vec<(u8, u8)> = open
                        .iter()
                        .filter(|(_, (s, _))| (s + WINDOW_MS).saturating_add(grace) <= *now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in due {
                        let w = open.remove(&id).unwrap();
                        closed.insert(id, w.0);
                        windows.push((id, w));
                    }
                }
            }
        }
        prop_assert!(open.is_empty());
        let mut want: BTreeMap<(String, i64, String), Value> = BTreeMap::new();
        for ((d, k), (start, vals)) in windows {
            prop_assert!(!vals.is_empty());
            let xs: Vec<f64> = vals.iter().map(|(_, v)| numeric(v).unwrap()).collect();
            let n = xs.len() as f64;
            let sum: f64 = xs.iter().sum();
            let mean = sum / n;
            let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
            let first = vals.iter().enumerate().min_by_key(|(i, (t, _))| (*t, *i)).unwrap().1.1.clone();
            let last = vals.iter().enumerate().max_by_key(|(i, (t, _))| (*t, *i)).unwrap().1.1.clone();
            let end = start + WINDOW_MS;
            for (f, v) in [
                ("min", Value::F64(xs.iter().copied().fold(f64::INFINITY, f64::min))),
                ("max", Value::F64(xs.iter().copied().fold(f64::NEG_INFINITY, f64::max))),
                ("avg", Value::F64(mean)),
                ("sum", Value::F64(sum)),
                ("count", Value::I64(xs.len() as i64)),
                ("first", first),
                ("last", last),
                ("stddev", Value::F64(var.sqrt())),
            ] {
                let key = format!("k{k}_{f}");
                prop_assert!(want.insert((name(d), end, key), v).is_none());
            }
        }
        let mut got: BTreeMap<(String, i64, String), Value> = BTreeMap::new();
        let mut got_raw = 0usize;
        for (_, dev, ts, key, v) in flat(&applied.out) {
            if key.contains('_') {
                prop_assert!(got.insert((dev, ts, key), v).is_none(), "an aggregate came out twice");
            } else {
                got_raw += 1;
            }
        }
        prop_assert_eq!(got.len(), want.len());
        for (k, w) in &want {
            let g = got.get(k);
            prop_assert!(g.is_some_and(|g| close_enough(g, w)), "{:?}: got {:?}, want {:?}", k, g, w);
        }
        prop_assert_eq!(got_raw, raws);
        let c = &r.counters()[0];
        prop_assert_eq!(c.late, late);
        prop_assert_eq!(applied.dropped.len() as u64, if emit_raw { 0 } else { late });
        prop_assert_eq!(r.next_tick_ms(), None);
    }

    #[test]
    fn deadband_passes_exactly_the_moves_beyond_its_band(
        xs in prop::collection::vec((0u8..3, -50.0f64..50.0), 0..200),
        band in 0.1f64..20.0,
        pct in any::<bool>(),
    ) {
        let kind = if pct { "pct" } else { "abs" };
        let mut r = engine(&format!("[[rules]]\nname = \"r\"\nactions = [{{ type = \"deadband\", {kind} = {band} }}]\n"));
        let mut last: BTreeMap<u8, f64> = BTreeMap::new();
        for (t, (d, x)) in xs.iter().enumerate() {
            let out = r.apply("t", vec![rec(&name(*d), t as i64, &[("k", f(*x))])]).out;
            let width = |l: f64| if pct { l.abs() * band / 100.0 } else { band };
            let should = last.get(d).is_none_or(|l| (x - l).abs() > width(*l));
            prop_assert_eq!(out.len(), usize::from(should));
            if should {
                last.insert(*d, *x);
            }
        }
        // The bound: per device, every passed value moved more than the band
        // from the one before it, so a value bouncing within the band passes once.
        let c = &r.counters()[0];
        prop_assert!(c.emitted <= xs.len() as u64);
    }

    #[test]
    fn throttle_passes_at_most_one_reading_per_interval(
        evs in events(),
        last in any::<bool>(),
    ) {
        let keep = if last { "last" } else { "first" };
        let mut r = engine(&format!(
            "[[rules]]\nname = \"r\"\nactions = [{{ type = \"throttle\", interval = \"10s\", keep = \"{keep}\" }}]\n"
        ));
        let mut evs = evs;
        evs.push(Ev::Tick(i64::MAX));
        let applied = run_events(&mut r, &evs);
        let mut per_interval: BTreeMap<(String, String, i64), Value> = BTreeMap::new();
        let inputs: Vec<(String, String, i64, Value)> = evs
            .iter()
            .filter_map(|e| match e {
                Ev::Read(d, k, ts, v) => Some((name(*d), format!("k{k}"), *ts, v.clone())),
                Ev::Tick(_) => None,
            })
            .collect();
        for (_, dev, ts, key, v) in flat(&applied.out) {
            let start = ts - ts.rem_euclid(WINDOW_MS);
            prop_assert!(per_interval.insert((dev.clone(), key.clone(), start), v.clone()).is_none(), "two readings passed in one interval");
            prop_assert!(inputs.iter().any(|(d, k, t, x)| *d == dev && *k == key && *t == ts && *x == v));
        }
        // every interval that got a timely reading is represented
        let c = &r.counters()[0];
        prop_assert_eq!(c.emitted + c.dropped, inputs.len() as u64);
        prop_assert_eq!(c.emitted as usize, per_interval.len());
    }

    #[test]
    fn a_restored_snapshot_continues_exactly_like_an_uninterrupted_run(
        evs in mixed_events(),
        cut in any::<prop::sample::Index>(),
    ) {
        let cfg = parse(PIPELINE).unwrap();
        let cut = cut.index(evs.len() + 1);

        let mut whole = Rules::new(cfg.clone());
        let want = run_events_mixed(&mut whole, &evs);

        // 1. full snapshot, serialised, restored
        let mut first = Rules::new(cfg.clone());
        let mut got = run_events_mixed(&mut first, &evs[..cut]);
        let bytes = postcard::to_allocvec(&first.state()).unwrap();
        drop(first); // kill -9
        let state: EngineState = postcard::from_bytes(&bytes).unwrap();
        let (mut second, refused) = Rules::with_state(cfg.clone(), &state);
        prop_assert!(refused.is_empty());
        let rest = run_events_mixed(&mut second, &evs[cut..]);
        got.out.extend(rest.out);
        got.dropped.extend(rest.dropped);
        prop_assert_eq!(&got, &want);

        // 2. the integrator's way: dirty entries written after every step
        let mut db: BTreeMap<StateKey, StateBytes> = BTreeMap::new();
        let mut first = Rules::new(cfg.clone());
        let mut got = Applied::default();
        for ev in &evs[..cut] {
            let a = run_events_mixed(&mut first, std::slice::from_ref(ev));
            got.out.extend(a.out);
            got.dropped.extend(a.dropped);
            for (k, v) in first.take_dirty() {
                match v {
                    Some(v) => { db.insert(k, v); }
                    None => { db.remove(&k); }
                }
            }
        }
        drop(first);
        let state = EngineState { entries: db.into_iter().collect() };
        let (mut second, refused) = Rules::with_state(cfg, &state);
        prop_assert!(refused.is_empty());
        let rest = run_events_mixed(&mut second, &evs[cut..]);
        got.out.extend(rest.out);
        got.dropped.extend(rest.dropped);
        prop_assert_eq!(&got, &want);
    }
}

/// Every stateful action, chained with transforms, over several keys.
const PIPELINE: &str = r#"
[[rules]]
name = "temp"
keys = "k0"
actions = [
  { type = "range", min = -500, max = 500, action = "clamp" },
  { type = "deadband", abs = 5 },
  { type = "scale", factor = 2 },
  { type = "aggregate", window = "10s", functions = ["min", "avg", "last", "count"], emit_raw = true, grace = "1s" },
  { type = "rename", to = "temp" },
  { type = "throttle", interval = "10s", keep = "last" },
]

[[rules]]
name = "state"
keys = "k1"
actions = [
  { type = "dedupe", window = "5s" },
  { type = "throttle", interval = "3s" },
  { type = "stream", name = "alarms" },
]

[[rules]]
name = "hum"
devices = "d1"
keys = "k2"
actions = [{ type = "aggregate", window = "7s", functions = ["sum", "stddev", "first"] }]
"#;

fn mixed_events() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            0u8..2,
            0u8..4,
            0i64..2_500,
            -15_000i64..15_000,
            prop_oneof![
                numeric_value(),
                (0i64..3).prop_map(Value::I64),
                any::<bool>().prop_map(Value::Bool)
            ],
            0u8..8,
        ),
        0..120,
    )
    .prop_map(|raw| {
        let mut t = 100_000i64;
        let mut now = 0i64;
        raw.into_iter()
            .map(|(d, k, step, jitter, v, tick)| {
                t += step;
                if tick == 0 {
                    now = now.max(t + jitter);
                    Ev::Tick(now)
                } else {
                    Ev::Read(d, k, t + jitter, v)
                }
            })
            .collect()
    })
}

/// Like [`run_events`], but a reading also carries its neighbours' keys, so
/// records mix rules.
fn run_events_mixed(r: &mut Rules, evs: &[Ev]) -> Applied {
    let mut all = Applied::default();
    for ev in evs {
        match ev {
            Ev::Read(d, k, ts, v) => {
                let other = format!("k{}", (k + 1) % 4);
                let a = r.apply(
                    "t",
                    vec![rec(
                        &name(*d),
                        *ts,
                        &[(&format!("k{k}"), v.clone()), (&other, Value::I64(*ts % 7))],
                    )],
                );
                all.out.extend(a.out);
                all.dropped.extend(a.dropped);
            }
            Ev::Tick(now) => all.out.extend(r.tick(*now)),
        }
    }
    all
}

#[test]
fn the_commented_example_in_the_reference_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/sluice.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let example: String = text
        .lines()
        .skip_while(|l| *l != "# [[rules]]")
        .take_while(|l| l.starts_with('#'))
        .map(|l| {
            format!(
                "{}\n",
                l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#'))
            )
        })
        .collect();
    let rules = parse(&example).unwrap();
    assert_eq!(rules.len(), 3);
    let kinds: std::collections::HashSet<std::mem::Discriminant<Action>> = rules
        .iter()
        .flat_map(|r| r.actions.iter().map(std::mem::discriminant))
        .collect();
    assert_eq!(kinds.len(), 9, "the example shows every action type");
}
