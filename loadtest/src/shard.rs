//! One shard: a single-threaded tokio runtime that runs a share of the
//! subscribers and publishers and collects their results.
//!
//! A shard goes through three steps. Setup connects and subscribes its
//! clients and reports readiness. On the shared start time ("go") the load
//! runs on a timeline that every shard derives from the same start, so the
//! measured windows of all shards line up. At the end, subscribers wait for
//! the drain and the shard returns its [`ShardReport`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use crate::cli::Protocol;
use crate::config::{RunConfig, Scenario};
use crate::payload::StampFinder;
use crate::procfs::{now_ns, thread_cpu_ns};
use crate::publisher::{self, PubSpec};
use crate::report::{CpuSeries, ShardReport, BUCKET_NS};
use crate::subscriber::{self, SubSpec};
use crate::track::InFlight;

/// Interval of the shard's CPU time samples.
const CPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Step of the run that the clients of a shard follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Setup,
    Running,
    /// Every client drops its connection and reconnects.
    Storm,
    Stop,
}

/// Times of one run, derived from the shared start.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    pub go: Instant,
    pub go_ns: i64,
    /// Messages sent from here on count for latency.
    pub measure_start_ns: i64,
    /// Publishers stop here.
    pub publish_end: Instant,
    /// Everything stops here, whatever is still in flight.
    pub end: Instant,
}

impl Timeline {
    /// Builds the timeline of `config` for the start time `go_ns`
    /// (`CLOCK_REALTIME` nanoseconds).
    pub fn new(config: &RunConfig, go_ns: i64) -> Timeline {
        let now = Instant::now();
        let wait = Duration::from_nanos((go_ns - now_ns()).max(0) as u64);
        let go = now + wait;
        let end = match config.scenario {
            Scenario::Storm => go + config.duration,
            _ => go + config.publish_time() + config.drain,
        };
        Timeline {
            go,
            go_ns,
            measure_start_ns: go_ns + config.warmup.as_nanos() as i64,
            publish_end: go + config.publish_time(),
            end,
        }
    }

    /// Returns the index of the 100 ms bucket that contains `at_ns`.
    pub fn bucket(&self, at_ns: i64) -> usize {
        ((at_ns - self.go_ns).max(0) / BUCKET_NS) as usize
    }
}

/// State shared by the tasks of one shard.
pub struct Shard {
    pub config: Arc<RunConfig>,
    pub index: u32,
    pub finder: StampFinder,
    timeline: Cell<Option<Timeline>>,
    pub report: RefCell<ShardReport>,
    pub inflight: InFlight,
    pub phase: watch::Sender<Phase>,
    pub last_delivery_ns: Cell<i64>,
    /// Limits connection attempts in progress during setup.
    pub connect_slots: Semaphore,
    /// Earliest start of the next setup connection when --connect-rate is set.
    next_connect: Cell<Option<Instant>>,
    seed: Cell<u64>,
    /// Clients currently without a connection, in the storm scenario.
    pub storm_down: Cell<u64>,
    /// Clients that dropped at least once, in the storm scenario.
    pub storm_hit: Cell<u64>,
    pub storm_changed: Notify,
}

impl Shard {
    /// Creates the state of shard `index`, before setup.
    pub fn new(config: Arc<RunConfig>, index: u32) -> Shard {
        let inflight = InFlight::new(&config.placement, index, config.in_flight);
        Shard {
            finder: StampFinder::new(config.common.protocol == Protocol::Pusher),
            timeline: Cell::new(None),
            report: RefCell::new(ShardReport {
                shards: 1,
                ..ShardReport::default()
            }),
            inflight,
            phase: watch::channel(Phase::Setup).0,
            last_delivery_ns: Cell::new(0),
            connect_slots: Semaphore::new(config.common.connect_concurrency),
            next_connect: Cell::new(None),
            seed: Cell::new(now_ns() as u64 ^ (u64::from(index) << 48)),
            storm_down: Cell::new(0),
            storm_hit: Cell::new(0),
            storm_changed: Notify::new(),
            config,
            index,
        }
    }

    /// Returns the run's timeline once the run has started.
    pub fn timeline(&self) -> Option<Timeline> {
        self.timeline.get()
    }

    /// Returns a new seed for a client's mask source.
    pub fn next_seed(&self) -> u64 {
        let seed = self.seed.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.seed.set(seed);
        seed
    }

    /// Waits for this shard's turn under --connect-rate, if set.
    pub async fn pace_connect(&self) {
        let Some(rate) = self.config.common.connect_rate else {
            return;
        };
        let per_shard = rate / f64::from(self.config.placement.shards);
        let interval = Duration::from_secs_f64(1.0 / per_shard);
        let now = Instant::now();
        let at = self.next_connect.get().map_or(now, |next| next.max(now));
        self.next_connect.set(Some(at + interval));
        sleep_until(at.into()).await;
    }
}

/// Channels between a shard and the thread that started it.
pub struct ShardLink {
    /// Receives `Ok` when setup is done, or the reason it failed.
    pub ready: std::sync::mpsc::Sender<Result<(), String>>,
    /// Delivers the shared start time in `CLOCK_REALTIME` nanoseconds.
    pub go: oneshot::Receiver<i64>,
}

/// Runs shard `index` on the current thread until the run ends.
pub fn run(config: Arc<RunConfig>, index: u32, link: ShardLink) -> Result<ShardReport, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the runtime of shard {index}: {error}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run_shard(config, index, link))
}

async fn run_shard(
    config: Arc<RunConfig>,
    index: u32,
    link: ShardLink,
) -> Result<ShardReport, String> {
    let shard = Rc::new(Shard::new(config, index));

    let cpu_before = thread_cpu_ns();
    let setup = setup(&shard).await;
    shard.report.borrow_mut().connect.setup_cpu_ns = thread_cpu_ns().saturating_sub(cpu_before);
    let (subscribers, publishers) = match setup {
        Ok(clients) => {
            let _ = link.ready.send(Ok(()));
            clients
        }
        Err(error) => {
            let _ = link.ready.send(Err(error.clone()));
            shard.phase.send_replace(Phase::Stop);
            return Err(error);
        }
    };
    let Ok(go_ns) = link.go.await else {
        shard.phase.send_replace(Phase::Stop);
        return Err("run cancelled before the start".to_string());
    };

    let timeline = Timeline::new(&shard.config, go_ns);
    sleep_until(timeline.go.into()).await;
    shard.timeline.set(Some(timeline));
    shard.phase.send_replace(Phase::Running);
    let sampler = tokio::task::spawn_local(sample_cpu(shard.clone()));

    let publishers: Vec<JoinHandle<()>> = publishers
        .into_iter()
        .map(|client| tokio::task::spawn_local(publisher::run(shard.clone(), client)))
        .collect();
    for task in publishers {
        let _ = task.await;
    }
    wait_for_end(&shard, &timeline).await;

    shard.phase.send_replace(Phase::Stop);
    for task in subscribers {
        let _ = task.await;
    }
    let series = sampler.await.unwrap_or_default();
    let mut report = shard.report.borrow().clone();
    report.thread_cpu.push(series);
    Ok(report)
}

/// Connects this shard's subscribers, then its publishers.
async fn setup(shard: &Rc<Shard>) -> Result<(Vec<JoinHandle<()>>, Vec<publisher::Client>), String> {
    let config = &shard.config;
    let placement = &config.placement;
    let local = placement.local_subscribers(shard.index);
    if config.scenario == Scenario::Storm {
        shard.report.borrow_mut().storm.clients = local.len() as u64;
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let subscribers: Vec<JoinHandle<()>> = local
        .iter()
        .map(|&index| {
            let spec = SubSpec::new(config, index);
            tokio::task::spawn_local(subscriber::run(shard.clone(), spec, ready_tx.clone()))
        })
        .collect();
    drop(ready_tx);
    for _ in 0..local.len() {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => return Err(error),
            None => return Err("a subscriber task ended during setup".to_string()),
        }
    }

    let mut publishers = Vec::new();
    for index in placement.local_publishers(shard.index) {
        let spec = PubSpec::new(config, index);
        publishers.push(publisher::connect(shard, spec).await?);
    }
    Ok((subscribers, publishers))
}

/// Waits until the scenario's end condition holds.
async fn wait_for_end(shard: &Shard, timeline: &Timeline) {
    match shard.config.scenario {
        Scenario::Connections => sleep_until(timeline.publish_end.into()).await,
        Scenario::Storm => wait_for_storm(shard, timeline).await,
        _ => wait_for_drain(shard, timeline).await,
    }
}

/// Waits until no delivery arrived for the drain time, or the end.
///
/// A shard without publishers cannot see when the others stop, so its quiet
/// period starts at the planned end of publishing.
async fn wait_for_drain(shard: &Shard, timeline: &Timeline) {
    if shard
        .config
        .placement
        .local_publishers(shard.index)
        .is_empty()
    {
        sleep_until(timeline.publish_end.into()).await;
    }
    let drain_ns = shard.config.drain.as_nanos() as i64;
    let started_ns = now_ns();
    loop {
        let quiet_end_ns = shard.last_delivery_ns.get().max(started_ns) + drain_ns;
        let now = now_ns();
        if now >= quiet_end_ns || Instant::now() >= timeline.end {
            return;
        }
        let wait = Duration::from_nanos((quiet_end_ns - now) as u64);
        sleep_until((Instant::now() + wait).min(timeline.end).into()).await;
    }
}

/// Triggers the storm when --storm-after is set, then waits until every
/// client dropped and came back, or the end.
async fn wait_for_storm(shard: &Shard, timeline: &Timeline) {
    let clients = shard.report.borrow().storm.clients;
    let storm = async {
        if let Some(after) = shard.config.storm_after {
            sleep_until((timeline.go + after).into()).await;
            shard.phase.send_replace(Phase::Storm);
        }
        loop {
            let notified = shard.storm_changed.notified();
            if clients > 0 && shard.storm_hit.get() == clients && shard.storm_down.get() == 0 {
                return;
            }
            notified.await;
        }
    };
    tokio::select! {
        () = storm => {}
        () = sleep_until(timeline.end.into()) => {}
    }
}

/// Samples this thread's CPU time until the shard stops.
async fn sample_cpu(shard: Rc<Shard>) -> CpuSeries {
    let mut series = CpuSeries::default();
    let mut phase = shard.phase.subscribe();
    let mut ticker = tokio::time::interval(CPU_SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        series.samples.push((now_ns(), thread_cpu_ns()));
        tokio::select! {
            _ = ticker.tick() => {}
            _ = phase.wait_for(|phase| *phase == Phase::Stop) => break,
        }
    }
    series.samples.push((now_ns(), thread_cpu_ns()));
    series
}
