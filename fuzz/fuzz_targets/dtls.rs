//! Arbitrary datagrams to the coaps listener's DTLS layer: the session
//! table (prefilter, cookies), an established session, a fresh server
//! session, and application data round-tripped through a real session
//! (`fuzz_dtls`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice_agent::coaps::fuzz_dtls(data);
});
