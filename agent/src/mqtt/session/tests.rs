use super::*;
use std::cell::RefCell;

#[derive(Default)]
struct TestEnv {
    counts: RefCell<Vec<IngestResult>>,
    records: RefCell<usize>,
    protocol_errors: RefCell<Vec<ProtocolError>>,
}

impl Env for TestEnv {
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
    fn count(&self, result: IngestResult) {
        self.counts.borrow_mut().push(result);
    }
    fn count_records(&self, n: usize) {
        *self.records.borrow_mut() += n;
    }
    fn protocol_error(&self, reason: ProtocolError) {
        self.protocol_errors.borrow_mut().push(reason);
    }
}

const LIMITS: Limits = Limits {
    max_packet_size: 65536,
    receive_maximum: 4,
};

fn connect(version: Version, token: &str, client_id: &str) -> Inbound {
    Inbound::Connect {
        version,
        client_id: client_id.into(),
        username: Some(token.into()),
        clean: true,
        keep_alive_s: 60,
    }
}

fn publish(topic: &str, qos: u8, pkid: u16, payload: &str) -> Inbound {
    Inbound::Publish {
        topic: Some(topic.into()),
        qos,
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

fn connected(version: Version, env: &TestEnv) -> Session {
    let mut s = Session::new(LIMITS);
    let a = s.handle(connect(version, "good-token", "c1"), env);
    assert_eq!(
        a,
        vec![
            Action::Send(Outbound::ConnAck {
                code: ConnAckCode::Accepted,
                assigned_client_id: None
            }),
            Action::Authenticated(DeviceName::new("dev-1"))
        ]
    );
    s
}

fn tickets(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Store { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .collect()
}

fn acks(actions: &[Action]) -> Vec<(u16, AckReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(Outbound::PubAck { pkid, reason }) => Some((*pkid, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn anything_before_connect_closes_the_connection() {
    let env = TestEnv::default();
    for first in [
        publish(TELEMETRY_TOPIC, 1, 1, "{\"t\":1}"),
        Inbound::PingReq,
        Inbound::Subscribe {
            pkid: 1,
            filters: vec![],
        },
        Inbound::Disconnect,
    ] {
        let mut s = Session::new(LIMITS);
        assert_eq!(s.handle(first, &env), vec![Action::Close]);
        assert!(
            s.handle(Inbound::PingReq, &env).is_empty(),
            "closed stays closed"
        );
    }
    assert!(env.counts.borrow().is_empty());
    assert_eq!(
        *env.protocol_errors.borrow(),
        vec![ProtocolError::NotConnectFirst; 4],
        "each close counted once"
    );
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    assert_eq!(
        s.handle(connect(Version::V5, "good-token", "c1"), &env),
        vec![
            Action::Send(Outbound::Disconnect(DisconnectReason::ProtocolError)),
            Action::Close
        ]
    );
    assert_eq!(
        *env.protocol_errors.borrow(),
        vec![ProtocolError::ProtocolViolation]
    );
}

#[test]
fn a_second_connect_on_mqtt311_closes_without_a_disconnect_and_is_counted() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    assert_eq!(
        s.handle(connect(Version::V4, "good-token", "c1"), &env),
        vec![Action::Close]
    );
    assert!(
        s.handle(Inbound::PingReq, &env).is_empty(),
        "closed stays closed"
    );
    assert_eq!(
        *env.protocol_errors.borrow(),
        vec![ProtocolError::ProtocolViolation]
    );
}

#[test]
fn an_unexpected_packet_type_is_a_counted_protocol_violation() {
    for version in [Version::V4, Version::V5] {
        let env = TestEnv::default();
        let mut s = connected(version, &env);
        let a = s.handle(Inbound::Unexpected("PUBREL"), &env);
        assert_eq!(a.last(), Some(&Action::Close), "{version:?}");
        assert_eq!(
            *env.protocol_errors.borrow(),
            vec![ProtocolError::ProtocolViolation],
            "{version:?}"
        );
    }
}

#[test]
fn a_non_utf8_topic_closes_at_once_and_is_counted_as_malformed() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    let a = s.handle(
        Inbound::Publish {
            topic: None,
            qos: 1,
            pkid: 1,
            payload: Bytes::from_static(b"{}"),
        },
        &env,
    );
    assert_eq!(
        a,
        vec![
            Action::Send(Outbound::Disconnect(DisconnectReason::ProtocolError)),
            Action::Close
        ]
    );
    assert_eq!(
        *env.protocol_errors.borrow(),
        vec![ProtocolError::Malformed]
    );
    assert!(env.counts.borrow().is_empty(), "not an ingested message");
}

#[test]
fn ordinary_sessions_count_no_protocol_errors() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    let a = s.handle(publish(TELEMETRY_TOPIC, 1, 1, "{\"t\":1}"), &env);
    assert_eq!(tickets(&a), vec![0]);
    s.stored(0, Stored::Ok, 1, &env);
    s.handle(Inbound::PingReq, &env);
    assert_eq!(s.handle(Inbound::Disconnect, &env), vec![Action::Close]);
    assert!(env.protocol_errors.borrow().is_empty());
}

#[test]
fn unknown_tokens_are_refused_with_bad_credentials_and_counted() {
    let env = TestEnv::default();
    for (version, token) in [
        (Version::V4, Some("nope")),
        (Version::V5, Some("nope")),
        (Version::V4, None),
        (Version::V5, Some("")),
    ] {
        let mut s = Session::new(LIMITS);
        let a = s.handle(
            Inbound::Connect {
                version,
                client_id: "c".into(),
                username: token.map(str::to_owned),
                clean: true,
                keep_alive_s: 0,
            },
            &env,
        );
        assert_eq!(
            a,
            vec![
                Action::Send(Outbound::ConnAck {
                    code: ConnAckCode::BadCredentials,
                    assigned_client_id: None
                }),
                Action::Close
            ]
        );
    }
    assert_eq!(*env.counts.borrow(), vec![IngestResult::Unauthorized; 4]);
}

#[test]
fn an_empty_client_id_gets_an_assigned_one_on_mqtt5() {
    let env = TestEnv::default();
    let mut s = Session::new(LIMITS);
    let a = s.handle(connect(Version::V5, "good-token", ""), &env);
    assert_eq!(
        a[0],
        Action::Send(Outbound::ConnAck {
            code: ConnAckCode::Accepted,
            assigned_client_id: Some("sluice-dev-1".into())
        })
    );
    assert_eq!(s.keep_alive_limit(), Some(Duration::from_secs(90)));
    let mut s = Session::new(LIMITS);
    let a = s.handle(
        Inbound::Connect {
            version: Version::V4,
            client_id: String::new(),
            username: Some("good-token".into()),
            clean: false,
            keep_alive_s: 0,
        },
        &env,
    );
    assert_eq!(
        a[0],
        Action::Send(Outbound::ConnAck {
            code: ConnAckCode::BadClientId,
            assigned_client_id: None
        })
    );
}

#[test]
fn pubacks_leave_in_arrival_order_and_only_after_commit() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    let mut stores = Vec::new();
    for pkid in 1..=3 {
        let a = s.handle(publish(TELEMETRY_TOPIC, 1, pkid, "{\"t\":1}"), &env);
        assert!(acks(&a).is_empty(), "no PUBACK before the commit");
        stores.extend(tickets(&a));
    }
    assert_eq!(stores, vec![0, 1, 2]);
    // Commits reported out of order: nothing goes until the head is done.
    assert!(s.stored(2, Stored::Ok, 1, &env).is_empty());
    assert!(s.stored(1, Stored::Ok, 1, &env).is_empty());
    assert_eq!(
        acks(&s.stored(0, Stored::Ok, 1, &env)),
        vec![
            (1, AckReason::Success),
            (2, AckReason::Success),
            (3, AckReason::Success)
        ]
    );
    assert!(s.settled());
    assert_eq!(*env.records.borrow(), 3);
}

#[test]
fn a_refusal_waits_behind_earlier_publishes() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    let a = s.handle(publish(TELEMETRY_TOPIC, 1, 1, "{\"t\":1}"), &env);
    assert_eq!(tickets(&a), vec![0]);
    assert!(
        s.handle(publish(TELEMETRY_TOPIC, 1, 2, "not json"), &env)
            .is_empty()
    );
    assert!(
        s.handle(publish("v1/devices/me/claim", 1, 3, "{}"), &env)
            .is_empty()
    );
    assert_eq!(
        acks(&s.stored(0, Stored::Ok, 1, &env)),
        vec![
            (1, AckReason::Success),
            (2, AckReason::PayloadFormatInvalid),
            (3, AckReason::NotAuthorized)
        ]
    );
    assert_eq!(
        *env.counts.borrow(),
        vec![IngestResult::BadPayload, IngestResult::Ok]
    );
}

#[test]
fn mqtt311_closes_on_a_bad_payload_after_acking_what_came_before() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    s.handle(publish(TELEMETRY_TOPIC, 1, 1, "{\"t\":1}"), &env);
    assert!(
        s.handle(publish(TELEMETRY_TOPIC, 1, 2, "[1,2"), &env)
            .is_empty()
    );
    assert!(
        !s.wants_input(),
        "nothing more is read once a close is queued"
    );
    let a = s.stored(0, Stored::Ok, 1, &env);
    assert_eq!(
        a,
        vec![
            Action::Send(Outbound::PubAck {
                pkid: 1,
                reason: AckReason::Success
            }),
            Action::Close
        ]
    );
}

#[test]
fn a_full_outbox_is_quota_exceeded_on_mqtt5_and_a_withheld_ack_on_mqtt311() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    s.handle(publish(TELEMETRY_TOPIC, 1, 7, "{\"t\":1}"), &env);
    assert_eq!(
        acks(&s.stored(0, Stored::Full, 1, &env)),
        vec![(7, AckReason::QuotaExceeded)]
    );
    let mut s = connected(Version::V4, &env);
    s.handle(publish(TELEMETRY_TOPIC, 1, 7, "{\"t\":1}"), &env);
    assert_eq!(s.stored(0, Stored::Full, 1, &env), vec![Action::Close]);
    assert_eq!(
        env.counts.borrow().as_slice(),
        &[IngestResult::Rejected, IngestResult::Rejected]
    );
}

#[test]
fn qos2_is_refused_with_qos_not_supported() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    assert_eq!(
        s.handle(publish(TELEMETRY_TOPIC, 2, 1, "{\"t\":1}"), &env),
        vec![
            Action::Send(Outbound::Disconnect(DisconnectReason::QoSNotSupported)),
            Action::Close
        ]
    );
    let mut s = connected(Version::V4, &env);
    assert_eq!(
        s.handle(publish(TELEMETRY_TOPIC, 2, 1, "{\"t\":1}"), &env),
        vec![Action::Close]
    );
}

#[test]
fn client_side_rpc_is_answered_on_the_response_topic_after_its_puback() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    let a = s.handle(
        publish(
            "v1/devices/me/rpc/request/7",
            1,
            9,
            "{\"method\":\"getSessionLimits\",\"params\":{\"timeout\":5000}}",
        ),
        &env,
    );
    assert_eq!(acks(&a), vec![(9, AckReason::Success)]);
    let Some(Action::Send(Outbound::Publish { topic, payload })) = a.last() else {
        panic!("{a:?}");
    };
    assert_eq!(topic, "v1/devices/me/rpc/response/7");
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"maxPayloadSize": 65536, "maxInflightMessages": 4,
            "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}})
    );
    let a = s.handle(
        publish(
            "v1/devices/me/rpc/request/8",
            0,
            0,
            "{\"method\":\"getCurrentTime\"}",
        ),
        &env,
    );
    assert_eq!(
        a,
        vec![Action::Send(Outbound::Publish {
            topic: "v1/devices/me/rpc/response/8".into(),
            payload: b"{\"currentTime\":1800000000000}".to_vec()
        })]
    );
    let a = s.handle(
        publish(
            "v1/devices/me/rpc/request/9",
            0,
            0,
            "{\"method\":\"reboot\"}",
        ),
        &env,
    );
    assert_eq!(
        a,
        vec![Action::Send(Outbound::Publish {
            topic: "v1/devices/me/rpc/response/9".into(),
            payload: b"{\"error\":\"unsupported method\"}".to_vec()
        })]
    );
}

#[test]
fn only_the_device_api_filters_are_granted_at_qos_one_at_most() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    let a = s.handle(
        Inbound::Subscribe {
            pkid: 3,
            filters: vec![
                ("v1/devices/me/attributes".into(), 1),
                ("v1/devices/me/rpc/request/+".into(), 2),
                ("#".into(), 0),
                ("v2/fw/response/+".into(), 0),
            ],
        },
        &env,
    );
    assert_eq!(
        a,
        vec![Action::Send(Outbound::SubAck {
            pkid: 3,
            granted: vec![Some(1), Some(1), None, Some(0)]
        })]
    );
    assert_eq!(
        s.handle(Inbound::PingReq, &env),
        vec![Action::Send(Outbound::PingResp)]
    );
}

#[test]
fn receive_maximum_stops_reading_until_commits_come_back() {
    let env = TestEnv::default();
    let mut s = connected(Version::V5, &env);
    for pkid in 1..=4 {
        assert!(s.wants_input());
        s.handle(publish(TELEMETRY_TOPIC, 1, pkid, "{\"t\":1}"), &env);
    }
    assert!(!s.wants_input());
    s.stored(0, Stored::Ok, 1, &env);
    assert!(s.wants_input());
}

#[test]
fn qos0_telemetry_is_stored_without_an_ack_and_an_empty_object_is_accepted() {
    let env = TestEnv::default();
    let mut s = connected(Version::V4, &env);
    let a = s.handle(publish(TELEMETRY_TOPIC, 0, 0, "{\"t\":1}"), &env);
    assert_eq!(tickets(&a), vec![0]);
    assert!(s.stored(0, Stored::Ok, 1, &env).is_empty());
    assert_eq!(
        acks(&s.handle(publish(TELEMETRY_TOPIC, 1, 5, "{}"), &env)),
        vec![(5, AckReason::Success)]
    );
    assert!(s.settled());
}

/// A connection that presented the verified client certificate of "cam-1".
struct CertEnv(TestEnv);

impl Env for CertEnv {
    fn authenticate(&self, token: &str) -> Option<DeviceName> {
        self.0.authenticate(token)
    }
    fn authenticate_certificate(&self) -> Option<DeviceName> {
        Some(DeviceName::new("cam-1"))
    }
    fn now(&self) -> Stamp {
        self.0.now()
    }
    fn count(&self, result: IngestResult) {
        self.0.count(result);
    }
    fn count_records(&self, n: usize) {
        self.0.count_records(n);
    }
    fn protocol_error(&self, reason: ProtocolError) {
        self.0.protocol_error(reason);
    }
}

#[test]
fn a_registered_client_certificate_wins_over_the_username() {
    for username in [None, Some(String::new()), Some("good-token".to_owned())] {
        let env = CertEnv(TestEnv::default());
        let mut s = Session::new(LIMITS);
        let a = s.handle(
            Inbound::Connect {
                version: Version::V5,
                client_id: "c".into(),
                username: username.clone(),
                clean: true,
                keep_alive_s: 60,
            },
            &env,
        );
        assert_eq!(
            a.last(),
            Some(&Action::Authenticated(DeviceName::new("cam-1"))),
            "{username:?}"
        );
        assert_eq!(s.device().map(DeviceName::as_str), Some("cam-1"));
    }
}
