//! Malformed input: every decoder fails with the right error class and never panics.

use walcast_protocol::{decode_binary, decode_text, FrameAction, FrameError, Vsn, MAX_FRAME_LEN};

fn text_err(vsn: Vsn, s: &str) -> FrameError {
    match decode_text(vsn, s) {
        Ok(f) => panic!("{s:?} decoded: {f:?}"),
        Err(e) => e,
    }
}

fn bin_err(b: &[u8]) -> FrameError {
    match decode_binary(Vsn::V2, b) {
        Ok(f) => panic!("{b:?} decoded: {f:?}"),
        Err(e) => e,
    }
}

#[test]
fn not_json() {
    for vsn in [Vsn::V1, Vsn::V2] {
        for s in [
            "",
            " ",
            "hello",
            "[",
            "{",
            r#"{"topic":"#,
            "[null,null,\"a\",\"b\",{}",
            "\u{feff}[]",
        ] {
            let e = text_err(vsn, s);
            assert!(
                matches!(e, FrameError::Json(_) | FrameError::Shape { .. }),
                "{s:?}: {e:?}"
            );
            assert_eq!(e.action(), FrameAction::Ignore, "{s:?}");
        }
    }
    assert!(matches!(text_err(Vsn::V2, "[null,"), FrameError::Json(_)));
    assert!(matches!(text_err(Vsn::V2, "[1,"), FrameError::Shape { .. }));
}

#[test]
fn v2_wrong_shapes() {
    for s in [
        "[]",
        r#"[null,"1","t","e"]"#,
        r#"[null,"1","t","e",{},6]"#,
        r#"{"topic":"t","event":"e","payload":{},"ref":null}"#,
        r#"[1,"1","t","e",{}]"#,
        r#"[null,2,"t","e",{}]"#,
        r#"[null,"1",null,"e",{}]"#,
        r#"[null,"1","t",["e"],{}]"#,
        "null",
        "42",
        r#""[null,null,\"t\",\"e\",{}]""#,
    ] {
        let e = text_err(Vsn::V2, s);
        assert!(
            matches!(e, FrameError::Shape { vsn: "2.0.0", .. }),
            "{s}: {e:?}"
        );
        assert!(!e.is_fatal());
    }
}

#[test]
fn v1_wrong_shapes() {
    for s in [
        r#"["t","e",{},"1"]"#,
        r#"["t","e",{},null,null]"#,
        r#"{"event":"e","payload":{},"ref":null}"#,
        r#"{"topic":"t","payload":{},"ref":null}"#,
        r#"{"topic":"t","event":"e","ref":null}"#,
        r#"{"topic":"t","event":"e","payload":{}}"#,
        r#"{"topic":1,"event":"e","payload":{},"ref":null}"#,
        r#"{"topic":"t","event":"e","payload":{},"ref":1}"#,
        r#"{"topic":"t","event":"e","payload":{},"ref":null,"join_ref":false}"#,
        "[]",
        "true",
    ] {
        let e = text_err(Vsn::V1, s);
        assert!(
            matches!(e, FrameError::Shape { vsn: "1.0.0", .. }),
            "{s}: {e:?}"
        );
    }
    // ref present as null is fine; join_ref optional; unknown keys ignored.
    let f = decode_text(
        Vsn::V1,
        r#"{"topic":"t","event":"e","payload":[],"ref":null,"x":{"y":1}}"#,
    )
    .unwrap();
    assert_eq!(f.msg_ref, None);
    assert_eq!(f.join_ref, None);
}

#[test]
fn payload_errors_are_answerable() {
    let cases = [
        (
            r#"["1","9","realtime:a","presence",{"event":"track","payload":[1]}]"#,
            "Presence track payload must be a map",
        ),
        (
            r#"["1","9","realtime:a","presence",{"event":"track"}]"#,
            "Presence track payload must be a map",
        ),
        (
            r#"["1","9","realtime:a","presence",{"event":"wave"}]"#,
            "presence event must be track or untrack",
        ),
        (
            r#"["1","9","realtime:a","presence","track"]"#,
            "presence payload must be an object, got a string",
        ),
        (
            r#"["1","9","realtime:a","broadcast",[1]]"#,
            "broadcast payload must be an object, got an array",
        ),
    ];
    for (s, reason) in cases {
        let e = text_err(Vsn::V2, s);
        assert_eq!(e.action(), FrameAction::Reply, "{s}");
        assert_eq!(e.reply_reason(), Some(reason), "{s}");
        let refs = e.reply_to().unwrap();
        assert_eq!(refs.join_ref.as_deref(), Some("1"));
        assert_eq!(refs.msg_ref.as_deref(), Some("9"));
        assert_eq!(refs.topic, "realtime:a");
    }
}

#[test]
fn too_large() {
    let big = format!(r#"[null,null,"t","e","{}"]"#, "a".repeat(MAX_FRAME_LEN));
    let e = text_err(Vsn::V2, &big);
    assert!(matches!(
        e,
        FrameError::TooLarge {
            max: MAX_FRAME_LEN,
            ..
        }
    ));
    assert!(e.is_fatal());
    let mut bin = vec![3u8, 0, 0, 1, 1, 0, 0, b't', b'e'];
    bin.resize(MAX_FRAME_LEN + 1, 0);
    assert!(bin_err(&bin).is_fatal());
}

#[test]
fn binary_on_v1_and_unknown_kinds() {
    let e = decode_binary(Vsn::V1, &[3, 0, 0, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(e, FrameError::BinaryOnV1);
    assert!(e.is_fatal());
    for kind in [0u8, 1, 2, 4, 5, 255] {
        let e = bin_err(&[kind, 0, 0, 0, 0, 0, 0]);
        assert_eq!(e, FrameError::UnsupportedBinaryKind(kind));
        assert!(e.is_fatal());
    }
}

#[test]
fn empty_and_truncated_binary() {
    assert_eq!(
        bin_err(&[]),
        FrameError::Truncated {
            field: "kind",
            needed: 1,
            available: 0
        }
    );
    for n in 1..7 {
        let header = [3u8, 0, 0, 0, 0, 0, 1];
        let e = bin_err(&header[..n]);
        assert_eq!(
            e,
            FrameError::Truncated {
                field: "header",
                needed: 7,
                available: n
            }
        );
        assert_eq!(e.action(), FrameAction::Ignore);
    }
    // Lengths pointing past the end, section by section.
    let cases: [(&[u8], &str); 5] = [
        (&[3, 2, 0, 0, 0, 0, 1, b'1'], "join_ref"),
        (&[3, 0, 3, 0, 0, 0, 1, b'1'], "ref"),
        (&[3, 0, 0, 255, 0, 0, 1, b't'], "topic"),
        (&[3, 0, 0, 1, 9, 0, 1, b't', b'e'], "event"),
        (&[3, 0, 0, 1, 1, 200, 1, b't', b'e', b'{'], "meta"),
    ];
    for (b, field) in cases {
        match bin_err(b) {
            FrameError::Truncated { field: f, .. } => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn invalid_binary_contents() {
    // Invalid UTF-8 in each string section.
    let bad = [0xffu8];
    for (i, field) in ["join_ref", "ref", "topic", "event"]
        .into_iter()
        .enumerate()
    {
        let mut b = vec![3u8, 0, 0, 0, 0, 0, 1];
        b[1 + i] = 1;
        b.extend_from_slice(&bad);
        b.extend_from_slice(b"1");
        assert_eq!(bin_err(&b), FrameError::InvalidUtf8 { field });
    }
    // A multi-byte character cut by its length.
    let mut b = vec![3u8, 0, 0, 1, 0, 0, 1];
    b.extend_from_slice("é".as_bytes());
    assert_eq!(bin_err(&b), FrameError::InvalidUtf8 { field: "topic" });
    // Unknown encoding flag.
    assert_eq!(
        bin_err(&[3, 0, 0, 1, 1, 0, 2, b't', b'e']),
        FrameError::InvalidEncoding(2)
    );
    // Metadata that is not a JSON object; JSON payloads that are not JSON.
    for (meta, enc, payload, reason) in [
        (
            &b"[1]"[..],
            1u8,
            &b"1"[..],
            "broadcast metadata must be a JSON object",
        ),
        (b"{", 0, b"", "broadcast metadata must be a JSON object"),
        (b"\xff", 0, b"", "broadcast metadata must be a JSON object"),
        (b"", 1, b"{\"x\":", "broadcast payload is not valid JSON"),
        (b"", 1, b"", "broadcast payload is not valid JSON"),
        (b"", 1, b"\"\xff\"", "broadcast payload is not valid JSON"),
    ] {
        let mut b = vec![
            3u8,
            1,
            1,
            3,
            1,
            meta.len() as u8,
            enc,
            b'j',
            b'r',
            b'a',
            b'/',
            b'b',
            b'e',
        ];
        b.extend_from_slice(meta);
        b.extend_from_slice(payload);
        let e = bin_err(&b);
        assert_eq!(e.reply_reason(), Some(reason), "{e:?}");
        let refs = e.reply_to().unwrap();
        assert_eq!(refs.join_ref.as_deref(), Some("j"));
        assert_eq!(refs.msg_ref.as_deref(), Some("r"));
        assert_eq!(refs.topic, "a/b");
        assert_eq!(refs.event, "broadcast");
    }
    // Binary encoding accepts any bytes, including none.
    assert!(decode_binary(Vsn::V2, &[3, 0, 0, 1, 1, 0, 0, b't', b'e']).is_ok());
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    for vsn in [Vsn::V1, Vsn::V2] {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let text = match vsn {
            Vsn::V1 => format!(r#"{{"topic":"t","event":"e","payload":{deep},"ref":null}}"#),
            Vsn::V2 => format!(r#"[null,null,"t","e",{deep}]"#),
        };
        assert!(decode_text(vsn, &text).is_err());
    }
    let mut b = vec![3u8, 0, 0, 1, 1, 0, 1, b't', b'e'];
    b.extend(std::iter::repeat_n(b'[', 100_000));
    assert!(decode_binary(Vsn::V2, &b).is_err());
}
