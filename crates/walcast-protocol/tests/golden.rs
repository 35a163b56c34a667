//! Golden tests: the example frames of the protocol reference, decoded and encoded.

use serde_json::{json, Value};
use walcast_protocol::outbound::{self, event, SystemExtension, SystemStatus};
use walcast_protocol::{
    decode_binary, decode_text, encode_push, encode_user_broadcast_binary, join_reply_ok,
    BroadcastPush, Inbound, PayloadEncoding, PresencePush, ReplayConfig, Vsn,
};

const JOIN_V2: &str = r#"["3","3","realtime:room1","phx_join",{
  "config":{
    "broadcast":{"ack":false,"self":false,"replay":{"since":1763407103911,"limit":10},"replication_ready":false},
    "presence":{"key":"","enabled":false},
    "postgres_changes":[{"event":"*","schema":"public","table":"todos","filter":"id=eq.1","select":["id","title"]}],
    "private":false,
    "postgres_changes_options":{"wait":true,"timeout":15000}
  },
  "access_token":"eyJ...",
  "version":"realtime-js/2.119.1"
}]"#;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn realtime_js_2_119_join() {
    let f = decode_text(Vsn::V2, JOIN_V2).unwrap();
    assert_eq!(f.join_ref.as_deref(), Some("3"));
    assert_eq!(f.msg_ref.as_deref(), Some("3"));
    assert_eq!(f.topic, "realtime:room1");
    assert_eq!(f.event, "phx_join");
    let Inbound::Join(join) = f.payload else {
        panic!("not a join: {:?}", f.payload)
    };
    assert!(join.has_config);
    assert!(join.warnings.is_empty(), "{:?}", join.warnings);
    assert_eq!(join.access_token.as_deref(), Some("eyJ..."));
    let c = &join.config;
    assert!(!c.broadcast.ack);
    assert!(!c.broadcast.self_broadcast);
    assert!(!c.broadcast.replication_ready);
    assert_eq!(
        c.broadcast.replay,
        Some(ReplayConfig {
            since: Some(1_763_407_103_911),
            limit: Some(10),
            invalid: false
        })
    );
    assert_eq!(c.presence.key, "");
    assert!(!c.presence.enabled);
    assert!(!c.private);
    assert_eq!(c.postgres_changes.len(), 1);
    let b = &c.postgres_changes[0];
    assert_eq!(
        b.raw.get(),
        r#"{"event":"*","schema":"public","table":"todos","filter":"id=eq.1","select":["id","title"]}"#
    );
    assert_eq!(b.event.as_deref(), Some("*"));
    assert_eq!(b.schema.as_deref(), Some("public"));
    assert_eq!(b.table.as_deref(), Some("todos"));
    assert_eq!(b.filter.as_deref(), Some("id=eq.1"));
    assert_eq!(b.select, Some(vec!["id".to_owned(), "title".to_owned()]));

    // Section 2.4: the reply echoes the binding with an integer id.
    let payload = join_reply_ok(&[(106_243_155, &*b.raw)]);
    assert_eq!(
        payload,
        r#"{"status":"ok","response":{"postgres_changes":[{"event":"*","schema":"public","table":"todos","filter":"id=eq.1","select":["id","title"],"id":106243155}]}}"#
    );
    let frame = encode_push(
        Vsn::V2,
        f.join_ref.as_deref(),
        f.msg_ref.as_deref(),
        &f.topic,
        event::PHX_REPLY,
        &payload,
    );
    assert_eq!(
        json(&frame),
        json(
            r#"["3","3","realtime:room1","phx_reply",{"status":"ok","response":{"postgres_changes":[
            {"id":106243155,"event":"*","schema":"public","table":"todos","filter":"id=eq.1","select":["id","title"]}]}}]"#
        )
    );
}

#[test]
fn v1_join_and_reply() {
    let text = r#"{"topic":"realtime:room1","event":"phx_join","payload":{"config":{"postgres_changes":[{"event":"insert","schema":"public"}]}},"ref":"1","join_ref":"1"}"#;
    let f = decode_text(Vsn::V1, text).unwrap();
    assert_eq!(f.join_ref.as_deref(), Some("1"));
    assert_eq!(f.msg_ref.as_deref(), Some("1"));
    let Inbound::Join(join) = f.payload else {
        panic!("not a join")
    };
    let b = &join.config.postgres_changes[0];
    // Reply keeps the client's lower-case event text.
    let payload = join_reply_ok(&[(7, &*b.raw)]);
    let frame = encode_push(
        Vsn::V1,
        Some("1"),
        Some("1"),
        &f.topic,
        event::PHX_REPLY,
        &payload,
    );
    assert_eq!(
        frame,
        r#"{"topic":"realtime:room1","event":"phx_reply","payload":{"status":"ok","response":{"postgres_changes":[{"event":"insert","schema":"public","id":7}]}},"ref":"1"}"#
    );
}

#[test]
fn heartbeat_both_vsns() {
    let v2 = decode_text(Vsn::V2, r#"[null,"26","phoenix","heartbeat",{}]"#).unwrap();
    assert!(matches!(v2.payload, Inbound::Heartbeat));
    assert_eq!(v2.join_ref, None);
    assert_eq!(v2.msg_ref.as_deref(), Some("26"));
    assert_eq!(v2.topic, "phoenix");

    let v1 = decode_text(
        Vsn::V1,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"26"}"#,
    )
    .unwrap();
    assert!(matches!(v1.payload, Inbound::Heartbeat));
    assert_eq!(v1.msg_ref.as_deref(), Some("26"));

    assert_eq!(
        encode_push(
            Vsn::V2,
            None,
            Some("26"),
            "phoenix",
            event::PHX_REPLY,
            outbound::REPLY_OK_EMPTY
        ),
        r#"[null,"26","phoenix","phx_reply",{"status":"ok","response":{}}]"#
    );
    assert_eq!(
        encode_push(
            Vsn::V1,
            None,
            Some("26"),
            "phoenix",
            event::PHX_REPLY,
            outbound::REPLY_OK_EMPTY
        ),
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"26"}"#
    );
    // "heartbeat" on a channel topic is just an unknown channel event.
    let other = decode_text(Vsn::V2, r#"["1","2","realtime:x","heartbeat",{}]"#).unwrap();
    assert!(matches!(other.payload, Inbound::Other { .. }));
}

#[test]
fn access_token_push() {
    let f = decode_text(
        Vsn::V2,
        r#"["1","7","realtime:room1","access_token",{"access_token":"eyJ..."}]"#,
    )
    .unwrap();
    assert_eq!(f.msg_ref.as_deref(), Some("7"));
    let Inbound::AccessToken { access_token } = f.payload else {
        panic!("not access_token")
    };
    assert_eq!(access_token.as_deref(), Some("eyJ..."));

    for payload in [
        r#"{"access_token":"sb_publishable_x"}"#,
        r#"{"access_token":null}"#,
        r#"{}"#,
        r#"{"access_token":5}"#,
        r#""eyJ""#,
    ] {
        let text = format!(r#"["1","8","realtime:room1","access_token",{payload}]"#);
        let f = decode_text(Vsn::V2, &text).unwrap();
        assert!(
            matches!(f.payload, Inbound::AccessToken { access_token: None }),
            "{payload}"
        );
    }
}

#[test]
fn broadcast_text_push_is_relayed_as_sent() {
    let f = decode_text(
        Vsn::V2,
        r#"["1","5","realtime:room1","broadcast",{"type":"broadcast","event":"cursor-pos","payload":{"x":1}}]"#,
    )
    .unwrap();
    assert_eq!(f.event, "broadcast");
    let Inbound::Broadcast(BroadcastPush::Json(b)) = &f.payload else {
        panic!("not a text broadcast")
    };
    assert_eq!(b.event.as_deref(), Some("cursor-pos"));
    assert_eq!(
        b.payload.get(),
        r#"{"type":"broadcast","event":"cursor-pos","payload":{"x":1}}"#
    );
    // Extra keys and their order survive.
    let f = decode_text(
        Vsn::V1,
        r#"{"topic":"realtime:r","event":"broadcast","payload":{"payload":[1,2],"zz":true,"event":"e","type":"broadcast"},"ref":null}"#,
    )
    .unwrap();
    let Inbound::Broadcast(b) = &f.payload else {
        panic!("not a broadcast")
    };
    assert_eq!(b.event(), Some("e"));
    let BroadcastPush::Json(b) = b else { panic!() };
    assert_eq!(
        b.payload.get(),
        r#"{"payload":[1,2],"zz":true,"event":"e","type":"broadcast"}"#
    );
    assert_eq!(f.msg_ref, None);
    // Fan-out frame to a V2 subscriber: join_ref and ref null.
    assert_eq!(
        encode_push(
            Vsn::V2,
            None,
            None,
            "realtime:r",
            event::BROADCAST,
            b.payload.get()
        ),
        r#"[null,null,"realtime:r","broadcast",{"payload":[1,2],"zz":true,"event":"e","type":"broadcast"}]"#
    );
}

#[test]
fn presence_track_and_untrack() {
    let f = decode_text(
        Vsn::V2,
        r#"["1","5","realtime:room1","presence",{"type":"presence","event":"track","payload":{"user":"alice","online_at":"..."}}]"#,
    )
    .unwrap();
    let Inbound::Presence(PresencePush::Track { payload }) = &f.payload else {
        panic!("not a track")
    };
    assert_eq!(payload.get(), r#"{"user":"alice","online_at":"..."}"#);

    let f = decode_text(
        Vsn::V2,
        r#"["1","6","realtime:room1","presence",{"type":"presence","event":"untrack"}]"#,
    )
    .unwrap();
    assert!(matches!(
        f.payload,
        Inbound::Presence(PresencePush::Untrack)
    ));

    // Python form: no type; event case-insensitive.
    let f = decode_text(
        Vsn::V1,
        r#"{"topic":"realtime:room1","event":"presence","payload":{"event":"TRACK","payload":{"a":1}},"ref":"2","join_ref":"1"}"#,
    )
    .unwrap();
    assert!(matches!(
        f.payload,
        Inbound::Presence(PresencePush::Track { .. })
    ));
}

fn kind3(
    join_ref: &str,
    r: &str,
    topic: &str,
    event: &str,
    meta: &str,
    enc: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = vec![
        3,
        join_ref.len() as u8,
        r.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        enc,
    ];
    for s in [join_ref, r, topic, event, meta] {
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(payload);
    v
}

#[test]
fn kind3_json_encoding() {
    let frame = kind3(
        "1",
        "5",
        "realtime:room1",
        "cursor-pos",
        "",
        1,
        br#"{"x":1}"#,
    );
    assert_eq!(&frame[..7], &[3, 1, 1, 14, 10, 0, 1]);
    let f = decode_binary(Vsn::V2, &frame).unwrap();
    assert_eq!(f.join_ref.as_deref(), Some("1"));
    assert_eq!(f.msg_ref.as_deref(), Some("5"));
    assert_eq!(f.topic, "realtime:room1");
    assert_eq!(f.event, "broadcast");
    let Inbound::Broadcast(BroadcastPush::Binary(b)) = &f.payload else {
        panic!("not a binary broadcast")
    };
    assert_eq!(b.event, "cursor-pos");
    assert_eq!(b.encoding, PayloadEncoding::Json);
    assert!(b.meta.is_none());
    assert_eq!(&b.payload[..], br#"{"x":1}"#);
    assert_eq!(b.json_payload(), Some(r#"{"x":1}"#));
    // What the reference server treats it as, and what V1 subscribers get.
    assert_eq!(
        b.as_json_push_payload().unwrap(),
        r#"{"type":"broadcast","event":"cursor-pos","payload":{"x":1}}"#
    );
    assert_eq!(
        b.v1_text_payload().unwrap(),
        r#"{"event":"cursor-pos","payload":{"x":1},"type":"broadcast"}"#
    );
}

#[test]
fn kind3_binary_encoding_with_meta() {
    let frame = kind3(
        "",
        "",
        "realtime:files",
        "chunk",
        r#"{"persist":true}"#,
        0,
        &[0, 255, 7],
    );
    let f = decode_binary(Vsn::V2, &frame).unwrap();
    assert_eq!(f.join_ref, None);
    assert_eq!(f.msg_ref, None);
    let Inbound::Broadcast(BroadcastPush::Binary(b)) = &f.payload else {
        panic!("not a binary broadcast")
    };
    assert_eq!(b.encoding, PayloadEncoding::Binary);
    assert_eq!(b.meta.as_ref().unwrap().get(), r#"{"persist":true}"#);
    assert_eq!(&b.payload[..], &[0, 255, 7]);
    assert_eq!(b.json_payload(), None);
    assert_eq!(
        b.v1_text_payload(),
        None,
        "binary payloads never reach V1 sockets"
    );

    // The zero-copy entry point agrees.
    let shared = bytes::Bytes::from(frame);
    let g = walcast_protocol::decode_binary_bytes(Vsn::V2, &shared).unwrap();
    let Inbound::Broadcast(BroadcastPush::Binary(b2)) = &g.payload else {
        panic!()
    };
    assert_eq!(b2.payload, b.payload);
}

#[test]
fn kind4_byte_by_byte() {
    let out = encode_user_broadcast_binary(
        "realtime:room1",
        "cursor-pos",
        None,
        PayloadEncoding::Json,
        br#"{"x":1}"#,
    )
    .unwrap();
    let mut want = vec![4u8, 14, 10, 0, 1];
    want.extend_from_slice(b"realtime:room1");
    want.extend_from_slice(b"cursor-pos");
    want.extend_from_slice(br#"{"x":1}"#);
    assert_eq!(&out[..], &want[..]);

    let out = encode_user_broadcast_binary(
        "t",
        "e",
        Some(r#"{"id":"u"}"#),
        PayloadEncoding::Binary,
        &[9, 8],
    )
    .unwrap();
    assert_eq!(
        &out[..],
        &[
            4, 1, 1, 10, 0, b't', b'e', b'{', b'"', b'i', b'd', b'"', b':', b'"', b'u', b'"', b'}',
            9, 8
        ]
    );

    let long = "x".repeat(256);
    let err =
        encode_user_broadcast_binary(&long, "e", None, PayloadEncoding::Json, b"1").unwrap_err();
    assert_eq!(
        err,
        walcast_protocol::FrameError::FieldTooLong {
            field: "topic",
            len: 256
        }
    );
    assert!(encode_user_broadcast_binary("t", &long, None, PayloadEncoding::Json, b"1").is_err());
    assert!(
        encode_user_broadcast_binary("t", "e", Some(&long), PayloadEncoding::Json, b"1").is_err()
    );
    let max = "y".repeat(255);
    assert!(
        encode_user_broadcast_binary(&max, &max, Some(&max), PayloadEncoding::Binary, b"").is_ok()
    );
}

#[test]
fn server_payloads() {
    assert_eq!(
        outbound::reply_error("InvalidJWTToken", "Token has expired 300 seconds ago"),
        r#"{"status":"error","response":{"reason":"InvalidJWTToken: Token has expired 300 seconds ago"}}"#
    );
    assert_eq!(
        outbound::reply_error_reason("unmatched topic"),
        r#"{"status":"error","response":{"reason":"unmatched topic"}}"#
    );
    assert_eq!(
        outbound::reply_error_response(r#""payload_size_exceeded""#),
        r#"{"status":"error","response":"payload_size_exceeded"}"#
    );
    assert_eq!(outbound::reply_ok("{}"), outbound::REPLY_OK_EMPTY);
    assert_eq!(outbound::PHX_CLOSE_PAYLOAD, "{}");
    assert_eq!(
        json(outbound::PHX_ERROR_PAYLOAD),
        json!({"reason": "channel_crash"})
    );
    assert_eq!(
        outbound::system(
            SystemExtension::PostgresChanges,
            SystemStatus::Ok,
            "Subscribed to PostgreSQL",
            "realtime:room1"
        ),
        r#"{"extension":"postgres_changes","status":"ok","message":"Subscribed to PostgreSQL","channel":"room1"}"#
    );
    assert_eq!(
        outbound::system(
            SystemExtension::System,
            SystemStatus::Error,
            "Token has \"expired\"",
            "odd"
        ),
        r#"{"extension":"system","status":"error","message":"Token has \"expired\"","channel":"odd"}"#
    );
    let data = r#"{"schema":"public","table":"todos","type":"UPDATE","commit_timestamp":"2025-11-19T00:22:40.877Z","columns":[{"name":"id","type":"int8"}],"record":{"id":46},"old_record":{"id":46},"errors":null}"#;
    assert_eq!(
        outbound::postgres_changes(&[106_243_155], data),
        format!(r#"{{"ids":[106243155],"data":{data}}}"#)
    );
    assert_eq!(
        outbound::postgres_changes(&[1, 2], "{}"),
        r#"{"ids":[1,2],"data":{}}"#
    );
    assert_eq!(
        outbound::broadcast("my-event", r#"{"a":1}"#, Some(r#"{"id":"u1"}"#)),
        r#"{"type":"broadcast","event":"my-event","payload":{"a":1},"meta":{"id":"u1"}}"#
    );
    assert_eq!(
        outbound::broadcast("e", "null", None),
        r#"{"type":"broadcast","event":"e","payload":null}"#
    );
    assert_eq!(
        outbound::broadcast_v1_from_binary("e", "[1]", Some(r#"{"replayed":true,"id":"x"}"#)),
        r#"{"event":"e","payload":[1],"type":"broadcast","meta":{"replayed":true,"id":"x"}}"#
    );
}

#[test]
fn presence_payloads() {
    let state = outbound::presence_state([
        (
            "user-1",
            vec![r#"{"phx_ref":"GHlA1fShRjMmZhnL","user":"alice"}"#],
        ),
        (
            "9b1e",
            vec![r#"{"phx_ref":"GHk99Q_ez6-GzaeG","color":"red"}"#],
        ),
    ]);
    assert_eq!(
        state,
        r#"{"user-1":{"metas":[{"phx_ref":"GHlA1fShRjMmZhnL","user":"alice"}]},"9b1e":{"metas":[{"phx_ref":"GHk99Q_ez6-GzaeG","color":"red"}]}}"#
    );
    let none: [(&str, Vec<&str>); 0] = [];
    assert_eq!(outbound::presence_state(none), "{}");
    let diff = outbound::presence_diff(
        [(
            "user-1",
            [r#"{"phx_ref":"r2","phx_ref_prev":"r1","status":"away"}"#],
        )],
        [("user-1", [r#"{"phx_ref":"r1","status":"online"}"#])],
    );
    assert_eq!(
        json(&diff),
        json(
            r#"{"joins":{"user-1":{"metas":[{"phx_ref":"r2","phx_ref_prev":"r1","status":"away"}]}},
                "leaves":{"user-1":{"metas":[{"phx_ref":"r1","status":"online"}]}}}"#
        )
    );
    let empty: [(&str, [&str; 0]); 0] = [];
    assert_eq!(
        outbound::presence_diff(empty, [("k\"", ["{}", "{}"])]),
        r#"{"joins":{},"leaves":{"k\"":{"metas":[{},{}]}}}"#
    );
}

#[test]
fn server_push_frames() {
    // `system` and `presence_state` carry the channel's join_ref; fan-out pushes carry null.
    let p = outbound::system(SystemExtension::System, SystemStatus::Ok, "m", "realtime:a");
    assert_eq!(
        encode_push(Vsn::V2, Some("4"), None, "realtime:a", event::SYSTEM, &p),
        format!(r#"["4",null,"realtime:a","system",{p}]"#)
    );
    assert_eq!(
        encode_push(Vsn::V1, Some("4"), None, "realtime:a", event::SYSTEM, &p),
        format!(r#"{{"topic":"realtime:a","event":"system","payload":{p},"ref":null}}"#)
    );
    // phx_close after phx_leave: ref = join_ref.
    assert_eq!(
        encode_push(
            Vsn::V2,
            Some("3"),
            Some("3"),
            "realtime:a",
            event::PHX_CLOSE,
            outbound::PHX_CLOSE_PAYLOAD
        ),
        r#"["3","3","realtime:a","phx_close",{}]"#
    );
}
