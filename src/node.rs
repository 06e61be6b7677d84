//! Starting and stopping a node: one pinned glommio executor per worker core, the signal
//! handler, and the wait for every core to drain.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use slog::{info, Logger};
use thiserror::Error;

use crate::bus::{self, CoreMessage, CoreReceiver};
use crate::config::Config;
use crate::core::{Core, NodeShared};
use crate::link::settings::LinkSettings;
use crate::link::{ClusterLink, LocalLink, RedisLink};

/// Locked memory each core's executor registers for its I/O buffers, in bytes. The node does no
/// file I/O, so it keeps this far below glommio's 10 MiB default and the usual 8 MiB memlock limit.
const IO_MEMORY: usize = 256 * 1024;

/// Submission queue entries of each core's io_uring. The kernel sizes the ring's table of
/// pending polls from this, and every connection keeps one poll pending, so a deep ring keeps
/// cancellations cheap with tens of thousands of connections per core.
const RING_DEPTH: usize = 4096;

/// The fix for a runtime that failed because of the locked-memory limit.
const MEMLOCK_FIX: &str = "Each core locks about 512 KiB for its io_uring buffers: raise the \
    locked-memory limit (`ulimit -l 8192`, LimitMEMLOCK= in systemd, or `ulimits: memlock` in \
    docker-compose.yml)";

/// The fix for a runtime that failed for any other reason, usually io_uring itself.
const IO_URING_FIX: &str = "NexusNode needs io_uring: Linux 5.8 or later, with io_uring not \
    disabled (sysctl kernel.io_uring_disabled=0) and not blocked by seccomp. Docker 25 and later \
    block it by default, so run the container with deploy/seccomp-io-uring.json as its seccomp \
    profile";

/// Returns a runtime start error with the fix that matches its cause.
fn runtime_error(core: usize, cause: String) -> NodeError {
    let fix = if cause.contains("MemLock") {
        MEMLOCK_FIX
    } else {
        IO_URING_FIX
    };
    NodeError::Runtime { core, cause, fix }
}

/// A failure that stops the node from starting.
#[derive(Debug, Error)]
pub enum NodeError {
    /// io_uring or its locked memory is unavailable.
    #[error("cannot start the io_uring runtime for core {core}: {cause}. {fix}")]
    Runtime {
        /// The core whose executor failed.
        core: usize,
        /// glommio's error.
        cause: String,
        /// The operator's fix.
        fix: &'static str,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        cause: String,
    },
    /// The signal handler could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handler: {0}")]
    Signals(std::io::Error),
    /// The cluster link could not be set up or its thread started.
    #[error("cannot start the cluster link: {0}")]
    Link(String),
}

/// Runs a node until SIGINT or SIGTERM, then drains it and returns.
///
/// With `redis_url` set the node joins a cluster through [`RedisLink`]; without it, it runs
/// alone with [`LocalLink`].
pub fn run(config: Config, log: Logger) -> Result<(), NodeError> {
    let link: Arc<dyn ClusterLink> = match LinkSettings::from_config(&config) {
        Ok(Some(settings)) => Arc::new(RedisLink::new(settings, &log)),
        Ok(None) => Arc::new(LocalLink),
        Err(cause) => return Err(NodeError::Link(cause)),
    };
    run_with_link(config, link, log)
}

/// Runs a node with the given cluster link until SIGINT or SIGTERM.
pub fn run_with_link(
    config: Config,
    link: Arc<dyn ClusterLink>,
    log: Logger,
) -> Result<(), NodeError> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.cores).map(|_| bus::inbox()).unzip();
    let node = Arc::new(NodeShared {
        config,
        cores: senders,
        connections: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        intake_stopped: AtomicUsize::new(0),
        link,
        started: Instant::now(),
    });
    install_signal_handler(&node, &log)?;

    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|id| id.id).collect())
        .unwrap_or_default();
    let mut listen = probe_listen_address(node.config.listen)?;
    // Held until the process exits, which releases it at once, even on SIGKILL.
    let _address_lock = lock_listen_address(listen)?;
    let mut handles = Vec::with_capacity(receivers.len());
    for (id, receiver) in receivers.into_iter().enumerate() {
        let cpu = cpus.get(id % cpus.len().max(1)).copied();
        let (handle, bound) = start_core(id, cpu, listen, receiver, &node, &log)?;
        // Core 0 resolves port 0; the others bind the same port with SO_REUSEPORT.
        listen = bound;
        handles.push(handle);
    }
    node.link
        .start(&node, listen)
        .map_err(|error| NodeError::Link(error.to_string()))?;
    info!(log, "node started";
        "listen" => %listen, "cores" => node.cores.len(), "node_id" => &node.config.node_id,
        "max_connections" => node.config.max_connections,
        "max_message_size" => node.config.max_message_size,
        "ping_interval_ms" => node.config.ping_interval.as_millis() as u64,
        "pong_timeout_ms" => node.config.pong_timeout.as_millis() as u64,
        "cluster" => node.config.redis_url.is_some());

    for (id, handle) in handles.into_iter().enumerate() {
        if let Err(error) = handle.join() {
            slog::error!(log, "core failed"; "core" => id, "error" => %error);
        }
    }
    node.link.shutdown();
    info!(log, "node stopped"; "node_id" => &node.config.node_id);
    Ok(())
}

type CoreHandle = glommio::ExecutorJoinHandle<()>;

fn start_core(
    id: usize,
    cpu: Option<usize>,
    listen: SocketAddr,
    receiver: CoreReceiver,
    node: &Arc<NodeShared>,
    log: &Logger,
) -> Result<(CoreHandle, SocketAddr), NodeError> {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let (ready_tx, ready_rx) = mpsc::channel();
    let node = Arc::clone(node);
    let log = log.clone();
    let handle = LocalExecutorBuilder::new(placement)
        .name(&format!("nexus-core-{id}"))
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH)
        .spawn(move || async move {
            let (listener, listener_fd) = match bind_listener(listen) {
                Ok(bound) => bound,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
            };
            let bound = listener.local_addr().unwrap_or(listen);
            let _ = ready_tx.send(Ok(bound));
            Core::new(id, node, &log)
                .run(listener, listener_fd, receiver)
                .await;
        })
        .map_err(|error| runtime_error(id, error.to_string()))?;

    match ready_rx.recv() {
        Ok(Ok(bound)) => Ok((handle, bound)),
        Ok(Err(cause)) => Err(NodeError::Bind {
            addr: listen,
            cause,
        }),
        // The executor thread ended before running the core: its runtime failed to start.
        Err(_) => {
            let cause = match handle.join() {
                Err(error) => error.to_string(),
                Ok(()) => "executor stopped at start".to_owned(),
            };
            Err(runtime_error(id, cause))
        }
    }
}

/// Backlog of each core's listening socket. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds one core's listening socket on `addr`, shared with the other cores through
/// `SO_REUSEPORT` so that the kernel spreads new connections over them.
///
/// `SO_REUSEADDR` is set too. Accepted sockets inherit it, so the connections a node closed
/// itself, which linger in TIME_WAIT for a minute, do not keep a restarted node from binding
/// the port, neither here nor in `probe_listen_address`.
fn bind_listener(addr: SocketAddr) -> std::io::Result<(TcpListener, RawFd)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};

    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY on Linux: each delivery leaves at once.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let fd = socket.into_raw_fd();
    // SAFETY: the descriptor is a bound, listening TCP socket that nothing else owns.
    Ok((unsafe { TcpListener::from_raw_fd(fd) }, fd))
}

/// Checks that no other process listens on `addr`, and resolves port 0 to a free port.
///
/// The cores bind with `SO_REUSEPORT`, which would let a second node of the same user share the
/// port and silently take part of its connections. A plain bind without that option fails while
/// any other socket listens there.
///
/// A node that has just exited can leave its listening sockets in place for a few milliseconds
/// while the kernel tears down its io_uring instances. A taken port is therefore tried again for
/// up to `PROBE_RETRY` before the node gives up.
fn probe_listen_address(addr: SocketAddr) -> Result<SocketAddr, NodeError> {
    let deadline = Instant::now() + PROBE_RETRY;
    let probe = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => break probe,
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                return Err(NodeError::Bind {
                    addr,
                    cause: format!("{error} (is another node running on this port?)"),
                })
            }
        }
    };
    probe.local_addr().map_err(|error| NodeError::Bind {
        addr,
        cause: error.to_string(),
    })
}

/// How long a taken listen address is tried again at start.
const PROBE_RETRY: Duration = Duration::from_millis(300);

/// Takes a lock named after `addr` that only one process on this host (network namespace) can
/// hold: a Unix socket bound to an abstract name, which the kernel releases when the process
/// exits.
///
/// `probe_listen_address` cannot see a node that probed the same port a moment earlier and has
/// not bound it yet. Without this lock, two nodes started together would both pass the probe and
/// share the port through `SO_REUSEPORT`.
fn lock_listen_address(addr: SocketAddr) -> Result<std::os::unix::net::UnixListener, NodeError> {
    use std::os::linux::net::SocketAddrExt;

    let name = format!("nexus-node/{addr}");
    let lock = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|lock| std::os::unix::net::UnixListener::bind_addr(&lock));
    lock.map_err(|error| NodeError::Bind {
        addr,
        cause: match error.kind() {
            std::io::ErrorKind::AddrInUse => {
                "another node is starting or running on this address".to_owned()
            }
            _ => format!("cannot take the address lock `@{name}`: {error}"),
        },
    })
}

/// Stops every core from reading requests, and waits until all have stopped, for at most a
/// second. A publish that one core accepted before it stopped is then already in the other
/// cores' inboxes ahead of their Shutdown message, so it reaches subscribers before they close.
fn stop_intake(node: &NodeShared) {
    for core in &node.cores {
        core.send(CoreMessage::StopIntake);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while node.intake_stopped.load(Ordering::Acquire) < node.cores.len()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn install_signal_handler(node: &Arc<NodeShared>, log: &Logger) -> Result<(), NodeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(NodeError::Signals)?;
    let node = Arc::clone(node);
    let log = log.clone();
    std::thread::Builder::new()
        .name("nexus-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!(log, "shutdown started"; "signal" => signal,
                    "drain_timeout_ms" => node.config.drain_timeout.as_millis() as u64);
                node.shutting_down.store(true, Ordering::Relaxed);
                stop_intake(&node);
                for core in &node.cores {
                    core.send(CoreMessage::Shutdown);
                }
            }
        })
        .map_err(NodeError::Signals)?;
    Ok(())
}
