//! What the cloud sends down (generic profile) and what goes back up
//! outside the outbox.
//!
//! - `P/commands`: `{"id":ID,"device":NAME,"method":M,"params":…,"expires_ms":N?}`
//!   where `ID` is any JSON string or number (echoed back as it came) and
//!   `expires_ms` is how long the command may wait for the device's answer,
//!   in milliseconds from its arrival (default `cloud.command_timeout`).
//! - `P/attributes/shared`: `{"device":NAME,"values":{"k":v,…}}`; a `null`
//!   value deletes the key.
//! - `P/commands/response` (up): `{"id":ID,"device":NAME,"result":…}` or
//!   `{"id":ID,"device":NAME,"error":{"code":C,"message":…}}`, `C` one of
//!   `offline`, `timeout`, `unknown_device`, `device_error`, and for
//!   commands addressed to the gateway itself `unknown_method`,
//!   `not_allowed`. Responses are
//!   published at QoS 1 when the link is up and are **not** stored in the
//!   outbox: a response that cannot be sent is dropped (counted), and the
//!   cloud's own timeout covers it.
//!
//! Parsing is strict about shape and says what was wrong; the uplink counts
//! and logs refusals, never acting on half a message.

use serde_json::{Map, Value as Json};

/// Longest device name accepted from the cloud.
const MAX_DEVICE_LEN: usize = 64;

/// A command for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The cloud's id, echoed back verbatim (a JSON string or number).
    pub id: Json,
    /// Target device name.
    pub device: String,
    /// RPC method.
    pub method: String,
    /// RPC params (`null` when absent).
    pub params: Json,
    /// How long the answer may take, ms from arrival (`None` = default).
    pub expires_ms: Option<u64>,
}

/// A message for the cloud that is not an outbox record: published when
/// the link is up, not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpMessage {
    /// `P/commands/response` (QoS 1).
    CommandResponse(Vec<u8>),
    /// `P/health` (QoS 0).
    Health(Vec<u8>),
    /// `P/config/state` (QoS 1, retained).
    ConfigState(Vec<u8>),
    /// `P/firmware/state` (QoS 1): a firmware target's progress.
    FirmwareState(Vec<u8>),
}

/// A message from the cloud.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudRequest {
    /// Route a command to a device's RPC.
    Command(Command),
    /// Set (or, with `null`, delete) shared attributes of a device.
    SharedAttributes {
        /// Target device name.
        device: String,
        /// The keys.
        values: Map<String, Json>,
    },
    /// A fleet configuration envelope from `P/config` (verified by the
    /// agent).
    Config(Vec<u8>),
    /// A firmware manifest envelope from `P/firmware` (verified by the
    /// agent).
    Firmware(Vec<u8>),
}

/// Why a downlink message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownlinkError {
    /// Not a topic we subscribed to.
    #[error("unexpected topic {0:?}")]
    Topic(String),
    /// Not JSON.
    #[error("payload is not JSON: {0}")]
    Syntax(String),
    /// JSON of the wrong shape.
    #[error("{0}")]
    Shape(String),
}

/// Command error codes (`P/commands/response` `error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    /// The device has no live session that can take the command.
    Offline,
    /// The device did not answer in time.
    Timeout,
    /// No active device of that name.
    UnknownDevice,
    /// The device answered with something that is not a result.
    DeviceError,
    /// A command for the gateway itself names a method it does not have.
    UnknownMethod,
    /// A command for the gateway itself that its configuration forbids
    /// (`gateway_reboot` without `commands.allow_reboot`).
    NotAllowed,
}

impl CommandError {
    /// The wire code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Timeout => "timeout",
            Self::UnknownDevice => "unknown_device",
            Self::DeviceError => "device_error",
            Self::UnknownMethod => "unknown_method",
            Self::NotAllowed => "not_allowed",
        }
    }
}

fn shape(m: impl Into<String>) -> DownlinkError {
    DownlinkError::Shape(m.into())
}

fn device_of(obj: &Map<String, Json>) -> Result<String, DownlinkError> {
    match obj.get("device") {
        Some(Json::String(d)) if !d.is_empty() && d.len() <= MAX_DEVICE_LEN => Ok(d.clone()),
        Some(Json::String(_)) => Err(shape(format!(
            "\"device\" must be 1-{MAX_DEVICE_LEN} characters"
        ))),
        _ => Err(shape("\"device\" (a string) is required")),
    }
}

/// Parses a message that arrived on `topic` (`commands_topic` or
/// `shared_topic`; the caller handles `P/config` itself).
///
/// Fails on another topic, invalid JSON, or a wrong shape.
pub fn parse(
    commands_topic: &str,
    shared_topic: &str,
    topic: &str,
    payload: &[u8],
) -> Result<CloudRequest, DownlinkError> {
    if topic != commands_topic && topic != shared_topic {
        return Err(DownlinkError::Topic(topic.to_owned()));
    }
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| DownlinkError::Syntax(e.to_string()))?;
    let Json::Object(mut obj) = json else {
        return Err(shape("expected a JSON object"));
    };
    let device = device_of(&obj)?;
    if topic == shared_topic {
        return match obj.remove("values") {
            Some(Json::Object(values)) if !values.is_empty() => {
                Ok(CloudRequest::SharedAttributes { device, values })
            }
            _ => Err(shape("\"values\" must be a non-empty JSON object")),
        };
    }
    let id = match obj.remove("id") {
        Some(id @ (Json::String(_) | Json::Number(_))) => id,
        _ => return Err(shape("\"id\" (a string or number) is required")),
    };
    let method = match obj.remove("method") {
        Some(Json::String(m)) if !m.is_empty() => m,
        _ => return Err(shape("\"method\" (a non-empty string) is required")),
    };
    let params = obj.remove("params").unwrap_or(Json::Null);
    let expires_ms = match obj.remove("expires_ms") {
        None | Some(Json::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|v| *v > 0)
                .ok_or_else(|| shape("\"expires_ms\" must be a positive integer"))?,
        ),
    };
    Ok(CloudRequest::Command(Command {
        id,
        device,
        method,
        params,
        expires_ms,
    }))
}

/// A `P/commands/response` carrying the device's result.
pub fn command_result(id: &Json, device: &str, result: Json) -> Vec<u8> {
    serde_json::json!({"id": id, "device": device, "result": result})
        .to_string()
        .into_bytes()
}

/// A `P/commands/response` carrying an error.
pub fn command_error(id: &Json, device: &str, error: CommandError, message: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "device": device, "error": {"code": error.code(), "message": message}})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const C: &str = "p/commands";
    const S: &str = "p/attributes/shared";

    #[test]
    fn commands_and_shared_attributes_parse() {
        let r = parse(
            C,
            S,
            C,
            br#"{"id":"a-1","device":"d1","method":"setGpio","params":{"pin":7},"expires_ms":5000}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            CloudRequest::Command(Command {
                id: json!("a-1"),
                device: "d1".into(),
                method: "setGpio".into(),
                params: json!({"pin": 7}),
                expires_ms: Some(5000),
            })
        );
        let r = parse(C, S, C, br#"{"id":42,"device":"d1","method":"ping"}"#).unwrap();
        assert!(
            matches!(r, CloudRequest::Command(c) if c.id == json!(42) && c.params.is_null() && c.expires_ms.is_none())
        );
        let r = parse(C, S, S, br#"{"device":"d1","values":{"t":23,"old":null}}"#).unwrap();
        assert!(
            matches!(r, CloudRequest::SharedAttributes { device, values } if device == "d1" && values.len() == 2)
        );
    }

    #[test]
    fn bad_messages_say_why() {
        for (topic, body, why) in [
            ("other", "{}", "unexpected topic"),
            (C, "{", "not JSON"),
            (C, "[]", "JSON object"),
            (C, r#"{"id":1,"method":"m"}"#, "\"device\""),
            (C, r#"{"id":1,"device":"","method":"m"}"#, "1-64"),
            (C, r#"{"device":"d","method":"m"}"#, "\"id\""),
            (C, r#"{"id":[1],"device":"d","method":"m"}"#, "\"id\""),
            (C, r#"{"id":1,"device":"d"}"#, "\"method\""),
            (
                C,
                r#"{"id":1,"device":"d","method":"m","expires_ms":-5}"#,
                "expires_ms",
            ),
            (S, r#"{"device":"d","values":{}}"#, "non-empty"),
            (S, r#"{"device":"d","values":3}"#, "non-empty"),
        ] {
            let e = parse(C, S, topic, body.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn responses_echo_the_cloud_id() {
        let v: Json =
            serde_json::from_slice(&command_result(&json!("x"), "d", json!({"ok": true}))).unwrap();
        assert_eq!(v, json!({"id": "x", "device": "d", "result": {"ok": true}}));
        let v: Json = serde_json::from_slice(&command_error(
            &json!(7),
            "d",
            CommandError::Timeout,
            "no answer in 5000 ms",
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"id": 7, "device": "d", "error": {"code": "timeout", "message": "no answer in 5000 ms"}})
        );
    }
}
