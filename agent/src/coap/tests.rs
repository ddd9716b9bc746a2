use super::*;

#[test]
fn option_values_are_minimal_big_endian() {
    assert_eq!(uint(0), Vec::<u8>::new());
    assert_eq!(uint(50), vec![50]);
    assert_eq!(uint(0x1234), vec![0x12, 0x34]);
    assert_eq!(read_uint(&[0x12, 0x34]), Some(0x1234));
    assert_eq!(read_uint(&[]), Some(0));
    assert_eq!(read_uint(&[1, 2, 3, 4, 5]), None);
}

#[test]
fn answers_are_framed_for_the_message_type_with_the_token() {
    let a = Answer::text(ResponseType::BadRequest, "why");
    let bytes = frame(MessageType::Acknowledgement, 0x1234, &[9, 8], a);
    let p = Packet::from_bytes(&bytes).unwrap();
    assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(p.header.message_id, 0x1234);
    assert_eq!(p.get_token(), &[9, 8]);
    assert_eq!(
        p.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );
    assert_eq!(p.payload, b"why");
    let e = Packet::from_bytes(&empty(MessageType::Reset, 7)).unwrap();
    assert_eq!(e.header.get_type(), MessageType::Reset);
    assert_eq!(e.header.code, MessageClass::Empty);
    assert_eq!(e.header.message_id, 7);
}

#[test]
fn critical_options_we_do_not_know_are_flagged() {
    for n in [3u16, 7, 11, 15, 17, 23, 27] {
        assert!(known_option(n), "{n}");
    }
    for n in [1u16, 5, 9, 35, 39, 2049] {
        assert!(!known_option(n) && n % 2 == 1, "{n}");
    }
}

#[test]
fn observers_register_renew_notify_and_go() {
    let o = Observers::default();
    let d = DeviceName::new("d");
    let p = SocketAddr::from(([127, 0, 0, 1], 5000));
    assert!(o.subscriptions(&d).is_none());
    assert_eq!(o.register(&d, p, &[1], Resource::Rpc), 0);
    assert_eq!(
        o.subscriptions(&d),
        Some(Subscriptions {
            attributes: false,
            rpc: true
        })
    );
    assert_eq!(
        o.register(&d, p, &[1], Resource::Rpc),
        1,
        "a renewal moves the sequence on"
    );
    let next = o.next_for(&d, Resource::Rpc);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].seq, 2);
    assert!(o.next_for(&d, Resource::AttributeUpdates).is_empty());
    assert_eq!(
        o.push(&d, Push::Attributes(json!({}))),
        Err(PushError::NoSession),
        "not attached to a listener"
    );
    for t in 0..20u8 {
        o.register(&d, p, &[t, 0], Resource::AttributeUpdates);
    }
    assert!(o.count() <= MAX_OBSERVERS_PER_DEVICE, "bounded per device");
    o.deregister(&d, p, &[19, 0]);
    assert_eq!(o.count(), MAX_OBSERVERS_PER_DEVICE - 1);
}

#[test]
fn token_buckets_refill_at_their_rate() {
    let t = Instant::now();
    let mut b = Bucket { tokens: 2.0, at: t };
    assert!(b.take(2.0, t).is_ok());
    assert!(b.take(2.0, t).is_ok());
    assert_eq!(b.take(2.0, t), Err(1));
    assert!(b.take(2.0, t + Duration::from_millis(500)).is_ok());
}

#[test]
fn datagrams_are_classified_and_bad_cons_reset() {
    let p = SocketAddr::from(([127, 0, 0, 1], 5000));
    // CON POST /api/v1/t/telemetry, token 0xAB, payload {}.
    let mut pkt = Packet::new();
    pkt.header.set_version(1);
    pkt.header.set_type(MessageType::Confirmable);
    pkt.header.code = MessageClass::Request(RequestType::Post);
    pkt.header.message_id = 42;
    pkt.set_token(vec![0xAB]);
    for seg in ["api", "v1", "t", "telemetry"] {
        pkt.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    pkt.add_option(CoapOption::Unknown(2049), vec![1]);
    pkt.payload = b"{}".to_vec();
    let Datagram::Request(req, bad) = classify(&pkt.to_bytes().unwrap(), p) else {
        panic!()
    };
    assert_eq!(req.path, ["api", "v1", "t", "telemetry"]);
    assert_eq!(
        (req.key, req.con, req.token.as_slice()),
        ((p, 42), true, &[0xAB][..])
    );
    assert_eq!(bad, Some(2049), "an unknown critical option is flagged");
    // Garbage with a CON header: RST; other garbage: dropped.
    assert!(matches!(
        classify(&[0x40, 0x01, 0x12, 0x34, 0xF0], p),
        Datagram::Malformed {
            reset: Some(0x1234),
            ..
        }
    ));
    assert!(matches!(
        classify(&[0x50, 0x01, 0x12, 0x34, 0xF0], p),
        Datagram::Malformed { reset: None, .. }
    ));
    assert!(matches!(classify(&[0x40, 0, 0, 7], p), Datagram::Ping(7)));
    assert!(matches!(classify(&[0x60, 0, 0, 7], p), Datagram::Ack(7)));
    assert!(matches!(classify(&[0x70, 0, 0, 7], p), Datagram::Reset(7)));
    assert!(
        matches!(classify(&[0x80, 0x01, 0, 7], p), Datagram::Malformed { .. }),
        "version 2"
    );
    assert!(matches!(
        classify(&[0x40], p),
        Datagram::Malformed { reset: None, .. }
    ));
}

mod fuzz {
    //! Property tests beside the `coap_datagram` cargo-fuzz target.
    use super::super::fuzz_datagram;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            fuzz_datagram(&bytes);
        }

        /// A valid CON/NON header and token reach the option parser.
        #[test]
        fn plausible_headers_with_arbitrary_options_never_panic(
            t in 0u8..2, tkl in 0u8..9, code in prop::sample::select(vec![1u8, 2, 3, 4, 0x45, 0]),
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut b = vec![0x40 | (t << 4) | tkl, code, 1, 2];
            b.extend(std::iter::repeat_n(7u8, usize::from(tkl)));
            b.extend(rest);
            fuzz_datagram(&b);
        }
    }
}
