//! Per-subscriber sequence checks and the publishers' in-flight windows.

use std::cell::{Cell, RefCell};

use tokio::sync::Notify;

use crate::placement::{Placement, TopicCycle};

/// How far back a [`SeqTrack`] remembers which messages arrived.
const SEEN_WINDOW: u64 = 64;

/// Order of one message's arrival relative to the others from its
/// publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Later than every message seen before from this publisher.
    InOrder,
    /// Received before.
    Duplicate,
    /// Earlier than a message already received: out of order. Messages more
    /// than 64 positions back are counted here even when they are duplicates,
    /// because the track no longer remembers them.
    Late,
}

/// Order check for the messages one subscriber receives from one publisher
/// on one topic, whose positions are consecutive from 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTrack {
    next: u64,
    /// Bit `i` is set when position `next - 1 - i` arrived.
    seen: u64,
}

impl SeqTrack {
    /// Records the arrival of position `seq`.
    pub fn observe(&mut self, seq: u64) -> Arrival {
        if seq >= self.next {
            let shift = seq - self.next + 1;
            self.seen = if shift >= SEEN_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.next = seq + 1;
            return Arrival::InOrder;
        }
        let back = self.next - 1 - seq;
        if back >= SEEN_WINDOW {
            return Arrival::Late;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            Arrival::Duplicate
        } else {
            self.seen |= bit;
            Arrival::Late
        }
    }
}

/// In-flight window of one local publisher.
///
/// A message leaves the window when every live subscriber of its topic in
/// this shard has received it; `counts` contains the receipts of the messages
/// still in the window, indexed by `seq % limit`.
struct Window {
    limit: u64,
    published: u64,
    completed: u64,
    counts: Vec<u32>,
    cycle: TopicCycle,
    /// For each topic position in `cycle`, whether its local subscriber
    /// still runs (topics layout only).
    topic_alive: Vec<bool>,
}

/// The in-flight windows of the publishers of one shard.
pub struct InFlight {
    enabled: bool,
    shards: u32,
    shard: u32,
    per_topic: bool,
    windows: RefCell<Vec<Window>>,
    wakers: Vec<Notify>,
    /// Live local subscribers, for layouts where every subscriber receives
    /// every message.
    live_subscribers: Cell<u64>,
}

impl InFlight {
    /// Creates the windows of `shard`'s publishers; `limit` is the total
    /// number of messages in flight across all publishers, or `None` for no
    /// limit.
    pub fn new(placement: &Placement, shard: u32, limit: Option<u64>) -> InFlight {
        let per_publisher = limit
            .map(|total| {
                total
                    .div_ceil(u64::from(placement.publishers.max(1)))
                    .max(1)
            })
            .unwrap_or(0);
        let windows: Vec<Window> = placement
            .local_publishers(shard)
            .into_iter()
            .map(|publisher| {
                let cycle = placement.publisher_topics(publisher);
                Window {
                    limit: per_publisher,
                    published: 0,
                    completed: 0,
                    counts: vec![0; per_publisher as usize],
                    cycle,
                    topic_alive: vec![true; cycle.count as usize],
                }
            })
            .collect();
        let live = placement.local_subscribers(shard).len() as u64;
        InFlight {
            enabled: limit.is_some(),
            shards: placement.shards,
            shard,
            per_topic: matches!(placement.layout, crate::placement::Layout::Topics),
            wakers: windows.iter().map(|_| Notify::new()).collect(),
            windows: RefCell::new(windows),
            live_subscribers: Cell::new(live),
        }
    }

    fn local_index(&self, publisher: u32) -> Option<usize> {
        (publisher % self.shards == self.shard).then_some((publisher / self.shards) as usize)
    }

    /// Returns how many more messages `publisher` may send now.
    pub fn room(&self, publisher: u32) -> u64 {
        if !self.enabled {
            return u64::MAX;
        }
        let windows = self.windows.borrow();
        let Some(window) = self.local_index(publisher).and_then(|i| windows.get(i)) else {
            return u64::MAX;
        };
        window.limit - (window.published - window.completed)
    }

    /// Records that `publisher` sent `count` more messages.
    pub fn on_publish(&self, publisher: u32, count: u64) {
        if !self.enabled {
            return;
        }
        if let Some(index) = self.local_index(publisher) {
            let mut windows = self.windows.borrow_mut();
            windows[index].published += count;
            self.advance(&mut windows[index], index);
        }
    }

    /// Records that a local subscriber received message `seq` of `publisher`.
    pub fn on_delivery(&self, publisher: u32, seq: u64) {
        if !self.enabled {
            return;
        }
        let Some(index) = self.local_index(publisher) else {
            return;
        };
        let mut windows = self.windows.borrow_mut();
        let Some(window) = windows.get_mut(index) else {
            return;
        };
        if seq < window.completed || seq >= window.published {
            return;
        }
        window.counts[(seq % window.limit) as usize] += 1;
        self.advance(window, index);
    }

    /// Stops waiting for a local subscriber that lost its connection.
    pub fn on_subscriber_lost(&self, topic: u32) {
        if !self.enabled {
            return;
        }
        let mut windows = self.windows.borrow_mut();
        if !self.per_topic {
            self.live_subscribers
                .set(self.live_subscribers.get().saturating_sub(1));
        }
        for (index, window) in windows.iter_mut().enumerate() {
            if self.per_topic {
                match window.cycle.position(topic) {
                    Some(position) => window.topic_alive[position as usize] = false,
                    None => continue,
                }
            }
            self.advance(window, index);
        }
    }

    /// Takes every message of `publisher` out of the window, for when the
    /// missing receipts have not come for too long.
    pub fn give_up(&self, publisher: u32) {
        if let Some(index) = self.local_index(publisher) {
            let mut windows = self.windows.borrow_mut();
            let window = &mut windows[index];
            window.counts.fill(0);
            window.completed = window.published;
        }
    }

    /// Waits until a message of `publisher` leaves the window.
    pub async fn changed(&self, publisher: u32) {
        match self.local_index(publisher).and_then(|i| self.wakers.get(i)) {
            Some(waker) => waker.notified().await,
            None => std::future::pending().await,
        }
    }

    fn advance(&self, window: &mut Window, index: usize) {
        let before = window.completed;
        while window.completed < window.published {
            let slot = (window.completed % window.limit) as usize;
            let need = if self.per_topic {
                let position = window.completed % u64::from(window.cycle.count);
                u32::from(window.topic_alive[position as usize])
            } else {
                self.live_subscribers.get().min(u64::from(u32::MAX)) as u32
            };
            if window.counts[slot] < need {
                break;
            }
            window.counts[slot] = 0;
            window.completed += 1;
        }
        if window.completed > before {
            self.wakers[index].notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Layout;

    #[test]
    fn seq_track_classifies_arrivals() {
        let mut track = SeqTrack::default();
        assert_eq!(track.observe(0), Arrival::InOrder);
        assert_eq!(track.observe(1), Arrival::InOrder);
        assert_eq!(track.observe(1), Arrival::Duplicate);
        assert_eq!(track.observe(4), Arrival::InOrder);
        assert_eq!(track.observe(2), Arrival::Late);
        assert_eq!(track.observe(2), Arrival::Duplicate);
        assert_eq!(track.observe(3), Arrival::Late);
        assert_eq!(track.observe(0), Arrival::Duplicate);
    }

    #[test]
    fn seq_track_forgets_after_window() {
        let mut track = SeqTrack::default();
        assert_eq!(track.observe(0), Arrival::InOrder);
        assert_eq!(track.observe(200), Arrival::InOrder);
        assert_eq!(track.observe(0), Arrival::Late);
        assert_eq!(track.observe(150), Arrival::Late);
        assert_eq!(track.observe(150), Arrival::Duplicate);
    }

    fn fanout(subscribers: u32, publishers: u32) -> Placement {
        Placement {
            layout: Layout::Fanout,
            subscribers,
            publishers,
            shards: 1,
            urls: 1,
        }
    }

    #[test]
    fn window_waits_for_every_subscriber() {
        let inflight = InFlight::new(&fanout(2, 1), 0, Some(3));
        assert_eq!(inflight.room(0), 3);
        inflight.on_publish(0, 3);
        assert_eq!(inflight.room(0), 0);
        inflight.on_delivery(0, 0);
        assert_eq!(inflight.room(0), 0);
        inflight.on_delivery(0, 0);
        assert_eq!(inflight.room(0), 1);
        inflight.on_delivery(0, 2);
        inflight.on_delivery(0, 2);
        assert_eq!(inflight.room(0), 1, "message 1 still open");
        inflight.on_delivery(0, 1);
        inflight.on_delivery(0, 1);
        assert_eq!(inflight.room(0), 3);
    }

    #[test]
    fn window_splits_limit_over_publishers() {
        let inflight = InFlight::new(&fanout(1, 4), 0, Some(10));
        assert_eq!(inflight.room(0), 3);
        assert_eq!(inflight.room(3), 3);
    }

    #[test]
    fn window_stops_waiting_for_lost_subscriber() {
        let inflight = InFlight::new(&fanout(2, 1), 0, Some(2));
        inflight.on_publish(0, 2);
        inflight.on_delivery(0, 0);
        inflight.on_delivery(0, 1);
        assert_eq!(inflight.room(0), 0);
        inflight.on_subscriber_lost(0);
        assert_eq!(inflight.room(0), 2);
    }

    #[test]
    fn window_per_topic_needs_that_topic_only() {
        let placement = Placement {
            layout: Layout::Topics,
            subscribers: 4,
            publishers: 2,
            shards: 1,
            urls: 1,
        };
        let inflight = InFlight::new(&placement, 0, Some(4));
        inflight.on_publish(0, 2);
        inflight.on_delivery(0, 0);
        assert_eq!(inflight.room(0), 1);
        inflight.on_subscriber_lost(2);
        assert_eq!(inflight.room(0), 2, "topic 2 lost its subscriber");
    }

    #[test]
    fn window_give_up_empties_it() {
        let inflight = InFlight::new(&fanout(1, 1), 0, Some(2));
        inflight.on_publish(0, 2);
        inflight.give_up(0);
        assert_eq!(inflight.room(0), 2);
    }

    #[test]
    fn unlimited_window_has_room() {
        let inflight = InFlight::new(&fanout(1, 1), 0, None);
        inflight.on_publish(0, 1000);
        assert_eq!(inflight.room(0), u64::MAX);
    }
}
