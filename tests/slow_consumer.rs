//! A subscriber that stops reading is closed with 4000 once its outbound queue passes
//! `--max-outbound-queue`, without the node buffering the flood and without losing messages for
//! the subscribers that keep up.

mod common;

use common::client::{Client, Incoming};
use common::{assert_node_serves, Node, EVENT_TIMEOUT};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// 50,000 messages of about 1 KiB each: about 50 MB through the stalled subscriber.
const MESSAGES: u64 = 50_000;
const PAD_BYTES: usize = 1_000;

/// Per-connection outbound limit given to the node (the default, 1 MiB).
const MAX_OUTBOUND_QUEUE: u64 = 1 << 20;

/// Messages the publisher may be ahead of the fast subscriber: about 256 KiB, a quarter of the
/// outbound limit, so the fast subscriber never becomes a slow consumer itself.
const WINDOW: u64 = 256;

/// Allowed growth of the node's VmRSS during the flood.
///
/// The outbound queues are capped at 1 MiB for each of the two subscribers and a request at the
/// 64 KiB message limit, so a node that drops the stalled subscriber needs a few MiB more at
/// most. One that kept queueing for it would grow by most of the 50 MB flood (less the few MiB
/// the kernel's socket buffers absorb), far past this bound.
const MAX_RSS_GROWTH_KIB: u64 = 24 * 1024;

/// Time allowed for the whole flood.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn stalled_subscriber_is_closed_with_4000() {
    let mut node = Node::start_with(&[("--max-outbound-queue", &MAX_OUTBOUND_QUEUE.to_string())]);
    let mut stalled = Client::connect(node.addr);
    stalled.subscribe("flood");
    let stalled_conn = node.connection_opened(stalled.local_addr);
    let mut fast = Client::connect(node.addr);
    fast.subscribe("flood");
    let mut publisher = Client::connect(node.addr);

    let baseline_kib = node.vm_rss_kib();
    let sampler = RssSampler::start(node.pid());
    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_fast_reader(fast, received.clone());
    flood(&mut publisher, &received);

    let fast_result = reader.join().expect("fast reader panicked");
    let peak_kib = sampler.stop();
    fast_result.unwrap_or_else(|problem| panic!("fast subscriber: {problem}"));

    let closed = node.connection_closed(&stalled_conn.conn_id, EVENT_TIMEOUT);
    assert_eq!(closed["close_code"], 4000, "stalled subscriber: {closed}");
    let reason = closed["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "no reason in {closed}");

    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    println!("VmRSS baseline {baseline_kib} KiB, peak {peak_kib} KiB, growth {growth_kib} KiB");
    assert!(
        growth_kib <= MAX_RSS_GROWTH_KIB,
        "VmRSS grew from {baseline_kib} KiB to a peak of {peak_kib} KiB (+{growth_kib} KiB, \
         bound {MAX_RSS_GROWTH_KIB} KiB) while flooding {} MB",
        MESSAGES * PAD_BYTES as u64 / 1_000_000
    );

    let (delivered, close) = drain_stalled(&mut stalled);
    println!("stalled subscriber: {delivered} deliveries, then close frame {close:?}");
    assert!(
        delivered < MESSAGES,
        "the stalled subscriber still got all {MESSAGES} messages"
    );
    if let Some(code) = close {
        assert_eq!(code, 4000, "close frame seen by the stalled subscriber");
    }
    publisher.ping();
    assert_node_serves(&mut node);
}

/// Publishes [`MESSAGES`] messages, staying at most [`WINDOW`] ahead of the fast subscriber.
fn flood(publisher: &mut Client, received: &AtomicU64) {
    let pad = "x".repeat(PAD_BYTES);
    let deadline = Instant::now() + FLOOD_TIMEOUT;
    for n in 0..MESSAGES {
        while n >= received.load(Ordering::Acquire) + WINDOW {
            assert!(
                Instant::now() < deadline,
                "flood stuck: {n} sent, {} received by the fast subscriber",
                received.load(Ordering::Acquire)
            );
            thread::sleep(Duration::from_micros(200));
        }
        publisher.publish_no_ack("flood", &format!(r#"{{"seq":{n},"pad":"{pad}"}}"#));
    }
}

/// Reads every message in order, counting them in `received`.
fn spawn_fast_reader(
    mut fast: Client,
    received: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<(), String>> {
    thread::spawn(move || {
        for expected in 0..MESSAGES {
            let delivery = match fast.read_incoming(EVENT_TIMEOUT) {
                Incoming::Text(text) => text,
                other => return Err(format!("after {expected} messages: {other:?}")),
            };
            let delivery: Value = serde_json::from_str(&delivery).map_err(|e| e.to_string())?;
            if delivery["data"]["seq"] != expected {
                let seq = &delivery["data"]["seq"];
                return Err(format!("message {expected} carried seq {seq}"));
            }
            received.store(expected + 1, Ordering::Release);
        }
        Ok(())
    })
}

/// Reads what the stalled subscriber still has buffered and returns the number of deliveries.
/// The close code is returned too when a close frame got through before the node dropped the
/// connection.
fn drain_stalled(stalled: &mut Client) -> (u64, Option<u16>) {
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match stalled.read_incoming(EVENT_TIMEOUT) {
            Incoming::Text(_) => delivered += 1,
            Incoming::Close(frame) => return (delivered, frame.map(|f| f.code.into())),
            Incoming::Ended(_) => return (delivered, None),
            Incoming::TimedOut => {
                panic!("the node kept the stalled subscriber open after {delivered} deliveries")
            }
        }
    }
    panic!("still draining the stalled subscriber after 30 s ({delivered} deliveries)");
}

/// Samples a process's VmRSS every 20 ms on a thread and keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(common::vm_rss_kib(pid).unwrap_or(0));
                thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { stop, handle }
    }

    /// Stops sampling and returns the peak in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("RSS sampler panicked")
    }
}
