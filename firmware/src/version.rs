//! The order of firmware versions, for anti-rollback.
//!
//! Semver-ish, and total on every string (manifests carry free-form
//! versions):
//!
//! 1. A leading `v`/`V` followed by a digit is dropped (`v1.2` = `1.2`).
//! 2. Everything from the first `+` on is build metadata and ignored, as in
//!    semver (`1.0+b7` = `1.0`).
//! 3. The rest is split on `.`, `-`, `_` and between runs of digits and
//!    non-digits: `1.0-rc10` → `1`, `0`, `rc`, `10`. Empty pieces vanish.
//! 4. The leading numeric pieces are the **core**; cores compare piece by
//!    piece as numbers of any length (no overflow: leading zeros stripped,
//!    then the longer number is larger, then digit by digit), a missing
//!    piece counting as 0: `1.10` > `1.9`, `2.0` > `1.99`, `1.0` = `1.0.0`,
//!    `01.2` = `1.2`.
//! 5. Whatever follows the core (it starts with a non-digit piece) is a
//!    **pre-release**: with equal cores, a version without one is greater
//!    (`1.0-rc1` < `1.0`, and so `1.0.2a` < `1.0.2`: a letter suffix is not a
//!    patch release, use `1.0.3` or `1.0.2.1`).
//! 6. Two pre-releases compare piece by piece as in semver: numbers
//!    numerically, words by their bytes (case-sensitive ASCII order), a
//!    number below a word, and a prefix below the longer list
//!    (`1.0-alpha` < `1.0-alpha.1` < `1.0-alpha.beta` < `1.0-beta` <
//!    `1.0-rc2` < `1.0-rc10` < `1.0`).
//!
//! Distinct strings may be equal (`1.0` and `1.0.0`); the order is still
//! total, reflexive, antisymmetric and transitive over the equal classes.

use std::cmp::Ordering;

/// Compares two firmware versions (see the module doc for the rules).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a, b) = (Key::of(a), Key::of(b));
    let core = (0..a.core.len().max(b.core.len()))
        .map(|i| {
            let x = a.core.get(i).copied().unwrap_or("");
            let y = b.core.get(i).copied().unwrap_or("");
            cmp_digits(x, y)
        })
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal);
    core.then_with(|| match (a.pre.is_empty(), b.pre.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => cmp_pre(&a.pre, &b.pre),
    })
}

#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    /// Digits with leading zeros stripped ("" is zero).
    Num(&'a str),
    Word(&'a str),
}

struct Key<'a> {
    core: Vec<&'a str>,
    pre: Vec<Piece<'a>>,
}

impl<'a> Key<'a> {
    fn of(v: &'a str) -> Self {
        let v = match v.as_bytes() {
            [b'v' | b'V', d, ..] if d.is_ascii_digit() => &v[1..],
            _ => v,
        };
        let v = v.split('+').next().unwrap_or("");
        let mut pieces = v
            .split(['.', '-', '_'])
            .flat_map(runs)
            .filter(|p| !p.is_empty())
            .map(|p| {
                if p.as_bytes()[0].is_ascii_digit() {
                    Piece::Num(p.trim_start_matches('0'))
                } else {
                    Piece::Word(p)
                }
            })
            .peekable();
        let mut core = Vec::new();
        while let Some(Piece::Num(n)) = pieces.peek() {
            core.push(*n);
            pieces.next();
        }
        Self {
            core,
            pre: pieces.collect(),
        }
    }
}

/// Splits `s` into maximal runs of ASCII digits and of everything else.
fn runs(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let first = rest.as_bytes().first()?;
        let digit = first.is_ascii_digit();
        let end = rest
            .bytes()
            .position(|b| b.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

/// Compares two digit strings without leading zeros by numeric value.
fn cmp_digits(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn cmp_pre(a: &[Piece<'_>], b: &[Piece<'_>]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x, y) {
            (Piece::Num(x), Piece::Num(y)) => cmp_digits(x, y),
            (Piece::Word(x), Piece::Word(y)) => x.as_bytes().cmp(y.as_bytes()),
            (Piece::Num(_), Piece::Word(_)) => Ordering::Less,
            (Piece::Word(_), Piece::Num(_)) => Ordering::Greater,
        };
        if o.is_ne() {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};
    use proptest::prelude::*;

    #[test]
    fn versions_order_as_documented() {
        let table = [
            ("1.10", "1.9", Greater),
            ("2.0", "1.99", Greater),
            ("1.0", "1.0.0", Equal),
            ("1.0.0.0", "1", Equal),
            ("1.0.1", "1.0", Greater),
            ("01.02", "1.2", Equal),
            ("1.0-rc1", "1.0", Less),
            ("1.0rc1", "1.0", Less),
            ("1.0-rc1", "1.0.0-rc1", Equal),
            ("1.0-rc1", "0.9", Greater),
            ("1.0-rc2", "1.0-rc10", Less),
            ("1.0-alpha", "1.0-alpha.1", Less),
            ("1.0-alpha.1", "1.0-alpha.beta", Less),
            ("1.0-alpha.beta", "1.0-beta", Less),
            ("1.0-beta", "1.0-rc1", Less),
            ("1.0-RC1", "1.0-rc1", Less),
            ("1.0.2a", "1.0.2", Less),
            ("1.0+build7", "1.0", Equal),
            ("1.0+b7", "1.0+b8", Equal),
            ("1.0-rc1+b9", "1.0-rc1", Equal),
            ("v1.2", "1.2", Equal),
            ("V2", "1.9", Greater),
            ("vendor", "1", Less),
            ("1_2_3", "1.2.3", Equal),
            ("1-2", "1.2", Equal),
            ("1..2", "1.2", Equal),
            ("", "0", Equal),
            ("", "0.0.1", Less),
            ("beta", "alpha", Greater),
            ("18446744073709551616", "18446744073709551615", Greater),
            (
                "1.99999999999999999999999999999999",
                "1.100000000000000000000000000000000",
                Less,
            ),
            ("1.00000000000000000000000000000000001", "1.1", Equal),
            ("2024.01.15", "2023.12.31", Greater),
        ];
        for (a, b, want) in table {
            assert_eq!(compare_versions(a, b), want, "{a:?} vs {b:?}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b:?} vs {a:?}");
        }
    }

    /// Version-like strings that exercise every rule: numbers with leading
    /// zeros and beyond u64, words, each separator, `v` and `+` build tags.
    fn version() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[0-9]{1,3}",
            1 => "0{0,3}[0-9]{18,22}",
            2 => "(alpha|beta|rc|RC|a|b)",
            1 => "[a-z]{1,3}[0-9]{0,2}",
        ];
        let sep = prop_oneof![Just("."), Just("-"), Just("_"), Just("+"), Just("")];
        (
            prop_oneof![Just(""), Just("v")],
            prop::collection::vec((piece, sep), 0..6),
        )
            .prop_map(|(v, parts)| {
                let mut s = v.to_owned();
                for (p, sep) in parts {
                    s.push_str(&p);
                    s.push_str(sep);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn every_version_equals_itself(a in version()) {
            prop_assert_eq!(compare_versions(&a, &a), Equal);
        }

        #[test]
        fn swapping_the_arguments_reverses_the_order(a in version(), b in version()) {
            prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
        }

        #[test]
        fn the_order_is_transitive(a in version(), b in version(), c in version()) {
            let mut v = [a, b, c];
            v.sort_by(|x, y| compare_versions(x, y));
            prop_assert_ne!(compare_versions(&v[0], &v[1]), Greater);
            prop_assert_ne!(compare_versions(&v[1], &v[2]), Greater);
            prop_assert_ne!(compare_versions(&v[0], &v[2]), Greater, "{:?}", v);
            // Equality is transitive too.
            if compare_versions(&v[0], &v[1]) == Equal && compare_versions(&v[1], &v[2]) == Equal {
                prop_assert_eq!(compare_versions(&v[0], &v[2]), Equal);
            }
        }

        #[test]
        fn trailing_zero_components_do_not_matter(a in "[0-9]{1,4}(\\.[0-9]{1,4}){0,3}", zeros in 1usize..4) {
            let padded = format!("{a}{}", ".0".repeat(zeros));
            prop_assert_eq!(compare_versions(&a, &padded), Equal);
        }

        #[test]
        fn numeric_cores_order_like_integers(x in any::<u64>(), y in any::<u64>()) {
            prop_assert_eq!(
                compare_versions(&format!("1.{x}"), &format!("1.{y}")),
                x.cmp(&y)
            );
        }

        #[test]
        fn a_pre_release_sorts_below_its_release(core in "[0-9]{1,3}(\\.[0-9]{1,3}){0,2}", tag in "(alpha|beta|rc)[0-9]{0,2}") {
            prop_assert_eq!(compare_versions(&format!("{core}-{tag}"), &core), Less);
        }

        #[test]
        fn any_string_compares_without_panicking(a in ".{0,40}", b in ".{0,40}") {
            let _ = compare_versions(&a, &b);
        }
    }
}
