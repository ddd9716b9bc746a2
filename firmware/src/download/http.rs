//! The HTTP/1.1 of a firmware download, without I/O: the request head, the
//! response head (httparse, bounded: [`MAX_HEAD`] bytes, [`MAX_HEADERS`]
//! fields), how the body is delimited, and `Content-Range`.

use super::chunked::Chunked;
use crate::url::HttpsUrl;
use std::fmt::Write as _;

/// Largest response head accepted.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in a response head.
pub(crate) const MAX_HEADERS: usize = 64;

/// The request for `url`, asking for the bytes from `from` on when it is
/// not 0. `Accept-Encoding: identity`, because the bytes are hashed as
/// they arrive.
pub(crate) fn request_head(url: &HttpsUrl, from: u64) -> String {
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice/{}\r\n\
         Accept-Encoding: identity\r\nConnection: close\r\n",
        url.target(),
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    );
    if from > 0 {
        let _ = write!(head, "Range: bytes={from}-\r\n");
    }
    head.push_str("\r\n");
    head
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    /// Lower-case names and their values (lossy UTF-8), in order.
    headers: Vec<(String, String)>,
}

/// How a response body ends.
#[derive(Debug)]
pub(crate) enum Framing {
    /// After this many bytes.
    Length(u64),
    /// At the last chunk.
    Chunked(Chunked),
    /// When the server closes the connection.
    Eof,
}

impl ResponseHead {
    /// Parses a response head from the start of `buf`: `Ok(None)` while
    /// incomplete, else the head and its length in bytes.
    ///
    /// Fails on malformed input, more than [`MAX_HEADERS`] fields, or an
    /// incomplete head of [`MAX_HEAD`] bytes or more.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, String> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut fields);
        match res.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                let status = res.code.unwrap_or(0);
                let headers = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).trim().to_owned(),
                        )
                    })
                    .collect();
                Ok(Some((Self { status, headers }, len)))
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
            Ok(_) => Err(format!("the response head exceeds {MAX_HEAD} bytes")),
            Err(httparse::Error::TooManyHeaders) => Err(format!(
                "the response has more than {MAX_HEADERS} header fields"
            )),
            Err(e) => Err(format!("malformed response head: {e}")),
        }
    }

    /// The first value of header `name` (lower case).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// How the body of this (200 or 206) response is delimited.
    ///
    /// Fails on a transfer or content coding other than chunked/identity
    /// (the bytes must arrive as the manifest hashed them) and on a bad or
    /// conflicting `Content-Length`.
    pub(crate) fn framing(&self) -> Result<Framing, String> {
        let encodings: Vec<String> = self
            .all("content-encoding")
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        if !encodings.is_empty() {
            return Err(format!(
                "content-encoding {} is not supported",
                encodings.join(", ")
            ));
        }
        let codings: Vec<String> = self
            .all("transfer-encoding")
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        if !codings.is_empty() {
            return if codings == ["chunked"] {
                Ok(Framing::Chunked(Chunked::new()))
            } else {
                Err(format!(
                    "transfer-encoding {} is not supported",
                    codings.join(", ")
                ))
            };
        }
        let mut length = None;
        for v in self.all("content-length").flat_map(|v| v.split(',')) {
            let v = v.trim();
            let n = v
                .parse::<u64>()
                .ok()
                .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("content-length {v:?} is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".to_owned());
            }
            length = Some(n);
        }
        Ok(length.map_or(Framing::Eof, Framing::Length))
    }
}

/// A `Content-Range` value (RFC 9110 §14.4), byte ranges only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContentRange {
    /// `bytes START-END/TOTAL` (`TOTAL` `None` when `*`).
    Bytes {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    /// `bytes */TOTAL` (with a 416).
    Unsatisfied { total: u64 },
}

impl ContentRange {
    /// Parses a `Content-Range` value; `None` when malformed (including
    /// END < START or END ≥ TOTAL).
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let (unit, rest) = value.trim().split_once(' ')?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return None;
        }
        let (range, total) = rest.trim_start().split_once('/')?;
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
        };
        let total = match total {
            "*" => None,
            t => Some(number(t)?),
        };
        if range == "*" {
            return total.map(|total| Self::Unsatisfied { total });
        }
        let (start, end) = range.split_once('-')?;
        let (start, end) = (number(start)?, number(end)?);
        let fits = start <= end && total.is_none_or(|t| end < t);
        fits.then_some(Self::Bytes { start, end, total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_target_host_and_range() {
        let url = HttpsUrl::parse("https://[::1]:8443/fw/a.bin?sig=x").unwrap();
        let head = request_head(&url, 0);
        assert!(
            head.starts_with("GET /fw/a.bin?sig=x HTTP/1.1\r\nHost: [::1]:8443\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!(
            "User-Agent: sluice/{}\r\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(head.contains("Connection: close\r\n"));
        assert!(!head.contains("Range"));
        assert!(head.ends_with("\r\n\r\n"));
        let resumed = request_head(&url, 262_144);
        assert!(
            resumed.contains("\r\nRange: bytes=262144-\r\n"),
            "{resumed}"
        );
    }

    fn head(text: &str) -> ResponseHead {
        ResponseHead::parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn response_heads_parse_when_complete_and_not_before() {
        let text = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/10\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..text.len() - 5 {
            assert!(
                ResponseHead::parse(&text.as_bytes()[..cut])
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        let (h, len) = ResponseHead::parse(text.as_bytes()).unwrap().unwrap();
        assert_eq!((h.status, len), (206, text.len() - 5));
        assert_eq!(h.get("content-range"), Some("bytes 5-9/10"));
        assert!(matches!(h.framing(), Ok(Framing::Length(5))));
    }

    #[test]
    fn oversized_and_malformed_heads_are_refused() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let e =
            ResponseHead::parse(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()).unwrap_err();
        assert!(e.contains("more than 64"), "{e}");
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n", "a".repeat(MAX_HEAD));
        let e = ResponseHead::parse(big.as_bytes()).unwrap_err();
        assert!(e.contains("exceeds"), "{e}");
        let complete_but_big = format!("{big}\r\n");
        assert!(ResponseHead::parse(complete_but_big.as_bytes()).is_err());
        assert!(ResponseHead::parse(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").is_err());
        assert!(ResponseHead::parse(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    }

    #[test]
    fn bodies_are_delimited_by_chunking_then_length_then_eof() {
        let f = |t: &str| head(&format!("HTTP/1.1 200 OK\r\n{t}\r\n")).framing();
        assert!(matches!(
            f("Transfer-Encoding: chunked\r\nContent-Length: 9\r\n"),
            Ok(Framing::Chunked(_))
        ));
        assert!(matches!(
            f("Transfer-Encoding: Chunked\r\n"),
            Ok(Framing::Chunked(_))
        ));
        assert!(matches!(
            f("Content-Length: 42\r\n"),
            Ok(Framing::Length(42))
        ));
        assert!(matches!(
            f("Content-Length: 42\r\nContent-Length: 42\r\n"),
            Ok(Framing::Length(42))
        ));
        assert!(matches!(
            f("Content-Encoding: identity\r\nContent-Length: 1\r\n"),
            Ok(Framing::Length(1))
        ));
        assert!(matches!(f(""), Ok(Framing::Eof)));
        for bad in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Content-Encoding: gzip\r\nContent-Length: 5\r\n",
            "Content-Length: 4\r\nContent-Length: 5\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            assert!(f(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_ranges_parse_strictly() {
        use ContentRange::*;
        let table = [
            (
                "bytes 0-9/10",
                Some(Bytes {
                    start: 0,
                    end: 9,
                    total: Some(10),
                }),
            ),
            (
                "bytes 262144-2097151/2097152",
                Some(Bytes {
                    start: 262_144,
                    end: 2_097_151,
                    total: Some(2_097_152),
                }),
            ),
            (
                "Bytes 5-5/6",
                Some(Bytes {
                    start: 5,
                    end: 5,
                    total: Some(6),
                }),
            ),
            (
                "bytes 5-9/*",
                Some(Bytes {
                    start: 5,
                    end: 9,
                    total: None,
                }),
            ),
            ("bytes */2097152", Some(Unsatisfied { total: 2_097_152 })),
            ("bytes 9-5/10", None),
            ("bytes 0-10/10", None),
            ("bytes 0-9", None),
            ("bytes -9/10", None),
            ("bytes 0-/10", None),
            ("bytes */*", None),
            ("items 0-9/10", None),
            ("bytes=0-9/10", None),
            ("bytes 0-9/1x", None),
            ("bytes +0-9/10", None),
            ("bytes 0-99999999999999999999/10", None),
            ("", None),
        ];
        for (value, want) in table {
            assert_eq!(ContentRange::parse(value), want, "{value:?}");
        }
    }
}
