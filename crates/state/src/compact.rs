//! Denser B-trees for the big stores of state (a remote cluster's ipcache, 500k entries, held
//! by the watcher's reflection and by the view several times over).
//!
//! Filled one insert at a time, a `BTreeMap` leaves its nodes about half full (an insert into a
//! full node splits it 6/5), so it takes twice the memory of its contents; rebuilt from its own
//! sorted contents it packs them into full nodes. O(n): for after a list or an initial sync,
//! not per event. The old nodes are freed before the new ones are allocated, so the allocator
//! hands the same memory back instead of growing the heap.

use std::collections::{BTreeMap, BTreeSet};

/// Rebuilds `map` with full nodes (same contents).
pub fn btree_map<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    let items: Vec<(K, V)> = std::mem::take(map).into_iter().collect();
    *map = items.into_iter().collect();
}

/// Rebuilds `set` with full nodes (same contents).
pub fn btree_set<T: Ord>(set: &mut BTreeSet<T>) {
    let items: Vec<T> = std::mem::take(set).into_iter().collect();
    *set = items.into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_and_order_are_kept() {
        let mut map: BTreeMap<u32, String> = (0..1000).rev().map(|i| (i, i.to_string())).collect();
        map.remove(&500);
        let before: Vec<_> = map.clone().into_iter().collect();
        btree_map(&mut map);
        assert_eq!(map.into_iter().collect::<Vec<_>>(), before);

        let mut set: BTreeSet<u32> = (0..100).filter(|i| i % 3 != 0).collect();
        let before: Vec<_> = set.iter().copied().collect();
        btree_set(&mut set);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), before);
    }
}
