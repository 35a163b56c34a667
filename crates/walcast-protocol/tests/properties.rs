//! Property tests: encode/decode round trips for both vsns, and decoders never panic.

use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;
use walcast_protocol::{
    decode_binary, decode_text, encode_push, encode_user_broadcast_binary, join_reply_ok,
    BroadcastPush, Inbound, PayloadEncoding, Vsn,
};

/// Strings biased towards what breaks JSON writers: quotes, backslashes, controls,
/// non-BMP characters and the JS line separators.
fn nasty_string() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => any::<char>(),
        1 => prop::sample::select(vec![
            '"', '\\', '/', '\n', '\r', '\t', '\u{0}', '\u{1}', '\u{8}', '\u{c}', '\u{1f}',
            '\u{7f}', '\u{2028}', '\u{2029}', '\u{feff}', '😀', 'é', '{', '[', ':', ',',
        ]),
    ];
    prop::collection::vec(ch, 0..24).prop_map(|v| v.into_iter().collect())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(nasty_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const TYPED_EVENTS: [&str; 6] = [
    "heartbeat",
    "phx_join",
    "phx_leave",
    "access_token",
    "broadcast",
    "presence",
];

fn vsn() -> impl Strategy<Value = Vsn> {
    prop_oneof![Just(Vsn::V1), Just(Vsn::V2)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn text_round_trip(
        vsn in vsn(),
        join_ref in prop::option::of(nasty_string()),
        msg_ref in prop::option::of(nasty_string()),
        topic in nasty_string(),
        event in nasty_string().prop_filter("typed events have their own tests", |e| !TYPED_EVENTS.contains(&e.as_str())),
        payload in json_value(),
    ) {
        let payload_json = serde_json::to_string(&payload).unwrap();
        let text = encode_push(vsn, join_ref.as_deref(), msg_ref.as_deref(), &topic, &event, &payload_json);
        // The writer's output is plain JSON to any parser.
        let parsed: Value = serde_json::from_str(&text).unwrap();
        match vsn {
            Vsn::V1 => {
                prop_assert!(parsed.is_object());
                prop_assert!(parsed.get("join_ref").is_none());
            }
            Vsn::V2 => prop_assert_eq!(parsed.as_array().map(Vec::len), Some(5)),
        }
        let f = decode_text(vsn, &text).unwrap();
        prop_assert_eq!(&f.topic, &topic);
        prop_assert_eq!(&f.event, &event);
        prop_assert_eq!(&f.msg_ref, &msg_ref);
        let want_join_ref = match vsn { Vsn::V1 => None, Vsn::V2 => join_ref };
        prop_assert_eq!(&f.join_ref, &want_join_ref);
        match f.payload {
            Inbound::Other { event: e, payload: p } => {
                prop_assert_eq!(e, event);
                prop_assert_eq!(p, payload);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn broadcast_text_round_trip(
        vsn in vsn(),
        topic in nasty_string(),
        user_event in nasty_string(),
        inner in json_value(),
    ) {
        let payload = walcast_protocol::outbound::broadcast(&user_event, &serde_json::to_string(&inner).unwrap(), None);
        let text = encode_push(vsn, Some("1"), Some("2"), &topic, "broadcast", &payload);
        let f = decode_text(vsn, &text).unwrap();
        let Inbound::Broadcast(BroadcastPush::Json(b)) = f.payload else {
            return Err(TestCaseError::fail("not a text broadcast"));
        };
        prop_assert_eq!(b.event.as_deref(), Some(user_event.as_str()));
        // Relayed exactly as it came in.
        prop_assert_eq!(b.payload.get(), payload.as_str());
        let v: Value = serde_json::from_str(b.payload.get()).unwrap();
        prop_assert_eq!(&v["payload"], &inner);
    }

    #[test]
    fn kind3_round_trip(
        join_ref in prop::option::of("[0-9]{1,6}"),
        msg_ref in prop::option::of("[0-9]{1,6}"),
        topic in nasty_string(),
        user_event in nasty_string(),
        binary in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        json in json_value(),
    ) {
        let (encoding, payload) = if binary {
            (0u8, bytes)
        } else {
            (1u8, serde_json::to_vec(&json).unwrap())
        };
        let jr = join_ref.clone().unwrap_or_default();
        let r = msg_ref.clone().unwrap_or_default();
        let mut frame = vec![3, jr.len() as u8, r.len() as u8, topic.len() as u8, user_event.len() as u8, 0, encoding];
        for s in [&jr, &r, &topic, &user_event] {
            frame.extend_from_slice(s.as_bytes());
        }
        frame.extend_from_slice(&payload);
        let f = decode_binary(Vsn::V2, &frame).unwrap();
        prop_assert_eq!(&f.join_ref, &join_ref);
        prop_assert_eq!(&f.msg_ref, &msg_ref);
        prop_assert_eq!(&f.topic, &topic);
        let Inbound::Broadcast(BroadcastPush::Binary(b)) = f.payload else {
            return Err(TestCaseError::fail("not a binary broadcast"));
        };
        prop_assert_eq!(&b.event, &user_event);
        prop_assert_eq!(&b.payload[..], &payload[..]);

        // Server side: the same broadcast out as kind 4 …
        let out = encode_user_broadcast_binary(&f.topic, &b.event, None, b.encoding, &b.payload).unwrap();
        prop_assert_eq!(out[0], 4);
        prop_assert_eq!(out[4], encoding);
        prop_assert_eq!(&out[5 + topic.len() + user_event.len()..], &payload[..]);
        // … and, for JSON, as V1 text that realtime clients can parse.
        if let Some(v1) = b.v1_text_payload() {
            let v: Value = serde_json::from_str(&v1).unwrap();
            prop_assert_eq!(&v["event"], &Value::String(user_event.clone()));
            prop_assert_eq!(&v["payload"], &json);
            prop_assert_eq!(&v["type"], "broadcast");
        } else {
            prop_assert!(binary);
        }
    }

    #[test]
    fn join_echo_keeps_every_binding(
        bindings in prop::collection::vec(
            prop::collection::btree_map(nasty_string(), json_value(), 0..5), 0..6),
        ids in prop::collection::vec(any::<u32>(), 6),
    ) {
        let list: Vec<Value> = bindings.iter().cloned().map(|m| Value::Object(m.into_iter().collect())).collect();
        let payload = serde_json::json!({"config": {"postgres_changes": list}});
        let text = encode_push(Vsn::V2, Some("1"), Some("1"), "realtime:r", "phx_join", &payload.to_string());
        let Inbound::Join(join) = decode_text(Vsn::V2, &text).unwrap().payload else {
            return Err(TestCaseError::fail("not a join"));
        };
        prop_assert_eq!(join.config.postgres_changes.len(), bindings.len());
        let pairs: Vec<(u32, &RawValue)> = join.config.postgres_changes.iter().zip(&ids).map(|(b, id)| (*id, &*b.raw)).collect();
        let reply: Value = serde_json::from_str(&join_reply_ok(&pairs)).unwrap();
        prop_assert_eq!(&reply["status"], "ok");
        let echoed = reply["response"]["postgres_changes"].as_array().unwrap();
        prop_assert_eq!(echoed.len(), bindings.len());
        for ((got, original), id) in echoed.iter().zip(&bindings).zip(&ids) {
            let mut want: serde_json::Map<String, Value> = original.clone().into_iter().collect();
            want.insert("id".to_owned(), Value::from(*id));
            prop_assert_eq!(got, &Value::Object(want));
        }
    }

    #[test]
    fn text_decoders_never_panic(vsn in vsn(), s in any::<String>()) {
        let _ = decode_text(vsn, &s);
    }

    #[test]
    fn text_decoders_never_panic_on_near_frames(
        vsn in vsn(),
        event in prop::sample::select(TYPED_EVENTS.to_vec()),
        payload in json_value(),
        cut in any::<prop::sample::Index>(),
    ) {
        let text = encode_push(vsn, None, Some("1"), "realtime:x", event, &payload.to_string());
        let _ = decode_text(vsn, &text);
        // Truncated at an arbitrary char boundary.
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) { at -= 1; }
        let _ = decode_text(vsn, &text[..at]);
    }

    #[test]
    fn binary_decoder_never_panics(vsn in vsn(), bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_binary(vsn, &bytes);
    }

    #[test]
    fn binary_decoder_never_panics_on_kind3_headers(
        header in prop::collection::vec(0u8..8, 6),
        tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut b = vec![3u8];
        b.extend_from_slice(&header);
        b.extend_from_slice(&tail);
        let _ = decode_binary(Vsn::V2, &b);
    }
}

#[test]
fn payload_encoding_bytes() {
    assert_eq!(PayloadEncoding::from_byte(0), Some(PayloadEncoding::Binary));
    assert_eq!(PayloadEncoding::from_byte(1), Some(PayloadEncoding::Json));
    assert_eq!(PayloadEncoding::from_byte(2), None);
    assert_eq!(PayloadEncoding::Json.as_byte(), 1);
    assert_eq!(PayloadEncoding::Binary.as_byte(), 0);
}
