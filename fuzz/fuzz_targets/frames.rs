//! Feeds arbitrary bytes to every decoder: as text for both serializer versions when the
//! bytes are UTF-8, and as a binary frame for both. Any panic is a bug; errors are fine.
//! Successful decodes are re-encoded to exercise the writers on decoder output too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast_protocol::{
    decode_binary, decode_text, encode_push, encode_user_broadcast_binary, join_reply_ok,
    BroadcastPush, Inbound, InboundFrame, Vsn,
};

fn exercise(frame: &InboundFrame) {
    match &frame.payload {
        Inbound::Join(join) => {
            let bindings: Vec<_> = join
                .config
                .postgres_changes
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u32, &*b.raw))
                .collect();
            let reply = join_reply_ok(&bindings);
            // The echo must stay valid JSON whatever the client sent.
            assert!(serde_json_valid(&reply), "join reply is not JSON: {reply}");
        }
        Inbound::Broadcast(BroadcastPush::Binary(b)) => {
            let _ = b.v1_text_payload();
            let _ = encode_user_broadcast_binary(
                &frame.topic,
                &b.event,
                b.meta.as_deref().map(|m| m.get()),
                b.encoding,
                &b.payload,
            );
        }
        _ => {}
    }
    for vsn in [Vsn::V1, Vsn::V2] {
        let text = encode_push(
            vsn,
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            &frame.event,
            // Valid for every event this crate types (an untrack is the strictest).
            r#"{"event":"untrack"}"#,
        );
        let back = decode_text(vsn, &text).expect("re-encoded frame decodes");
        assert_eq!(back.topic, frame.topic);
        assert_eq!(back.msg_ref, frame.msg_ref);
    }
}

/// JSON syntax, checked as the decoder checks it. Not `serde_json::Value`: that one also
/// refuses escapes of lone surrogates (`"\uDB8a"`), which the JSON grammar allows, the
/// decoder lets through in nested values, clients' `JSON.parse` accepts, and the join
/// reply rightly echoes verbatim.
fn serde_json_valid(s: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for vsn in [Vsn::V1, Vsn::V2] {
            if let Ok(frame) = decode_text(vsn, text) {
                exercise(&frame);
            }
        }
    }
    for vsn in [Vsn::V1, Vsn::V2] {
        if let Ok(frame) = decode_binary(vsn, data) {
            exercise(&frame);
        }
    }
});
