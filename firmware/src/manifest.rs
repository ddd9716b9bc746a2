//! The firmware manifest: the JSON payload of a signed envelope on
//! `P/firmware` (the agent verifies the signature; this module only reads
//! the bytes it was handed).
//!
//! ```json
//! {"title": "gw-os", "version": "1.4.0", "url": "https://cdn.example/gw-os-1.4.0.bin",
//!  "size": 123456, "sha256": "<64 hex>",
//!  "targets": {"gateway": true, "devices": ["pump-1"], "types": ["sensor"]},
//!  "allow_downgrade": false}
//! ```
//!
//! Validation is strict and names the field at fault: every field above but
//! `allow_downgrade` (absent = false) is required (`targets.devices`,
//! `targets.types` may be empty arrays,
//! `targets.gateway` may be false, but one of the three must name a target);
//! unknown fields are ignored so the cloud can add some. A manifest is bad
//! input from the network: nothing here panics or allocates beyond the
//! payload's own size.

use crate::lwm2m::UpdateResult;
use crate::url::{HttpsUrl, UrlError};
use serde_json::{Map, Value};

pub use crate::version::compare_versions;

/// A validated firmware manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Image title (1-128 characters, no control characters, '/' or '\\').
    pub title: String,
    /// Image version (same rule); ordered by [`compare_versions`].
    pub version: String,
    /// Where to fetch it: `https://host[:port]/path[?query]`, normalized
    /// (scheme and host lower case, no `:443`, no fragment).
    pub url: String,
    /// Size in bytes, 1..=max_size.
    pub size: u64,
    /// SHA-256 of the image, 64 lower-case hex digits.
    pub sha256: String,
    /// Who should install it.
    pub targets: Targets,
    /// Whether it may replace a newer (or equal-ranked) version.
    pub allow_downgrade: bool,
}

/// The targets of a manifest; at least one is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// The gateway itself (a self-update).
    pub gateway: bool,
    /// Device names (1-64 characters of A-Z a-z 0-9 - _ .).
    pub devices: Vec<String>,
    /// Device types (same rule): every device of these types.
    pub types: Vec<String>,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The payload is not JSON.
    #[error("manifest is not valid JSON: {0}")]
    Syntax(String),
    /// The payload is JSON but not an object.
    #[error("manifest must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    /// A required field is absent.
    #[error("manifest field {0:?} is missing")]
    Missing(&'static str),
    /// A field has the wrong JSON type.
    #[error("manifest field {field:?} must be {expected}, not {found}")]
    WrongType {
        /// The field (`size`, `targets.devices[2]` …).
        field: String,
        /// What it must be.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// `title` or `version` is unusable.
    #[error(
        "manifest field {field:?} = {value:?} must be 1-128 characters without '/', '\\' or control characters"
    )]
    BadName {
        /// `title` or `version`.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// `url` is not a URL at all (LwM2M result 7, invalid URI).
    #[error("manifest field \"url\": {0}")]
    InvalidUrl(UrlError),
    /// `url` has a scheme other than https (LwM2M result 9, unsupported
    /// protocol).
    #[error("manifest field \"url\": {0}")]
    UnsupportedScheme(UrlError),
    /// `size` is 0 or above the configured maximum.
    #[error("manifest field \"size\" = {size} must be 1..={max} bytes")]
    BadSize {
        /// The size given.
        size: u64,
        /// The largest image accepted.
        max: u64,
    },
    /// `sha256` is not 64 hex digits.
    #[error("manifest field \"sha256\" = {0:?} must be 64 hex digits")]
    BadSha256(String),
    /// `targets` names nothing.
    #[error("manifest field \"targets\" names no target (gateway false, no devices, no types)")]
    NoTargets,
    /// A device name or type in `targets` is unusable.
    #[error("manifest field {field:?} = {value:?} must be 1-64 characters of A-Z a-z 0-9 - _ .")]
    BadTarget {
        /// `targets.devices[i]` or `targets.types[i]`.
        field: String,
        /// The value.
        value: String,
    },
}

impl ManifestError {
    /// The LwM2M result code that reports this refusal: `InvalidUri` (7)
    /// for a malformed URL, `UnsupportedProtocol` (9) for a non-https one,
    /// `NotEnoughStorage` (2) for an image above the size limit,
    /// `UnsupportedPackage` (6) for everything else.
    pub fn result(&self) -> UpdateResult {
        match self {
            Self::InvalidUrl(_) => UpdateResult::InvalidUri,
            Self::UnsupportedScheme(_) => UpdateResult::UnsupportedProtocol,
            Self::BadSize { size, .. } if *size > 0 => UpdateResult::NotEnoughStorage,
            _ => UpdateResult::UnsupportedPackage,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a Value, ManifestError> {
    obj.get(name).ok_or(ManifestError::Missing(name))
}

fn wrong(field: impl Into<String>, expected: &'static str, found: &Value) -> ManifestError {
    ManifestError::WrongType {
        field: field.into(),
        expected,
        found: type_name(found),
    }
}

fn string<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, ManifestError> {
    let v = field(obj, name)?;
    v.as_str().ok_or_else(|| wrong(name, "a string", v))
}

fn boolean(obj: &Map<String, Value>, name: &'static str) -> Result<bool, ManifestError> {
    let v = field(obj, name)?;
    v.as_bool().ok_or_else(|| wrong(name, "a boolean", v))
}

/// The agent's rule for device names and types.
fn target_name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `targets.<name>` (called `path`): an array of device names or types.
fn names(
    targets: &Map<String, Value>,
    name: &'static str,
    path: &'static str,
) -> Result<Vec<String>, ManifestError> {
    let v = targets.get(name).ok_or(ManifestError::Missing(path))?;
    let items = v
        .as_array()
        .ok_or_else(|| wrong(path, "an array of strings", v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{path}[{i}]");
            let s = item.as_str().ok_or_else(|| wrong(&at, "a string", item))?;
            if target_name_ok(s) {
                Ok(s.to_owned())
            } else {
                Err(ManifestError::BadTarget {
                    field: at,
                    value: s.to_owned(),
                })
            }
        })
        .collect()
}

impl Manifest {
    /// Parses and validates a manifest payload; images above `max_size`
    /// bytes are refused.
    ///
    /// Fails with the first problem found, naming the field (see
    /// [`ManifestError`]); [`ManifestError::result`] gives the LwM2M result
    /// code to report.
    pub fn parse(payload: &[u8], max_size: u64) -> Result<Self, ManifestError> {
        let json: Value =
            serde_json::from_slice(payload).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        let obj = match &json {
            Value::Object(o) => o,
            other => return Err(ManifestError::NotAnObject(type_name(other))),
        };
        let title = string(obj, "title")?;
        if !crate::name_ok(title) {
            return Err(ManifestError::BadName {
                field: "title",
                value: title.to_owned(),
            });
        }
        let version = string(obj, "version")?;
        if !crate::name_ok(version) {
            return Err(ManifestError::BadName {
                field: "version",
                value: version.to_owned(),
            });
        }
        let url = match HttpsUrl::parse(string(obj, "url")?) {
            Ok(u) => u.to_string(),
            Err(e @ UrlError::UnsupportedScheme { .. }) => {
                return Err(ManifestError::UnsupportedScheme(e));
            }
            Err(e @ UrlError::Invalid { .. }) => return Err(ManifestError::InvalidUrl(e)),
        };
        let size_v = field(obj, "size")?;
        let size = size_v
            .as_u64()
            .ok_or_else(|| wrong("size", "a non-negative integer", size_v))?;
        if size == 0 || size > max_size {
            return Err(ManifestError::BadSize {
                size,
                max: max_size,
            });
        }
        let sha = string(obj, "sha256")?;
        let sha256 =
            crate::sha256_hex(sha).ok_or_else(|| ManifestError::BadSha256(sha.to_owned()))?;
        let targets_v = field(obj, "targets")?;
        let targets_obj = targets_v
            .as_object()
            .ok_or_else(|| wrong("targets", "an object", targets_v))?;
        let gateway_v = targets_obj
            .get("gateway")
            .ok_or(ManifestError::Missing("targets.gateway"))?;
        let gateway = gateway_v
            .as_bool()
            .ok_or_else(|| wrong("targets.gateway", "a boolean", gateway_v))?;
        let targets = Targets {
            gateway,
            devices: names(targets_obj, "devices", "targets.devices")?,
            types: names(targets_obj, "types", "targets.types")?,
        };
        if !targets.gateway && targets.devices.is_empty() && targets.types.is_empty() {
            return Err(ManifestError::NoTargets);
        }
        // Absent means false: a manifest has to ask for a downgrade.
        let allow_downgrade = match obj.get("allow_downgrade") {
            None => false,
            Some(_) => boolean(obj, "allow_downgrade")?,
        };
        Ok(Self {
            title: title.to_owned(),
            version: version.to_owned(),
            url,
            size,
            sha256,
            targets,
            allow_downgrade,
        })
    }

    /// Anti-rollback: whether this manifest may replace `installed` (the
    /// version installed on its target, `None` when nothing is). True when
    /// nothing is installed, when this version is newer
    /// ([`compare_versions`]), or when `allow_downgrade` is set and the
    /// version string differs from the installed one (re-installing the
    /// very same version is never an update).
    pub fn admits_over(&self, installed: Option<&str>) -> bool {
        match installed {
            None => true,
            Some(current) => {
                compare_versions(&self.version, current).is_gt()
                    || (self.allow_downgrade && self.version != current)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn good() -> Value {
        json!({
            "title": "gw-os",
            "version": "1.4.0",
            "url": "https://cdn.example:8443/fw/gw-os-1.4.0.bin?sig=abc",
            "size": 123_456,
            "sha256": SHA,
            "targets": {"gateway": true, "devices": ["pump-1"], "types": ["sensor"]},
            "allow_downgrade": false,
            "release_notes": "ignored",
        })
    }

    fn parse(v: &Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(v.to_string().as_bytes(), 1 << 20)
    }

    fn with(path: &[&str], value: Value) -> Value {
        let mut v = good();
        let mut at = &mut v;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = value;
        v
    }

    fn without(path: &[&str]) -> Value {
        let mut v = good();
        let mut at = &mut v;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at.as_object_mut().unwrap().remove(path[path.len() - 1]);
        v
    }

    #[test]
    fn a_good_manifest_parses_with_every_field() {
        let m = parse(&good()).unwrap();
        assert_eq!(
            m,
            Manifest {
                title: "gw-os".into(),
                version: "1.4.0".into(),
                url: "https://cdn.example:8443/fw/gw-os-1.4.0.bin?sig=abc".into(),
                size: 123_456,
                sha256: SHA.into(),
                targets: Targets {
                    gateway: true,
                    devices: vec!["pump-1".into()],
                    types: vec!["sensor".into()],
                },
                allow_downgrade: false,
            }
        );
    }

    #[test]
    fn the_url_is_stored_normalized() {
        let m = parse(&with(
            &["url"],
            json!("HTTPS://CDN.Example:443/Fw/A.bin?Sig=X#part"),
        ))
        .unwrap();
        assert_eq!(m.url, "https://cdn.example/Fw/A.bin?Sig=X");
    }

    #[test]
    fn an_upper_case_sha256_is_stored_lower_case() {
        let m = parse(&with(&["sha256"], json!(SHA.to_uppercase()))).unwrap();
        assert_eq!(m.sha256, SHA);
    }

    #[test]
    fn one_target_kind_is_enough() {
        for targets in [
            json!({"gateway": true, "devices": [], "types": []}),
            json!({"gateway": false, "devices": ["d.1_x-y"], "types": []}),
            json!({"gateway": false, "devices": [], "types": ["sensor"]}),
        ] {
            assert!(
                parse(&with(&["targets"], targets.clone())).is_ok(),
                "{targets}"
            );
        }
    }

    #[test]
    fn each_problem_is_named_with_its_field_and_value() {
        use ManifestError as E;
        let long = "x".repeat(129);
        let cases: Vec<(Value, E)> = vec![
            (without(&["title"]), E::Missing("title")),
            (without(&["version"]), E::Missing("version")),
            (without(&["url"]), E::Missing("url")),
            (without(&["size"]), E::Missing("size")),
            (without(&["sha256"]), E::Missing("sha256")),
            (without(&["targets"]), E::Missing("targets")),
            (
                without(&["targets", "gateway"]),
                E::Missing("targets.gateway"),
            ),
            (
                without(&["targets", "devices"]),
                E::Missing("targets.devices"),
            ),
            (without(&["targets", "types"]), E::Missing("targets.types")),
            (
                with(&["title"], json!(7)),
                E::WrongType {
                    field: "title".into(),
                    expected: "a string",
                    found: "a number",
                },
            ),
            (
                with(&["size"], json!("12")),
                E::WrongType {
                    field: "size".into(),
                    expected: "a non-negative integer",
                    found: "a string",
                },
            ),
            (
                with(&["size"], json!(-1)),
                E::WrongType {
                    field: "size".into(),
                    expected: "a non-negative integer",
                    found: "a number",
                },
            ),
            (
                with(&["size"], json!(1.5)),
                E::WrongType {
                    field: "size".into(),
                    expected: "a non-negative integer",
                    found: "a number",
                },
            ),
            (
                with(&["allow_downgrade"], json!("no")),
                E::WrongType {
                    field: "allow_downgrade".into(),
                    expected: "a boolean",
                    found: "a string",
                },
            ),
            (
                with(&["targets"], json!([])),
                E::WrongType {
                    field: "targets".into(),
                    expected: "an object",
                    found: "an array",
                },
            ),
            (
                with(&["targets", "gateway"], json!(null)),
                E::WrongType {
                    field: "targets.gateway".into(),
                    expected: "a boolean",
                    found: "null",
                },
            ),
            (
                with(&["targets", "devices"], json!("pump-1")),
                E::WrongType {
                    field: "targets.devices".into(),
                    expected: "an array of strings",
                    found: "a string",
                },
            ),
            (
                with(&["targets", "types"], json!(["ok", 3])),
                E::WrongType {
                    field: "targets.types[1]".into(),
                    expected: "a string",
                    found: "a number",
                },
            ),
            (
                with(&["title"], json!("")),
                E::BadName {
                    field: "title",
                    value: String::new(),
                },
            ),
            (
                with(&["title"], json!(long)),
                E::BadName {
                    field: "title",
                    value: long.clone(),
                },
            ),
            (
                with(&["title"], json!("a/b")),
                E::BadName {
                    field: "title",
                    value: "a/b".into(),
                },
            ),
            (
                with(&["version"], json!("1\\2")),
                E::BadName {
                    field: "version",
                    value: "1\\2".into(),
                },
            ),
            (
                with(&["version"], json!("1.0\u{7}")),
                E::BadName {
                    field: "version",
                    value: "1.0\u{7}".into(),
                },
            ),
            (
                with(&["size"], json!(0)),
                E::BadSize {
                    size: 0,
                    max: 1 << 20,
                },
            ),
            (
                with(&["size"], json!((1 << 20) + 1)),
                E::BadSize {
                    size: (1 << 20) + 1,
                    max: 1 << 20,
                },
            ),
            (
                with(&["sha256"], json!(&SHA[1..])),
                E::BadSha256(SHA[1..].into()),
            ),
            (
                with(&["sha256"], json!(format!("{}g", &SHA[1..]))),
                E::BadSha256(format!("{}g", &SHA[1..])),
            ),
            (
                with(
                    &["targets"],
                    json!({"gateway": false, "devices": [], "types": []}),
                ),
                E::NoTargets,
            ),
            (
                with(&["targets", "devices"], json!(["ok", ""])),
                E::BadTarget {
                    field: "targets.devices[1]".into(),
                    value: String::new(),
                },
            ),
            (
                with(&["targets", "devices"], json!(["x".repeat(65)])),
                E::BadTarget {
                    field: "targets.devices[0]".into(),
                    value: "x".repeat(65),
                },
            ),
            (
                with(&["targets", "types"], json!(["a b"])),
                E::BadTarget {
                    field: "targets.types[0]".into(),
                    value: "a b".into(),
                },
            ),
        ];
        for (payload, want) in cases {
            assert_eq!(parse(&payload), Err(want), "{payload}");
        }
    }

    #[test]
    fn url_problems_carry_their_lwm2m_result() {
        let http = parse(&with(&["url"], json!("http://cdn.example/fw.bin"))).unwrap_err();
        assert!(
            matches!(http, ManifestError::UnsupportedScheme(UrlError::UnsupportedScheme { ref scheme, .. }) if scheme == "http")
        );
        assert_eq!(http.result(), UpdateResult::UnsupportedProtocol);
        for bad in [
            "cdn.example/fw.bin",
            "https://",
            "https://h:99999/x",
            "https://a b/",
        ] {
            let e = parse(&with(&["url"], json!(bad))).unwrap_err();
            assert!(matches!(e, ManifestError::InvalidUrl(_)), "{bad}: {e:?}");
            assert_eq!(e.result(), UpdateResult::InvalidUri);
        }
        let big = parse(&with(&["size"], json!(1u64 << 40))).unwrap_err();
        assert_eq!(big.result(), UpdateResult::NotEnoughStorage);
        assert_eq!(
            ManifestError::NoTargets.result(),
            UpdateResult::UnsupportedPackage
        );
    }

    #[test]
    fn payloads_that_are_not_json_objects_are_refused() {
        for (payload, want) in [
            (&b"[1]"[..], ManifestError::NotAnObject("an array")),
            (b"\"x\"", ManifestError::NotAnObject("a string")),
            (b"null", ManifestError::NotAnObject("null")),
        ] {
            assert_eq!(Manifest::parse(payload, 10), Err(want));
        }
        for payload in [&b""[..], b"{", b"{\"title\":}", b"\xff\xfe", b"{} trailing"] {
            let e = Manifest::parse(payload, 10).unwrap_err();
            assert!(matches!(e, ManifestError::Syntax(_)), "{payload:?}: {e:?}");
            assert!(e.to_string().contains("line"), "{e}");
        }
    }

    #[test]
    fn errors_read_well() {
        let e = parse(&with(&["targets", "types"], json!(["ok", 3]))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "manifest field \"targets.types[1]\" must be a string, not a number"
        );
        let e = parse(&with(&["url"], json!("ftp://h/x"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "manifest field \"url\": \"ftp://h/x\": scheme \"ftp\" is not supported (only https)"
        );
    }

    #[test]
    fn anti_rollback_admits_only_newer_versions_unless_downgrades_are_allowed() {
        let mut m = parse(&good()).unwrap(); // 1.4.0
        assert!(m.admits_over(None));
        assert!(m.admits_over(Some("1.3.9")));
        assert!(m.admits_over(Some("1.4.0-rc2")));
        assert!(!m.admits_over(Some("1.4.0")));
        assert!(!m.admits_over(Some("1.4")), "equal rank is not newer");
        assert!(!m.admits_over(Some("1.10")));
        m.allow_downgrade = true;
        assert!(m.admits_over(Some("1.10")));
        assert!(
            m.admits_over(Some("1.4")),
            "a different string of equal rank"
        );
        assert!(!m.admits_over(Some("1.4.0")), "the very same version");
    }
}
