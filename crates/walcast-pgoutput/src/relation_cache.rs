//! The latest Relation per relation OID.
//!
//! pgoutput sends a Relation before the first change to a table in a walsender session and
//! again after any change to its definition, and every later tuple follows the most recent
//! one. So the cache *replaces* entries (never merges), and is cleared on reconnect because
//! the server re-sends everything a new session needs. Entries are `Arc`s so decoded changes
//! can keep the shape they were decoded with even after a DDL replaces it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Relation;

#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
}

impl RelationCache {
    pub fn new() -> Self {
        RelationCache::default()
    }

    /// Stores `relation` under its OID, replacing any earlier definition, and returns the
    /// stored handle.
    pub fn apply(&mut self, relation: Relation) -> Arc<Relation> {
        let relation = Arc::new(relation);
        self.relations.insert(relation.id, Arc::clone(&relation));
        relation
    }

    pub fn get(&self, id: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&id)
    }

    pub fn remove(&mut self, id: u32) -> Option<Arc<Relation>> {
        self.relations.remove(&id)
    }

    /// Forgets everything; call on reconnect.
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Relation>> {
        self.relations.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{RelationColumn, ReplicaIdentity};

    fn rel(id: u32, name: &str, cols: &[&str]) -> Relation {
        Relation {
            xid: None,
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|c| RelationColumn {
                    is_key: *c == "id",
                    name: (*c).into(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn apply_replaces_and_keeps_old_handles_alive() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        let v1 = cache.apply(rel(16384, "todos", &["id"]));
        let v2 = cache.apply(rel(16384, "todos", &["id", "title"]));
        assert_eq!(cache.len(), 1);
        assert_eq!(v1.columns.len(), 1, "an earlier handle keeps its shape");
        assert!(Arc::ptr_eq(cache.get(16384).expect("just applied"), &v2));
        assert_eq!(cache.get(16384).map(|r| r.columns.len()), Some(2));
        assert!(cache.get(1).is_none());
    }

    #[test]
    fn clear_and_remove() {
        let mut cache = RelationCache::new();
        cache.apply(rel(1, "a", &["id"]));
        cache.apply(rel(2, "b", &["id"]));
        assert_eq!(cache.iter().count(), 2);
        assert_eq!(
            cache.remove(1).map(|r| r.name.clone()),
            Some("a".to_owned())
        );
        assert!(cache.get(1).is_none());
        cache.clear();
        assert!(cache.is_empty());
        assert!(cache.get(2).is_none());
    }
}
