//! The telemetry record: what a device said, as the outbox stores it and the
//! uplink sends it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A registered device's name, as the registry and the cloud know it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceName(String);

impl DeviceName {
    /// Wraps a name that the registry has already validated.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A record's sequence number: unique and strictly increasing for the
/// gateway's whole life (DESIGN.md invariant 2).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One telemetry value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// `true`/`false`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    I64(i64),
    /// Any other number.
    F64(f64),
    /// Text.
    Str(String),
    /// A nested JSON object or array, kept as its JSON text.
    Json(String),
}

/// One reading of one device at one time: the unit the outbox stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The device that sent it.
    pub device: DeviceName,
    /// Unix time in milliseconds: the device's own `ts`, or the gateway's
    /// receive time when the device gave none.
    pub ts_ms: i64,
    /// Whether the clock that produced `ts_ms` was trusted.
    pub ts_trusted: bool,
    /// Key → value, in the order the device sent them.
    pub values: Vec<(String, Value)>,
}

/// The version byte in front of every stored record body, so the encoding can
/// change without misreading old rows.
const BODY_VERSION: u8 = 1;

/// Why a stored body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The row is empty.
    #[error("empty record body")]
    Empty,
    /// The body's version byte is not one this binary knows.
    #[error("record body version {0} is unknown to this binary")]
    UnknownVersion(u8),
    /// The postcard bytes are damaged.
    #[error("record body is damaged: {0}")]
    Postcard(#[from] postcard::Error),
}

impl Record {
    /// Encodes the record for storage: a version byte, then postcard.
    ///
    /// Fails only if postcard rejects a value (not expected for this type).
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// [`Record::encode`] appended to `out`, so that many records can share
    /// one buffer. On failure `out` is left empty.
    ///
    /// Fails as [`Record::encode`] does.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
        let mut buf = std::mem::take(out);
        buf.push(BODY_VERSION);
        *out = postcard::to_extend(self, buf)?;
        Ok(())
    }

    /// Decodes a stored body.
    ///
    /// Fails when the body is empty, of an unknown version, or damaged.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        match body.split_first() {
            None => Err(DecodeError::Empty),
            Some((&BODY_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
            Some((&v, _)) => Err(DecodeError::UnknownVersion(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_its_stored_body() {
        let r = Record {
            device: DeviceName::new("dev-1"),
            ts_ms: 1_700_000_000_123,
            ts_trusted: true,
            values: vec![
                ("t".into(), Value::F64(21.5)),
                ("n".into(), Value::I64(-3)),
                ("ok".into(), Value::Bool(true)),
                ("s".into(), Value::Str("hi".into())),
                ("j".into(), Value::Json("{\"a\":[1,2]}".into())),
            ],
        };
        let body = r.encode().unwrap();
        assert_eq!(body[0], BODY_VERSION);
        assert_eq!(Record::decode(&body).unwrap(), r);
    }

    #[test]
    fn damaged_bodies_are_errors_not_panics() {
        assert!(matches!(Record::decode(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            Record::decode(&[9, 1, 2]),
            Err(DecodeError::UnknownVersion(9))
        ));
        assert!(Record::decode(&[BODY_VERSION, 0xff, 0xff, 0xff]).is_err());
    }
}
