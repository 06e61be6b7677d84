//! Where each subscriber and publisher runs, which node it talks to and
//! which topics it uses.
//!
//! The run is split into shards: one current-thread runtime per thread per
//! process. Every shard computes the same placement from the configuration,
//! so no shard needs to ask another where anything is.

/// How topics, subscribers and publishers relate in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// All subscribers on topic 0; publishers and subscribers on all URLs.
    Fanout,
    /// Subscriber `i` alone on topic `i`; topic `t` is published by publisher
    /// `t % publishers`.
    Topics,
    /// Like `Fanout`, but publishers use the first URL and subscribers the
    /// others.
    Cluster,
    /// Connections only: subscriber `i` on topic `i % topics`.
    Idle { topics: u32 },
}

/// The topics one publisher cycles through: `first`, `first + step`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicCycle {
    pub first: u32,
    pub step: u32,
    pub count: u32,
}

impl TopicCycle {
    /// Returns the topic of the publisher's `seq`-th message.
    pub fn topic(&self, seq: u64) -> u32 {
        self.first + (seq % u64::from(self.count)) as u32 * self.step
    }

    /// Returns the position of the `seq`-th message among the messages the
    /// publisher sent to that topic; subscribers see these positions as
    /// consecutive numbers.
    pub fn topic_seq(&self, seq: u64) -> u64 {
        seq / u64::from(self.count)
    }

    /// Returns the index of `topic` in the cycle, if the publisher uses it.
    pub fn position(&self, topic: u32) -> Option<u32> {
        let offset = topic.checked_sub(self.first)?;
        (offset % self.step == 0 && offset / self.step < self.count).then_some(offset / self.step)
    }
}

/// Placement of a run's clients over shards and URLs.
#[derive(Clone, Debug)]
pub struct Placement {
    pub layout: Layout,
    pub subscribers: u32,
    pub publishers: u32,
    pub shards: u32,
    pub urls: usize,
}

impl Placement {
    /// Returns the shard that runs subscriber `index`.
    pub fn subscriber_shard(&self, index: u32) -> u32 {
        match self.layout {
            // Keep each topic's subscriber beside its publisher, so that the
            // publisher's in-flight window sees the deliveries.
            Layout::Topics => (index % self.publishers) % self.shards,
            _ => index % self.shards,
        }
    }

    /// Returns the shard that runs publisher `index`.
    pub fn publisher_shard(&self, index: u32) -> u32 {
        index % self.shards
    }

    /// Returns the indices of the subscribers that `shard` runs.
    pub fn local_subscribers(&self, shard: u32) -> Vec<u32> {
        (0..self.subscribers)
            .filter(|&index| self.subscriber_shard(index) == shard)
            .collect()
    }

    /// Returns the indices of the publishers that `shard` runs.
    pub fn local_publishers(&self, shard: u32) -> Vec<u32> {
        (0..self.publishers)
            .filter(|&index| self.publisher_shard(index) == shard)
            .collect()
    }

    /// Returns the index in the URL list that subscriber `index` connects to.
    pub fn subscriber_url(&self, index: u32) -> usize {
        match self.layout {
            Layout::Cluster => 1 + index as usize % (self.urls - 1),
            _ => index as usize % self.urls,
        }
    }

    /// Returns the index in the URL list that publisher `index` connects to.
    pub fn publisher_url(&self, index: u32) -> usize {
        match self.layout {
            Layout::Cluster => 0,
            _ => index as usize % self.urls,
        }
    }

    /// Returns the topic that subscriber `index` subscribes to.
    pub fn subscriber_topic(&self, index: u32) -> u32 {
        match self.layout {
            Layout::Fanout | Layout::Cluster => 0,
            Layout::Topics => index,
            Layout::Idle { topics } => index % topics,
        }
    }

    /// Returns the topics publisher `index` publishes to.
    pub fn publisher_topics(&self, index: u32) -> TopicCycle {
        match self.layout {
            Layout::Topics => TopicCycle {
                first: index,
                step: self.publishers,
                count: (self.subscribers - index).div_ceil(self.publishers),
            },
            _ => TopicCycle {
                first: 0,
                step: 1,
                count: 1,
            },
        }
    }

    /// Returns the number of subscribers of `topic` in the whole run.
    pub fn receivers(&self, topic: u32) -> u64 {
        match self.layout {
            Layout::Fanout | Layout::Cluster => u64::from(self.subscribers),
            Layout::Topics => u64::from(topic < self.subscribers),
            Layout::Idle { topics } => {
                let full = self.subscribers / topics;
                u64::from(full + u32::from(topic < self.subscribers % topics))
            }
        }
    }

    /// Returns the publishers whose messages subscriber `index` receives,
    /// as the first index and the count (publishers are numbered densely).
    pub fn senders_of(&self, index: u32) -> (u32, u32) {
        match self.layout {
            Layout::Fanout | Layout::Cluster => (0, self.publishers),
            Layout::Topics => (index % self.publishers, 1),
            Layout::Idle { .. } => (0, 0),
        }
    }

    /// Returns the message cap of publisher `index` when the run publishes
    /// `total` messages in all.
    pub fn publisher_cap(&self, index: u32, total: u64) -> u64 {
        let publishers = u64::from(self.publishers);
        total / publishers + u64::from(u64::from(index) < total % publishers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(layout: Layout, subscribers: u32, publishers: u32, shards: u32) -> Placement {
        Placement {
            layout,
            subscribers,
            publishers,
            shards,
            urls: 3,
        }
    }

    #[test]
    fn topics_cover_every_subscriber_once() {
        let plan = placement(Layout::Topics, 10, 3, 2);
        let mut seen = vec![0; 10];
        for publisher in 0..3 {
            let cycle = plan.publisher_topics(publisher);
            for seq in 0..u64::from(cycle.count) {
                let topic = cycle.topic(seq);
                seen[topic as usize] += 1;
                assert_eq!(cycle.position(topic), Some(seq as u32));
                let (first, count) = plan.senders_of(topic);
                assert_eq!((first, count), (publisher, 1));
            }
        }
        assert_eq!(seen, vec![1; 10]);
    }

    #[test]
    fn topics_subscriber_shares_publisher_shard() {
        let plan = placement(Layout::Topics, 100, 6, 4);
        for topic in 0..100 {
            let publisher = topic % 6;
            assert_eq!(
                plan.subscriber_shard(topic),
                plan.publisher_shard(publisher)
            );
        }
    }

    #[test]
    fn topic_seq_is_consecutive_per_topic() {
        let cycle = TopicCycle {
            first: 1,
            step: 3,
            count: 4,
        };
        let seqs: Vec<u64> = (0..20)
            .filter(|&seq| cycle.topic(seq) == 7)
            .map(|seq| cycle.topic_seq(seq))
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn cluster_keeps_subscribers_off_first_url() {
        let plan = placement(Layout::Cluster, 10, 2, 1);
        assert!((0..10).all(|index| plan.subscriber_url(index) != 0));
        assert!((0..2).all(|index| plan.publisher_url(index) == 0));
    }

    #[test]
    fn receivers_count_idle_topics() {
        let plan = placement(Layout::Idle { topics: 3 }, 10, 0, 1);
        let total: u64 = (0..3).map(|topic| plan.receivers(topic)).sum();
        assert_eq!(total, 10);
        assert_eq!(plan.receivers(0), 4);
        assert_eq!(plan.receivers(2), 3);
    }

    #[test]
    fn publisher_caps_sum_to_total() {
        let plan = placement(Layout::Fanout, 10, 3, 1);
        let caps: Vec<u64> = (0..3).map(|index| plan.publisher_cap(index, 10)).collect();
        assert_eq!(caps, [4, 3, 3]);
    }
}
