//! Presence state of one topic: who is tracked under which key, with which metas.
//!
//! ```text
//!  channel (member id) ──track(key, payload)──▶ PresenceState ──▶ Diff { joins, leaves }
//!                      ──untrack / leave──────▶               ──▶ Diff { leaves }
//!  new joiner ◀── state_payload() = {key: {metas: [meta, …]}, …}
//!
//!  meta = the tracked payload object with "phx_ref" (and on updates "phx_ref_prev") added
//! ```
//!
//! Invariants:
//! - A member (one joined channel) holds at most one meta, under the key it tracked with.
//!   A key holds the metas of every member that tracked under it, in tracking order.
//! - Every meta gets a fresh `phx_ref` ([`RefGen`]); tracking the same payload again is a
//!   no-op (no diff), a different payload is an update: one diff with the new meta in
//!   `joins` (carrying `phx_ref_prev` = the old ref) and the old meta in `leaves`.
//! - A key with no metas left is removed from the state (clients drop it on the leave).
//! - Pure data: no I/O, no clock; the caller fans diffs out (see [`crate::broadcast`]).

use std::collections::HashMap;

use walcast_protocol::outbound;

/// Identifies a joined channel (the server's subscriber id).
pub type MemberId = u64;

/// Generates `phx_ref` values: unique within a process, distinct across restarts when the
/// salt is (the server salts with its start time).
#[derive(Debug)]
pub struct RefGen {
    salt: u64,
    next: u64,
}

impl RefGen {
    pub fn new(salt: u64) -> RefGen {
        RefGen { salt, next: 0 }
    }

    /// A fresh opaque reference.
    pub fn next_ref(&mut self) -> String {
        self.next += 1;
        // XOR with a constant is a bijection, so distinct counters give distinct refs.
        format!("F{:016x}", self.next ^ self.salt)
    }
}

#[derive(Debug, Clone)]
struct Tracked {
    member: MemberId,
    phx_ref: String,
    /// The payload object as the client sent it (compared to detect no-op re-tracks).
    payload: String,
    /// The meta as clients see it: payload + `phx_ref` (+ `phx_ref_prev`).
    meta: String,
}

/// A change of presence to fan out as `presence_diff`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// (key, meta JSON) pairs that joined.
    pub joins: Vec<(String, String)>,
    /// (key, meta JSON) pairs that left.
    pub leaves: Vec<(String, String)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// The `presence_diff` payload, `{"joins":{..},"leaves":{..}}`.
    pub fn payload(&self) -> String {
        outbound::presence_diff(group(&self.joins), group(&self.leaves))
    }
}

/// Groups (key, meta) pairs by key, keeping first-seen key order.
fn group(pairs: &[(String, String)]) -> Vec<(&str, Vec<&str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    for (k, m) in pairs {
        match out.iter_mut().find(|(key, _)| *key == k.as_str()) {
            Some((_, metas)) => metas.push(m),
            None => out.push((k, vec![m])),
        }
    }
    out
}

/// The presence of one topic.
#[derive(Debug, Default)]
pub struct PresenceState {
    /// key → metas, plus the order keys appeared in (for a stable `presence_state`).
    keys: HashMap<String, Vec<Tracked>>,
    order: Vec<String>,
    /// member → the key it is tracked under.
    by_member: HashMap<MemberId, String>,
    /// Bytes of every meta held (what a `presence_state` costs to send).
    bytes: usize,
}

impl PresenceState {
    pub fn is_empty(&self) -> bool {
        self.by_member.is_empty()
    }

    /// Number of tracked members.
    pub fn len(&self) -> usize {
        self.by_member.len()
    }

    /// Bytes of the metas held: roughly the size of a `presence_state` payload.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What the state would hold in bytes once `member` tracked `payload` (its current meta,
    /// if any, replaced), for limits checked before tracking.
    pub fn bytes_after_track(&self, member: MemberId, payload: &str) -> usize {
        let current = self
            .by_member
            .get(&member)
            .and_then(|k| self.keys.get(k))
            .and_then(|metas| metas.iter().find(|t| t.member == member))
            .map_or(0, |t| t.meta.len());
        // A meta is the payload plus `phx_ref` and `phx_ref_prev` (two short refs).
        (self.bytes - current).saturating_add(payload.trim().len() + META_OVERHEAD)
    }

    /// Track (or update) `member` under `key` with `payload` (a JSON object's text).
    /// Returns `None` when nothing changed.
    pub fn track(
        &mut self,
        member: MemberId,
        key: &str,
        payload: &str,
        refs: &mut RefGen,
    ) -> Option<Diff> {
        let payload = payload.trim();
        let mut diff = Diff::default();
        let mut prev_ref = None;
        if let Some(old_key) = self.by_member.get(&member).cloned() {
            if old_key == key {
                let metas = self.keys.get(key)?;
                let old = metas.iter().find(|t| t.member == member)?;
                if old.payload == payload {
                    return None;
                }
                prev_ref = Some(old.phx_ref.clone());
            }
            if let Some(old) = self.remove(member) {
                diff.leaves.push((old_key, old.meta));
            }
        }
        let phx_ref = refs.next_ref();
        let meta = meta_json(payload, &phx_ref, prev_ref.as_deref());
        diff.joins.push((key.to_owned(), meta.clone()));
        if !self.keys.contains_key(key) {
            self.order.push(key.to_owned());
        }
        self.bytes += meta.len();
        self.keys.entry(key.to_owned()).or_default().push(Tracked {
            member,
            phx_ref,
            payload: payload.to_owned(),
            meta,
        });
        self.by_member.insert(member, key.to_owned());
        Some(diff)
    }

    /// Remove `member`'s meta (untrack, channel leave, socket gone). `None` when it was
    /// not tracked.
    pub fn untrack(&mut self, member: MemberId) -> Option<Diff> {
        let key = self.by_member.get(&member)?.clone();
        let old = self.remove(member)?;
        Some(Diff {
            joins: Vec::new(),
            leaves: vec![(key, old.meta)],
        })
    }

    fn remove(&mut self, member: MemberId) -> Option<Tracked> {
        let key = self.by_member.remove(&member)?;
        let metas = self.keys.get_mut(&key)?;
        let i = metas.iter().position(|t| t.member == member)?;
        let old = metas.remove(i);
        self.bytes = self.bytes.saturating_sub(old.meta.len());
        if metas.is_empty() {
            self.keys.remove(&key);
            self.order.retain(|k| *k != key);
        }
        Some(old)
    }

    /// Put a meta built elsewhere (another cluster node's entry, `phx_ref` included) under
    /// `key` for `member`. `None` when `member` already holds exactly this meta.
    pub fn put_meta(&mut self, member: MemberId, key: &str, meta: &str) -> Option<Diff> {
        let mut diff = Diff::default();
        if let Some(old_key) = self.by_member.get(&member).cloned() {
            let same = self
                .keys
                .get(&old_key)
                .and_then(|metas| metas.iter().find(|t| t.member == member))
                .is_some_and(|t| old_key == key && t.meta == meta);
            if same {
                return None;
            }
            if let Some(old) = self.remove(member) {
                diff.leaves.push((old_key, old.meta));
            }
        }
        diff.joins.push((key.to_owned(), meta.to_owned()));
        if !self.keys.contains_key(key) {
            self.order.push(key.to_owned());
        }
        self.bytes += meta.len();
        self.keys.entry(key.to_owned()).or_default().push(Tracked {
            member,
            phx_ref: String::new(),
            payload: meta.to_owned(),
            meta: meta.to_owned(),
        });
        self.by_member.insert(member, key.to_owned());
        Some(diff)
    }

    /// Every (member, key, meta) whose member passes `keep`, in state order.
    pub fn entries(&self, keep: impl Fn(MemberId) -> bool) -> Vec<(MemberId, String, String)> {
        self.order
            .iter()
            .filter_map(|k| self.keys.get(k).map(|metas| (k, metas)))
            .flat_map(|(k, metas)| {
                metas
                    .iter()
                    .filter(|t| keep(t.member))
                    .map(move |t| (t.member, k.clone(), t.meta.clone()))
            })
            .collect()
    }

    /// The `presence_state` payload: `{key: {"metas": [..]}, ..}`.
    pub fn state_payload(&self) -> String {
        outbound::presence_state(self.order.iter().filter_map(|k| {
            let metas = self.keys.get(k)?;
            Some((k.as_str(), metas.iter().map(|t| t.meta.as_str())))
        }))
    }
}

/// Upper bound of what [`meta_json`] adds to a payload: `,"phx_ref":"…","phx_ref_prev":"…"`.
const META_OVERHEAD: usize = 64;

/// The payload object with `phx_ref` (and `phx_ref_prev`) appended. Appended last so that
/// ours win over same-named members a client might send (JSON parsers keep the last).
fn meta_json(payload: &str, phx_ref: &str, prev: Option<&str>) -> String {
    let inner = payload
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .unwrap_or("")
        .trim();
    let mut out = String::with_capacity(inner.len() + 64);
    out.push('{');
    if !inner.is_empty() {
        out.push_str(inner);
        out.push(',');
    }
    out.push_str("\"phx_ref\":\"");
    out.push_str(phx_ref);
    out.push('"');
    if let Some(prev) = prev {
        out.push_str(",\"phx_ref_prev\":\"");
        out.push_str(prev);
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v(s: &str) -> Value {
        serde_json::from_str(s).expect("valid json")
    }

    #[test]
    fn track_update_untrack() {
        let mut refs = RefGen::new(0);
        let mut st = PresenceState::default();
        let d = st
            .track(1, "alice", r#"{"status":"online"}"#, &mut refs)
            .unwrap();
        let r1 = "F0000000000000001";
        assert_eq!(
            v(&d.payload()),
            json!({"joins":{"alice":{"metas":[{"status":"online","phx_ref":r1}]}},"leaves":{}})
        );
        // Same payload: nothing happens.
        assert!(st
            .track(1, "alice", r#"{"status":"online"}"#, &mut refs)
            .is_none());
        // Update: join with phx_ref_prev plus leave of the old meta, same key.
        let d = st
            .track(1, "alice", r#"{"status":"away"}"#, &mut refs)
            .unwrap();
        let r2 = "F0000000000000002";
        assert_eq!(
            v(&d.payload()),
            json!({"joins":{"alice":{"metas":[{"status":"away","phx_ref":r2,"phx_ref_prev":r1}]}},
                   "leaves":{"alice":{"metas":[{"status":"online","phx_ref":r1}]}}})
        );
        assert_eq!(
            v(&st.state_payload()),
            json!({"alice":{"metas":[{"status":"away","phx_ref":r2,"phx_ref_prev":r1}]}})
        );
        let d = st.untrack(1).unwrap();
        assert_eq!(d.joins, vec![]);
        assert_eq!(d.leaves.len(), 1);
        assert!(st.is_empty());
        assert_eq!(st.state_payload(), "{}");
        assert!(st.untrack(1).is_none());
    }

    #[test]
    fn one_key_many_members() {
        let mut refs = RefGen::new(0);
        let mut st = PresenceState::default();
        st.track(1, "u", "{}", &mut refs).unwrap();
        st.track(2, "u", r#"{"tab":2}"#, &mut refs).unwrap();
        st.track(3, "other", r#"{"x":1}"#, &mut refs).unwrap();
        assert_eq!(
            v(&st.state_payload()),
            json!({"u":{"metas":[{"phx_ref":"F0000000000000001"},{"tab":2,"phx_ref":"F0000000000000002"}]},
                   "other":{"metas":[{"x":1,"phx_ref":"F0000000000000003"}]}})
        );
        st.untrack(1).unwrap();
        assert_eq!(
            v(&st.state_payload()),
            json!({"u":{"metas":[{"tab":2,"phx_ref":"F0000000000000002"}]},
                   "other":{"metas":[{"x":1,"phx_ref":"F0000000000000003"}]}})
        );
        assert_eq!(st.len(), 2);
    }

    #[test]
    fn key_change_is_leave_then_join() {
        let mut refs = RefGen::new(0);
        let mut st = PresenceState::default();
        st.track(1, "a", "{}", &mut refs).unwrap();
        let d = st.track(1, "b", "{}", &mut refs).unwrap();
        assert_eq!(d.leaves[0].0, "a");
        assert_eq!(d.joins[0].0, "b");
        // A different key is not an update of the old meta: no phx_ref_prev.
        assert!(!d.joins[0].1.contains("phx_ref_prev"));
        assert_eq!(v(&st.state_payload()).as_object().unwrap().len(), 1);
    }

    #[test]
    fn bytes_follow_the_metas() {
        let mut refs = RefGen::new(0);
        let mut st = PresenceState::default();
        assert_eq!(st.bytes(), 0);
        st.track(1, "a", r#"{"x":1}"#, &mut refs).unwrap();
        let one = st.bytes();
        assert_eq!(
            one,
            st.state_payload().len() - r#"{"a":{"metas":[]}}"#.len()
        );
        assert!(st.bytes_after_track(2, r#"{"x":1}"#) >= 2 * one);
        assert!(st.bytes_after_track(1, r#"{"x":1}"#) >= one);
        assert!(st.bytes_after_track(1, r#"{"x":1}"#) < 2 * one);
        st.track(1, "a", r#"{"x":22}"#, &mut refs).unwrap();
        assert!(st.bytes() > one);
        st.untrack(1).unwrap();
        assert_eq!(st.bytes(), 0);
    }

    #[test]
    fn refs_are_unique_and_salted() {
        let mut a = RefGen::new(7);
        let r: std::collections::HashSet<String> = (0..1000).map(|_| a.next_ref()).collect();
        assert_eq!(r.len(), 1000);
        assert_ne!(RefGen::new(1).next_ref(), RefGen::new(2).next_ref());
    }

    #[test]
    fn meta_keeps_payload_members() {
        assert_eq!(meta_json(" { } ", "r", None), r#"{"phx_ref":"r"}"#);
        assert_eq!(
            meta_json(r#"{"a":[1,{"b":2}]}"#, "r", Some("p")),
            r#"{"a":[1,{"b":2}],"phx_ref":"r","phx_ref_prev":"p"}"#
        );
    }
}
