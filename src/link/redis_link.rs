//! [`RedisLink`]: the cluster link through Redis pub/sub, and the thread it runs on.
//!
//! The worker cores call the [`ClusterLink`] methods on their own threads. Each call reads atomic
//! flags and pushes onto an unbounded lock-free queue, so a core never waits for Redis I/O. While
//! the link is down, a call also copies the reason text from behind a briefly held mutex.
//! The link thread is pinned to the CPU after the worker cores and runs a tokio current-thread
//! runtime with the tasks of `driver`, `publisher` and `subscriber`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use slog::{error, info, warn, Logger};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use super::driver::{self, Context, Inputs, InterestChange, Shared};
use super::settings::{LinkSettings, Mode};
use super::status::LinkStatus;
use super::{ClusterLink, LinkDown, LinkHealth};
use crate::bus::Publication;
use crate::core::NodeShared;

/// Bytes of accepted publishes not yet written to Redis, past which PUBLISH fails with
/// `cluster_unavailable`. It bounds memory while Redis is slower than the clients.
const MAX_BACKLOG: usize = 64 << 20;

/// The cluster link through Redis.
pub struct RedisLink {
    shared: Arc<Shared>,
    publishes: UnboundedSender<Arc<Publication>>,
    interest: UnboundedSender<InterestChange>,
    waiting: Mutex<Option<Waiting>>,
    running: Mutex<Option<Running>>,
    log: Logger,
}

/// The queue ends that the link thread takes over when it starts.
struct Waiting {
    publishes: UnboundedReceiver<Arc<Publication>>,
    interest: UnboundedReceiver<InterestChange>,
}

/// A started link thread.
struct Running {
    shutdown: oneshot::Sender<()>,
    done: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

impl RedisLink {
    /// Creates the link. It queues what the cores hand it until [`ClusterLink::start`].
    pub fn new(settings: LinkSettings, log: &Logger) -> RedisLink {
        let (publishes, publish_queue) = unbounded_channel();
        let (interest, interest_queue) = unbounded_channel();
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let shared = Shared {
            settings,
            status: Arc::new(LinkStatus::new()),
            backlog: Arc::new(AtomicUsize::new(0)),
            instance: rand::random(),
            started_at,
        };
        RedisLink {
            shared: Arc::new(shared),
            publishes,
            interest,
            waiting: Mutex::new(Some(Waiting {
                publishes: publish_queue,
                interest: interest_queue,
            })),
            running: Mutex::new(None),
            log: log.new(slog::o!("component" => "link")),
        }
    }

    fn log_start(&self, cpu: Option<usize>) {
        let settings = &self.shared.settings;
        let (servers, cluster) = match &settings.mode {
            Mode::Single(endpoint) => (endpoint.to_string(), false),
            Mode::Cluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
                (seeds.join(","), true)
            }
        };
        info!(self.log, "cluster link starting"; "redis" => servers, "cluster" => cluster,
            "prefix" => &settings.prefix, "cpu" => cpu);
    }

    fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
        slot.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl ClusterLink for RedisLink {
    fn publish(&self, publication: &Arc<Publication>) -> Result<(), LinkDown> {
        let status = &self.shared.status;
        if !status.publish_ready() {
            return Err(LinkDown {
                reason: status.reason(),
            });
        }
        let bytes = publication.frame.len();
        let backlog = self.shared.backlog.fetch_add(bytes, Ordering::Relaxed);
        if backlog + bytes > MAX_BACKLOG {
            self.shared.backlog.fetch_sub(bytes, Ordering::Relaxed);
            return Err(LinkDown {
                reason: format!("Redis is not keeping up: {backlog} bytes of publishes are queued"),
            });
        }
        if self.publishes.send(Arc::clone(publication)).is_err() {
            self.shared.backlog.fetch_sub(bytes, Ordering::Relaxed);
            return Err(LinkDown {
                reason: "the cluster link has stopped".to_owned(),
            });
        }
        Ok(())
    }

    fn subscribe(&self, core: usize, pattern: &str) {
        let _ = self.interest.send(InterestChange {
            core,
            pattern: pattern.into(),
            added: true,
        });
    }

    fn unsubscribe(&self, core: usize, pattern: &str) {
        let _ = self.interest.send(InterestChange {
            core,
            pattern: pattern.into(),
            added: false,
        });
    }

    fn health(&self) -> LinkHealth {
        let status = &self.shared.status;
        if status.is_up() {
            LinkHealth::Up
        } else {
            LinkHealth::Down(status.reason())
        }
    }

    fn start(&self, node: &Arc<NodeShared>, listen: SocketAddr) -> std::io::Result<()> {
        let Some(waiting) = Self::take(&self.waiting) else {
            return Ok(());
        };
        let cpu = link_cpu(node.cores.len());
        self.log_start(cpu);

        let (shutdown, shutdown_signal) = oneshot::channel();
        let (done_sender, done) = mpsc::channel();
        let shared = Arc::clone(&self.shared);
        let node = Arc::clone(node);
        let log = self.log.clone();
        let thread = std::thread::Builder::new()
            .name("nexus-link".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                let inputs = Inputs {
                    publishes: waiting.publishes,
                    interest: waiting.interest,
                    shutdown: shutdown_signal,
                };
                run_thread(&shared, node, listen, inputs, &log);
                let _ = done_sender.send(());
            })?;

        let running = Running {
            shutdown,
            done,
            thread,
        };
        *self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(running);
        Ok(())
    }

    fn shutdown(&self) {
        let Some(running) = Self::take(&self.running) else {
            return;
        };
        let _ = running.shutdown.send(());
        // The thread itself waits at most redis_timeout plus one second for its tasks.
        let limit = self.shared.settings.timeout * 2 + Duration::from_secs(2);
        match running.done.recv_timeout(limit) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = running.thread.join();
                info!(self.log, "cluster link stopped");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(self.log, "cluster link did not stop in time"; "waited_ms" => limit.as_millis() as u64);
            }
        }
    }
}

/// Returns the CPU for the link thread: the one after the worker cores, wrapping around when
/// every CPU runs a core.
fn link_cpu(cores: usize) -> Option<usize> {
    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|id| id.id).collect())
        .unwrap_or_default();
    (!cpus.is_empty()).then(|| cpus[cores % cpus.len()])
}

/// Body of the link thread: a current-thread runtime running the driver to its end.
fn run_thread(
    shared: &Shared,
    node: Arc<NodeShared>,
    listen: SocketAddr,
    inputs: Inputs,
    log: &Logger,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(cause) => {
            error!(log, "cluster link runtime failed to start"; "error" => %cause);
            return;
        }
    };
    let ctx = Rc::new(Context::new(shared, node, listen, log.clone()));
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, driver::run(ctx, inputs));
}
