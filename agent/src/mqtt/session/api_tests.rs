//! The ThingsBoard device API beyond telemetry: client attributes,
//! attribute requests, shared-attribute and command pushes, command
//! answers, firmware chunks.

use super::*;
use std::cell::RefCell;

type KeyRequest = (Option<Vec<String>>, Option<Vec<String>>);

struct ApiEnv {
    client_attrs: RefCell<Vec<Map<String, Json>>>,
    requests: RefCell<Vec<KeyRequest>>,
    replies: RefCell<Vec<(u32, Vec<u8>)>>,
    firmware: Option<(PathBuf, u64)>,
}

impl ApiEnv {
    fn new(firmware: Option<(PathBuf, u64)>) -> Self {
        Self {
            client_attrs: RefCell::default(),
            requests: RefCell::default(),
            replies: RefCell::default(),
            firmware,
        }
    }
}

impl Env for ApiEnv {
    fn authenticate(&self, token: &str) -> Option<DeviceName> {
        (token == "good-token").then(|| DeviceName::new("dev-1"))
    }
    fn now(&self) -> Stamp {
        Stamp {
            wall_ms: 1_800_000_000_000,
            trusted: true,
            boot: 1,
            mono_ms: 5,
        }
    }
    fn count(&self, _: IngestResult) {}
    fn count_records(&self, _: usize) {}
    fn protocol_error(&self, _: crate::stats::ProtocolError) {}
    fn set_client_attributes(&self, _: &DeviceName, values: &Map<String, Json>) {
        self.client_attrs.borrow_mut().push(values.clone());
    }
    fn attributes(
        &self,
        _: &DeviceName,
        client_keys: Option<&[String]>,
        shared_keys: Option<&[String]>,
    ) -> Json {
        self.requests.borrow_mut().push((
            client_keys.map(<[_]>::to_vec),
            shared_keys.map(<[_]>::to_vec),
        ));
        serde_json::json!({"shared": {"targetTemp": 23}})
    }
    fn rpc_reply(&self, _: &DeviceName, id: u32, payload: &[u8]) -> bool {
        self.replies.borrow_mut().push((id, payload.to_vec()));
        id == 7
    }
    fn firmware(&self, _: &DeviceName) -> Option<(PathBuf, u64)> {
        self.firmware.clone()
    }
}

const LIMITS: Limits = Limits {
    max_packet_size: 65536,
    receive_maximum: 4,
};

fn session(env: &ApiEnv, version: Version) -> Session {
    let mut s = Session::new(LIMITS);
    let a = s.handle(
        Inbound::Connect {
            version,
            client_id: String::new(),
            username: Some("good-token".into()),
            clean: true,
            keep_alive_s: 60,
        },
        env,
    );
    assert!(a.contains(&Action::Authenticated(DeviceName::new("dev-1"))));
    s
}

fn publish(topic: &str, qos: u8, pkid: u16, payload: &str) -> Inbound {
    Inbound::Publish {
        topic: Some(topic.into()),
        qos,
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

fn ack(pkid: u16) -> Action {
    Action::Send(Outbound::PubAck {
        pkid,
        reason: AckReason::Success,
    })
}

fn sent(topic: &str, payload: &str) -> Action {
    Action::Send(Outbound::Publish {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
    })
}

#[test]
fn client_attributes_are_stored_in_the_attributes_stream_and_acked_after_commit() {
    let env = ApiEnv::new(None);
    let mut s = session(&env, Version::V5);
    let a = s.handle(
        publish(
            ATTRIBUTES_TOPIC,
            1,
            3,
            r#"{"model":"bench","fwSupported":true}"#,
        ),
        &env,
    );
    let [Action::StoreAttributes { ticket, records }] = a.as_slice() else {
        panic!("{a:?}");
    };
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].values.len(), 2);
    assert_eq!(env.client_attrs.borrow().len(), 1);
    assert_eq!(
        env.client_attrs.borrow()[0].get("model"),
        Some(&Json::from("bench"))
    );
    assert_eq!(s.stored(*ticket, Stored::Ok, 1, &env), vec![ack(3)]);
    // Bad JSON is refused like telemetry, and nothing is remembered.
    let a = s.handle(publish(ATTRIBUTES_TOPIC, 1, 4, "{"), &env);
    assert_eq!(
        a,
        vec![Action::Send(Outbound::PubAck {
            pkid: 4,
            reason: AckReason::PayloadFormatInvalid
        })]
    );
    assert_eq!(env.client_attrs.borrow().len(), 1);
}

#[test]
fn attribute_requests_are_answered_in_order_behind_earlier_publishes() {
    let env = ApiEnv::new(None);
    let mut s = session(&env, Version::V5);
    let a = s.handle(publish(TELEMETRY_TOPIC, 1, 1, r#"{"t":1}"#), &env);
    let [Action::Store { ticket, .. }] = a.as_slice() else {
        panic!("{a:?}");
    };
    let ticket = *ticket;
    let a = s.handle(
        publish(
            "v1/devices/me/attributes/request/5",
            1,
            2,
            r#"{"clientKeys":"model, fw","sharedKeys":"targetTemp"}"#,
        ),
        &env,
    );
    assert!(a.is_empty(), "waits behind the telemetry's commit: {a:?}");
    let a = s.stored(ticket, Stored::Ok, 1, &env);
    assert_eq!(
        a,
        vec![
            ack(1),
            ack(2),
            sent(
                "v1/devices/me/attributes/response/5",
                r#"{"shared":{"targetTemp":23}}"#
            )
        ]
    );
    assert_eq!(
        env.requests.borrow()[0],
        (
            Some(vec!["model".to_string(), "fw".to_string()]),
            Some(vec!["targetTemp".to_string()])
        )
    );
    // Empty payload = everything; arrays are accepted too.
    s.handle(
        publish("v1/devices/me/attributes/request/6", 0, 0, ""),
        &env,
    );
    s.handle(
        publish(
            "v1/devices/me/attributes/request/7",
            0,
            0,
            r#"{"sharedKeys":["a","b"]}"#,
        ),
        &env,
    );
    assert_eq!(env.requests.borrow()[1], (None, None));
    assert_eq!(
        env.requests.borrow()[2],
        (None, Some(vec!["a".to_string(), "b".to_string()]))
    );
    // A malformed request gets an error answer, not a close.
    let a = s.handle(
        publish(
            "v1/devices/me/attributes/request/8",
            1,
            9,
            r#"{"sharedKeys":5}"#,
        ),
        &env,
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a[0], ack(9));
    assert!(
        matches!(&a[1], Action::Send(Outbound::Publish { topic, payload })
        if topic == "v1/devices/me/attributes/response/8" && String::from_utf8_lossy(payload).contains("error"))
    );
}

#[test]
fn pushes_reach_only_subscribed_sessions_and_unsubscribe_stops_them() {
    let env = ApiEnv::new(None);
    let mut s = session(&env, Version::V4);
    let rpc = Push::Rpc {
        id: 7,
        body: serde_json::json!({"method": "setGpio", "params": {"pin": 7}}),
    };
    let attrs = Push::Attributes(serde_json::json!({"targetTemp": 23}));
    assert!(s.push(rpc.clone()).is_empty(), "not subscribed yet");
    assert!(s.push(attrs.clone()).is_empty());
    s.handle(
        Inbound::Subscribe {
            pkid: 1,
            filters: vec![
                ("v1/devices/me/rpc/request/+".into(), 1),
                (ATTRIBUTES_TOPIC.into(), 1),
            ],
        },
        &env,
    );
    assert_eq!(
        s.subscriptions(),
        Subscriptions {
            attributes: true,
            rpc: true
        }
    );
    assert_eq!(
        s.push(rpc.clone()),
        vec![sent(
            "v1/devices/me/rpc/request/7",
            r#"{"method":"setGpio","params":{"pin":7}}"#
        )]
    );
    assert_eq!(
        s.push(attrs.clone()),
        vec![sent(ATTRIBUTES_TOPIC, r#"{"targetTemp":23}"#)]
    );
    s.handle(
        Inbound::Unsubscribe {
            pkid: 2,
            filters: vec!["v1/devices/me/rpc/request/+".into()],
        },
        &env,
    );
    assert!(s.push(rpc).is_empty());
    assert_eq!(s.push(attrs).len(), 1);
}

#[test]
fn command_answers_are_routed_and_acked_even_when_stray() {
    let env = ApiEnv::new(None);
    let mut s = session(&env, Version::V5);
    assert_eq!(
        s.handle(
            publish("v1/devices/me/rpc/response/7", 1, 1, r#"{"ok":true}"#),
            &env
        ),
        vec![ack(1)]
    );
    assert_eq!(
        s.handle(publish("v1/devices/me/rpc/response/99", 1, 2, "{}"), &env),
        vec![ack(2)],
        "an answer for no pending command is acknowledged and dropped"
    );
    assert_eq!(
        s.handle(publish("v1/devices/me/rpc/response/abc", 1, 3, "{}"), &env),
        vec![ack(3)]
    );
    assert_eq!(
        env.replies.borrow().len(),
        2,
        "a non-integer id never routes"
    );
    assert_eq!(env.replies.borrow()[0], (7, br#"{"ok":true}"#.to_vec()));
}

#[test]
fn firmware_chunks_are_served_by_offset_to_the_requesting_session() {
    let env = ApiEnv::new(Some((PathBuf::from("/fw/img"), 5000)));
    let mut s = session(&env, Version::V5);
    // No subscription to v2/fw/response/# is needed (the SDK's `+` filter
    // does not match the chunk topics; ThingsBoard delivers anyway).
    let a = s.handle(publish("v2/fw/request/1/chunk/4", 1, 1, "1024"), &env);
    assert_eq!(
        a,
        vec![
            ack(1),
            Action::SendFirmware {
                topic: "v2/fw/response/1/chunk/4".into(),
                path: PathBuf::from("/fw/img"),
                offset: 4096,
                len: 904
            }
        ]
    );
    let a = s.handle(publish("v2/fw/request/2/chunk/0", 0, 0, ""), &env);
    assert_eq!(
        a,
        vec![Action::SendFirmware {
            topic: "v2/fw/response/2/chunk/0".into(),
            path: PathBuf::from("/fw/img"),
            offset: 0,
            len: 5000
        }],
        "an empty payload asks for the whole image"
    );
    assert_eq!(
        s.handle(publish("v2/fw/request/2/chunk/0", 1, 5, "lots"), &env),
        vec![ack(5)],
        "a payload that is not a size gets no chunk"
    );
    // A device no campaign targets is refused (0x87) and gets no bytes.
    let none = ApiEnv::new(None);
    let mut s = session(&none, Version::V5);
    assert_eq!(
        s.handle(publish("v2/fw/request/1/chunk/0", 1, 1, "1024"), &none),
        vec![Action::Send(Outbound::PubAck {
            pkid: 1,
            reason: AckReason::NotAuthorized
        })]
    );
    assert!(
        s.handle(publish("v2/fw/request/1/chunk/1", 0, 0, "1024"), &none)
            .is_empty()
    );
}

#[test]
fn filters_inside_the_device_api_are_granted_and_matched_exactly() {
    for f in [
        "v1/devices/me/attributes",
        "v1/devices/me/attributes/response/+",
        "v1/devices/me/attributes/response/7",
        "v1/devices/me/rpc/request/+",
        "v1/devices/me/rpc/response/3",
        "v2/fw/response/+",
        "v2/fw/response/#",
        "v2/fw/response/1/chunk/+",
    ] {
        assert!(grantable(f), "{f}");
    }
    for f in [
        "#",
        "+",
        "v1/devices/me/#",
        "v1/devices/me/telemetry",
        "v1/devices/me/+",
        "v1/devices/me/attributes/response/#",
        "v1/devices/me/attributes/response/",
        "v1/devices/me/attributes/+",
        "v1/devices/me/rpc/request/a+b",
        "",
    ] {
        assert!(!grantable(f), "{f}");
    }
    assert!(topic_matches("a/+/c", "a/b/c"));
    assert!(topic_matches("a/#", "a"));
    assert!(topic_matches("a/#", "a/b/c"));
    assert!(!topic_matches("a/+", "a/b/c"));
    assert!(!topic_matches("a/b", "a"));
    // A session subscribed to one request id gets only that command.
    let env = ApiEnv::new(None);
    let mut s = session(&env, Version::V5);
    s.handle(
        Inbound::Subscribe {
            pkid: 1,
            filters: vec![("v1/devices/me/rpc/request/5".into(), 1)],
        },
        &env,
    );
    let rpc = |id| Push::Rpc {
        id,
        body: serde_json::json!({}),
    };
    assert!(s.push(rpc(4)).is_empty());
    assert_eq!(s.push(rpc(5)).len(), 1);
}

struct Throttled;

impl Env for Throttled {
    fn authenticate(&self, _: &str) -> Option<DeviceName> {
        panic!("a throttled address must not get its credentials checked")
    }
    fn auth_allowed(&self) -> bool {
        false
    }
    fn now(&self) -> Stamp {
        Stamp {
            wall_ms: 1,
            trusted: true,
            boot: 1,
            mono_ms: 1,
        }
    }
    fn count(&self, _: IngestResult) {}
    fn count_records(&self, _: usize) {}
    fn protocol_error(&self, _: crate::stats::ProtocolError) {}
}

#[test]
fn a_throttled_address_is_refused_before_its_credentials_are_checked() {
    let mut s = Session::new(LIMITS);
    let a = s.handle(
        Inbound::Connect {
            version: Version::V5,
            client_id: "c".into(),
            username: Some("good-token".into()),
            clean: true,
            keep_alive_s: 60,
        },
        &Throttled,
    );
    assert_eq!(
        a,
        vec![
            Action::Send(Outbound::ConnAck {
                code: ConnAckCode::NotAuthorized,
                assigned_client_id: None
            }),
            Action::Close
        ]
    );
}
