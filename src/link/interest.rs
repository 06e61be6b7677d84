//! Which topics this node needs from Redis, and the commands that bring one Redis connection's
//! subscriptions to that state.
//!
//! Worker cores report the first and last local subscriber of each pattern. [`Interest`] keeps
//! those reports in a [`SubscriptionIndex`] of core ids, which routes incoming messages to the
//! cores that want them, and reference-counts the Redis subscriptions they need: several
//! patterns can need one Redis glob (`orders.*` and `orders.>` both need `nexus:orders.*`).
//!
//! [`Projection`] is the state one connection will be in once Redis has run every command sent on
//! it. Redis runs a connection's commands in order. So the link compares the desired state with
//! the projection, never with confirmations still in flight, and an old UNSUBSCRIBE cannot undo a
//! newer SUBSCRIBE. A subscribe/unsubscribe storm between two syncs sends nothing at all.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::resp;
use super::topology::key_slot;
use crate::topic::{redis_glob, Insertion, Removal, SubscriptionIndex};

/// Maximum channels named in one SUBSCRIBE-family command, to keep each command small.
const MAX_CHANNELS_PER_COMMAND: usize = 1000;

/// One Redis subscription, by its full channel name or glob (prefix included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RedisSub {
    /// A classic channel: SUBSCRIBE.
    Channel(Box<str>),
    /// A classic glob: PSUBSCRIBE.
    Pattern(Box<str>),
    /// A shard channel of Redis Cluster: SSUBSCRIBE.
    Sharded(Box<str>),
}

impl RedisSub {
    /// Returns the channel name or glob.
    pub fn name(&self) -> &str {
        match self {
            RedisSub::Channel(name) | RedisSub::Pattern(name) | RedisSub::Sharded(name) => name,
        }
    }
}

/// Returns whether `pattern` contains a `*` or `>` segment.
pub fn is_wildcard(pattern: &str) -> bool {
    pattern
        .split('.')
        .any(|segment| segment == "*" || segment == ">")
}

/// Subscriptions of the worker cores of this node.
pub struct Interest {
    prefix: String,
    sharded: bool,
    cores: SubscriptionIndex<usize>,
    desired: HashMap<RedisSub, usize>,
    patterns: BTreeSet<Box<str>>,
    wildcards_changed: bool,
}

impl Interest {
    /// Creates an empty interest. `sharded` maps exact topics to shard channels (Redis Cluster).
    pub fn new(prefix: &str, sharded: bool) -> Interest {
        Interest {
            prefix: prefix.to_owned(),
            sharded,
            cores: SubscriptionIndex::new(),
            desired: HashMap::new(),
            patterns: BTreeSet::new(),
            wildcards_changed: false,
        }
    }

    /// Returns the Redis subscription that carries the messages of `pattern`.
    pub fn redis_sub(&self, pattern: &str) -> RedisSub {
        if is_wildcard(pattern) {
            RedisSub::Pattern(redis_glob(&self.prefix, pattern).into())
        } else {
            let channel = format!("{}{pattern}", self.prefix).into();
            if self.sharded {
                RedisSub::Sharded(channel)
            } else {
                RedisSub::Channel(channel)
            }
        }
    }

    /// Adds a subscription the link needs whatever the cores want, such as a control channel.
    pub fn pin(&mut self, sub: RedisSub) {
        *self.desired.entry(sub).or_default() += 1;
    }

    /// Records that `core` gained (`added`) or lost its last subscriber of `pattern`. Returns the
    /// Redis subscription that became desired or no longer desired because of it, if any.
    pub fn apply(&mut self, core: usize, pattern: &str, added: bool) -> Option<RedisSub> {
        let sub = self.redis_sub(pattern);
        if added {
            if self.cores.insert(pattern, core) != Insertion::FirstForPattern {
                return None;
            }
            self.patterns.insert(pattern.into());
            self.wildcards_changed |= is_wildcard(pattern);
            let count = self.desired.entry(sub.clone()).or_default();
            *count += 1;
            (*count == 1).then_some(sub)
        } else {
            if self.cores.remove(pattern, core) != Removal::LastForPattern {
                return None;
            }
            self.patterns.remove(pattern);
            self.wildcards_changed |= is_wildcard(pattern);
            let count = self.desired.get_mut(&sub)?;
            *count -= 1;
            if *count > 0 {
                return None;
            }
            self.desired.remove(&sub);
            Some(sub)
        }
    }

    /// Returns whether Redis should deliver `sub` to this node.
    pub fn is_desired(&self, sub: &RedisSub) -> bool {
        self.desired.contains_key(sub)
    }

    /// Returns every desired Redis subscription.
    pub fn desired(&self) -> impl Iterator<Item = &RedisSub> {
        self.desired.keys()
    }

    /// Marks each core whose patterns match `topic`; `marks` has one entry per core.
    pub fn mark_cores(&self, topic: &str, marks: &mut [bool]) -> bool {
        let mut any = false;
        self.cores.for_each_match(topic, |core| {
            if let Some(mark) = marks.get_mut(core) {
                *mark = true;
                any = true;
            }
        });
        any
    }

    /// Returns the patterns that have at least one subscriber on this node, sorted.
    pub fn patterns(&self) -> &BTreeSet<Box<str>> {
        &self.patterns
    }

    /// Returns the wildcard patterns of this node when they changed since the last call.
    pub fn take_changed_wildcards(&mut self) -> Option<Vec<&str>> {
        if !std::mem::take(&mut self.wildcards_changed) {
            return None;
        }
        Some(self.wildcards())
    }

    /// Returns the wildcard patterns of this node.
    pub fn wildcards(&self) -> Vec<&str> {
        let wildcards = self.patterns.iter().filter(|p| is_wildcard(p));
        wildcards.map(|pattern| &**pattern).collect()
    }
}

/// The subscriptions one connection has once Redis has run every command sent on it.
#[derive(Default)]
pub struct Projection {
    subscribed: HashSet<RedisSub>,
}

/// Subscribe and unsubscribe commands for one connection, not yet encoded.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Changes {
    subscribe: BTreeMap<CommandGroup, Vec<Box<str>>>,
    unsubscribe: BTreeMap<CommandGroup, Vec<Box<str>>>,
}

/// Channels that may share one command: shard channels only when they share a hash slot,
/// since Redis Cluster rejects an SSUBSCRIBE whose channels span slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CommandGroup {
    Channel,
    Pattern,
    Sharded(u16),
}

impl Projection {
    /// Removes a subscription that Redis dropped on its own (a shard channel whose slot moved).
    pub fn forget(&mut self, sub: &RedisSub) -> bool {
        self.subscribed.remove(sub)
    }

    /// Returns the number of subscriptions.
    pub fn len(&self) -> usize {
        self.subscribed.len()
    }

    /// Compares each of `candidates` with what this connection should carry and records the
    /// commands that close the gap, updating the projection as if Redis had run them.
    pub fn sync<'a>(
        &mut self,
        candidates: impl IntoIterator<Item = &'a RedisSub>,
        should_carry: impl Fn(&RedisSub) -> bool,
    ) -> Changes {
        let mut changes = Changes::default();
        for sub in candidates {
            let want = should_carry(sub);
            if want && !self.subscribed.contains(sub) {
                self.subscribed.insert(sub.clone());
                changes
                    .subscribe
                    .entry(group(sub))
                    .or_default()
                    .push(sub.name().into());
            } else if !want && self.subscribed.remove(sub) {
                changes
                    .unsubscribe
                    .entry(group(sub))
                    .or_default()
                    .push(sub.name().into());
            }
        }
        changes
    }

    /// Returns every subscription of the connection.
    pub fn iter(&self) -> impl Iterator<Item = &RedisSub> {
        self.subscribed.iter()
    }
}

fn group(sub: &RedisSub) -> CommandGroup {
    match sub {
        RedisSub::Channel(_) => CommandGroup::Channel,
        RedisSub::Pattern(_) => CommandGroup::Pattern,
        RedisSub::Sharded(name) => CommandGroup::Sharded(key_slot(name.as_bytes())),
    }
}

impl Changes {
    /// Returns whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }

    /// Returns the number of commands [`Changes::encode`] writes.
    pub fn command_count(&self) -> usize {
        let chunks = |groups: &BTreeMap<CommandGroup, Vec<Box<str>>>| -> usize {
            let per_group = groups
                .values()
                .map(|names| names.len().div_ceil(MAX_CHANNELS_PER_COMMAND));
            per_group.sum()
        };
        chunks(&self.unsubscribe) + chunks(&self.subscribe)
    }

    /// Appends the commands: unsubscribes first, then subscribes, each naming many channels.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (group, names) in &self.unsubscribe {
            let verb = match group {
                CommandGroup::Channel => "UNSUBSCRIBE",
                CommandGroup::Pattern => "PUNSUBSCRIBE",
                CommandGroup::Sharded(_) => "SUNSUBSCRIBE",
            };
            encode_chunks(out, verb, names);
        }
        for (group, names) in &self.subscribe {
            let verb = match group {
                CommandGroup::Channel => "SUBSCRIBE",
                CommandGroup::Pattern => "PSUBSCRIBE",
                CommandGroup::Sharded(_) => "SSUBSCRIBE",
            };
            encode_chunks(out, verb, names);
        }
    }
}

fn encode_chunks(out: &mut Vec<u8>, verb: &str, names: &[Box<str>]) {
    for chunk in names.chunks(MAX_CHANNELS_PER_COMMAND) {
        resp::push_array_header(out, chunk.len() + 1);
        resp::push_bulk(out, verb.as_bytes());
        for name in chunk {
            resp::push_bulk(out, name.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(changes: &Changes) -> String {
        let mut out = Vec::new();
        changes.encode(&mut out);
        String::from_utf8(out).unwrap().replace("\r\n", " ")
    }

    #[test]
    fn first_and_last_core_flip_the_redis_subscription() {
        let mut interest = Interest::new("nexus:", false);
        let sub = RedisSub::Channel("nexus:a.b".into());
        assert_eq!(interest.apply(0, "a.b", true), Some(sub.clone()));
        assert_eq!(interest.apply(1, "a.b", true), None);
        assert_eq!(interest.apply(0, "a.b", false), None);
        assert!(interest.is_desired(&sub));
        assert_eq!(interest.apply(1, "a.b", false), Some(sub.clone()));
        assert!(!interest.is_desired(&sub));
    }

    #[test]
    fn patterns_sharing_a_glob_are_counted() {
        let mut interest = Interest::new("nexus:", false);
        let glob = RedisSub::Pattern("nexus:orders.*".into());
        assert_eq!(interest.apply(0, "orders.*", true), Some(glob.clone()));
        assert_eq!(interest.apply(0, "orders.>", true), None);
        assert_eq!(interest.apply(0, "orders.*", false), None);
        assert_eq!(interest.apply(0, "orders.>", false), Some(glob));
    }

    #[test]
    fn cores_are_marked_once_per_match() {
        let mut interest = Interest::new("p:", false);
        let _ = interest.apply(0, "a.*", true);
        let _ = interest.apply(0, "a.b", true);
        let _ = interest.apply(2, "a.>", true);
        let mut marks = vec![false; 3];
        assert!(interest.mark_cores("a.b", &mut marks));
        assert_eq!(marks, [true, false, true]);
        let mut marks = vec![false; 3];
        assert!(!interest.mark_cores("b", &mut marks));
    }

    #[test]
    fn wildcard_changes_are_reported_once() {
        let mut interest = Interest::new("p:", true);
        let _ = interest.apply(0, "x", true);
        assert_eq!(interest.take_changed_wildcards(), None);
        let _ = interest.apply(0, "x.*", true);
        assert_eq!(interest.take_changed_wildcards(), Some(vec!["x.*"]));
        assert_eq!(interest.take_changed_wildcards(), None);
    }

    #[test]
    fn sync_batches_and_orders_unsubscribes_first() {
        let mut projection = Projection::default();
        let a = RedisSub::Channel("p:a".into());
        let b = RedisSub::Channel("p:b".into());
        let glob = RedisSub::Pattern("p:*".into());
        let changes = projection.sync([&a, &b, &glob], |_| true);
        assert_eq!(changes.command_count(), 2);
        assert_eq!(
            encoded(&changes),
            "*3 $9 SUBSCRIBE $3 p:a $3 p:b *2 $10 PSUBSCRIBE $3 p:* "
        );
        let changes = projection.sync([&a, &b], |sub| sub == &b);
        assert_eq!(encoded(&changes), "*2 $11 UNSUBSCRIBE $3 p:a ");
        assert_eq!(projection.len(), 2);
    }

    #[test]
    fn storm_between_syncs_sends_nothing() {
        let mut interest = Interest::new("p:", false);
        let mut projection = Projection::default();
        let mut dirty = Vec::new();
        for _ in 0..100 {
            dirty.extend(interest.apply(0, "t", true));
            dirty.extend(interest.apply(0, "t", false));
        }
        let changes = projection.sync(&dirty, |sub| interest.is_desired(sub));
        assert!(changes.is_empty());
    }

    #[test]
    fn unsubscribe_then_resubscribe_ends_subscribed() {
        // The projection already counts an UNSUBSCRIBE in flight, so a newer SUBSCRIBE follows it
        // instead of being skipped as a duplicate.
        let mut interest = Interest::new("p:", false);
        let mut projection = Projection::default();
        let sub = interest.apply(0, "t", true).unwrap();
        let _ = projection.sync([&sub], |s| interest.is_desired(s));
        let _ = interest.apply(0, "t", false);
        let gone = projection.sync([&sub], |s| interest.is_desired(s));
        assert_eq!(encoded(&gone), "*2 $11 UNSUBSCRIBE $3 p:t ");
        let _ = interest.apply(0, "t", true);
        let back = projection.sync([&sub], |s| interest.is_desired(s));
        assert_eq!(encoded(&back), "*2 $9 SUBSCRIBE $3 p:t ");
    }

    #[test]
    fn shard_channels_are_grouped_by_slot() {
        let mut projection = Projection::default();
        let subs: Vec<RedisSub> = (0..50)
            .map(|i| RedisSub::Sharded(format!("p:t{i}").into()))
            .collect();
        let changes = projection.sync(&subs, |_| true);
        let slots: BTreeSet<u16> = subs.iter().map(|s| key_slot(s.name().as_bytes())).collect();
        assert_eq!(changes.command_count(), slots.len());
        assert!(encoded(&changes).contains("SSUBSCRIBE"));
    }

    #[test]
    fn large_batches_are_split_into_chunks() {
        let mut projection = Projection::default();
        let subs: Vec<RedisSub> = (0..2500)
            .map(|i| RedisSub::Channel(format!("c{i}").into()))
            .collect();
        let changes = projection.sync(&subs, |_| true);
        assert_eq!(changes.command_count(), 3);
    }
}
