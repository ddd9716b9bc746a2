//! The HTTP device listener: the ThingsBoard device API over HTTP under
//! `/api/v1/{token}/` (DESIGN.md, "HTTP").
//!
//! Every request is authenticated by the token in its path first (401
//! whatever else is wrong); bodies are read up to `listeners.http.max_body`
//! (413 past it, without buffering the excess); refusals carry a JSON body
//! `{"error":"why"}`.
//!
//! - `POST telemetry`, `POST attributes`: decoded (400 with the reason),
//!   appended to the outbox (`telemetry` through the rules, client
//!   attributes to the `attributes` stream) and answered 200 only after the
//!   commit; a full outbox (`reject`) or shutdown answers 503 with
//!   `Retry-After`. Telemetry follows `Content-Type`:
//!   `application/senml+json` is SenML ([`senml`]), anything else (none,
//!   what `curl -d` sends) ThingsBoard JSON ([`tbjson`]), as ThingsBoard
//!   does; attributes are ThingsBoard JSON only (SenML is 415). Stored
//!   client attributes are also kept for attribute requests.
//! - `GET attributes?clientKeys=a,b&sharedKeys=c` (also `client_keys` /
//!   `shared_keys`, comma-separated or repeated, as the HTTP SDK sends):
//!   200 `{"client":{…},"shared":{…}}`.
//! - `GET attributes/updates?timeout=MS` and `GET rpc?timeout=MS`: long
//!   polls ([`long_poll`]; timeout 30 s by default, capped at 5 min): 200
//!   with the next shared-attribute change (`{"k":v}` or `{"deleted":[…]}`)
//!   or command (`{"id":N,"method":…,"params":…}`); 408 when the timeout
//!   passes; 409 when a newer poll of the same device and kind took over;
//!   503 with `Retry-After` at shutdown.
//! - `POST rpc/{id}`: the device's answer to command `id`, routed up: 200,
//!   or 404 when no such command is pending for this device (400 for an id
//!   that is not a number).
//! - `POST rpc` with `{"method":…,"params":…}`: client-side RPC answered in
//!   the body, 200 `getCurrentTime` / `getSessionLimits`, and 200
//!   `{"error":"unsupported method"}` for any other method (as the MQTT
//!   and CoAP listeners answer); 400 when the body is not such an object.
//! - `GET firmware?title&version[&size&chunk]`, with `Range`: [`firmware`].
//!
//! Wrong method on a known path: 405; unknown path: 404. Refusals
//! (401/413/400) are counted for every endpoint; `ok` and `rejected` count
//! telemetry and attribute posts.

// Handlers answer refusals as early `Err(Response)` returns (axum's idiom);
// the size of a `Response` on that path does not matter here.
#![allow(clippy::result_large_err)]

mod firmware;
pub mod long_poll;

pub use long_poll::LongPolls;

use crate::downlink::Router;
use crate::mqtt::session::Push;
use crate::registry::Registry;
use crate::stats::{IngestResult, IngestStats, Protocol};
use crate::{senml, tbjson};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use long_poll::{Kind, Poll, Wake};
use serde_json::{Map, Value as Json, json};
use sluice_cloud_sync::{AppendError, Clock, DeviceName, Outbox};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Seconds a device is asked to wait when the outbox is full.
const RETRY_AFTER_S: &str = "5";
/// Long-poll timeout when the device names none.
const DEFAULT_POLL: Duration = Duration::from_secs(30);
/// Longest long poll.
const MAX_POLL: Duration = Duration::from_secs(300);

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
    /// Attributes, commands, firmware.
    pub router: Arc<Router>,
    /// Waiting long polls (a delivery channel of the router).
    pub long_polls: Arc<LongPolls>,
    /// Ends the long polls at shutdown.
    pub shutdown: CancellationToken,
}

/// The router of the device HTTP API.
pub fn router(ctx: Arc<HttpContext>) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/{token}/telemetry", post(telemetry))
        .route(
            "/api/v1/{token}/attributes",
            post(post_attributes).get(get_attributes),
        )
        .route("/api/v1/{token}/attributes/updates", get(attribute_updates))
        .route("/api/v1/{token}/rpc", get(commands).post(client_rpc))
        .route("/api/v1/{token}/rpc/{id}", post(rpc_reply))
        .route("/api/v1/{token}/firmware", get(firmware::serve))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource") })
        .with_state(ctx)
}

fn error(status: StatusCode, why: impl Into<String>) -> Response {
    let body = json!({ "error": why.into() }).to_string();
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

fn json_ok(body: &Json) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn retry_later(why: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    r
}

/// The device of `token`; 401 (counted) when there is none.
fn authenticate(ctx: &HttpContext, token: &str) -> Result<DeviceName, Response> {
    ctx.registry.authenticate(token).ok_or_else(|| {
        ctx.stats.count(Protocol::Http, IngestResult::Unauthorized);
        tracing::debug!("HTTP request with an unknown or revoked token");
        error(StatusCode::UNAUTHORIZED, "unknown or revoked access token")
    })
}

/// Reads the body up to `max_body`; 413 (counted) past it.
async fn read_body(
    ctx: &HttpContext,
    device: &DeviceName,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    let too_large = || {
        ctx.stats.count(Protocol::Http, IngestResult::TooLarge);
        tracing::debug!(%device, "body over the limit");
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {} bytes", ctx.max_body),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ctx.max_body as u64) {
        return Err(too_large());
    }
    // Over the limit (chunked) or the client went away mid-body.
    axum::body::to_bytes(body, ctx.max_body)
        .await
        .map_err(|_| too_large())
}

fn bad_payload(ctx: &HttpContext, device: &DeviceName, why: impl Into<String>) -> Response {
    let why = why.into();
    ctx.stats.count(Protocol::Http, IngestResult::BadPayload);
    tracing::debug!(%device, error = %why, "refused HTTP request");
    error(StatusCode::BAD_REQUEST, why)
}

/// The query string's parameters, in order (a name may repeat).
struct Params(Vec<(String, String)>);

impl Params {
    /// 400 when the query string cannot be read.
    fn from(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Self, Response> {
        match q {
            Ok(Query(pairs)) => Ok(Self(pairs)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }

    fn first(&self, names: &[&str]) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated key under any of `names`; `None` when none of
    /// them is given.
    fn keys(&self, names: &[&str]) -> Option<Vec<String>> {
        let mut given = false;
        let mut keys = Vec::new();
        for (_, v) in self.0.iter().filter(|(k, _)| names.contains(&k.as_str())) {
            given = true;
            keys.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned),
            );
        }
        given.then_some(keys)
    }

    /// Parameter `name` as a number; 400 when it is not one.
    fn number(&self, name: &str) -> Result<Option<u64>, Response> {
        self.first(&[name])
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("{name}={v:?} is not a non-negative integer"),
                    )
                })
            })
            .transpose()
    }
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
) -> Result<Response, Response> {
    ingest(&ctx, &token, &headers, body, "telemetry").await
}

async fn post_attributes(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    ingest(&ctx, &token, &headers, body, "attributes").await
}

/// Decodes a telemetry or client-attributes post and answers after the
/// commit.
async fn ingest(
    ctx: &HttpContext,
    token: &str,
    headers: &HeaderMap,
    body: Body,
    stream: &'static str,
) -> Result<Response, Response> {
    let count = |r| ctx.stats.count(Protocol::Http, r);
    let device = authenticate(ctx, token)?;
    let format = BodyFormat::of(headers);
    let bytes = read_body(ctx, &device, headers, body).await?;
    let now = ctx.clock.now();
    let decoded = match (format, stream) {
        (BodyFormat::SenMl, "telemetry") => {
            senml::decode(&bytes, &device, now.wall_ms, now.trusted)
        }
        (BodyFormat::SenMl, _) => {
            count(IngestResult::BadPayload);
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "attributes are ThingsBoard JSON, not SenML",
            ));
        }
        (BodyFormat::ThingsBoard, _) => tbjson::decode(&bytes, &device, now.wall_ms, now.trusted),
    };
    let records = decoded.map_err(|e| bad_payload(ctx, &device, e.to_string()))?;
    if records.is_empty() {
        // `{}` (the ThingsBoard SDK's connection test) or `[]`: nothing to store.
        count(IngestResult::Ok);
        return Ok(StatusCode::OK.into_response());
    }
    let client: Option<Map<String, Json>> = (stream == "attributes").then(|| {
        records
            .iter()
            .flat_map(|r| &r.values)
            .map(|(k, v)| (k.clone(), sluice_cloud_sync::profile::value_json(v)))
            .collect()
    });
    let started = std::time::Instant::now();
    let n = records.len();
    let appended = match ctx.pipeline.submit(stream, records).await {
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
            if let Some(values) = client {
                ctx.router.attributes().set_client(&device, &values);
            }
            Ok(StatusCode::OK.into_response())
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
            Err(retry_later(why))
        }
    }
}

async fn get_attributes(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Response> {
    let device = authenticate(&ctx, &token)?;
    let params = Params::from(query)?;
    let client = params.keys(&["clientKeys", "client_keys"]);
    let shared = params.keys(&["sharedKeys", "shared_keys"]);
    let body = ctx
        .router
        .attributes()
        .request(&device, client.as_deref(), shared.as_deref());
    Ok(json_ok(&body))
}

async fn attribute_updates(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Response> {
    long_poll(&ctx, &token, query, Kind::Attributes).await
}

async fn commands(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Response> {
    long_poll(&ctx, &token, query, Kind::Rpc).await
}

/// What a long poll answers for a push.
fn push_body(push: Push) -> Json {
    match push {
        Push::Attributes(values) => values,
        Push::Rpc { id, body } => {
            let mut m = Map::new();
            m.insert("id".into(), json!(id));
            match body {
                Json::Object(fields) => m.extend(fields),
                other => {
                    m.insert("params".into(), other);
                }
            }
            Json::Object(m)
        }
    }
}

async fn long_poll(
    ctx: &HttpContext,
    token: &str,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    kind: Kind,
) -> Result<Response, Response> {
    let device = authenticate(ctx, token)?;
    let params = Params::from(query)?;
    let timeout = params
        .number("timeout")?
        .map_or(DEFAULT_POLL, |ms| Duration::from_millis(ms).min(MAX_POLL));
    let wake = match ctx.long_polls.register(&device, kind) {
        Poll::Ready(p) => Some(Wake::Push(p)),
        Poll::Waiting(w) => tokio::select! {
            wake = w.wait(timeout) => wake,
            () = ctx.shutdown.cancelled() => return Err(retry_later("shutting down, retry later")),
        },
    };
    match wake {
        Some(Wake::Push(p)) => {
            tracing::debug!(%device, ?kind, "long poll answered");
            Ok(json_ok(&push_body(p)))
        }
        Some(Wake::Replaced) => Err(error(
            StatusCode::CONFLICT,
            "a newer poll of this device took over",
        )),
        None => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("nothing within {} ms", timeout.as_millis()),
        )),
    }
}

async fn rpc_reply(
    State(ctx): State<Arc<HttpContext>>,
    Path((token, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let device = authenticate(&ctx, &token)?;
    let bytes = read_body(&ctx, &device, &headers, body).await?;
    let Ok(id) = id.parse::<u32>() else {
        return Err(bad_payload(
            &ctx,
            &device,
            format!("command id {id:?} is not a number"),
        ));
    };
    if ctx.router.device_reply(&device, id, &bytes) {
        Ok(StatusCode::OK.into_response())
    } else {
        tracing::debug!(%device, id, "answer to no pending command");
        Err(error(
            StatusCode::NOT_FOUND,
            "no pending command with that id for this device",
        ))
    }
}

async fn client_rpc(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let device = authenticate(&ctx, &token)?;
    let bytes = read_body(&ctx, &device, &headers, body).await?;
    let method = serde_json::from_slice::<Json>(&bytes)
        .ok()
        .and_then(|v| v.get("method").and_then(Json::as_str).map(str::to_owned))
        .ok_or_else(|| bad_payload(&ctx, &device, "expected {\"method\":\"…\",\"params\":…}"))?;
    let answer = match method.as_str() {
        "getCurrentTime" => json!({"currentTime": ctx.clock.now().wall_ms}),
        "getSessionLimits" => json!({
            "maxPayloadSize": ctx.max_body,
            "maxInflightMessages": 1,
            // Empty strings mean "no limit" to the ThingsBoard SDK.
            "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
        }),
        _ => json!({"error": "unsupported method"}),
    };
    Ok(json_ok(&answer))
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
