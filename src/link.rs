//! The cluster link seam: how worker cores hand publishes and subscription interest to whatever
//! connects this node to others.
//!
//! The single node uses [`LocalLink`], which connects to nothing. Cross-core delivery inside one
//! node never goes through the link: cores send to each other directly (see `bus`). A node
//! started with `--redis` uses [`RedisLink`], which joins the other nodes through Redis pub/sub
//! (docs/architecture.md follows a message through it).

mod connection;
mod driver;
mod envelope;
mod interest;
mod limits;
mod publisher;
mod redis_link;
mod registry;
mod resp;
mod router;
pub mod settings;
mod status;
mod subscriber;
mod topology;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;

use crate::bus::Publication;
use crate::core::NodeShared;

pub use redis_link::RedisLink;

/// The link cannot carry a publish to the cluster right now.
#[derive(Debug, Error)]
#[error("cluster link is down: {reason}")]
pub struct LinkDown {
    /// Why the link is down, for the error frame and /health.
    pub reason: String,
}

/// State of the link as /health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkHealth {
    /// No cluster is configured.
    Standalone,
    /// Connected to the cluster.
    Up,
    /// Configured but disconnected, with the reason.
    Down(String),
}

/// Connects one node to the rest of its cluster.
///
/// Worker cores call these methods from their own threads; implementations hand the work to the
/// link's own core through lock-free channels and never block the caller.
pub trait ClusterLink: Send + Sync {
    /// Hands a publish made on this node to the other nodes.
    fn publish(&self, publication: &Arc<Publication>) -> Result<(), LinkDown>;

    /// Reports that `core` now has its first local subscriber of `pattern`.
    fn subscribe(&self, core: usize, pattern: &str);

    /// Reports that the last local subscriber of `pattern` on `core` has left.
    fn unsubscribe(&self, core: usize, pattern: &str);

    /// Returns the link's current state.
    fn health(&self) -> LinkHealth;

    /// Starts the link's own thread, once every core is listening on `listen`. Until then the
    /// link queues what the cores hand it.
    fn start(&self, _node: &Arc<NodeShared>, _listen: SocketAddr) -> std::io::Result<()> {
        Ok(())
    }

    /// Leaves the cluster: drops every subscription and deregisters the node. Called once, after
    /// every core has drained its clients.
    fn shutdown(&self) {}
}

/// The link of a single node, which has no other nodes to reach.
#[derive(Debug, Default)]
pub struct LocalLink;

impl ClusterLink for LocalLink {
    fn publish(&self, _publication: &Arc<Publication>) -> Result<(), LinkDown> {
        Ok(())
    }

    fn subscribe(&self, _core: usize, _pattern: &str) {}

    fn unsubscribe(&self, _core: usize, _pattern: &str) {}

    fn health(&self) -> LinkHealth {
        LinkHealth::Standalone
    }
}
