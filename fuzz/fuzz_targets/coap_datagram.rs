//! Arbitrary bytes as one UDP datagram to the CoAP listener: parsed as the
//! listener parses it, a request's Block1 body through the reassembler, its
//! message id through the dedup layer, and an answer framed for it that
//! must parse again (`fuzz_datagram`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice_agent::coap::fuzz_datagram(data);
});
