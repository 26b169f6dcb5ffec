//! What seeded trial runners share (the fault trials, the crash-safety trials, the datapath's
//! packet mutation trials): a small generator that gives the same sequence on every machine,
//! and their knobs from the environment (`make faults TRIALS=N SEED=S`).

use anyhow::Context;

/// splitmix64: small, seedable, and the same sequence on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `r`.
    pub fn range(&mut self, r: std::ops::RangeInclusive<u64>) -> u64 {
        r.start() + self.below(r.end() - r.start() + 1)
    }

    /// One of `items`, `None` when there is none.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

/// The number in environment variable `name`, or `default` when unset or empty; a value that
/// is not a number is an error naming the variable.
pub fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().with_context(|| format!("{name}={v}")),
        _ => Ok(default),
    }
}
