//! The subscription index: which joined channels want a change, with which binding ids.
//!
//! ```text
//!  Change(schema, table, kind) ──▶ exact[(schema, table)] ─┐
//!                                  schema_wide[schema]  ───┤   event filter, then row filter
//!                                  table_wide[table]    ───┼──▶ (subscriber, binding id, select)
//!                                  everything           ───┘          │ sort + group
//!                                                                     ▼
//!                                              Match { subscriber, binding_ids, select }
//! ```
//!
//! Invariants:
//! - Fan-out cost is proportional to the bindings that could match: a change only looks at
//!   the bindings of its own `(schema, table)` and at the wildcard lists (`*` table within
//!   its schema, `*` schema with its table name, and `*`/`*`). Bindings of other tables are
//!   never evaluated.
//! - The event filter is checked before the row filter, so a row filter never runs for an
//!   event the binding does not want.
//! - TRUNCATE matches nothing: Supabase does not deliver it.
//! - Output is deterministic: one [`Match`] per subscriber, subscribers ascending, binding ids
//!   ascending and deduplicated (identical bindings of one channel share an id).
//! - [`binding_id`] is a pure function of the binding's content (key order and whitespace do
//!   not matter), identical across processes and nodes, in Supabase's 27-bit `phash2` range.

use std::collections::{BTreeMap, HashMap};

use crate::change::{Change, ChangeKind};
use crate::filter::CompiledFilter;

/// One joined channel on one socket.
pub type SubscriberId = u64;

/// A binding's `event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventFilter {
    All,
    Insert,
    Update,
    Delete,
}

impl EventFilter {
    /// From the binding's `event` string: `INSERT`/`UPDATE`/`DELETE` in any case; anything
    /// else (including `*`) behaves as all events, as in Supabase.
    pub fn from_binding_event(event: &str) -> Self {
        if event.eq_ignore_ascii_case("insert") {
            EventFilter::Insert
        } else if event.eq_ignore_ascii_case("update") {
            EventFilter::Update
        } else if event.eq_ignore_ascii_case("delete") {
            EventFilter::Delete
        } else {
            EventFilter::All
        }
    }

    /// Does this filter let a change of `kind` through? TRUNCATE never passes.
    pub fn accepts(self, kind: ChangeKind) -> bool {
        match (self, kind) {
            (_, ChangeKind::Truncate) => false,
            (EventFilter::All, _) => true,
            (EventFilter::Insert, ChangeKind::Insert)
            | (EventFilter::Update, ChangeKind::Update)
            | (EventFilter::Delete, ChangeKind::Delete) => true,
            _ => false,
        }
    }
}

/// The wildcard accepted in a binding's `schema` and `table`.
pub const WILDCARD: &str = "*";

/// One `postgres_changes` binding of a channel, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The integer id echoed in the join reply and sent in `ids`.
    pub id: u32,
    pub event: EventFilter,
    /// A schema name or `*`.
    pub schema: String,
    /// A table name or `*`.
    pub table: String,
    /// Compiled row filter; `None` accepts every row.
    pub filter: Option<CompiledFilter>,
    /// Selected columns; `None` means all.
    pub select: Option<Vec<String>>,
}

impl Binding {
    /// The columns whose values decide or shape what this binding delivers: the filter's
    /// and the selection's. A subscriber must be allowed to read every one of them, or the
    /// binding itself reveals them (which rows match, which columns exist).
    pub fn columns_read(&self) -> impl Iterator<Item = &str> {
        self.filter
            .iter()
            .flat_map(|f| f.columns())
            .chain(self.select.iter().flatten().map(String::as_str))
    }
}

/// What one subscriber gets for one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub subscriber: SubscriberId,
    /// Ids of the subscriber's bindings that match, ascending, no duplicates.
    pub binding_ids: Vec<u32>,
    /// Union of the matched bindings' selected columns (in order of first appearance over
    /// ascending binding ids), or `None` when any matched binding selects all columns.
    pub select: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Entry {
    subscriber: SubscriberId,
    binding: Binding,
}

/// Where a subscriber's bindings live, so removal touches only those lists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Exact { schema: String, table: String },
    SchemaWide { schema: String },
    TableWide { table: String },
    Everything,
}

/// Bindings of all channels, indexed by the tables they can match.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// schema → table → bindings. Two levels so a lookup borrows the change's `&str`s.
    exact: HashMap<String, HashMap<String, Vec<Entry>>>,
    /// `schema.*`: every table of a schema.
    schema_wide: HashMap<String, Vec<Entry>>,
    /// `*.table`: a table name in any schema.
    table_wide: HashMap<String, Vec<Entry>>,
    /// `*.*`.
    everything: Vec<Entry>,
    /// Slots holding each subscriber's bindings (sorted, deduplicated).
    by_subscriber: BTreeMap<SubscriberId, Vec<Slot>>,
    /// Each subscriber's own bindings (copies of its entries), so matching a few named
    /// subscribers ([`SubscriptionIndex::matches_of`]) costs their bindings, not a walk of
    /// the table's whole list.
    own: HashMap<SubscriberId, Vec<Binding>>,
    len: usize,
}

impl SubscriptionIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one binding of a channel. A subscriber may hold any number of bindings, including
    /// identical ones.
    pub fn insert(&mut self, subscriber: SubscriberId, binding: Binding) {
        let slot = match (binding.schema == WILDCARD, binding.table == WILDCARD) {
            (true, true) => Slot::Everything,
            (false, true) => Slot::SchemaWide {
                schema: binding.schema.clone(),
            },
            (true, false) => Slot::TableWide {
                table: binding.table.clone(),
            },
            (false, false) => Slot::Exact {
                schema: binding.schema.clone(),
                table: binding.table.clone(),
            },
        };
        self.own
            .entry(subscriber)
            .or_default()
            .push(binding.clone());
        let entry = Entry {
            subscriber,
            binding,
        };
        match &slot {
            Slot::Exact { schema, table } => self
                .exact
                .entry(schema.clone())
                .or_default()
                .entry(table.clone())
                .or_default()
                .push(entry),
            Slot::SchemaWide { schema } => self
                .schema_wide
                .entry(schema.clone())
                .or_default()
                .push(entry),
            Slot::TableWide { table } => self
                .table_wide
                .entry(table.clone())
                .or_default()
                .push(entry),
            Slot::Everything => self.everything.push(entry),
        }
        let slots = self.by_subscriber.entry(subscriber).or_default();
        if let Err(at) = slots.binary_search(&slot) {
            slots.insert(at, slot);
        }
        self.len += 1;
    }

    /// Remove one binding (by id) of a channel, keeping its others. Returns how many entries
    /// went (identical bindings share an id).
    pub fn remove_binding(&mut self, subscriber: SubscriberId, binding_id: u32) -> usize {
        let mut kept: Vec<Binding> = Vec::new();
        let mut removed = 0;
        let Some(slots) = self.by_subscriber.get(&subscriber).cloned() else {
            return 0;
        };
        for slot in &slots {
            let list = match slot {
                Slot::Exact { schema, table } => {
                    self.exact.get(schema).and_then(|tables| tables.get(table))
                }
                Slot::SchemaWide { schema } => self.schema_wide.get(schema),
                Slot::TableWide { table } => self.table_wide.get(table),
                Slot::Everything => Some(&self.everything),
            };
            for e in list.into_iter().flatten() {
                if e.subscriber != subscriber {
                    continue;
                }
                if e.binding.id == binding_id {
                    removed += 1;
                } else {
                    kept.push(e.binding.clone());
                }
            }
        }
        if removed > 0 {
            self.remove_subscriber(subscriber);
            for b in kept {
                self.insert(subscriber, b);
            }
        }
        removed
    }

    /// Remove every binding of a channel (leave, close, socket gone). Unknown ids are a no-op.
    pub fn remove_subscriber(&mut self, subscriber: SubscriberId) {
        self.own.remove(&subscriber);
        let Some(slots) = self.by_subscriber.remove(&subscriber) else {
            return;
        };
        let mut removed = 0;
        let mut drop_from = |list: &mut Vec<Entry>| {
            let before = list.len();
            list.retain(|e| e.subscriber != subscriber);
            removed += before - list.len();
            list.is_empty()
        };
        for slot in slots {
            match slot {
                Slot::Exact { schema, table } => {
                    if let Some(tables) = self.exact.get_mut(&schema) {
                        if tables.get_mut(&table).is_some_and(&mut drop_from) {
                            tables.remove(&table);
                        }
                        if tables.is_empty() {
                            self.exact.remove(&schema);
                        }
                    }
                }
                Slot::SchemaWide { schema } => {
                    if self
                        .schema_wide
                        .get_mut(&schema)
                        .is_some_and(&mut drop_from)
                    {
                        self.schema_wide.remove(&schema);
                    }
                }
                Slot::TableWide { table } => {
                    if self.table_wide.get_mut(&table).is_some_and(&mut drop_from) {
                        self.table_wide.remove(&table);
                    }
                }
                Slot::Everything => {
                    drop_from(&mut self.everything);
                }
            }
        }
        self.len -= removed;
    }

    /// The subscribers (with their binding ids and column selection) that want `change`.
    /// Clears `out` first.
    pub fn matches(&self, change: &Change, out: &mut Vec<Match>) {
        self.matches_counted(change, out);
    }

    /// [`SubscriptionIndex::matches`], returning how many bindings were examined (a measure
    /// of fan-out work: it counts only the candidate lists of the change's table).
    pub fn matches_counted(&self, change: &Change, out: &mut Vec<Match>) -> usize {
        self.matches_except(change, out, |_| false)
    }

    /// [`SubscriptionIndex::matches_counted`] without the subscribers `skip` names (one call
    /// per binding of the table: keep it a cheap lookup).
    pub fn matches_except(
        &self,
        change: &Change,
        out: &mut Vec<Match>,
        skip: impl Fn(SubscriberId) -> bool,
    ) -> usize {
        out.clear();
        if change.kind == ChangeKind::Truncate {
            return 0;
        }
        let schema = change.schema();
        let table = change.table_name();
        let lists = self.lists_covering(schema, table);
        let mut examined = 0;
        let mut hits: Vec<(SubscriberId, u32, Option<&[String]>)> = Vec::new();
        for entry in lists.into_iter().flatten().flatten() {
            examined += 1;
            if skip(entry.subscriber) {
                continue;
            }
            Self::hit(entry, change, &mut hits);
        }
        Self::group(hits, out);
        examined
    }

    /// The matches of the given subscribers only, appended to `out` (each one's own
    /// bindings, not the table's whole list). A subscriber listed twice is matched once.
    pub fn matches_of(&self, change: &Change, subscribers: &[SubscriberId], out: &mut Vec<Match>) {
        let mut distinct = subscribers.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        self.matches_of_distinct(change, distinct.iter().copied(), out);
    }

    /// [`SubscriptionIndex::matches_of`] for subscribers the caller knows to be distinct
    /// (no deduplication pass: a long list costs one lookup per subscriber).
    pub fn matches_of_distinct(
        &self,
        change: &Change,
        subscribers: impl IntoIterator<Item = SubscriberId>,
        out: &mut Vec<Match>,
    ) {
        if change.kind == ChangeKind::Truncate {
            return;
        }
        let schema = change.schema();
        let table = change.table_name();
        let mut hits: Vec<(SubscriberId, u32, Option<&[String]>)> = Vec::new();
        for subscriber in subscribers {
            let Some(bindings) = self.own.get(&subscriber) else {
                continue;
            };
            for b in bindings {
                let covers = (b.schema == WILDCARD || b.schema == schema)
                    && (b.table == WILDCARD || b.table == table);
                if covers {
                    Self::hit_binding(subscriber, b, change, &mut hits);
                }
            }
        }
        let mut mine = Vec::new();
        Self::group(hits, &mut mine);
        out.extend(mine);
    }

    /// The entry lists whose bindings may cover `(schema, table)`: exact, schema-wide,
    /// table-wide and everything (each binding is in exactly one of them).
    fn lists_covering(&self, schema: &str, table: &str) -> [Option<&[Entry]>; 4] {
        [
            self.exact
                .get(schema)
                .and_then(|tables| tables.get(table))
                .map(Vec::as_slice),
            self.schema_wide.get(schema).map(Vec::as_slice),
            self.table_wide.get(table).map(Vec::as_slice),
            Some(self.everything.as_slice()),
        ]
    }

    /// Every subscriber with a binding that covers `(schema, table)`, ascending, each once.
    pub fn subscribers_of_table(&self, schema: &str, table: &str) -> Vec<SubscriberId> {
        let lists = self.lists_covering(schema, table);
        let mut out: Vec<SubscriberId> = lists
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.subscriber)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn hit<'a>(
        entry: &'a Entry,
        change: &Change,
        hits: &mut Vec<(SubscriberId, u32, Option<&'a [String]>)>,
    ) {
        Self::hit_binding(entry.subscriber, &entry.binding, change, hits)
    }

    fn hit_binding<'a>(
        subscriber: SubscriberId,
        b: &'a Binding,
        change: &Change,
        hits: &mut Vec<(SubscriberId, u32, Option<&'a [String]>)>,
    ) {
        if !b.event.accepts(change.kind) {
            return;
        }
        if let Some(filter) = &b.filter {
            if !filter.matches(change) {
                return;
            }
        }
        hits.push((subscriber, b.id, b.select.as_deref()));
    }

    /// One [`Match`] per subscriber among `hits`.
    fn group(mut hits: Vec<(SubscriberId, u32, Option<&[String]>)>, out: &mut Vec<Match>) {
        // Sorting by (subscriber, id) groups each subscriber and orders its ids; the select
        // lists of identical ids are identical, so which one survives dedup does not matter.
        hits.sort_unstable_by_key(|(s, id, _)| (*s, *id));
        let mut i = 0;
        while let Some(&(subscriber, _, _)) = hits.get(i) {
            let group_len = hits
                .get(i..)
                .map(|rest| rest.iter().take_while(|h| h.0 == subscriber).count())
                .unwrap_or(0);
            let group = hits.get(i..i + group_len).unwrap_or(&[]);
            let mut binding_ids: Vec<u32> = group.iter().map(|h| h.1).collect();
            binding_ids.dedup();
            let select = if group.iter().any(|h| h.2.is_none()) {
                None
            } else {
                let mut cols: Vec<String> = Vec::new();
                for col in group.iter().filter_map(|h| h.2).flatten() {
                    if !cols.contains(col) {
                        cols.push(col.clone());
                    }
                }
                Some(cols)
            };
            out.push(Match {
                subscriber,
                binding_ids,
                select,
            });
            i += group_len.max(1);
        }
    }

    /// True when no binding is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of bindings registered (over all subscribers).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Number of subscribers holding at least one binding.
    pub fn subscriber_count(&self) -> usize {
        self.by_subscriber.len()
    }

    /// The bindings of `subscriber` with one of `ids` that cover `(schema, table)`. A slow
    /// path (it walks the table's list), for the rare checks that need a binding itself.
    pub fn bindings_of<'a>(
        &'a self,
        subscriber: SubscriberId,
        ids: &'a [u32],
        schema: &'a str,
        table: &'a str,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        let lists = self.lists_covering(schema, table);
        lists
            .into_iter()
            .flatten()
            .flatten()
            .filter(move |e| e.subscriber == subscriber && ids.contains(&e.binding.id))
            .map(|e| &e.binding)
    }

    /// The `(schema, table)` patterns a subscriber's bindings cover (`*` for wildcards),
    /// sorted and deduplicated. Empty for an unknown subscriber.
    pub fn tables_of(&self, subscriber: SubscriberId) -> Vec<(String, String)> {
        let Some(slots) = self.by_subscriber.get(&subscriber) else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = slots
            .iter()
            .map(|slot| match slot {
                Slot::Exact { schema, table } => (schema.clone(), table.clone()),
                Slot::SchemaWide { schema } => (schema.clone(), WILDCARD.to_owned()),
                Slot::TableWide { table } => (WILDCARD.to_owned(), table.clone()),
                Slot::Everything => (WILDCARD.to_owned(), WILDCARD.to_owned()),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// A stable id for a binding, from its JSON text (`{"event":"*","schema":"public",…}`):
/// FNV-1a (32-bit) over a canonical rendering (object keys sorted, no whitespace), masked to
/// 27 bits like Supabase's `phash2` range. Text that is not JSON is hashed as is, so the
/// function is total. Deterministic across processes (no per-process hash seed).
pub fn binding_id(raw_binding_json: &str) -> u32 {
    let mut hasher = Fnv1a::new();
    match serde_json::from_str::<serde_json::Value>(raw_binding_json) {
        Ok(value) => canonical(&value, &mut hasher),
        Err(_) => hasher.write(raw_binding_json.as_bytes()),
    }
    hasher.finish() & ((1 << 27) - 1)
}

struct Fnv1a(u32);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0x811c_9dc5)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }

    fn finish(&self) -> u32 {
        self.0
    }
}

/// Streams a canonical JSON rendering into the hasher. Keys are sorted here rather than
/// relying on `serde_json::Map`'s order, which becomes insertion order if any crate in the
/// build enables serde_json's `preserve_order` feature.
fn canonical(value: &serde_json::Value, h: &mut Fnv1a) {
    use serde_json::Value as J;
    match value {
        J::Null => h.write(b"null"),
        J::Bool(true) => h.write(b"true"),
        J::Bool(false) => h.write(b"false"),
        J::Number(n) => h.write(n.to_string().as_bytes()),
        J::String(s) => write_string(s, h),
        J::Array(items) => {
            h.write(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.write(b",");
                }
                canonical(item, h);
            }
            h.write(b"]");
        }
        J::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.write(b"{");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    h.write(b",");
                }
                write_string(key, h);
                h.write(b":");
                if let Some(v) = map.get(key) {
                    canonical(v, h);
                }
            }
            h.write(b"}");
        }
    }
}

fn write_string(s: &str, h: &mut Fnv1a) {
    let mut out = String::with_capacity(s.len() + 2);
    crate::value::write_json_string(s, &mut out);
    h.write(out.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walcast_pgoutput::{Lsn, ReplicaIdentity};

    use super::*;
    use crate::change::{Column, Table, Value};
    use crate::filter::{self, ColumnInfo};
    use crate::pg_type::TypeRegistry;

    fn change(schema: &str, table: &str, kind: ChangeKind, id: i64) -> Change {
        let t = Table {
            relation_id: 1,
            schema: schema.into(),
            name: table.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_name: "int8".into(),
                type_oid: 20,
                is_key: true,
            }]
            .into(),
        };
        let row = vec![Value::Present {
            text: id.to_string().into(),
            json: id.to_string().into(),
        }];
        Change {
            table: Arc::new(t),
            kind,
            commit_lsn: Lsn(1),
            index_in_txn: 0,
            xid: 0,
            commit_time_us: 0,
            record: (kind != ChangeKind::Delete).then(|| row.clone()),
            old_record: (kind != ChangeKind::Insert).then_some(row),
        }
    }

    fn binding(id: u32, event: &str, schema: &str, table: &str, filter: Option<&str>) -> Binding {
        let filter = filter.map(|f| {
            filter::parse(f)
                .and_then(|f| {
                    f.compile(
                        &[ColumnInfo {
                            name: "id".into(),
                            type_oid: 20,
                        }],
                        &TypeRegistry::new(),
                    )
                })
                .expect("test filter compiles")
        });
        Binding {
            id,
            event: EventFilter::from_binding_event(event),
            schema: schema.into(),
            table: table.into(),
            filter,
            select: None,
        }
    }

    fn run(index: &SubscriptionIndex, c: &Change) -> Vec<(SubscriberId, Vec<u32>)> {
        let mut out = vec![Match {
            subscriber: 999,
            binding_ids: vec![],
            select: None,
        }];
        index.matches(c, &mut out);
        out.into_iter()
            .map(|m| (m.subscriber, m.binding_ids))
            .collect()
    }

    #[test]
    fn exact_wildcards_events_and_filters() {
        let mut idx = SubscriptionIndex::new();
        idx.insert(1, binding(10, "*", "public", "todos", None));
        idx.insert(2, binding(20, "insert", "public", "todos", None));
        idx.insert(3, binding(30, "*", "public", "*", None));
        idx.insert(4, binding(40, "*", "*", "*", None));
        idx.insert(5, binding(50, "*", "*", "todos", None));
        idx.insert(6, binding(60, "DELETE", "public", "todos", Some("id=eq.7")));
        idx.insert(7, binding(70, "*", "other", "todos", None));
        idx.insert(8, binding(80, "*", "public", "users", None));
        assert_eq!(idx.len(), 8);

        let ins = change("public", "todos", ChangeKind::Insert, 7);
        assert_eq!(
            run(&idx, &ins),
            vec![
                (1, vec![10]),
                (2, vec![20]),
                (3, vec![30]),
                (4, vec![40]),
                (5, vec![50])
            ]
        );
        let del7 = change("public", "todos", ChangeKind::Delete, 7);
        let del8 = change("public", "todos", ChangeKind::Delete, 8);
        let subs =
            |v: Vec<(SubscriberId, Vec<u32>)>| v.into_iter().map(|m| m.0).collect::<Vec<_>>();
        assert_eq!(subs(run(&idx, &del7)), vec![1, 3, 4, 5, 6]);
        assert_eq!(subs(run(&idx, &del8)), vec![1, 3, 4, 5]);
        let other = change("other", "todos", ChangeKind::Update, 1);
        assert_eq!(subs(run(&idx, &other)), vec![4, 5, 7]);
        let trunc = change("public", "todos", ChangeKind::Truncate, 0);
        assert_eq!(run(&idx, &trunc), vec![]);
    }

    #[test]
    fn one_match_per_subscriber_with_all_ids() {
        let mut idx = SubscriptionIndex::new();
        idx.insert(1, binding(900, "*", "public", "todos", None));
        idx.insert(1, binding(5, "INSERT", "public", "*", None));
        idx.insert(1, binding(900, "*", "public", "todos", None));
        idx.insert(1, binding(7, "update", "public", "todos", None));
        let mut b = binding(3, "*", "public", "todos", None);
        b.select = Some(vec!["id".into(), "title".into()]);
        idx.insert(1, b);
        let mut out = Vec::new();
        idx.matches(&change("public", "todos", ChangeKind::Insert, 1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].binding_ids, vec![3, 5, 900]);
        assert_eq!(out[0].select, None, "binding 5 selects everything");

        let mut idx = SubscriptionIndex::new();
        for (id, cols) in [(2, vec!["a", "b"]), (1, vec!["c", "a"])] {
            let mut b = binding(id, "*", "public", "todos", None);
            b.select = Some(cols.into_iter().map(String::from).collect());
            idx.insert(4, b);
        }
        idx.matches(&change("public", "todos", ChangeKind::Update, 1), &mut out);
        assert_eq!(out[0].binding_ids, vec![1, 2]);
        assert_eq!(
            out[0].select,
            Some(vec!["c".to_owned(), "a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn removal_clears_every_list() {
        let mut idx = SubscriptionIndex::new();
        idx.insert(1, binding(1, "*", "public", "todos", None));
        idx.insert(1, binding(2, "*", "public", "*", None));
        idx.insert(1, binding(3, "*", "*", "todos", None));
        idx.insert(1, binding(4, "*", "*", "*", None));
        idx.insert(2, binding(1, "*", "public", "todos", None));
        assert_eq!(idx.subscriber_count(), 2);
        assert_eq!(
            idx.tables_of(1),
            vec![
                ("*".to_owned(), "*".to_owned()),
                ("*".to_owned(), "todos".to_owned()),
                ("public".to_owned(), "*".to_owned()),
                ("public".to_owned(), "todos".to_owned()),
            ]
        );
        idx.remove_subscriber(1);
        idx.remove_subscriber(1);
        idx.remove_subscriber(42);
        assert_eq!(idx.len(), 1);
        assert_eq!(
            run(&idx, &change("public", "todos", ChangeKind::Insert, 1)),
            vec![(2, vec![1])]
        );
        idx.remove_subscriber(2);
        assert!(idx.is_empty());
        assert!(idx.exact.is_empty() && idx.schema_wide.is_empty() && idx.table_wide.is_empty());
        assert!(idx.everything.is_empty() && idx.by_subscriber.is_empty());
    }

    #[test]
    fn other_tables_bindings_are_never_examined() {
        let mut idx = SubscriptionIndex::new();
        for s in 0..1000 {
            idx.insert(s, binding(1, "*", "public", "b", Some("id=eq.1")));
        }
        idx.insert(5000, binding(2, "*", "public", "a", None));
        idx.insert(5001, binding(3, "*", "public", "*", None));
        let mut out = Vec::new();
        let examined = idx.matches_counted(&change("public", "a", ChangeKind::Insert, 1), &mut out);
        assert_eq!(examined, 2, "only public.a and public.* bindings");
        assert_eq!(out.len(), 2);
        let examined = idx.matches_counted(&change("public", "b", ChangeKind::Insert, 1), &mut out);
        assert_eq!(examined, 1001);
        assert_eq!(out.len(), 1001);
    }

    #[test]
    fn binding_ids_are_stable_and_canonical() {
        let a = binding_id(r#"{"event":"*","schema":"public","table":"todos","filter":"id=eq.1"}"#);
        let b = binding_id(
            r#"{ "filter": "id=eq.1", "table": "todos",
                 "schema": "public", "event": "*" }"#,
        );
        assert_eq!(a, b);
        assert!(a < (1 << 27));
        assert_ne!(
            a,
            binding_id(r#"{"event":"*","schema":"public","table":"todos","filter":"id=eq.2"}"#)
        );
        assert_ne!(
            a,
            binding_id(
                r#"{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"}"#
            )
        );
        // Fixed across processes and releases: a golden value.
        assert_eq!(
            binding_id(r#"{"event":"*","schema":"public","table":"todos"}"#),
            GOLDEN_ID
        );
        assert!(binding_id("not json") < (1 << 27));
    }

    // FNV-1a-32 of `{"event":"*","schema":"public","table":"todos"}`, low 27 bits.
    const GOLDEN_ID: u32 = 46_566_908;

    #[test]
    fn event_filter_parsing() {
        assert_eq!(
            EventFilter::from_binding_event("insert"),
            EventFilter::Insert
        );
        assert_eq!(
            EventFilter::from_binding_event("Update"),
            EventFilter::Update
        );
        assert_eq!(
            EventFilter::from_binding_event("DELETE"),
            EventFilter::Delete
        );
        assert_eq!(EventFilter::from_binding_event("*"), EventFilter::All);
        assert_eq!(
            EventFilter::from_binding_event("whatever"),
            EventFilter::All
        );
        assert!(!EventFilter::All.accepts(ChangeKind::Truncate));
    }
}
