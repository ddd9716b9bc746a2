//! The observability listener (`[metrics] bind`): `/metrics` in Prometheus'
//! text format, `/healthz` and `/readyz`.
//!
//! Every metric of DESIGN.md is exported from start-up with a sample for each
//! documented label value (0 until something happens). The outbox figures are
//! per stream (`stream` label); sum over it for the gateway's totals.
//! `/healthz` is 200 while the daemon runs: any long-lived task ending makes
//! the daemon exit. `/readyz` is 200 because this listener is started only
//! after every configured listener is bound and the outbox is open.
//!
//! Labels are bounded: protocols, results, reasons, and names from the
//! configuration (streams, rules); never a device. `docs/operations.md`
//! lists every family.

pub(crate) mod process;

use crate::admin::AdminContext;
use crate::stats::{PROTOCOL_ERROR_LABELS, PROTOCOLS_LABELS, RESULT_LABELS};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sluice_cloud_sync::outbox::DROP_REASONS;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// The router of the observability listener.
pub fn router(ctx: Arc<AdminContext>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(ctx)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

async fn metrics(State(ctx): State<Arc<AdminContext>>) -> Response {
    match render(&ctx).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The whole exposition.
///
/// Fails when the outbox cannot be read.
pub async fn render(ctx: &AdminContext) -> Result<String, sluice_cloud_sync::OutboxError> {
    let mut o = String::with_capacity(8192);
    let ingest = ctx.stats.snapshot();

    head(
        &mut o,
        "sluice_ingest_messages_total",
        "counter",
        "Device messages by protocol and result.",
    );
    for p in PROTOCOLS_LABELS {
        for r in RESULT_LABELS {
            let n = ingest
                .messages
                .get(p)
                .and_then(|m| m.get(r))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                o,
                "sluice_ingest_messages_total{{protocol=\"{p}\",result=\"{r}\"}} {n}"
            );
        }
    }
    head(
        &mut o,
        "sluice_ingest_records_total",
        "counter",
        "Records stored from device messages.",
    );
    let _ = writeln!(o, "sluice_ingest_records_total {}", ingest.records);
    head(
        &mut o,
        "sluice_ingest_commit_seconds",
        "histogram",
        "From a listener's append to the durable commit's answer.",
    );
    ctx.stats
        .commit_seconds
        .render(&mut o, "sluice_ingest_commit_seconds", "");
    head(
        &mut o,
        "sluice_auth_failures_total",
        "counter",
        "Failed device authentications by protocol.",
    );
    for p in PROTOCOLS_LABELS {
        let n = ingest.auth_failures.get(p).copied().unwrap_or(0);
        let _ = writeln!(o, "sluice_auth_failures_total{{protocol=\"{p}\"}} {n}");
    }
    head(
        &mut o,
        "sluice_mqtt_protocol_errors_total",
        "counter",
        "MQTT connections closed for a protocol error, by reason.",
    );
    for r in PROTOCOL_ERROR_LABELS {
        let n = ingest.mqtt_protocol_errors.get(r).copied().unwrap_or(0);
        let _ = writeln!(o, "sluice_mqtt_protocol_errors_total{{reason=\"{r}\"}} {n}");
    }

    let st = ctx.outbox.stats().await?;
    let now = now_ms();
    head(
        &mut o,
        "sluice_outbox_records",
        "gauge",
        "Records waiting in the outbox, by stream.",
    );
    for (name, s) in &st.streams {
        let _ = writeln!(
            o,
            "sluice_outbox_records{{stream=\"{name}\"}} {}",
            s.records
        );
    }
    head(
        &mut o,
        "sluice_outbox_bytes",
        "gauge",
        "Accounted bytes in the outbox, by stream.",
    );
    for (name, s) in &st.streams {
        let _ = writeln!(o, "sluice_outbox_bytes{{stream=\"{name}\"}} {}", s.bytes);
    }
    head(
        &mut o,
        "sluice_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest waiting record, by stream (0 when empty).",
    );
    for (name, s) in &st.streams {
        let age = s
            .oldest_accepted_ms
            .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        let _ = writeln!(
            o,
            "sluice_outbox_oldest_age_seconds{{stream=\"{name}\"}} {age}"
        );
    }
    head(
        &mut o,
        "sluice_outbox_dropped_total",
        "counter",
        "Records dropped from the outbox, by reason and stream.",
    );
    for (name, s) in &st.streams {
        for r in DROP_REASONS {
            let n = s.dropped.get(r).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "sluice_outbox_dropped_total{{reason=\"{r}\",stream=\"{name}\"}} {n}"
            );
        }
    }
    head(
        &mut o,
        "sluice_outbox_corrupt_set_aside_total",
        "counter",
        "Corrupt outbox files moved aside since start.",
    );
    let _ = writeln!(
        o,
        "sluice_outbox_corrupt_set_aside_total {}",
        st.corrupt_set_aside
    );
    ctx.outbox.render_histograms(&mut o);

    let (connected, acked) = ctx
        .uplink
        .as_ref()
        .map_or((false, 0), |u| (u.connected(), u.records_acked()));
    head(
        &mut o,
        "sluice_uplink_connected",
        "gauge",
        "1 while a cloud broker session is up.",
    );
    let _ = writeln!(o, "sluice_uplink_connected {}", u8::from(connected));
    head(
        &mut o,
        "sluice_uplink_records_acked_total",
        "counter",
        "Records the cloud broker acknowledged since start.",
    );
    let _ = writeln!(o, "sluice_uplink_records_acked_total {acked}");
    head(
        &mut o,
        "sluice_uplink_client_cert_expiry_seconds",
        "gauge",
        "Seconds until the cloud client certificate in use expires (negative once expired; no sample without one).",
    );
    if let Some(t) = ctx.uplink.as_ref().and_then(|u| u.client_cert_not_after()) {
        let _ = writeln!(
            o,
            "sluice_uplink_client_cert_expiry_seconds {}",
            t - now.div_euclid(1000)
        );
    }
    head(
        &mut o,
        "sluice_uplink_tls_reloads_total",
        "counter",
        "Cloud TLS files (CA, client certificate, key) reloaded after changing on disk, by result.",
    );
    let (reloads, failures) = ctx
        .uplink
        .as_ref()
        .map_or((0, 0), |u| (u.tls_reloads(), u.tls_reload_failures()));
    let _ = writeln!(
        o,
        "sluice_uplink_tls_reloads_total{{result=\"ok\"}} {reloads}"
    );
    let _ = writeln!(
        o,
        "sluice_uplink_tls_reloads_total{{result=\"failed\"}} {failures}"
    );

    head(
        &mut o,
        "sluice_devices_registered",
        "gauge",
        "Devices that can authenticate.",
    );
    let _ = writeln!(
        o,
        "sluice_devices_registered {}",
        ctx.registry.active_count()
    );
    head(
        &mut o,
        "sluice_devices_connected",
        "gauge",
        "Devices with a live session (MQTT) or Observe registration (CoAP), by protocol.",
    );
    for p in PROTOCOLS_LABELS {
        let n = match p {
            "mqtt" => ctx.mqtt_sessions.connected(),
            // CoAP has no sessions: devices with an Observe registration.
            "coap" => ctx.coap_observers.devices(),
            _ => 0,
        };
        let _ = writeln!(o, "sluice_devices_connected{{protocol=\"{p}\"}} {n}");
    }
    head(
        &mut o,
        "sluice_firmware_bytes_served_total",
        "counter",
        "Firmware bytes served to devices (MQTT chunks, CoAP Block2, HTTP).",
    );
    let _ = writeln!(
        o,
        "sluice_firmware_bytes_served_total {}",
        ctx.router
            .stats
            .firmware_bytes_served
            .load(Ordering::Relaxed)
    );
    head(
        &mut o,
        "sluice_firmware_manifests_total",
        "counter",
        "Signed firmware manifests by result (a rejected one is reported on P/firmware/state).",
    );
    for (result, n) in [
        ("accepted", &ctx.router.stats.manifests_accepted),
        ("rejected", &ctx.router.stats.manifests_rejected),
    ] {
        let _ = writeln!(
            o,
            "sluice_firmware_manifests_total{{result=\"{result}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    head(
        &mut o,
        "sluice_rule_readings_total",
        "counter",
        "Readings per telemetry rule by outcome (matched, dropped, late, absorbed into a window, emitted).",
    );
    for c in ctx.pipeline.counters().await {
        for (outcome, n) in [
            ("matched", c.matched),
            ("dropped", c.dropped),
            ("late", c.late),
            ("absorbed", c.absorbed),
            ("emitted", c.emitted),
        ] {
            let _ = writeln!(
                o,
                "sluice_rule_readings_total{{rule=\"{}\",outcome=\"{outcome}\"}} {n}",
                c.rule
            );
        }
    }
    head(
        &mut o,
        "sluice_coap_messages_total",
        "counter",
        "CoAP message-layer events by kind.",
    );
    let coap = serde_json::to_value(&*ctx.coap).unwrap_or_default();
    if let Some(m) = coap.as_object() {
        for (kind, n) in m {
            let _ = writeln!(o, "sluice_coap_messages_total{{kind=\"{kind}\"}} {n}");
        }
    }
    if let Some(c) = &ctx.coaps {
        let v = serde_json::to_value(&*c.stats).unwrap_or_default();
        head(
            &mut o,
            "sluice_coaps_sessions",
            "gauge",
            "coaps (DTLS) sessions now, by state.",
        );
        for state in ["half_open", "established"] {
            let n = v
                .get(state)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            let _ = writeln!(o, "sluice_coaps_sessions{{state=\"{state}\"}} {n}");
        }
        head(
            &mut o,
            "sluice_coaps_events_total",
            "counter",
            "coaps (DTLS) session-layer events by kind.",
        );
        if let Some(m) = v.as_object() {
            for (kind, n) in m {
                if kind != "half_open" && kind != "established" {
                    let _ = writeln!(o, "sluice_coaps_events_total{{kind=\"{kind}\"}} {n}");
                }
            }
        }
    }
    head(
        &mut o,
        "sluice_commands_total",
        "counter",
        "Commands from the cloud by outcome.",
    );
    let s = &ctx.router.stats;
    for (outcome, n) in [
        ("received", &s.commands),
        ("parked", &s.parked),
        ("delivered", &s.delivered),
        ("answered", &s.answered),
        ("failed", &s.failed),
    ] {
        let _ = writeln!(
            o,
            "sluice_commands_total{{outcome=\"{outcome}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    head(
        &mut o,
        "sluice_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(
        o,
        "sluice_uptime_seconds {}",
        ctx.started.elapsed().as_secs()
    );
    process::render(&mut o);
    Ok(o)
}
