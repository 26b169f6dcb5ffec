//! Capped exponential backoff with jitter, for reconnecting to etcd. Jitter spreads the
//! reconnects of many nodes after an etcd restart so they do not all relist at once.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The delay before the next attempt: `initial * 2^attempt`, capped at `max`, then scaled by
    /// a random factor in [0.5, 1.0] ("equal jitter": never zero, never above the cap).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let base = self
            .config
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.config.max);
        base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// After a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_resets() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut b = Backoff::new(config);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = (config.initial * (1 << i)).min(config.max);
            assert!(
                *d >= base / 2 && *d <= base,
                "attempt {i}: {d:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        assert!(delays[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Many attempts never overflow.
        let mut b = Backoff::new(config);
        for _ in 0..100 {
            assert!(b.next_delay() <= config.max);
        }
    }
}
