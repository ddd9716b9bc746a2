//! The one URL shape firmware is fetched from: `https://host[:port]/path[?query]`.
//!
//! Parsed here rather than with a URL crate (binary budget): scheme
//! (case-insensitive), host (a DNS name, an IPv4 address or a bracketed IPv6
//! address without zone id), an optional port, and the path and query sent
//! as the request target. A fragment is dropped (never sent). Refused: other
//! schemes ([`UrlError::UnsupportedScheme`], LwM2M result 9), user info
//! (`user@host`: credentials do not belong in a manifest), percent-encoded
//! or non-ASCII hosts, and whitespace, control or non-ASCII characters in
//! the path (it goes verbatim into the request line) — all
//! [`UrlError::Invalid`] (LwM2M result 7).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A parsed `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// Lower-case DNS name or IP address, without brackets.
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    target: String,
}

/// Why a URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// A well-formed URL of another scheme (`http`, `ftp`, `coap` …).
    #[error("{url:?}: scheme {scheme:?} is not supported (only https)")]
    UnsupportedScheme {
        /// The URL.
        url: String,
        /// Its scheme, lower case.
        scheme: String,
    },
    /// Not a URL this parser accepts.
    #[error("{url:?} is not a valid https URL: {reason}")]
    Invalid {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl HttpsUrl {
    /// Parses `https://host[:port]/path[?query][#fragment]`.
    ///
    /// Fails with [`UrlError::UnsupportedScheme`] for another scheme and
    /// [`UrlError::Invalid`] for anything malformed (see the module doc).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let invalid = |reason| UrlError::Invalid {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("no scheme:// prefix"))?;
        let scheme_ok = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(invalid("the scheme is malformed"));
        }
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "https" {
            return Err(UrlError::UnsupportedScheme {
                url: url.to_owned(),
                scheme,
            });
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        let (host, port) = parse_authority(authority).map_err(invalid)?;
        let target = parse_target(target).map_err(invalid)?;
        Ok(Self { host, port, target })
    }

    /// Resolves a redirect's `Location` against this URL: an absolute URL
    /// (which must be https), a scheme-relative `//host/…`, an absolute path
    /// `/…`, a query `?…`, or a path relative to this one's directory.
    ///
    /// Fails like [`HttpsUrl::parse`]; an `http://` location (a downgrade) is
    /// [`UrlError::UnsupportedScheme`].
    pub fn join(&self, location: &str) -> Result<Self, UrlError> {
        let location = location.trim_matches([' ', '\t']);
        let has_scheme = location
            .split_once(':')
            .is_some_and(|(s, _)| !s.is_empty() && !s.contains(['/', '?', '#']));
        if has_scheme {
            return Self::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Self::parse(&format!("https://{rest}"));
        }
        let invalid = |reason| UrlError::Invalid {
            url: location.to_owned(),
            reason,
        };
        if location.is_empty() {
            return Err(invalid("the redirect location is empty"));
        }
        let base_path = self.target.split('?').next().unwrap_or("/");
        let target = if location.starts_with('/') {
            location.to_owned()
        } else if location.starts_with('?') || location.starts_with('#') {
            format!("{base_path}{location}")
        } else {
            let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Ok(Self {
            host: self.host.clone(),
            port: self.port,
            target: parse_target(&target).map_err(invalid)?,
        })
    }

    /// The host: a lower-case DNS name or an IP address (IPv6 without
    /// brackets), as TLS server names want it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (443 unless the URL names one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request target: path and query, starting with `/`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The `Host` header's value: the host (IPv6 in brackets) and the port
    /// unless it is 443.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The URL for logs and error messages: the query, which often carries
    /// a signed-URL token, is shown as `?…`.
    pub fn redacted(&self) -> String {
        match self.target.split_once('?') {
            Some((path, _)) => format!("https://{}{path}?…", self.host_header()),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.host_header(), self.target)
    }
}

fn parse_authority(authority: &str) -> Result<(String, u16), &'static str> {
    if authority.contains('@') {
        return Err("user info (user@host) is not supported");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address lacks its closing ']'")?;
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| "the bracketed host is not an IPv6 address")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("the host is empty");
        }
        let host_ok = host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Err("the host must be a DNS name or an IP address");
        }
        let all_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if all_numeric && host.parse::<Ipv4Addr>().is_err() {
            return Err("the host looks like an IPv4 address but is not one");
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => 443,
        Some(p) => {
            let ok = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
            match p.parse::<u16>() {
                Ok(n) if ok && n > 0 => n,
                _ => return Err("the port must be 1-65535"),
            }
        }
    };
    Ok((host, port))
}

fn parse_target(target: &str) -> Result<String, &'static str> {
    let target = target.split('#').next().unwrap_or("");
    if target
        .bytes()
        .any(|b| b <= b' ' || b == 0x7f || !b.is_ascii())
    {
        return Err("the path contains whitespace, control or non-ASCII characters");
    }
    Ok(if target.is_empty() {
        "/".to_owned()
    } else if target.starts_with('?') {
        format!("/{target}")
    } else {
        target.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (String, u16, String) {
        let u = HttpsUrl::parse(url).unwrap();
        (u.host().to_owned(), u.port(), u.target().to_owned())
    }

    #[test]
    fn https_urls_split_into_host_port_and_target() {
        let table = [
            (
                "https://fw.example.com/a/b.bin",
                ("fw.example.com", 443, "/a/b.bin"),
            ),
            (
                "HTTPS://FW.Example.COM:8443/x?sig=1&e=2",
                ("fw.example.com", 8443, "/x?sig=1&e=2"),
            ),
            (
                "https://127.0.0.1:4443/fw.bin",
                ("127.0.0.1", 4443, "/fw.bin"),
            ),
            ("https://[::1]:4443/fw.bin", ("::1", 4443, "/fw.bin")),
            ("https://[2001:DB8::1]/fw", ("2001:db8::1", 443, "/fw")),
            ("https://host", ("host", 443, "/")),
            ("https://host?q=1", ("host", 443, "/?q=1")),
            ("https://host/p#frag", ("host", 443, "/p")),
            ("https://my_host.local:1/", ("my_host.local", 1, "/")),
        ];
        for (url, (h, p, t)) in table {
            assert_eq!(parts(url), (h.to_owned(), p, t.to_owned()), "{url}");
        }
    }

    #[test]
    fn other_schemes_are_unsupported_not_invalid() {
        for (url, scheme) in [
            ("http://host/fw", "http"),
            ("HTTP://host/fw", "http"),
            ("ftp://host/fw", "ftp"),
            ("coaps+tcp://host/fw", "coaps+tcp"),
        ] {
            assert_eq!(
                HttpsUrl::parse(url),
                Err(UrlError::UnsupportedScheme {
                    url: url.to_owned(),
                    scheme: scheme.to_owned()
                })
            );
        }
    }

    #[test]
    fn malformed_urls_are_invalid_with_a_reason() {
        for url in [
            "",
            "host/fw.bin",
            "https:/host/fw",
            "://host",
            "1http://host",
            "https://",
            "https:///path",
            "https://user:pw@host/fw",
            "https://host:/fw",
            "https://host:0/fw",
            "https://host:65536/fw",
            "https://host:44a/fw",
            "https://host:+443/fw",
            "https://[::1/fw",
            "https://[::1]x/fw",
            "https://[fe80::1%25eth0]/fw",
            "https://[nope]/fw",
            "https://ho st/fw",
            "https://h%41st/fw",
            "https://hôst/fw",
            "https://256.1.1.1/fw",
            "https://host/a b",
            "https://host/a\r\nX-Injected: 1",
            "https://host/é",
        ] {
            assert!(
                matches!(HttpsUrl::parse(url), Err(UrlError::Invalid { .. })),
                "{url:?} -> {:?}",
                HttpsUrl::parse(url)
            );
        }
    }

    #[test]
    fn host_header_brackets_ipv6_and_omits_the_default_port() {
        let h = |u: &str| HttpsUrl::parse(u).unwrap().host_header();
        assert_eq!(h("https://a.example/x"), "a.example");
        assert_eq!(h("https://a.example:443/x"), "a.example");
        assert_eq!(h("https://a.example:8443/x"), "a.example:8443");
        assert_eq!(h("https://[::1]:8443/x"), "[::1]:8443");
        assert_eq!(h("https://[::1]/x"), "[::1]");
    }

    #[test]
    fn redaction_hides_the_query_only() {
        let u = HttpsUrl::parse("https://cdn.example:8443/fw/1.bin?token=secret").unwrap();
        assert_eq!(u.redacted(), "https://cdn.example:8443/fw/1.bin?…");
        assert_eq!(
            u.to_string(),
            "https://cdn.example:8443/fw/1.bin?token=secret"
        );
        let plain = HttpsUrl::parse("https://cdn.example/fw/1.bin").unwrap();
        assert_eq!(plain.redacted(), "https://cdn.example/fw/1.bin");
    }

    #[test]
    fn redirect_locations_resolve_against_the_current_url() {
        let base = HttpsUrl::parse("https://a.example:8443/fw/v1/img.bin?x=1").unwrap();
        let j = |l: &str| base.join(l).map(|u| u.to_string());
        assert_eq!(
            j("https://b.example/o.bin").unwrap(),
            "https://b.example/o.bin"
        );
        assert_eq!(j("//c.example:9/p").unwrap(), "https://c.example:9/p");
        assert_eq!(j("/root.bin").unwrap(), "https://a.example:8443/root.bin");
        assert_eq!(
            j("other.bin").unwrap(),
            "https://a.example:8443/fw/v1/other.bin"
        );
        assert_eq!(
            j("?x=2").unwrap(),
            "https://a.example:8443/fw/v1/img.bin?x=2"
        );
        assert!(matches!(
            base.join("http://a.example/downgrade"),
            Err(UrlError::UnsupportedScheme { .. })
        ));
        assert!(matches!(base.join(""), Err(UrlError::Invalid { .. })));
        assert!(matches!(base.join("/a b"), Err(UrlError::Invalid { .. })));
    }
}
