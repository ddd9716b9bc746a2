//! Arbitrary bytes as a firmware manifest payload (what a signed envelope
//! from the cloud carries): parsed or refused with an error naming the
//! field, never a panic; a parsed manifest's version orders consistently
//! against itself and its URL is https.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_firmware::manifest::{Manifest, compare_versions};
use std::cmp::Ordering;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data, 1 << 30) {
        assert!(m.url.starts_with("https://"), "{}", m.url);
        assert!(m.size > 0 && m.size <= 1 << 30);
        assert_eq!(m.sha256.len(), 64);
        assert_eq!(compare_versions(&m.version, &m.version), Ordering::Equal);
        assert!(!m.admits_over(Some(&m.version)), "never over itself");
    }
    // Any two strings order antisymmetrically.
    let text = String::from_utf8_lossy(data);
    if let Some((a, b)) = text.split_at_checked(text.len() / 2) {
        assert_eq!(compare_versions(a, b), compare_versions(b, a).reverse());
    }
});
