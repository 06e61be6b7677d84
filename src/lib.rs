//! NexusNode: a thread-per-core WebSocket pub/sub broker.
//!
//! # How a node is built
//!
//! - [`node`] starts one pinned glommio executor per worker core. Each core binds the listen
//!   address with `SO_REUSEPORT`, so the kernel spreads connections over the cores.
//! - [`core`] is one worker core: its connection table, its subscription index ([`topic`]) and
//!   its loops (accept, inbox, flush, heartbeat). Nothing in it is shared with other cores.
//! - [`conn`] serves one connection: the HTTP handshake ([`http`]), then the WebSocket session
//!   ([`session`], framing in [`ws`], the JSON protocol in [`protocol`]).
//! - [`bus`] carries messages between cores through lock-free channels, and [`link`] is the seam
//!   to the rest of a cluster.
//! - [`outbound`] is a connection's bounded send queue; [`codes`] lists every error and close code.
//!
//! # How a message travels
//!
//! A PUBLISH is parsed on the core that owns the publishing connection. That core encodes the
//! delivery frame once, sends it to every other core's inbox and to the cluster link, and queues
//! it for its own subscribers. Each receiving core copies the frame once and queues the same bytes
//! for all of its matching subscribers; a per-core flush then writes each connection's queue with
//! one system call. docs/architecture.md follows a message across two nodes, channel by channel.

#![warn(missing_docs)]

pub mod bus;
pub mod codes;
pub mod config;
pub mod conn;
pub mod core;
pub mod health;
pub mod http;
pub mod link;
pub mod logging;
pub mod node;
pub mod outbound;
pub mod protocol;
pub mod session;
pub mod topic;
pub mod ws;
