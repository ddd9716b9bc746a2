//! The HTTP device listener (ThingsBoard device API over HTTP).
//!
//! `POST /api/v1/{token}/telemetry`: the token is checked first (401 whatever
//! the body), the body is read up to `listeners.http.max_body` (413 past it,
//! without buffering the excess), decoded (400 with a JSON reason), appended to
//! the outbox, and answered 200 only after the commit. A full outbox (`reject`
//! policy) answers 503 with `Retry-After`.
//!
//! The decoder follows `Content-Type`: `application/senml+json` is SenML
//! ([`senml`]); anything else, including none and what `curl -d` sends
//! (`application/x-www-form-urlencoded`), is ThingsBoard JSON ([`tbjson`]),
//! as ThingsBoard itself does (DESIGN.md, "Body formats").

use crate::registry::Registry;
use crate::stats::{IngestResult, IngestStats, Protocol};
use crate::{senml, tbjson};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sluice_cloud_sync::{AppendError, Clock, Outbox};
use std::sync::Arc;

/// Seconds a device is asked to wait when the outbox is full.
const RETRY_AFTER_S: &str = "5";

/// What the handlers share.
pub struct HttpContext {
    /// Device registry.
    pub registry: Arc<Registry>,
    /// The outbox.
    pub outbox: Outbox,
    /// Rules between decoding and the outbox.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// Counters.
    pub stats: Arc<IngestStats>,
    /// The gateway clock (receive timestamps and their trust).
    pub clock: Arc<Clock>,
    /// Body limit in bytes.
    pub max_body: usize,
}

/// The router of the device HTTP API.
pub fn router(ctx: Arc<HttpContext>) -> Router {
    Router::new()
        .route("/api/v1/{token}/telemetry", post(telemetry))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource") })
        .with_state(ctx)
}

fn error(status: StatusCode, why: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": why.into() }).to_string();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// How a telemetry body is encoded, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    ThingsBoard,
    SenMl,
}

impl BodyFormat {
    fn of(headers: &HeaderMap) -> Self {
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("")
            .trim();
        if media_type.eq_ignore_ascii_case("application/senml+json") {
            BodyFormat::SenMl
        } else {
            BodyFormat::ThingsBoard
        }
    }
}

async fn telemetry(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let count = |r| ctx.stats.count(Protocol::Http, r);
    let Some(device) = ctx.registry.authenticate(&token) else {
        count(IngestResult::Unauthorized);
        tracing::debug!("telemetry with an unknown or revoked token");
        return error(StatusCode::UNAUTHORIZED, "unknown or revoked access token");
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        count(IngestResult::TooLarge);
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {} bytes", ctx.max_body),
        )
    };
    if declared.is_some_and(|n| n > ctx.max_body as u64) {
        tracing::debug!(%device, "body over the limit");
        return too_large();
    }
    let format = BodyFormat::of(&headers);
    let Ok(bytes) = axum::body::to_bytes(body, ctx.max_body).await else {
        // Over the limit (chunked) or the client went away mid-body.
        return too_large();
    };
    let now = ctx.clock.now();
    let decoded = match format {
        BodyFormat::ThingsBoard => tbjson::decode(&bytes, &device, now.wall_ms, now.trusted),
        BodyFormat::SenMl => senml::decode(&bytes, &device, now.wall_ms, now.trusted),
    };
    let records = match decoded {
        Ok(r) => r,
        Err(e) => {
            count(IngestResult::BadPayload);
            tracing::debug!(%device, error = %e, "refused payload");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    if records.is_empty() {
        // `{}` (the ThingsBoard SDK's connection test) or `[]`: nothing to store.
        count(IngestResult::Ok);
        return StatusCode::OK.into_response();
    }
    let started = std::time::Instant::now();
    let n = records.len();
    let appended = match ctx.pipeline.submit("telemetry", records).await {
        Ok(p) => p.await,
        Err(e) => Err(e),
    };
    ctx.stats
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    match appended {
        Ok(_) => {
            count(IngestResult::Ok);
            ctx.stats.count_records(n);
            StatusCode::OK.into_response()
        }
        Err(e) => {
            count(IngestResult::Rejected);
            let why = match e {
                AppendError::Full => "outbox full, retry later",
                AppendError::Closed => "shutting down, retry later",
                other => {
                    tracing::error!(%device, error = %other, "append failed");
                    "storage error, retry later"
                }
            };
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format_of(content_type: Option<&str>) -> BodyFormat {
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        BodyFormat::of(&headers)
    }

    #[test]
    fn content_type_picks_senml_or_else_thingsboard_json() {
        for ct in [
            "application/senml+json",
            "Application/SenML+JSON",
            "application/senml+json; charset=utf-8",
        ] {
            assert_eq!(format_of(Some(ct)), BodyFormat::SenMl, "{ct}");
        }
        for ct in [
            None,
            Some("application/json"),
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
            Some("application/senml+jsonx"),
        ] {
            assert_eq!(format_of(ct), BodyFormat::ThingsBoard, "{ct:?}");
        }
    }
}
