//! Feeds arbitrary bytes to every decoding entry point, outside and inside a stream.
//!
//! Beyond "never panics", it checks two invariants: a failed decode leaves the stream state
//! unchanged, and anything that decodes re-encodes to bytes that decode to the same message.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast_pgoutput::{encode, Decoder, ReplicationFrame, StandbyStatusUpdate};

fn check(decoder: &Decoder, data: &Bytes) {
    let mut d = decoder.clone();
    match d.decode(data) {
        Ok(m) => {
            let again = encode::message_to_bytes(&m)
                .expect("invariant: a decoded message is always encodable");
            let mut d2 = decoder.clone();
            assert_eq!(d2.decode(&again), Ok(m), "decode(encode(m)) != m");
            assert_eq!(d2, d, "re-decoding must reach the same stream state");
        }
        Err(_) => assert_eq!(&d, decoder, "a failed decode changed the stream state"),
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);

    let outside = Decoder::new();
    let mut inside = Decoder::new();
    inside
        .decode(&Bytes::from_static(&[b'S', 0, 0, 0x02, 0xF1, 1]))
        .expect("invariant: a well-formed Stream Start decodes");

    let _ = StandbyStatusUpdate::parse(data);
    if let Ok(ReplicationFrame::XLogData(x)) = ReplicationFrame::parse(bytes.clone()) {
        check(&outside, &x.data);
        check(&inside, &x.data);
    }
    check(&outside, &bytes);
    check(&inside, &bytes);
});
