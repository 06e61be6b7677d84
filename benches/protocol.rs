//! Micro-benchmarks of the per-message codec work on the PUBLISH path: unmasking a client frame,
//! parsing the request, and encoding the delivery frame that subscribers receive. Each runs on
//! the example PUBLISH from docs/protocol.md and on one whose `data` is about 1 KiB.
//!
//! Run with `cargo bench --bench protocol`.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nexus_node::protocol::{encode_delivery, parse_request, Action};
use nexus_node::ws::{decode_frame, unmask, Decode, FrameKind};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

const TOPIC: &str = "market_updates";

/// The PUBLISH example from docs/protocol.md, byte for byte.
const SMALL_PUBLISH: &str =
    r#"{"action":"PUBLISH","topic":"market_updates","data":{"symbol":"BTC/USD","price":64000}}"#;

/// `data` of the small PUBLISH.
const SMALL_DATA: &str = r#"{"symbol":"BTC/USD","price":64000}"#;

/// The default `max_message_size`, in bytes.
const MAX_MESSAGE: usize = 65_536;

/// Returns an order book snapshot of about 1 KiB as a JSON object.
fn large_data() -> String {
    let mut data = String::from(r#"{"symbol":"BTC/USD","sequence":918273,"levels":["#);
    let mut level = 0;
    while data.len() < 1000 {
        if level > 0 {
            data.push(',');
        }
        let side = if level % 2 == 0 { "bid" } else { "ask" };
        let price = 64_000 + level * 5;
        let size = level + 1;
        write!(
            data,
            r#"{{"side":"{side}","price":{price}.5,"size":{size}.25}}"#
        )
        .expect("writing into a String cannot fail");
        level += 1;
    }
    data.push_str("]}");
    data
}

fn publish_request(data: &str) -> String {
    format!(r#"{{"action":"PUBLISH","topic":"{TOPIC}","data":{data}}}"#)
}

/// Returns `payload` as one final text frame masked with `mask`, as a client sends it.
fn masked_text_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let mut frame = Vec::with_capacity(payload.len() + 14);
    header
        .format(payload.len() as u64, &mut frame)
        .expect("writing into a Vec cannot fail");
    let start = frame.len();
    frame.extend_from_slice(payload);
    // XOR masking is its own inverse, so unmasking the plain payload masks it.
    unmask(&mut frame[start..], mask);
    frame
}

/// Returns the small and the large PUBLISH requests with their names and `data`.
fn cases() -> [(&'static str, String, String); 2] {
    let large = large_data();
    assert!(
        (1000..1100).contains(&large.len()),
        "large data is {} bytes",
        large.len()
    );
    [
        ("small", SMALL_PUBLISH.to_owned(), SMALL_DATA.to_owned()),
        ("1kib", publish_request(&large), large),
    ]
}

fn bench_decode_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_frame");
    for (name, request, _) in cases() {
        let mut frame = masked_text_frame(request.as_bytes(), [0x37, 0xfa, 0x21, 0x3d]);

        // Check the setup once: the frame decodes whole and unmasks to the request.
        let Ok(Decode::Frame(info)) = decode_frame(&mut frame, None, MAX_MESSAGE) else {
            panic!("the {name} frame does not decode");
        };
        assert_eq!(info.kind, FrameKind::Text);
        assert_eq!(info.end, frame.len());
        assert_eq!(&frame[info.payload_start..], request.as_bytes());

        // Decoding unmasks in place and XOR is its own inverse, so the payload is masked and
        // unmasked on alternate iterations. Both cost the same work.
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| decode_frame(black_box(&mut frame), None, MAX_MESSAGE))
        });
    }
    group.finish();
}

fn bench_parse_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_request");
    for (name, request, data) in cases() {
        let parsed = parse_request(request.as_bytes()).expect("the request parses");
        assert_eq!(parsed.action, Action::Publish);
        assert_eq!(parsed.topic.as_deref(), Some(TOPIC));
        assert_eq!(parsed.data, Some(data.as_bytes()));

        group.throughput(Throughput::Bytes(request.len() as u64));
        group.bench_function(format!("publish/{name}"), |b| {
            b.iter(|| parse_request(black_box(request.as_bytes())))
        });
    }
    group.finish();
}

fn bench_encode_delivery(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_delivery");
    for (name, _, data) in cases() {
        let frame = encode_delivery(TOPIC, data.as_bytes());
        let expected = format!(r#"{{"type":"message","topic":"{TOPIC}","data":{data}}}"#);
        assert!(frame.ends_with(expected.as_bytes()));

        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| encode_delivery(black_box(TOPIC), black_box(data.as_bytes())))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_decode_frame,
    bench_parse_request,
    bench_encode_delivery
);
criterion_main!(benches);
