//! Micro-benchmarks of topic routing on one core: matching a published topic against a
//! [`SubscriptionIndex`] that contains 10,000 wildcard patterns and 10,000 exact topics, and
//! validating a PUBLISH topic.
//!
//! Run with `cargo bench --bench topic_match`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use nexus_node::topic::{validate_topic, SubscriptionIndex};

const WILDCARD_PATTERNS: u32 = 10_000;
const EXACT_TOPICS: u32 = 10_000;

/// Returns the `n`-th wildcard pattern, cycling through four shapes so that the trie has wide
/// literal levels, a busy `*` child at the root and `>` leaves.
fn wildcard_pattern(n: u32) -> String {
    match n % 4 {
        0 => format!("tenant-{n}.*.created"),
        1 => format!("tenant-{n}.orders.>"),
        2 => format!("*.device-{n}.status"),
        _ => format!("region-{}.tenant-{n}.*", n % 50),
    }
}

fn build_index() -> SubscriptionIndex<u32> {
    let mut index = SubscriptionIndex::new();
    for n in 0..WILDCARD_PATTERNS {
        let inserted = index.insert(&wildcard_pattern(n), n);
        assert!(inserted.is_added());
    }
    for n in 0..EXACT_TOPICS {
        let inserted = index.insert(&format!("tenant-{n}.orders.created"), WILDCARD_PATTERNS + n);
        assert!(inserted.is_added());
    }
    index
}

fn count_matches(index: &SubscriptionIndex<u32>, topic: &str) -> usize {
    let mut count = 0;
    index.for_each_match(topic, |value| {
        black_box(value);
        count += 1;
    });
    count
}

fn bench_match(c: &mut Criterion) {
    let index = build_index();

    // Each topic is checked here so that a change in the pattern shapes cannot silently turn a
    // hit into a miss.
    let cases = [
        // The exact topic and `tenant-41.orders.>`.
        ("hit_exact_and_tail", "tenant-41.orders.created", 2),
        // `tenant-40.*.created` through the `*` child of a wide literal level.
        ("hit_single_wildcard", "tenant-40.shipments.created", 1),
        // `*.device-42.status` through the root `*` child.
        ("hit_root_wildcard", "site-9.device-42.status", 1),
        // Walks the `*` child of the root and finds nothing.
        ("miss", "metrics.cpu.load", 0),
    ];

    let mut group = c.benchmark_group("subscription_index");
    for (name, topic, expected) in cases {
        assert_eq!(count_matches(&index, topic), expected, "topic {topic}");
        group.bench_function(format!("for_each_match/{name}"), |b| {
            b.iter(|| count_matches(&index, black_box(topic)))
        });
    }
    group.bench_function("has_match/miss", |b| {
        b.iter(|| index.has_match(black_box("metrics.cpu.load")))
    });
    group.finish();
}

fn bench_validate(c: &mut Criterion) {
    c.bench_function("validate_topic", |b| {
        b.iter(|| validate_topic(black_box("tenant-41.orders.eu-west.created"), 255))
    });
}

criterion_group!(benches, bench_match, bench_validate);
criterion_main!(benches);
