//! The one allocation scan behind service VIPs (`vip`) and node ports (`node_ports`): the
//! first free value of a range, from an offset, wrapping around.

use std::collections::BTreeSet;

/// The first value not in `taken`, scanning positions `offset, offset + 1, ...` of a range of
/// `size` positions and wrapping around; `at(n)` is the value at position `n`, or `None` when
/// that position may not be given out (a network or broadcast address). `None` when the range
/// is exhausted.
///
/// Lowest-first (offset 0) keeps allocation predictable; replicas racing for the same value
/// are sorted out by the transaction (create-only compare on the allocation key), and a retry
/// after losing a race starts at a random offset, so concurrent writers stop colliding.
pub fn first_free<T: Ord>(
    size: u128,
    offset: u128,
    taken: &BTreeSet<T>,
    at: impl Fn(u128) -> Option<T>,
) -> Option<T> {
    if size == 0 {
        return None;
    }
    // Only as many candidates as could be taken or unassignable, plus one: beyond that a free
    // value has certainly been found (or the range is full). Unassignable positions are at
    // most two (network and broadcast).
    let limit = size.min(taken.len() as u128 + 3);
    let mut tried = 0u128;
    let mut k = 0u128;
    while k < size && tried <= limit {
        let n = offset.wrapping_add(k) % size;
        k += 1;
        let Some(value) = at(n) else {
            continue;
        };
        tried += 1;
        if !taken.contains(&value) {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_from_the_offset_and_wraps() {
        let taken: BTreeSet<u128> = [0, 1, 3].into();
        let at = |n: u128| (n != 4).then_some(n);
        assert_eq!(first_free(6, 0, &taken, at), Some(2));
        assert_eq!(first_free(6, 3, &taken, at), Some(5), "4 is skipped");
        assert_eq!(first_free(6, 5, &taken, at), Some(5));
        let full: BTreeSet<u128> = [0, 1, 2, 3, 5].into();
        assert_eq!(first_free(6, 2, &full, at), None);
        assert_eq!(first_free(0, 0, &full, at), None);
    }
}
