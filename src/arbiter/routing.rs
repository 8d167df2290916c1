//! Routing: which side a business id belongs to under the current switches. Pure, no I/O.
//!
//! `bucket` is part of the protocol: every instance, every version, must map a business id to the
//! same bucket, or a migration in progress would reshuffle. It is FNV-1a (64-bit) over the UTF-8
//! bytes of the business id, taken modulo 100; the test vectors below freeze it.

use super::switches::Switches;

/// The direction a message goes: to the side being migrated from, or to the one migrated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `cutover.from`.
    Old,
    /// `cutover.to`.
    New,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64-bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The stable bucket, 0..100, of a business id: `fnv1a64(utf8(id)) % 100`. Never change this.
pub fn bucket(business_id: &str) -> u8 {
    (fnv1a64(business_id.as_bytes()) % 100) as u8
}

/// Where a message with this business id goes:
/// consume switch off ⇒ old; whitelisted ⇒ new; `bucket < percent` ⇒ new; else old.
pub fn route(switches: &Switches, business_id: &str) -> Route {
    if !switches.consume {
        Route::Old
    } else if switches.whitelist.contains(business_id)
        || bucket(business_id) < switches.percent.get()
    {
        Route::New
    } else {
        Route::Old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbiter::config::Percent;
    use proptest::prelude::*;

    fn switches(consume: bool, percent: i64, whitelist: &[&str]) -> Switches {
        Switches {
            consume,
            percent: Percent::try_from(percent).unwrap(),
            whitelist: whitelist.iter().map(|s| s.to_string()).collect(),
            version: 1,
            changed_at_ms: 0,
        }
    }

    /// Frozen: these values are the protocol. A change here breaks running migrations.
    #[test]
    fn bucket_test_vectors_are_frozen() {
        let vectors: &[(&str, u64, u8)] = &[
            // The first three are the published FNV-1a 64 reference values.
            ("", 0xcbf29ce484222325, 37),
            ("a", 0xaf63dc4c8601ec8c, 96),
            ("foobar", 0x85944171f73967e8, 68),
            ("user-1", 0xf84ba2aa754a4bd4, 8),
            ("10086", 0x82c9267659b1300e, 50),
            ("订单-42", 0x404513d5aa31e791, 25),
        ];
        for &(id, hash, b) in vectors {
            assert_eq!(fnv1a64(id.as_bytes()), hash, "fnv1a64({id:?})");
            assert_eq!(bucket(id), b, "bucket({id:?})");
            assert_eq!(hash % 100, u64::from(b));
        }
    }

    #[test]
    fn consume_off_routes_everything_old_even_whitelisted() {
        let s = switches(false, 100, &["vip"]);
        assert_eq!(route(&s, "vip"), Route::Old);
        assert_eq!(route(&s, "anyone"), Route::Old);
    }

    #[test]
    fn whitelist_routes_new_at_zero_percent() {
        let s = switches(true, 0, &["vip"]);
        assert_eq!(route(&s, "vip"), Route::New);
        assert_eq!(route(&s, "other"), Route::Old);
    }

    #[test]
    fn percent_compares_bucket_strictly() {
        // bucket("foobar") == 68: new from 69 % on, old at 68 % and below.
        assert_eq!(route(&switches(true, 68, &[]), "foobar"), Route::Old);
        assert_eq!(route(&switches(true, 69, &[]), "foobar"), Route::New);
    }

    #[test]
    fn zero_and_hundred_percent_are_total() {
        for i in 0..1000 {
            let id = format!("u{i}");
            assert_eq!(route(&switches(true, 0, &[]), &id), Route::Old);
            assert_eq!(route(&switches(true, 100, &[]), &id), Route::New);
        }
    }

    #[test]
    fn buckets_spread_evenly_enough() {
        let mut counts = [0u32; 100];
        for i in 0..100_000 {
            counts[bucket(&format!("user-{i}")) as usize] += 1;
        }
        // 1000 expected per bucket; a hash that clumps would blow these bounds.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn raising_the_percent_never_moves_an_id_back_to_old(id in ".{0,40}", p in 0i64..100) {
            let lower = route(&switches(true, p, &[]), &id);
            let higher = route(&switches(true, p + 1, &[]), &id);
            prop_assert!(!(lower == Route::New && higher == Route::Old));
        }

        #[test]
        fn bucket_is_below_100(id in ".*") {
            prop_assert!(bucket(&id) < 100);
        }
    }
}
