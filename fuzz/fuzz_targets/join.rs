//! The `phx_join` payload is client input: whatever JSON it is, the join parser must not
//! panic, and (its documented contract) never fail either: every invalid field falls back to
//! its default with a warning.
//!
//! The input is the payload JSON. It is wrapped in a join frame of both serializer versions,
//! so the parser is reached exactly as the server reaches it (`decode_text`), and checked:
//! - the frame decodes to a join, the same one for both versions;
//! - the reply echoes every binding verbatim and in order, and is valid JSON;
//! - the fields a client relies on agree with a plain `serde_json::Value` reading of the
//!   payload (booleans may be strings, null counts as absent, the last duplicate key wins).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use walcast_protocol::{decode_text, join_reply_ok, Inbound, JoinPayload, Vsn};

fn join(vsn: Vsn, frame: &str) -> JoinPayload {
    let decoded = decode_text(vsn, frame).expect("a join frame around any JSON payload decodes");
    match decoded.payload {
        Inbound::Join(join) => join,
        other => panic!("phx_join decoded as {other:?}"),
    }
}

/// Ecto's boolean cast, as the server applies it: absent, null or invalid is `false`.
fn boolish(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

fn check_against_value(join: &JoinPayload, payload: &Value) {
    let config = payload.get("config");
    assert_eq!(join.has_config, config.is_some(), "has_config");
    let c = config.filter(|c| c.is_object());
    let section = |name: &str| c.and_then(|c| c.get(name)).filter(|s| s.is_object());
    let broadcast = section("broadcast");
    let presence = section("presence");
    let flag = |obj: Option<&Value>, key: &str| boolish(obj.and_then(|o| o.get(key)));
    assert_eq!(join.config.private, flag(c, "private"), "config.private");
    assert_eq!(
        join.config.broadcast.self_broadcast,
        flag(broadcast, "self")
    );
    assert_eq!(join.config.broadcast.ack, flag(broadcast, "ack"));
    assert_eq!(join.config.presence.enabled, flag(presence, "enabled"));

    let bindings = match c.and_then(|c| c.get("postgres_changes")) {
        Some(Value::Array(list)) => list.iter().filter(|e| e.is_object()).count(),
        _ => 0,
    };
    assert_eq!(
        join.config.postgres_changes.len(),
        bindings,
        "binding count"
    );

    // `access_token`, else its legacy alias; an `sb_` API key means "the connection's".
    let token = ["access_token", "user_token"]
        .iter()
        .filter_map(|k| payload.get(*k)?.as_str())
        .find(|t| !t.starts_with("sb_"));
    assert_eq!(join.access_token.as_deref(), token, "access_token");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Only JSON can be a payload: anything else is a frame error, not the join parser's.
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else {
        return;
    };
    let payload = raw.get();
    let v1 = join(
        Vsn::V1,
        &format!(
            r#"{{"topic":"realtime:room","event":"phx_join","payload":{payload},"ref":"1","join_ref":"1"}}"#
        ),
    );
    let v2 = join(
        Vsn::V2,
        &format!(r#"["1","1","realtime:room","phx_join",{payload}]"#),
    );
    assert_eq!(format!("{v1:?}"), format!("{v2:?}"), "v1 and v2 disagree");

    let bindings: Vec<(u32, &RawValue)> = v1
        .config
        .postgres_changes
        .iter()
        .zip(0u32..)
        .map(|(b, i)| (i, &*b.raw))
        .collect();
    for (_, raw) in &bindings {
        assert!(
            raw.get().starts_with('{'),
            "a binding that is not an object: {raw}"
        );
    }
    let reply = join_reply_ok(&bindings);
    assert!(
        serde_json::from_str::<serde::de::IgnoredAny>(&reply).is_ok(),
        "the join reply is not JSON: {reply}"
    );
    // Numbers beyond f64 and the like: serde_json's Value refuses what RawValue keeps.
    if let Ok(reply) = serde_json::from_str::<Value>(&reply) {
        let echoed = reply
            .pointer("/response/postgres_changes")
            .and_then(Value::as_array)
            .expect("the reply lists the bindings");
        assert_eq!(echoed.len(), bindings.len(), "every binding is echoed");
        for (i, entry) in echoed.iter().enumerate() {
            // Clients match reply entry i with their binding i by this id.
            assert_eq!(
                entry.get("id").and_then(Value::as_u64),
                Some(i as u64),
                "id of {i}"
            );
        }
    }

    if let Ok(value) = serde_json::from_str::<Value>(payload) {
        check_against_value(&v1, &value);
    }
});
