//! One joined channel of a socket, and the socket's set of them.
//!
//! Kept lean: an idle socket is mostly its channels and its task, and a server holds tens of
//! thousands of sockets. Strings shared with the hub and the topics are `Arc`s; nothing is
//! allocated for a feature the channel does not use (a presence key is made on first track).

use std::sync::Arc;
use std::time::Instant;

use walcast_core::broadcast::TopicKey;
use walcast_core::hub::Identity;
use walcast_protocol::{JoinPayload, PostgresBinding};

use crate::authz::private::ChannelPerms;
use crate::realtime::limiter::RateWindow;

/// One joined channel.
pub struct Channel {
    pub id: u64,
    /// Full topic, `realtime:<name>` (shared with the hub's view of the channel).
    pub topic: Arc<str>,
    pub join_ref: Option<String>,
    /// The token the channel acts with (shared with the connection's when it is the same).
    pub token: Arc<str>,
    /// The token's expiry, unix seconds.
    pub exp: i64,
    /// The token's role and claims, as every check runs them (shared with the hub).
    pub identity: Arc<Identity>,
    /// The postgres_changes entries as joined (kept to re-scope on `access_token`).
    pub entries: Vec<PostgresBinding>,
    /// The channel has live postgres_changes bindings in the hub.
    pub registered: bool,
    /// Broadcast and presence state of this channel.
    pub realtime: ChannelRealtime,
    /// Private channels: what the token may read (and, once checked, write).
    pub perms: Option<ChannelPerms>,
    /// Inbound broadcast/presence pushes in the current second, for the events/s limit.
    pub events: RateWindow,
    /// Under a session: the channel's outbox that outlives the socket.
    pub resumable: Option<Arc<crate::realtime::resume::Resumable>>,
    /// `config.broadcast.replication_ready` not yet answered: the deadline by which the
    /// replication stream must be up, else the channel is closed.
    pub replication_ready: Option<Instant>,
}

/// A channel's broadcast and presence settings and caches.
pub struct ChannelRealtime {
    pub key: TopicKey,
    pub self_broadcast: bool,
    pub ack: bool,
    /// `config.presence.enabled` at join.
    pub presence_enabled: bool,
    /// `config.presence.key`; without one, a fresh UUID made on the channel's first track
    /// (the key is only ever seen once tracked, so making it then changes nothing).
    pub presence_key: Option<String>,
    /// Presence calls in the current window (`CLIENT_PRESENCE_MAX_CALLS` per window).
    pub presence_calls: RateWindow,
}

impl ChannelRealtime {
    pub fn new(name: &str, join: &JoinPayload, now: Instant) -> ChannelRealtime {
        let key = &join.config.presence.key;
        ChannelRealtime {
            key: TopicKey::new(name, join.config.private),
            self_broadcast: join.config.broadcast.self_broadcast,
            ack: join.config.broadcast.ack,
            presence_enabled: join.config.presence.enabled,
            presence_key: (!key.is_empty()).then(|| key.clone()),
            presence_calls: RateWindow::new(now),
        }
    }
}

impl Channel {
    /// The metric label of the channel's kind.
    pub fn kind(&self) -> &'static str {
        if self.registered {
            "postgres_changes"
        } else {
            "plain"
        }
    }

    /// The topic name without `realtime:`.
    pub fn name(&self) -> &str {
        &self.realtime.key.name
    }

    /// What the topic sends this channel: broadcasts and presence diffs, as its permissions
    /// allow (public channels get both).
    pub fn receives(&self) -> (bool, bool) {
        match &self.perms {
            None => (true, true),
            Some(p) => (p.broadcast_read, p.presence_read == Some(true)),
        }
    }
}

/// A socket's channels, by topic: a vector grown one slot at a time. A socket holds one or a
/// few channels (at most `--max-channels-per-client`), so a linear search costs no more than
/// hashing, while a hash map keeps four buckets of a whole channel each for a single one.
#[derive(Default)]
pub struct Channels(Vec<Channel>);

impl Channels {
    fn position(&self, topic: &str) -> Option<usize> {
        self.0.iter().position(|c| &*c.topic == topic)
    }

    pub fn get(&self, topic: &str) -> Option<&Channel> {
        self.0.iter().find(|c| &*c.topic == topic)
    }

    pub fn get_mut(&mut self, topic: &str) -> Option<&mut Channel> {
        self.0.iter_mut().find(|c| &*c.topic == topic)
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.position(topic).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.0.iter()
    }

    pub fn remove(&mut self, topic: &str) -> Option<Channel> {
        let i = self.position(topic)?;
        Some(self.0.swap_remove(i))
    }

    /// Add a channel, replacing one on the same topic.
    pub fn insert(&mut self, channel: Channel) {
        if let Some(i) = self.position(&channel.topic) {
            self.0[i] = channel;
            return;
        }
        if self.0.len() == self.0.capacity() {
            self.0.reserve_exact(1);
        }
        self.0.push(channel);
    }

    pub fn take_all(&mut self) -> Vec<Channel> {
        std::mem::take(&mut self.0)
    }

    /// Slots held (tests: an idle socket keeps exactly its channels).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn channel(topic: &str) -> Channel {
        Channel {
            id: 1,
            topic: Arc::from(topic),
            join_ref: None,
            token: Arc::from("t"),
            exp: 0,
            identity: Arc::new(Identity {
                role: Arc::from("anon"),
                claims: Arc::from("{}"),
            }),
            entries: Vec::new(),
            registered: false,
            realtime: ChannelRealtime::new("x", &JoinPayload::default(), Instant::now()),
            perms: None,
            events: RateWindow::new(Instant::now()),
            resumable: None,
            replication_ready: None,
        }
    }

    /// What one joined channel costs an idle socket besides its heap strings.
    #[test]
    fn a_channel_stays_small() {
        let size = std::mem::size_of::<Channel>();
        eprintln!("channel: {size} bytes");
        assert!(size <= 256, "Channel is {size} bytes");
    }

    #[test]
    fn channels_grow_one_slot_at_a_time_and_replace_by_topic() {
        let mut chs = Channels::default();
        chs.insert(channel("realtime:a"));
        assert_eq!(chs.capacity(), 1);
        chs.insert(channel("realtime:b"));
        assert_eq!(chs.capacity(), 2);
        let mut again = channel("realtime:a");
        again.id = 7;
        chs.insert(again);
        assert_eq!(chs.len(), 2);
        assert_eq!(chs.get("realtime:a").map(|c| c.id), Some(7));
        assert!(chs.remove("realtime:a").is_some());
        assert!(!chs.contains("realtime:a"));
        assert!(chs.get_mut("realtime:b").is_some());
        // No presence key is made before the channel tracks.
        assert!(chs
            .get("realtime:b")
            .is_some_and(|c| c.realtime.presence_key.is_none()));
    }
}
