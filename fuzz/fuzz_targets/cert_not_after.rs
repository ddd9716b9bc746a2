//! Arbitrary bytes as a client certificate's DER: its notAfter is read or
//! refused, never a panic, and a time read is a real UTC second.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_cloud_sync::certificate::not_after;

fuzz_target!(|data: &[u8]| {
    if let Some(t) = not_after(data) {
        // 0000-01-01 ..= 9999-12-31T23:59:59Z (GeneralizedTime's range).
        assert!((-62_167_219_200..=253_402_300_799).contains(&t), "{t}");
    }
});
