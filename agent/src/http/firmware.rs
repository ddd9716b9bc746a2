//! `GET /api/v1/{token}/firmware?title=T&version=V[&size=S&chunk=K]`: the
//! image staged for the device, whole or chunk `K` of size `S` (as
//! ThingsBoard's HTTP OTA numbers them, [`sluice_firmware::chunk_range`];
//! one chunk past the end is an empty 200, which the HTTP SDK asks for), and
//! within that body a single `Range: bytes=…` (206 with `Content-Range`,
//! 416 past the end; several ranges or a malformed header are ignored and
//! the whole body is served, as RFC 9110 allows).
//!
//! The bytes are streamed from the file (64 KiB reads on tokio's blocking
//! pool), never loaded whole; what is read for a device is counted in
//! `firmware_bytes_served`.

use super::{HttpContext, Params, authenticate, error};
use crate::downlink::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, ReadBuf};

/// Bytes read from the image per step.
const READ_CHUNK: usize = 64 * 1024;

/// A `Range` header applied to a body of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ranged {
    /// No (usable) range: the whole body.
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// The range starts past the end.
    Unsatisfiable,
}

/// Reads a `Range` header against a body of `len` bytes: one
/// `bytes=a-b`, `bytes=a-` or `bytes=-n`.
fn ranged(header: Option<&str>, len: u64) -> Ranged {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match num(b) {
            None => Ranged::Whole,
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if len == 0 => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        (false, open_end) => {
            let Some(start) = num(a) else {
                return Ranged::Whole;
            };
            let end = if open_end {
                u64::MAX
            } else {
                match num(b) {
                    Some(end) if end >= start => end,
                    _ => return Ranged::Whole,
                }
            };
            if start >= len {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
        (true, true) => Ranged::Whole,
    }
}

/// The image reader, counting what it reads.
struct Counted<R> {
    inner: R,
    router: Arc<Router>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.router
                .stats
                .firmware_bytes_served
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

fn octets(status: StatusCode, len: u64, body: Body) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    r
}

/// The handler.
pub(super) async fn serve(
    State(ctx): State<Arc<HttpContext>>,
    Path(token): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let device = authenticate(&ctx, &token)?;
    let params = Params::from(query)?;
    let Some(img) = ctx.router.attributes().firmware_for(&device) else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this device is not targeted by a firmware campaign",
        ));
    };
    if params.first(&["title"]).is_some_and(|t| t != img.title)
        || params.first(&["version"]).is_some_and(|v| v != img.version)
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "that title/version is not staged for this device",
        ));
    }
    let chunk_size = params.number("size")?.filter(|s| *s > 0);
    let chunk = params.number("chunk")?.unwrap_or(0);
    let (base, len) = sluice_firmware::chunk_range(img.size, chunk_size, chunk);
    let range = ranged(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        len,
    );
    let (status, offset, n) = match range {
        Ranged::Whole => (StatusCode::OK, 0, len),
        Ranged::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Ranged::Unsatisfiable => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range starts past the end of the {len}-byte body"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Err(r);
        }
    };
    if n == 0 {
        return Ok(octets(status, 0, Body::empty()));
    }
    let unreadable = |e: std::io::Error| {
        tracing::warn!(%device, file = %img.path.display(), error = %e, "cannot read a staged firmware image");
        error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the image")
    };
    let mut file = tokio::fs::File::open(&img.path).await.map_err(unreadable)?;
    let on_disk = file.metadata().await.map_err(unreadable)?.len();
    if on_disk < base + offset + n {
        return Err(unreadable(std::io::Error::other(format!(
            "the file has {on_disk} bytes, the index says {}",
            img.size
        ))));
    }
    file.seek(SeekFrom::Start(base + offset))
        .await
        .map_err(unreadable)?;
    tracing::debug!(%device, title = %img.title, version = %img.version, offset = base + offset, bytes = n, "serving firmware");
    let reader = Counted {
        inner: file.take(n),
        router: ctx.router.clone(),
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        reader, READ_CHUNK,
    ));
    let mut r = octets(status, n, body);
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {offset}-{}/{len}", offset + n - 1))
    {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers_select_one_part_of_the_body() {
        let part = |start, end| Ranged::Part { start, end };
        for (header, len, want) in [
            (None, 100, Ranged::Whole),
            (Some("bytes=0-9"), 100, part(0, 9)),
            (Some("bytes=90-"), 100, part(90, 99)),
            (Some("bytes=90-200"), 100, part(90, 99)),
            (Some("bytes=-10"), 100, part(90, 99)),
            (Some("bytes=-500"), 100, part(0, 99)),
            (Some(" bytes= 5 - 5 "), 100, part(5, 5)),
            (Some("bytes=100-"), 100, Ranged::Unsatisfiable),
            (Some("bytes=100-150"), 100, Ranged::Unsatisfiable),
            (Some("bytes=-0"), 100, Ranged::Unsatisfiable),
            (Some("bytes=0-"), 0, Ranged::Unsatisfiable),
            (Some("bytes=-5"), 0, Ranged::Unsatisfiable),
            // Ignored: whole body.
            (Some("bytes=9-0"), 100, Ranged::Whole),
            (Some("bytes=0-1,5-6"), 100, Ranged::Whole),
            (Some("items=0-1"), 100, Ranged::Whole),
            (Some("bytes=x-1"), 100, Ranged::Whole),
            (Some("bytes=-"), 100, Ranged::Whole),
            (Some("bytes=5"), 100, Ranged::Whole),
        ] {
            assert_eq!(ranged(header, len), want, "{header:?} of {len}");
        }
    }
}
