//! Hands each message that arrives from Redis to the worker cores that want it, once per core.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use slog::{warn, Logger};

use super::envelope::{self, Deduplicator};
use super::interest::{is_wildcard, Interest};
use crate::bus::{CoreMessage, CoreSender, Publication};
use crate::config::TOPIC_LENGTH_CEILING;
use crate::logging::RepeatCounter;
use crate::topic::{validate_pattern, validate_topic, SubscriptionIndex};

/// Time after which the sequence window of a silent origin is dropped.
const ORIGIN_IDLE: Duration = Duration::from_secs(300);

/// Routing state of the link: local interest, the repeat filter and the other nodes' wildcards.
pub struct Router {
    /// Subscriptions of the local cores.
    pub interest: Interest,
    /// Wildcard patterns other nodes announced (Redis Cluster mode).
    pub remote_wildcards: RemoteWildcards,
    dedup: Deduplicator,
    instance: u64,
    prefix: String,
    marks: Vec<bool>,
    invalid: RepeatCounter,
}

/// Outcome of [`Router::route`] for one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// Sent to this many cores.
    Delivered(usize),
    /// This node published it.
    OwnEcho,
    /// Another copy of it was routed already.
    Repeat,
    /// No core subscribes to its topic any more.
    NoInterest,
    /// The channel or payload is not the link's.
    Invalid,
}

impl Router {
    /// Creates the router of a node with `cores` worker cores and the random `instance` id.
    pub fn new(interest: Interest, prefix: &str, instance: u64, cores: usize) -> Router {
        Router {
            interest,
            remote_wildcards: RemoteWildcards::default(),
            dedup: Deduplicator::default(),
            instance,
            prefix: prefix.to_owned(),
            marks: vec![false; cores],
            invalid: RepeatCounter::default(),
        }
    }

    /// Routes one message that Redis delivered on `channel`.
    pub fn route(
        &mut self,
        channel: &[u8],
        payload: &[u8],
        cores: &[CoreSender],
        log: &Logger,
    ) -> Routed {
        let topic = channel
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|topic| std::str::from_utf8(topic).ok())
            .filter(|topic| validate_topic(topic, TOPIC_LENGTH_CEILING).is_ok());
        let Some(topic) = topic else {
            return self.reject(
                channel,
                "channel is not a valid topic under the prefix",
                log,
            );
        };
        let envelope = match envelope::parse(payload) {
            Ok(envelope) => envelope,
            Err(error) => return self.reject(channel, &error.to_string(), log),
        };
        if envelope.origin == self.instance {
            return Routed::OwnEcho;
        }
        if !self
            .dedup
            .first_arrival(envelope.origin, envelope.seq, Instant::now())
        {
            return Routed::Repeat;
        }

        self.marks.fill(false);
        if !self.interest.mark_cores(topic, &mut self.marks) {
            return Routed::NoInterest;
        }
        let publication = Arc::new(Publication {
            topic: topic.into(),
            frame: envelope.frame.into(),
        });
        let mut delivered = 0;
        for (core, _) in self.marks.iter().enumerate().filter(|(_, marked)| **marked) {
            if let Some(sender) = cores.get(core) {
                sender.send(CoreMessage::Deliver(Arc::clone(&publication)));
                delivered += 1;
            }
        }
        Routed::Delivered(delivered)
    }

    fn reject(&mut self, channel: &[u8], reason: &str, log: &Logger) -> Routed {
        if let Some(suppressed) = self.invalid.record(Duration::from_secs(10)) {
            warn!(log, "message from Redis dropped";
                "channel" => %String::from_utf8_lossy(channel), "reason" => reason,
                "suppressed" => suppressed);
        }
        Routed::Invalid
    }

    /// Drops state about nodes that went quiet.
    pub fn forget_idle(&mut self, now: Instant, announcement_max_age: Duration) {
        self.dedup.forget_idle(now, ORIGIN_IDLE);
        self.remote_wildcards.expire(now, announcement_max_age);
    }

    /// Applies a wildcard announcement published by another node. Returns `Err` when the
    /// payload is not an announcement, and the announcing node's id with its new number of
    /// patterns when its set changed.
    pub fn apply_announcement(
        &mut self,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<(String, usize)>, simd_json::Error> {
        let mut bytes = payload.to_vec();
        let announcement = simd_json::serde::from_slice::<Announcement>(&mut bytes)?;
        if announcement.instance == self.instance {
            return Ok(None);
        }
        let patterns = announcement.patterns.into_iter().map(Box::from).collect();
        let count = self
            .remote_wildcards
            .update(announcement.instance, patterns, now);
        Ok(count.map(|count| (announcement.node_id, count)))
    }
}

/// Encodes the announcement of this node's wildcard patterns.
pub fn encode_announcement(instance: u64, node_id: &str, patterns: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + patterns.iter().map(|p| p.len() + 3).sum::<usize>());
    out.extend_from_slice(br#"{"instance":"#);
    out.extend_from_slice(itoa::Buffer::new().format(instance).as_bytes());
    out.extend_from_slice(br#","node_id":"#);
    crate::protocol::push_json_string(&mut out, node_id);
    out.extend_from_slice(br#","patterns":["#);
    for (index, pattern) in patterns.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        crate::protocol::push_json_string(&mut out, pattern);
    }
    out.extend_from_slice(b"]}");
    out
}

/// A node's list of wildcard patterns, published on the announcement channel.
#[derive(Deserialize)]
struct Announcement {
    instance: u64,
    node_id: String,
    patterns: Vec<String>,
}

/// Wildcard patterns of the other nodes, from their announcements.
#[derive(Default)]
pub struct RemoteWildcards {
    by_instance: HashMap<u64, (Vec<Box<str>>, Instant)>,
    index: SubscriptionIndex<u64>,
}

impl RemoteWildcards {
    /// Returns whether some other node has a wildcard pattern that matches `topic`.
    pub fn wants(&self, topic: &str) -> bool {
        self.index.has_match(topic)
    }

    /// Replaces the patterns of `instance`, and returns their new number when they changed.
    /// Invalid and exact patterns are ignored, since anything can publish on the announcement
    /// channel.
    pub fn update(
        &mut self,
        instance: u64,
        patterns: Vec<Box<str>>,
        now: Instant,
    ) -> Option<usize> {
        let mut valid: Vec<Box<str>> = patterns
            .into_iter()
            .filter(|p| validate_pattern(p, TOPIC_LENGTH_CEILING).is_ok() && is_wildcard(p))
            .collect();
        valid.sort();
        valid.dedup();
        if let Some((current, seen)) = self.by_instance.get_mut(&instance) {
            if *current == valid {
                *seen = now;
                return None;
            }
        } else if valid.is_empty() {
            return None;
        }
        self.remove(instance);
        for pattern in &valid {
            let _ = self.index.insert(pattern, instance);
        }
        let count = valid.len();
        if !valid.is_empty() {
            self.by_instance.insert(instance, (valid, now));
        }
        Some(count)
    }

    /// Drops the patterns of nodes whose last announcement is older than `max_age`.
    pub fn expire(&mut self, now: Instant, max_age: Duration) {
        let stale: Vec<u64> = self
            .by_instance
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > max_age)
            .map(|(instance, _)| *instance)
            .collect();
        for instance in stale {
            self.remove(instance);
        }
    }

    fn remove(&mut self, instance: u64) {
        if let Some((patterns, _)) = self.by_instance.remove(&instance) {
            for pattern in &patterns {
                let _ = self.index.remove(pattern, instance);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::inbox;
    use crate::protocol::encode_delivery;

    fn payload(origin: u64, seq: u64, topic: &str) -> Vec<u8> {
        let mut out = Vec::new();
        envelope::push_header(&mut out, origin, seq);
        out.extend_from_slice(&encode_delivery(topic, b"1"));
        out
    }

    fn router() -> Router {
        let mut interest = Interest::new("p:", false);
        let _ = interest.apply(0, "a.b", true);
        let _ = interest.apply(1, "a.*", true);
        Router::new(interest, "p:", 99, 2)
    }

    fn discard() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    #[test]
    fn pmessage_copy_is_a_repeat() {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..2).map(|_| inbox()).unzip();
        let mut router = router();
        let bytes = payload(7, 1, "a.b");
        let log = discard();
        assert_eq!(
            router.route(b"p:a.b", &bytes, &senders, &log),
            Routed::Delivered(2)
        );
        assert_eq!(
            router.route(b"p:a.b", &bytes, &senders, &log),
            Routed::Repeat
        );
        drop(receivers);
    }

    #[test]
    fn own_and_foreign_messages_are_dropped() {
        let (senders, _receivers): (Vec<_>, Vec<_>) = (0..2).map(|_| inbox()).unzip();
        let mut router = router();
        let log = discard();
        assert_eq!(
            router.route(b"p:a.b", &payload(99, 1, "a.b"), &senders, &log),
            Routed::OwnEcho
        );
        assert_eq!(
            router.route(b"p:a.b", b"hello", &senders, &log),
            Routed::Invalid
        );
        assert_eq!(
            router.route(b"q:a.b", &payload(7, 1, "a.b"), &senders, &log),
            Routed::Invalid
        );
        assert_eq!(
            router.route(b"p:#x", &payload(7, 2, "a.b"), &senders, &log),
            Routed::Invalid
        );
        assert_eq!(
            router.route(b"p:c", &payload(7, 3, "c"), &senders, &log),
            Routed::NoInterest
        );
    }

    #[test]
    fn announcements_replace_and_expire() {
        let start = Instant::now();
        let mut router = router();
        let message = encode_announcement(5, "node-b", &["x.*", "not..valid", "exact"]);
        let applied = router.apply_announcement(&message, start).unwrap();
        assert_eq!(applied, Some(("node-b".to_owned(), 1)));
        assert_eq!(
            router.apply_announcement(&message, start).unwrap(),
            None,
            "no change"
        );
        assert!(router.remote_wildcards.wants("x.y"));
        assert!(!router.remote_wildcards.wants("exact"));
        let message = encode_announcement(5, "node-b", &["z.>"]);
        assert!(router
            .apply_announcement(&message, start)
            .unwrap()
            .is_some());
        assert!(!router.remote_wildcards.wants("x.y"));
        assert!(router.remote_wildcards.wants("z.y.w"));
        router.forget_idle(start + Duration::from_secs(10), Duration::from_secs(6));
        assert!(!router.remote_wildcards.wants("z.y.w"));
        assert!(router.apply_announcement(b"{}", start).is_err());
    }

    #[test]
    fn own_announcement_is_ignored() {
        let mut router = router();
        let message = encode_announcement(99, "me", &["x.*"]);
        assert_eq!(
            router.apply_announcement(&message, Instant::now()).unwrap(),
            None
        );
        assert!(!router.remote_wildcards.wants("x.y"));
    }
}
