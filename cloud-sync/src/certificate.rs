//! The expiry (`notAfter`) of an X.509 certificate, read from its DER bytes.
//!
//! Only the path to the validity is walked (RFC 5280 §4.1):
//!
//! ```text
//! Certificate    ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] EXPLICIT version OPTIONAL, serialNumber,
//!                               signature, issuer, validity, ... }
//! Validity       ::= SEQUENCE { notBefore Time, notAfter Time }
//! Time           ::= CHOICE { UTCTime, GeneralizedTime }
//! ```
//!
//! A full X.509 crate would cost binary size for one field; rustls itself
//! validates the certificate, so this reader only has to be exact on valid
//! input and refuse (`None`) anything else without panicking: every length
//! is checked against what is left, every index goes through `get`.

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// One DER element: its tag and contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    // High-tag-number form never occurs on the path we walk.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form with 1..=4 length bytes; 0x80 (indefinite) is not DER.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest.get(n..)?)
    };
    let contents = rest.get(..len)?;
    Some((tag, contents, rest.get(len..)?))
}

/// The contents of an element with tag `want`, and what follows it.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    match element(input)? {
        (tag, contents, rest) if tag == want => Some((contents, rest)),
        _ => None,
    }
}

/// The certificate's `notAfter` as unix seconds, or `None` when `der` is
/// not a certificate this reader understands.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let tbs = match element(tbs)? {
        (VERSION, _, rest) => rest,
        _ => tbs,
    };
    let (_serial, rest) = expect(tbs, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (_, _not_before, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    match tag {
        UTC_TIME => parse_time(time, false),
        GENERALIZED_TIME => parse_time(time, true),
        _ => None,
    }
}

/// `YYMMDDHHMMSSZ` (UTCTime) or `YYYYMMDDHHMMSSZ` (GeneralizedTime), the
/// only forms DER allows for certificate validity (RFC 5280 §4.1.2.5).
fn parse_time(text: &[u8], generalized: bool) -> Option<i64> {
    let (digits, z) = text.split_last().map(|(z, d)| (d, *z))?;
    if z != b'Z' || digits.len() != if generalized { 14 } else { 12 } {
        return None;
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |from: usize, n: usize| -> Option<i64> {
        digits
            .get(from..from + n)?
            .iter()
            .try_fold(0i64, |acc, d| Some(acc * 10 + i64::from(d - b'0')))
    };
    let (year, at) = if generalized {
        (num(0, 4)?, 4)
    } else {
        // RFC 5280: YY >= 50 is 19YY, otherwise 20YY.
        let yy = num(0, 2)?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
    };
    let (month, day) = (num(at, 2)?, num(at + 2, 2)?);
    let (hour, minute, second) = (num(at + 4, 2)?, num(at + 6, 2)?, num(at + 8, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::process::Command;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// A self-signed certificate valid for `days` from now, made by openssl.
    fn openssl_cert(dir: &std::path::Path, days: u32, key: &str) -> Vec<u8> {
        let (crt, k) = (
            dir.join(format!("{days}.crt")),
            dir.join(format!("{days}.key")),
        );
        let st = Command::new("openssl")
            .args(["req", "-x509", "-newkey", key, "-nodes", "-subj", "/CN=t"])
            .args(["-days", &days.to_string(), "-keyout"])
            .arg(&k)
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl must be installed");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        CertificateDer::from_pem_file(&crt).unwrap().to_vec()
    }

    fn now_s() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn not_after_of_openssl_certificates_matches_their_validity_days() {
        let dir = tempfile::tempdir().unwrap();
        // 2 days: UTCTime; 36500 days: past 2049, so GeneralizedTime.
        for (days, key) in [(2u32, "ed25519"), (30, "rsa:2048"), (36_500, "ed25519")] {
            let before = now_s();
            let der = openssl_cert(dir.path(), days, key);
            let after = now_s();
            let got = not_after(&der).unwrap_or_else(|| panic!("{days} days: no notAfter"));
            let span = i64::from(days) * 86_400;
            assert!(
                (before + span - 2..=after + span + 2).contains(&got),
                "{days} days: {got} not in [{}, {}]",
                before + span,
                after + span
            );
        }
    }

    #[test]
    fn time_forms_convert_to_unix_seconds() {
        for (text, generalized, want) in [
            (&b"700101000000Z"[..], false, Some(0)),
            (b"491231235959Z", false, Some(2_524_607_999)),
            (b"500101000000Z", false, Some(-631_152_000)),
            (b"20240229120000Z", true, Some(1_709_208_000)),
            (b"20230229120000Z", true, None),
            (b"21000301000000Z", true, Some(4_107_542_400)),
            (b"00000101000000Z", true, Some(-62_167_219_200)),
            (b"99991231235959Z", true, Some(253_402_300_799)),
            (b"700101000000", false, None),
            (b"7001010000000Z", false, None),
            (b"701301000000Z", false, None),
            (b"700100000000Z", false, None),
            (b"700101240000Z", false, None),
            (b"700101006000Z", false, None),
            (b"700101000060Z", false, None),
            (b"70010100000+Z", false, None),
            (b"700101000000+0100", false, None),
            (b"", false, None),
            (b"Z", true, None),
        ] {
            assert_eq!(
                parse_time(text, generalized),
                want,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn truncated_or_altered_certificates_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let der = openssl_cert(dir.path(), 2, "ed25519");
        assert!(not_after(&der).is_some());
        for n in 0..der.len() {
            // The outer SEQUENCE's length no longer fits: always refused.
            assert_eq!(not_after(&der[..n]), None, "truncated to {n}");
        }
        for i in 0..der.len() {
            for b in [0x00, 0x1f, 0x7f, 0x80, 0x84, 0x85, 0xff] {
                let mut d = der.clone();
                d[i] = b;
                let _ = not_after(&d);
            }
        }
    }

    #[test]
    fn lengths_past_the_end_or_indefinite_are_refused() {
        for bad in [
            &[0x30, 0x80, 0x00, 0x00][..],
            &[0x30, 0x85, 1, 0, 0, 0, 0],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x81],
            &[0x30, 0x05, 0x30],
            &[0x3f, 0x00],
            &[0x30],
        ] {
            assert_eq!(not_after(bad), None, "{bad:x?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = not_after(&bytes);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_prefix_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            // SEQUENCE { SEQUENCE { INTEGER 1, SEQUENCE {}, SEQUENCE {}, tail
            let mut d = vec![0x30, 0x82, 0x01, 0x00, 0x30, 0x82, 0x00, 0xf0,
                             0x02, 0x01, 0x01, 0x30, 0x00, 0x30, 0x00];
            d.extend_from_slice(&tail);
            let _ = not_after(&d);
        }
    }
}
