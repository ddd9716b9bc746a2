//! End-to-end tests of the CoAP device listener with real peers: libcoap's
//! `coap-client-notls` as devices, raw UDP datagrams built with coap-lite
//! where a test needs exact control (retransmissions, bad messages), and a
//! TLS mosquitto as the cloud.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use harness::*;
use serde_json::{Value as Json, json};
use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn coap_gateway(dir: &std::path::Path, cloud: Option<&Cloud>, extra: &str) -> Gateway {
    Gateway::new(
        dir,
        &GatewaySpec {
            coap: Some(extra.to_owned()),
            cloud: cloud.map(|c| (c.broker.port, c.pki.ca.clone())),
            ..GatewaySpec::default()
        },
    )
}

fn url(gw: &Gateway, token: &str, path: &str) -> String {
    format!("coap://{}/api/v1/{token}/{path}", gw.coap.as_ref().unwrap())
}

/// Runs coap-client-notls with `args` (it exits 0 even on 4.xx: callers
/// check the output).
fn coap_client(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["60", "coap-client-notls"])
        .args(args)
        .output()
        .expect("coap-client-notls must be installed (libcoap3-bin)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn peek_all(gw: &Gateway) -> Vec<Json> {
    gw.cli_json(&["queue", "peek", "-n", "100000", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

/// A CoAP request built by hand.
fn request(
    mtype: MessageType,
    method: RequestType,
    mid: u16,
    token: &[u8],
    path: &str,
    payload: &[u8],
) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(mtype);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    for seg in path.split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}

fn udp(gw: &Gateway) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(gw.coap.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn exchange(s: &UdpSocket, bytes: &[u8]) -> Vec<u8> {
    s.send(bytes).unwrap();
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).expect("an answer within 5 s");
    buf[..n].to_vec()
}

fn code(bytes: &[u8]) -> MessageClass {
    Packet::from_bytes(bytes).unwrap().header.code
}

#[test]
fn coap_posts_reach_the_cloud_and_bad_requests_get_clear_codes() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), Some(&cloud), "");
    let token = gw.add_device("dev-1");
    gw.start();
    let tel = url(&gw, &token, "telemetry");
    // CON with JSON, NON, no content-format, SenML, client attributes.
    for args in [
        vec!["-m", "post", "-t", "50", "-e", r#"{"n":1}"#, &tel],
        vec!["-m", "post", "-N", "-e", r#"{"n":2}"#, &tel],
        vec!["-m", "post", "-e", r#"{"n":3}"#, &tel],
        vec![
            "-m",
            "post",
            "-t",
            "110",
            "-e",
            r#"[{"n":"n","v":4}]"#,
            &tel,
        ],
    ] {
        let o = coap_client(&args);
        assert!(
            o.status.success() && !text(&o).contains("4."),
            "{args:?}: {}",
            text(&o)
        );
    }
    let attrs = url(&gw, &token, "attributes");
    let o = coap_client(&["-m", "post", "-e", r#"{"model":"coap-1"}"#, &attrs]);
    assert!(!text(&o).contains("4."), "{}", text(&o));
    let o = coap_client(&["-m", "get", &format!("{attrs}?clientKeys=model")]);
    assert_eq!(
        serde_json::from_slice::<Json>(&o.stdout).unwrap(),
        json!({"client": {"model": "coap-1"}})
    );
    // Refusals, with the reason in the payload.
    for (args, expect) in [
        (
            vec!["-m", "post", "-e", "{}", &url(&gw, "nope", "telemetry")],
            "4.01",
        ),
        (vec!["-m", "post", "-e", "{", &tel], "4.00"),
        (vec!["-m", "post", "-t", "0", "-e", "21.5", &tel], "4.15"),
        (vec!["-m", "put", "-e", "{}", &tel], "4.05"),
        (vec!["-m", "get", &url(&gw, &token, "nothing")], "4.04"),
    ] {
        let o = coap_client(&args);
        assert!(text(&o).contains(expect), "{args:?} → {}", text(&o));
    }
    let values = || -> Vec<Json> {
        cloud
            .observer
            .records()
            .iter()
            .filter(|(_, d, _)| d == "dev-1")
            .map(|(_, _, r)| r["values"]["n"].clone())
            .collect()
    };
    wait_for(
        "four readings at the cloud",
        Duration::from_secs(15),
        || values().len() >= 4,
    );
    assert_eq!(values(), [json!(1), json!(2), json!(3), json!(4)]);
    wait_for(
        "the client attribute at the cloud",
        Duration::from_secs(15),
        || {
            cloud
                .seen_on(&format!("{PREFIX}/attributes"))
                .iter()
                .any(|p| p["records"][0]["values"] == json!({"model": "coap-1"}))
        },
    );
    let st = gw.status();
    let coap = &st["ingest"]["messages"]["coap"];
    assert_eq!(coap["ok"], 5, "{st}");
    assert_eq!(coap["unauthorized"], 1);
    assert_eq!(coap["bad_payload"], 2);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn a_con_sent_three_times_is_stored_once_and_bad_messages_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "");
    let token = gw.add_device("dev-1");
    gw.start();
    let s = udp(&gw);
    let path = format!("api/v1/{token}/telemetry");
    let con = request(
        MessageType::Confirmable,
        RequestType::Post,
        0x4242,
        &[1, 2, 3],
        &path,
        br#"{"x":1}"#,
    )
    .to_bytes()
    .unwrap();
    let answers: Vec<Vec<u8>> = (0..3).map(|_| exchange(&s, &con)).collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[1], answers[2]);
    let a = Packet::from_bytes(&answers[0]).unwrap();
    assert_eq!(a.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(a.header.message_id, 0x4242);
    assert_eq!(a.get_token(), &[1, 2, 3]);
    assert_eq!(a.header.code, MessageClass::Response(ResponseType::Changed));
    // The same message id from another endpoint is another request.
    let other = udp(&gw);
    assert_eq!(
        code(&exchange(&other, &con)),
        MessageClass::Response(ResponseType::Changed)
    );
    assert_eq!(
        peek_all(&gw).len(),
        2,
        "one record per request, not per datagram"
    );
    // An unrecognised critical option: 4.02.
    let mut p = request(
        MessageType::Confirmable,
        RequestType::Post,
        7,
        &[9],
        &path,
        b"{}",
    );
    p.add_option(CoapOption::Unknown(2049), vec![1]);
    assert_eq!(
        code(&exchange(&s, &p.to_bytes().unwrap())),
        MessageClass::Response(ResponseType::BadOption)
    );
    // A garbled CON: RST with its message id; a CoAP ping: RST.
    let rst = Packet::from_bytes(&exchange(&s, &[0x40, 0x02, 0x12, 0x34, 0xF0])).unwrap();
    assert_eq!(
        (rst.header.get_type(), rst.header.message_id),
        (MessageType::Reset, 0x1234)
    );
    let pong = Packet::from_bytes(&exchange(&s, &[0x40, 0x00, 0x00, 0x09])).unwrap();
    assert_eq!(
        (pong.header.get_type(), pong.header.message_id),
        (MessageType::Reset, 9)
    );
    // Garbage that is not a CON gets nothing, and the listener lives on.
    s.send(&[0xFF; 40]).unwrap();
    s.send(&[0x50, 0x02]).unwrap();
    let again = request(
        MessageType::Confirmable,
        RequestType::Post,
        8,
        &[],
        &path,
        br#"{"x":2}"#,
    );
    assert_eq!(
        code(&exchange(&s, &again.to_bytes().unwrap())),
        MessageClass::Response(ResponseType::Changed)
    );
    // NON is answered with NON.
    let non = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        9,
        &[5],
        &path,
        br#"{"x":3}"#,
    );
    let a = Packet::from_bytes(&exchange(&s, &non.to_bytes().unwrap())).unwrap();
    assert_eq!(a.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(a.get_token(), &[5]);
    let st = gw.status();
    assert_eq!(st["coap"]["counters"]["duplicates"], 2, "{st}");
    assert_eq!(st["coap"]["counters"]["malformed"], 3, "{st}");
    assert_eq!(peek_all(&gw).len(), 4);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn firmware_downloads_block_wise_at_every_block_size_and_by_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "");
    let token = gw.add_device("dev-1");
    let other = gw.add_device("dev-2");
    let image = ota_image();
    gw.stage_firmware(&image, "fw", "2", "dev-1");
    gw.start();
    let fw = url(&gw, &token, "firmware?title=fw&version=2");
    for size in ["16", "32", "64", "128", "256", "512", "1024"] {
        let dst = tmp.path().join(format!("got-{size}"));
        let o = coap_client(&["-m", "get", "-b", size, "-o", dst.to_str().unwrap(), &fw]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            std::fs::read(&dst).unwrap() == image,
            "block size {size}: the image differs"
        );
    }
    // ThingsBoard's chunk form: bytes 3000..4000.
    let dst = tmp.path().join("chunk");
    let o = coap_client(&[
        "-m",
        "get",
        "-o",
        dst.to_str().unwrap(),
        &format!("{fw}&size=1000&chunk=3"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&dst).unwrap(), &image[3000..4000]);
    // Not targeted: 4.03; another version than its campaign's: 4.04.
    let o = coap_client(&[
        "-m",
        "get",
        &url(&gw, &other, "firmware?title=fw&version=2"),
    ]);
    assert!(text(&o).contains("4.03"), "{}", text(&o));
    let o = coap_client(&[
        "-m",
        "get",
        &url(&gw, &token, "firmware?title=fw&version=1"),
    ]);
    assert!(text(&o).contains("4.04"), "{}", text(&o));
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn block1_bodies_are_reassembled_and_oversized_ones_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "max_body = \"2KiB\"");
    let token = gw.add_device("dev-1");
    gw.start();
    let tel = url(&gw, &token, "telemetry");
    // 40 readings in one ~1.4 KB array, sent in 64-byte blocks.
    let body = Json::Array(
        (0..40)
            .map(|i| json!({"ts": 1_700_000_000_000i64 + i, "values": {"i": i}}))
            .collect(),
    )
    .to_string();
    assert!(body.len() > 1024 && body.len() < 2048, "{}", body.len());
    let f = tmp.path().join("body.json");
    std::fs::write(&f, &body).unwrap();
    let o = coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-t",
        "50",
        "-f",
        f.to_str().unwrap(),
        &tel,
    ]);
    assert!(!text(&o).contains("4."), "{}", text(&o));
    let stored = peek_all(&gw);
    assert_eq!(stored.len(), 40);
    assert_eq!(stored[39]["values"]["i"], 39);
    // Over max_body: 4.13 (with Size1), nothing stored.
    let big = Json::Array(
        (0..100)
            .map(|i| json!({"ts": 1_700_000_000_000i64 + i, "values": {"i": i}}))
            .collect(),
    )
    .to_string();
    std::fs::write(&f, &big).unwrap();
    let o = coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-t",
        "50",
        "-f",
        f.to_str().unwrap(),
        &tel,
    ]);
    assert!(text(&o).contains("4.13"), "{}", text(&o));
    // A block without its predecessors: 4.08.
    let s = udp(&gw);
    let mut p = request(
        MessageType::Confirmable,
        RequestType::Post,
        77,
        &[1],
        &format!("api/v1/{token}/telemetry"),
        &[b' '; 64],
    );
    p.add_option(CoapOption::Block1, vec![0x3A]); // num 3, more, szx 2 (64 B)
    assert_eq!(
        code(&exchange(&s, &p.to_bytes().unwrap())),
        MessageClass::Response(ResponseType::RequestEntityIncomplete)
    );
    assert_eq!(peek_all(&gw).len(), 40);
    assert_eq!(gw.stop(), Some(0));
}

/// Starts `coap-client-notls -s SECS` observing `uri`; its output goes to
/// `out`.
fn observe(uri: &str, secs: u32, out: &std::path::Path) -> std::process::Child {
    Command::new("coap-client-notls")
        .args(["-m", "get", "-s", &secs.to_string(), uri])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn observers_get_shared_attributes_and_commands_from_the_cloud() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), Some(&cloud), "");
    let token = gw.add_device("dev-1");
    gw.start();
    wait_for("the uplink", Duration::from_secs(15), || {
        gw.status()["uplink"]["connected"] == json!(true)
    });
    pause(Duration::from_millis(500));
    let attrs_out = tmp.path().join("attrs.out");
    let rpc_out = tmp.path().join("rpc.out");
    let mut a = observe(&url(&gw, &token, "attributes/updates"), 20, &attrs_out);
    let mut r = observe(&url(&gw, &token, "rpc"), 20, &rpc_out);
    wait_for("two observers", Duration::from_secs(10), || {
        gw.status()["coap"]["observers"] == 2
    });
    cloud.publish(
        &format!("{PREFIX}/attributes/shared"),
        &json!({"device": "dev-1", "values": {"targetTemp": 23}}),
    );
    wait_for(
        "the attribute notification",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&attrs_out)
                .unwrap_or_default()
                .contains(r#"{"targetTemp":23}"#)
        },
    );
    cloud.publish(
        &format!("{PREFIX}/commands"),
        &json!({"id": "c-7", "device": "dev-1", "method": "setGpio", "params": {"pin": 3}}),
    );
    let cmd: Json = {
        let mut found = None;
        wait_for("the command notification", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&rpc_out).unwrap_or_default();
            found = text.find(r#"{"method""#).and_then(|start| {
                serde_json::Deserializer::from_str(&text[start..])
                    .into_iter::<Json>()
                    .next()?
                    .ok()
            });
            found.is_some()
        });
        found.unwrap()
    };
    assert_eq!(cmd["method"], "setGpio");
    assert_eq!(cmd["params"], json!({"pin": 3}));
    let id = cmd["id"].as_u64().unwrap();
    let o = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"ok":true}"#,
        &url(&gw, &token, &format!("rpc/{id}")),
    ]);
    assert!(!text(&o).contains("4."), "{}", text(&o));
    let responses = format!("{PREFIX}/commands/response");
    wait_for("the command response", Duration::from_secs(10), || {
        !cloud.seen_on(&responses).is_empty()
    });
    assert_eq!(
        cloud.seen_on(&responses),
        vec![json!({"id": "c-7", "device": "dev-1", "result": {"ok": true}})]
    );
    let _ = a.kill();
    let _ = r.kill();
    let _ = a.wait();
    let _ = r.wait();
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn slow_commits_get_an_empty_ack_and_a_separate_response() {
    let tmp = tempfile::tempdir().unwrap();
    // 0 = every CON gets an empty ACK before its commit lands.
    let mut gw = coap_gateway(tmp.path(), None, "separate_after = \"0s\"");
    let token = gw.add_device("dev-1");
    gw.start();
    let tel = url(&gw, &token, "telemetry");
    for i in 0..20 {
        let o = coap_client(&["-m", "post", "-e", &format!(r#"{{"i":{i}}}"#), &tel]);
        assert!(
            !text(&o).contains("4.") && !text(&o).contains("5."),
            "{}",
            text(&o)
        );
    }
    assert_eq!(peek_all(&gw).len(), 20);
    let st = gw.status();
    assert!(
        st["coap"]["counters"]["separate_responses"]
            .as_u64()
            .unwrap()
            > 0,
        "{st}"
    );
    assert_eq!(gw.stop(), Some(0));
}

/// Sends CON POSTs from `workers` sockets until `stop`; returns the values
/// whose 2.04 arrived.
fn con_load(
    addr: &str,
    token: &str,
    base: u64,
    workers: usize,
    for_how_long: Duration,
) -> BTreeSet<u64> {
    let deadline = Instant::now() + for_how_long;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (addr, token) = (addr.to_owned(), token.to_owned());
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut acked = BTreeSet::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let v = base + (w as u64) * 1_000_000 + n;
                    n += 1;
                    let mid = (n & 0xFFFF) as u16;
                    let p = request(
                        MessageType::Confirmable,
                        RequestType::Post,
                        mid,
                        &[w as u8],
                        &format!("api/v1/{token}/telemetry"),
                        format!(r#"{{"v":{v}}}"#).as_bytes(),
                    );
                    if s.send(&p.to_bytes().unwrap()).is_err() {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match s.recv(&mut buf) {
                        Ok(len) => {
                            if let Ok(a) = Packet::from_bytes(&buf[..len])
                                && a.header.message_id == mid
                                && a.header.code == MessageClass::Response(ResponseType::Changed)
                            {
                                acked.insert(v);
                            }
                        }
                        // The gateway was killed: stop this worker.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn coap_con_sigkill_loses_no_acknowledged_reading() {
    let cloud = cloud();
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), Some(&cloud), "");
    let token = gw.add_device("dev-1");
    let mut acked = BTreeSet::new();
    for round in 0..5u64 {
        gw.start();
        let addr = gw.coap.clone().unwrap();
        let load = {
            let token = token.clone();
            std::thread::spawn(move || {
                con_load(
                    &addr,
                    &token,
                    round * 100_000_000,
                    8,
                    Duration::from_secs(3),
                )
            })
        };
        pause(Duration::from_millis(700 + round * 150));
        gw.kill9();
        acked.extend(load.join().unwrap());
    }
    gw.start();
    assert!(acked.len() > 100, "the load ran: {}", acked.len());
    wait_for(
        "every acknowledged reading at the cloud",
        Duration::from_secs(60),
        || {
            let seen: BTreeSet<u64> = cloud
                .observer
                .records()
                .iter()
                .filter_map(|(_, _, r)| r["values"]["v"].as_u64())
                .collect();
            acked.is_subset(&seen)
        },
    );
    eprintln!(
        "{} acknowledged readings over 5 kill -9 rounds, all at the cloud",
        acked.len()
    );
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn dual_stack_bind_serves_ipv4_and_ipv6_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "");
    let config = std::fs::read_to_string(&gw.config).unwrap().replace(
        "[listeners.coap]\nbind = \"127.0.0.1:0\"",
        "[listeners.coap]\nbind = \"[::]:0\"",
    );
    std::fs::write(&gw.config, config).unwrap();
    let token = gw.add_device("dev-1");
    gw.start();
    let port = gw
        .coap
        .as_ref()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();
    for host in ["127.0.0.1", "[::1]"] {
        let o = coap_client(&[
            "-m",
            "post",
            "-e",
            r#"{"x":1}"#,
            &format!("coap://{host}:{port}/api/v1/{token}/telemetry"),
        ]);
        assert!(
            o.status.success() && !text(&o).contains("4."),
            "{host}: {}",
            text(&o)
        );
    }
    assert_eq!(peek_all(&gw).len(), 2);
    assert_eq!(gw.stop(), Some(0));
}

/// The first option value of `opt` as an unsigned integer.
fn uint_option(p: &Packet, opt: CoapOption) -> Option<u32> {
    p.get_first_option(opt)
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

#[test]
fn full_outbox_rate_limits_and_failed_logins_answer_with_max_age() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        tmp.path(),
        &GatewaySpec {
            coap: Some("rate_limit_per_device = 50.0\nauth_fail_limit = 3".into()),
            max_bytes: "16KiB".into(),
            when_full: "reject",
            ..GatewaySpec::default()
        },
    );
    let token = gw.add_device("dev-1");
    gw.start();
    let s = udp(&gw);
    let path = format!("api/v1/{token}/telemetry");
    let post = |mid: u16, body: &str| {
        let p = request(
            MessageType::Confirmable,
            RequestType::Post,
            mid,
            &[1],
            &path,
            body.as_bytes(),
        );
        Packet::from_bytes(&exchange(&s, &p.to_bytes().unwrap())).unwrap()
    };
    // Over 50 req/s for one device: 4.29 with Max-Age.
    let mut limited = None;
    for mid in 0..200u16 {
        let a = post(mid, r#"{"x":1}"#);
        if a.header.code == MessageClass::Response(ResponseType::TooManyRequests) {
            limited = Some(a);
            break;
        }
    }
    let limited = limited.expect("the rate limit answered 4.29");
    assert!(uint_option(&limited, CoapOption::MaxAge).unwrap() >= 1);
    // Fill the 16 KiB outbox: 5.03 with Max-Age once it is full (reject).
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(900));
    let mut full = None;
    for mid in 1000..1400u16 {
        pause(Duration::from_millis(25));
        let a = post(mid, &big);
        if a.header.code == MessageClass::Response(ResponseType::ServiceUnavailable) {
            full = Some(a);
            break;
        }
    }
    let full = full.expect("a full outbox answered 5.03");
    assert_eq!(uint_option(&full, CoapOption::MaxAge), Some(5));
    // Failed logins from this address: 4.01 three times, then 4.29 even
    // for the right token.
    let bad = |mid: u16, tok: &str| {
        let p = request(
            MessageType::Confirmable,
            RequestType::Post,
            mid,
            &[1],
            &format!("api/v1/{tok}/telemetry"),
            b"{}",
        );
        Packet::from_bytes(&exchange(&s, &p.to_bytes().unwrap()))
            .unwrap()
            .header
            .code
    };
    for mid in 2000..2003u16 {
        assert_eq!(
            bad(mid, "wrong"),
            MessageClass::Response(ResponseType::Unauthorized)
        );
    }
    assert_eq!(
        bad(2004, &token),
        MessageClass::Response(ResponseType::TooManyRequests)
    );
    let st = gw.status();
    assert!(st["coap"]["counters"]["rate_limited"].as_u64().unwrap() >= 1);
    assert!(
        st["ingest"]["messages"]["coap"]["rejected"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert_eq!(st["ingest"]["messages"]["coap"]["unauthorized"], 4);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn sluice_bench_over_coap_stores_every_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "");
    gw.start();
    let url = format!("coap://{}", gw.coap.as_ref().unwrap());
    let report = gw.cli_json(&[
        "bench",
        "--protocol",
        "coap",
        "--devices",
        "5",
        "--messages",
        "2000",
        "--concurrency",
        "16",
        "--url",
        &url,
        "--json",
    ]);
    assert_eq!(report["ok"], 2000, "{report}");
    assert_eq!(report["concurrency"], 16);
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    let st = gw.status();
    assert_eq!(
        st["outbox"]["records"], 2000,
        "every 2.04 is a stored message"
    );
    assert_eq!(st["ingest"]["messages"]["coap"]["ok"], 2000);
    assert_eq!(st["devices"]["registered"], 5);
    // Nothing listens there: a clear error before any load.
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = format!("coap://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = gw.cli(&[
        "bench",
        "--protocol",
        "coap",
        "--url",
        &dead,
        "--tokens",
        "/dev/null",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    assert_eq!(gw.stop(), Some(0));
}

fn sha256_hex(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn aiocoap_posts_downloads_firmware_block_wise_and_observes_the_next_version() {
    use std::io::BufRead as _;
    if !has_python_module("aiocoap") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = coap_gateway(tmp.path(), None, "");
    let token = gw.add_device("dev-1");
    let stage = |gw: &Gateway, version: &str, len: u32| {
        let image: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let src = gw.stage_firmware(&image, "fw", version, "dev-1");
        sha256_hex(&src)
    };
    let sha1 = stage(&gw, "1", 230_000);
    gw.start();
    let addr = gw.coap.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/aiocoap_device.py"
    );
    let mut child = Command::new("timeout")
        .args(["120", "python3", script, host, port, &token, "fw", "1", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = String::new();
    let mut sha2 = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "observing" {
            // The second version's fw_* attributes go to the observer.
            sha2 = Some(stage(&gw, "2", 210_000));
            continue;
        }
        last = line;
    }
    let out = child.wait_with_output().unwrap();
    let report: Json = serde_json::from_str(&last)
        .unwrap_or_else(|_| panic!("{last}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["telemetry"], "2.04", "{report}");
    assert_eq!(report["firmware"]["code"], "2.05");
    assert_eq!(report["firmware"]["size"], 230_000);
    assert_eq!(
        report["firmware"]["sha256"],
        sha1.as_str(),
        "the block-wise download is the image"
    );
    assert_eq!(report["firmware"]["last_block2"][1], false, "{report}");
    assert_eq!(report["registration"]["code"], "2.05");
    assert_eq!(
        report["registration"]["body"]["fw_version"], "1",
        "{report}"
    );
    let notes = report["notifications"].as_array().unwrap();
    let last_note = &notes.last().unwrap()["body"];
    assert_eq!(last_note["fw_version"], "2", "{report}");
    assert_eq!(last_note["fw_checksum"], sha2.unwrap().as_str());
    assert_eq!(last_note["fw_size"], 210_000);
    let stored = peek_all(&gw);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["values"]["via"], "aiocoap");
    assert_eq!(gw.stop(), Some(0));
}
