//! The link's health as the worker cores and /health see it, updated by the link's own thread.
//!
//! Each Redis connection reports itself up or down with a reason. The link is up when every
//! connection is; PUBLISH is accepted as long as every publishing connection is up, even while a
//! pub/sub connection reconnects, since the message still reaches the other nodes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::topology::Endpoint;

/// One of the link's Redis connections, or its view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// The list of Redis servers: known at once for one server, read with `CLUSTER SLOTS` for a
    /// Redis Cluster.
    Topology,
    /// The connection that publishes to this server.
    Publisher(Endpoint),
    /// The pub/sub connection to this server.
    Subscriber(Endpoint),
}

impl Component {
    fn describe(&self) -> String {
        match self {
            Component::Topology => "Redis topology".to_owned(),
            Component::Publisher(endpoint) => format!("publishing connection to {endpoint}"),
            Component::Subscriber(endpoint) => format!("pub/sub connection to {endpoint}"),
        }
    }
}

/// A change of the link's overall state, for the lifecycle log.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// Every connection is up now.
    Up,
    /// The first connection went down.
    Down(String),
}

/// Shared health of the link.
#[derive(Debug)]
pub struct LinkStatus {
    up: AtomicBool,
    publish_ready: AtomicBool,
    components: Mutex<BTreeMap<Component, Option<String>>>,
}

impl LinkStatus {
    /// Creates the status of a link that is still connecting.
    pub fn new() -> LinkStatus {
        let mut components = BTreeMap::new();
        components.insert(Component::Topology, Some("connecting to Redis".to_owned()));
        LinkStatus {
            up: AtomicBool::new(false),
            publish_ready: AtomicBool::new(false),
            components: Mutex::new(components),
        }
    }

    /// Returns whether every connection is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Returns whether a publish can be handed to Redis.
    pub fn publish_ready(&self) -> bool {
        self.publish_ready.load(Ordering::Acquire)
    }

    /// Returns why the link is down, or an empty string when it is up.
    pub fn reason(&self) -> String {
        let components = self.lock();
        let down = components.iter().find_map(|(component, error)| {
            let error = error.as_ref()?;
            Some(format!("{}: {error}", component.describe()))
        });
        down.unwrap_or_default()
    }

    /// Records that `component` is up (`None`) or down with a reason.
    pub fn set(&self, component: Component, error: Option<String>) -> Option<Transition> {
        let mut components = self.lock();
        components.insert(component, error);
        self.recompute(&components)
    }

    /// Forgets a connection that the link closed on purpose, such as to a former master.
    pub fn remove(&self, component: &Component) -> Option<Transition> {
        let mut components = self.lock();
        components.remove(component);
        self.recompute(&components)
    }

    fn recompute(&self, components: &BTreeMap<Component, Option<String>>) -> Option<Transition> {
        let all_up = |filter: fn(&Component) -> bool| {
            let mut matching = components.iter().filter(|(c, _)| filter(c)).peekable();
            matching.peek().is_some() && matching.all(|(_, error)| error.is_none())
        };
        let topology_up = components
            .get(&Component::Topology)
            .is_some_and(Option::is_none);
        let publish_ready = topology_up && all_up(|c| matches!(c, Component::Publisher(_)));
        let up = publish_ready && all_up(|c| matches!(c, Component::Subscriber(_)));
        self.publish_ready.store(publish_ready, Ordering::Release);
        let was_up = self.up.swap(up, Ordering::AcqRel);
        match (was_up, up) {
            (false, true) => Some(Transition::Up),
            (true, false) => {
                let reason = components.iter().find_map(|(component, error)| {
                    Some(format!("{}: {}", component.describe(), error.as_ref()?))
                });
                Some(Transition::Down(reason.unwrap_or_default()))
            }
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Component, Option<String>>> {
        self.components
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for LinkStatus {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: 6379,
        }
    }

    #[test]
    fn link_is_up_only_when_every_connection_is() {
        let status = LinkStatus::new();
        assert!(!status.is_up());
        assert_eq!(status.set(Component::Topology, None), None);
        assert_eq!(status.set(Component::Publisher(endpoint()), None), None);
        assert!(status.publish_ready());
        assert!(!status.is_up(), "no pub/sub connection yet");
        assert_eq!(
            status.set(Component::Subscriber(endpoint()), None),
            Some(Transition::Up)
        );
        assert!(status.is_up());
        assert_eq!(status.reason(), "");
    }

    #[test]
    fn lost_pubsub_connection_keeps_publishing_open() {
        let status = LinkStatus::new();
        status.set(Component::Topology, None);
        status.set(Component::Publisher(endpoint()), None);
        status.set(Component::Subscriber(endpoint()), None);
        let transition = status.set(Component::Subscriber(endpoint()), Some("refused".into()));
        assert_eq!(
            transition,
            Some(Transition::Down(
                "pub/sub connection to 127.0.0.1:6379: refused".into()
            ))
        );
        assert!(status.publish_ready());
        assert_eq!(
            status.reason(),
            "pub/sub connection to 127.0.0.1:6379: refused"
        );
    }
}
