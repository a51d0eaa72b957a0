//! Decode cost of typical client frames, run by hand (numbers vary with the machine, so
//! nothing asserts them):
//! `cargo run --release -p tandem-protocol --example decode_bench`

use std::hint::black_box;
use std::time::{Duration, Instant};
use tandem_protocol::decode_client_frame;

const ROUNDS: u32 = 100_000;

const FRAMES: [(&str, &str); 4] = [
    ("ping", r#"{"type":"ping","id":1}"#),
    (
        "update, 1 patch",
        r#"{"type":"update","id":42,"dataset":{"name":"todo"},"deviceId":"phone-1","patches":[{"op":"replace","key":"milk","value":"2 litres","syncCount":7,"deviceLastModified":1700000000000}]}"#,
    ),
    (
        "update, 10 patches",
        r#"{"type":"update","id":"u-42","dataset":{"owner":"alice","name":"groceries"},"deviceId":"phone-1","patches":[{"op":"replace","key":"k0","value":"value 0","syncCount":7},{"op":"replace","key":"k1","value":"value 1","syncCount":7},{"op":"replace","key":"k2","value":"value 2","syncCount":7},{"op":"replace","key":"k3","value":"value 3","syncCount":7},{"op":"replace","key":"k4","value":"value 4","syncCount":7},{"op":"remove","key":"k5","syncCount":7},{"op":"replace","key":"k6","value":"value 6","syncCount":7},{"op":"replace","key":"k7","value":"value 7","syncCount":7},{"op":"replace","key":"k8","value":"value 8","syncCount":7},{"op":"replace","key":"k9","value":"value 9","syncCount":7}]}"#,
    ),
    ("malformed", "{not json"),
];

fn main() {
    for (name, text) in FRAMES {
        // The best of five runs: the others measure what else the machine was doing.
        let best = (0..5).map(|_| time(text)).min().unwrap_or_default();
        println!(
            "{name:<20} {:>7.0} ns/decode ({} bytes)",
            best.as_nanos() as f64 / f64::from(ROUNDS),
            text.len()
        );
    }
}

fn time(text: &str) -> Duration {
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let _ = black_box(decode_client_frame(black_box(text)));
    }
    start.elapsed()
}
