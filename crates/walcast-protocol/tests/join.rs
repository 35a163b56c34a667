//! Join payload leniency (reference 2.2) and the verbatim binding echo (2.4).

use serde_json::value::RawValue;
use serde_json::Value;
use walcast_protocol::{decode_text, join_reply_ok, Inbound, JoinPayload, Vsn};

fn join(payload: &str) -> JoinPayload {
    let text = format!(r#"["1","1","realtime:room","phx_join",{payload}]"#);
    match decode_text(Vsn::V2, &text).unwrap().payload {
        Inbound::Join(j) => j,
        other => panic!("not a join: {other:?}"),
    }
}

#[test]
fn string_booleans_any_case() {
    let j = join(
        r#"{"config":{"broadcast":{"self":"TRUE","ack":"true","replication_ready":"True"},
            "presence":{"enabled":"tRuE","key":"alice"},"private":"FALSE"}}"#,
    );
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    assert!(j.config.broadcast.self_broadcast);
    assert!(j.config.broadcast.ack);
    assert!(j.config.broadcast.replication_ready);
    assert!(j.config.presence.enabled);
    assert_eq!(j.config.presence.key, "alice");
    assert!(!j.config.private);
    let j = join(r#"{"config":{"private":true}}"#);
    assert!(j.config.private);
}

#[test]
fn defaults_and_unknown_keys() {
    let j = join(r#"{"config":{"whatever":[1],"broadcast":{}},"version":"x","extra":{"a":1}}"#);
    assert!(j.has_config);
    assert!(j.warnings.is_empty());
    assert!(!j.config.broadcast.self_broadcast);
    assert!(!j.config.broadcast.ack);
    assert_eq!(j.config.broadcast.replay, None);
    assert_eq!(j.config.presence.key, "");
    assert!(!j.config.presence.enabled);
    assert!(j.config.postgres_changes.is_empty());
    assert_eq!(j.access_token, None);

    let legacy = join("{}");
    assert!(!legacy.has_config);
    let null_config = join(r#"{"config":null}"#);
    assert!(null_config.has_config);
    assert!(null_config.warnings.is_empty());
}

#[test]
fn invalid_shapes_fall_back_with_warnings() {
    let j = join(
        r#"{"config":{"broadcast":{"self":5,"ack":"yes","replay":{"since":"abc","limit":3}},
            "presence":"on","private":[],"postgres_changes":{"event":"*"}},"access_token":7}"#,
    );
    assert!(!j.config.broadcast.self_broadcast);
    assert!(!j.config.broadcast.ack);
    assert_eq!(
        j.config.broadcast.replay,
        Some(walcast_protocol::ReplayConfig {
            since: None,
            limit: Some(3),
            invalid: true
        })
    );
    assert!(!j.config.presence.enabled);
    assert!(!j.config.private);
    assert!(j.config.postgres_changes.is_empty());
    assert_eq!(j.access_token, None);
    let w = j.warnings.join("\n");
    for needle in [
        "config.broadcast.self: expected a boolean, got a number",
        "config.broadcast.ack: expected a boolean",
        "config.broadcast.replay.since: expected an integer",
        "config.presence: expected an object, got a string",
        "config.private: expected a boolean, got an array",
        "config.postgres_changes: expected an array, got an object",
        "access_token: expected a string, got a number",
    ] {
        assert!(w.contains(needle), "missing {needle:?} in\n{w}");
    }
    assert_eq!(j.warnings.len(), 7, "{w}");

    let j = join(r#""not an object""#);
    assert_eq!(j.warnings, ["payload: expected an object, got a string"]);
    let j = join(r#"{"config":3}"#);
    assert_eq!(j.warnings, ["config: expected an object, got a number"]);
}

#[test]
fn tokens() {
    assert_eq!(
        join(r#"{"access_token":"eyJ"}"#).access_token.as_deref(),
        Some("eyJ")
    );
    assert_eq!(
        join(r#"{"user_token":"eyL"}"#).access_token.as_deref(),
        Some("eyL")
    );
    assert_eq!(
        join(r#"{"access_token":"sb_publishable_abc"}"#).access_token,
        None
    );
    assert_eq!(
        join(r#"{"access_token":"sb_secret","user_token":"eyU"}"#)
            .access_token
            .as_deref(),
        Some("eyU")
    );
    assert_eq!(
        join(r#"{"access_token":"eyA","user_token":"eyU"}"#)
            .access_token
            .as_deref(),
        Some("eyA")
    );
    assert_eq!(join(r#"{"access_token":null}"#).access_token, None);
}

#[test]
fn bindings_null_entries_and_lists() {
    let j = join(r#"{"config":{"postgres_changes":null}}"#);
    assert!(j.config.postgres_changes.is_empty());
    assert!(j.warnings.is_empty());

    let j = join(
        r#"{"config":{"postgres_changes":[null,{"event":"INSERT","schema":"public","table":"a"},null,
            {"schema":"s","filter":null,"select":null}, 5, {"event":1,"select":["a",2]}]}}"#,
    );
    let b = &j.config.postgres_changes;
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].event.as_deref(), Some("INSERT"));
    assert_eq!(b[0].table.as_deref(), Some("a"));
    assert_eq!(b[1].schema.as_deref(), Some("s"));
    assert_eq!(b[1].event, None);
    assert_eq!(b[1].filter, None);
    assert_eq!(b[1].select, None);
    assert_eq!(
        b[1].raw.get(),
        r#"{"schema":"s","filter":null,"select":null}"#
    );
    assert_eq!(b[2].event, None);
    assert_eq!(b[2].select, None);
    let w = j.warnings.join("\n");
    assert!(
        w.contains("config.postgres_changes[4]: expected an object, got a number"),
        "{w}"
    );
    assert!(
        w.contains("config.postgres_changes[5].event: expected a string"),
        "{w}"
    );
    assert!(
        w.contains("config.postgres_changes[5].select: expected an array of strings"),
        "{w}"
    );
}

#[test]
fn echo_is_verbatim_in_order_with_ids() {
    let j = join(
        r#"{"config":{"postgres_changes":[
            {"table":"b", "event" : "insert",  "schema":"public"},
            {"event":"*","schema":"public","table":"a","filter":"x=in.(1,2)","id":"client"},
            {},
            {"event":"*","schema":"public","table":"a","filter":"x=in.(1,2)","id":"client"},
            {"event":"*","schema":"p\u00e9","table":"\"q\""}
        ]}}"#,
    );
    let b = &j.config.postgres_changes;
    let pairs: Vec<(u32, &RawValue)> = b
        .iter()
        .zip([10u32, 20, 30, 40, 50])
        .map(|(b, id)| (id, &*b.raw))
        .collect();
    let reply = join_reply_ok(&pairs);
    assert_eq!(
        reply,
        concat!(
            r#"{"status":"ok","response":{"postgres_changes":["#,
            r#"{"table":"b", "event" : "insert",  "schema":"public","id":10},"#,
            r#"{"event":"*","schema":"public","table":"a","filter":"x=in.(1,2)","id":20},"#,
            r#"{"id":30},"#,
            r#"{"event":"*","schema":"public","table":"a","filter":"x=in.(1,2)","id":40},"#,
            r#"{"event":"*","schema":"p\u00e9","table":"\"q\"","id":50}"#,
            "]}}"
        )
    );
    let v: Value = serde_json::from_str(&reply).unwrap();
    let list = v["response"]["postgres_changes"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    assert_eq!(list[4]["schema"], "pé");
    assert!(list.iter().all(|e| e["id"].is_u64()));

    assert_eq!(
        join_reply_ok(&[]),
        r#"{"status":"ok","response":{"postgres_changes":[]}}"#
    );
}

#[test]
fn postgres_changes_options_wait_and_timeout() {
    let j = join(r#"{"config":{"postgres_changes_options":{"wait":"true","timeout":2500}}}"#);
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    assert!(j.config.postgres_changes_options.wait);
    assert_eq!(j.config.postgres_changes_options.timeout_ms, Some(2500));
    // Absent: no wait, the server's default timeout.
    let j = join(r#"{"config":{}}"#);
    assert!(!j.config.postgres_changes_options.wait);
    assert_eq!(j.config.postgres_changes_options.timeout_ms, None);
    // A timeout that is not a positive integer falls back to the default, with a warning.
    for bad in ["0", "-5", "\"soon\"", "1.5"] {
        let j = join(&format!(
            r#"{{"config":{{"postgres_changes_options":{{"wait":true,"timeout":{bad}}}}}}}"#
        ));
        assert!(j.config.postgres_changes_options.wait, "{bad}");
        assert_eq!(j.config.postgres_changes_options.timeout_ms, None, "{bad}");
        assert_eq!(j.warnings.len(), 1, "{bad}: {:?}", j.warnings);
        assert!(
            j.warnings[0].starts_with("config.postgres_changes_options.timeout"),
            "{:?}",
            j.warnings
        );
    }
    // Not an object: ignored with a warning.
    let j = join(r#"{"config":{"postgres_changes_options":true}}"#);
    assert!(!j.config.postgres_changes_options.wait);
    assert_eq!(j.warnings.len(), 1, "{:?}", j.warnings);
}
