//! Micro-benchmark of local fan-out on one core: `Core::publish` queuing one delivery frame for
//! 1,000 subscribed connections, in memory.
//!
//! The core runs without its executor, so no socket is written: each connection gets a fake file
//! descriptor. Timed are `Core::publish`, which copies the frame once into a shared buffer and
//! keeps it for the flush round, and `Core::deliver_undelivered`, which the flush round calls
//! first: it matches the topic in the subscription index, queues the frame on each connection
//! and adds each connection to the flush list. Between iterations the benchmark takes the flush
//! list with `Core::take_dirty`, as the flush loop does, and empties every queue as a complete
//! write would. Divide the time per publish by 1,000 for the time per delivery. The second group
//! publishes a run of 100 messages on the topic before the flush round queues them.
//!
//! Run with `cargo bench --bench fanout`.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nexus_node::bus::{self, CoreReceiver};
use nexus_node::config::{Args, Config};
use nexus_node::core::{Conn, Core, NodeShared};
use nexus_node::link::LocalLink;
use nexus_node::protocol::encode_delivery;

const SUBSCRIBERS: usize = 1_000;

const TOPIC: &str = "market_updates";

/// Messages in the run of the second benchmark group.
const RUN: usize = 100;

/// `data` of the PUBLISH example in docs/protocol.md.
const DATA: &[u8] = br#"{"symbol":"BTC/USD","price":64000}"#;

/// File descriptor given to every connection in place of a socket. Nothing writes to it because
/// the flush loop is not running.
const FAKE_FD: i32 = -1;

/// One core of a single-core node, with its connections.
struct Bench {
    core: Rc<Core>,
    conns: Vec<Rc<Conn>>,
    /// Kept so that the core's inbox stays open; a single core never sends to it.
    _inbox: CoreReceiver,
}

/// Builds a single-core node with default settings and registers `SUBSCRIBERS` connections,
/// each subscribed to every pattern in `patterns`.
fn build(patterns: &[&str]) -> Bench {
    let args = Args {
        cores: Some(1),
        node_id: Some("bench".to_owned()),
        ..Args::default()
    };
    let config = Config::from_args(args).expect("default settings are valid");
    let (sender, inbox) = bus::inbox();
    let node = Arc::new(NodeShared {
        config,
        cores: vec![sender],
        connections: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        intake_stopped: AtomicUsize::new(0),
        link: Arc::new(LocalLink),
        started: Instant::now(),
    });
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let core = Core::new(0, node, &log);

    let mut conns = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let conn = core.register(FAKE_FD).expect("below max_connections");
        for pattern in patterns {
            assert!(core.add_subscription(pattern, &conn));
        }
        conns.push(conn);
    }
    Bench {
        core,
        conns,
        _inbox: inbox,
    }
}

/// Empties the queue of every connection marked since the last call, as a complete write
/// would, and returns how many there were.
fn drain(core: &Core, batch: &mut Vec<Rc<Conn>>) -> usize {
    core.take_dirty(batch);
    let count = batch.len();
    for conn in batch.drain(..) {
        let mut out = conn.out.borrow_mut();
        let pending = out.pending_bytes();
        out.consume(pending);
    }
    count
}

/// Publishes once and checks that the frame is queued exactly once on each connection.
fn check_delivery(bench: &Bench, frame: &[u8]) {
    bench
        .core
        .publish(TOPIC, frame.to_vec())
        .expect("a local link never fails");
    bench.core.deliver_undelivered();
    for conn in &bench.conns {
        let out = conn.out.borrow();
        assert_eq!(out.head(), Some(frame), "connection {}", conn.id);
        assert_eq!(out.pending_bytes(), frame.len(), "connection {}", conn.id);
        assert_eq!(conn.close_request(), None, "connection {}", conn.id);
    }
    let mut batch = Vec::new();
    assert_eq!(drain(&bench.core, &mut batch), SUBSCRIBERS);
}

fn bench_fanout(c: &mut Criterion) {
    let frame = encode_delivery(TOPIC, DATA);
    let cases: [(&str, &[&str]); 2] = [
        // Every connection subscribes to the exact topic.
        ("exact", &[TOPIC]),
        // Every connection also subscribes to `*`, so the index yields each connection twice and
        // the core drops the second match.
        ("exact_and_wildcard", &[TOPIC, "*"]),
    ];

    let mut group = c.benchmark_group("fanout_1000");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for (name, patterns) in cases {
        let bench = build(patterns);
        check_delivery(&bench, &frame);

        let mut batch = Vec::with_capacity(SUBSCRIBERS);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    // The session hands `publish` a fresh frame for each PUBLISH.
                    let frame = frame.clone();
                    let start = Instant::now();
                    let result = bench.core.publish(black_box(TOPIC), frame);
                    bench.core.deliver_undelivered();
                    elapsed += start.elapsed();
                    assert!(result.is_ok());
                    drain(&bench.core, &mut batch);
                }
                elapsed
            })
        });
    }
    group.finish();

    // A run of messages on one topic read in one round, as a busy publisher produces: the core
    // matches the topic once and touches each connection once for the whole run.
    let mut group = c.benchmark_group("fanout_1000_run_of_100");
    group.throughput(Throughput::Elements((SUBSCRIBERS * RUN) as u64));
    let bench = build(&[TOPIC]);
    let mut batch = Vec::with_capacity(SUBSCRIBERS);
    group.bench_function("exact", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let frames: Vec<Vec<u8>> = (0..RUN).map(|_| frame.clone()).collect();
                let start = Instant::now();
                for frame in frames {
                    let result = bench.core.publish(black_box(TOPIC), frame);
                    assert!(result.is_ok());
                }
                bench.core.deliver_undelivered();
                elapsed += start.elapsed();
                assert_eq!(drain(&bench.core, &mut batch), SUBSCRIBERS);
            }
            elapsed
        })
    });
    group.finish();
}

criterion_group!(benches, bench_fanout);
criterion_main!(benches);
