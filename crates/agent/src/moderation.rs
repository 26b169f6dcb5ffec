//! Wake-up moderation of the agent's runtime worker: interrupt moderation, in user space.
//!
//! Under steady churn (a remote cluster's endpoints changing hundreds of times a second) each
//! change reaches the agent as its own etcd watch response, about a millisecond after the last,
//! and the one runtime worker wakes for it, runs the whole pipeline for one event (etcd
//! connection, watch, cluster watcher, view, reconciler) and parks again. On the 2 vCPU VMs of
//! BENCHMARKS.md a wake-up of a parked thread is most of an event's cost (about 120 us of CPU
//! per wake-up, the scheduler's `finish_task_switch` alone 13-15% of the agent's samples), so
//! the CPU per event is set by how many events a wake-up finds.
//!
//! With a window set (`event_moderation_us`), a worker whose last idle spell was shorter than
//! the window sleeps for the window before it parks: what arrives meanwhile waits in the
//! socket buffers, and the next wake-up finds all of it, as a NIC's `rx-usecs` gathers packets
//! into one interrupt. A change after a quiet spell never waits (the spell before it was
//! long). No nap is taken before the agent's initial sync is done ([`arm`]: start-up is many
//! short steps, each of which a nap would delay) nor while bulk work runs or has just run
//! ([`meshd_kvstore::bulk_work_within`]: a new cluster's sync, a full diff), which would only
//! be slowed. The price is latency under churn: at most one window per change, on every task of
//! the agent alike (its API, health checks and leases too: milliseconds against their seconds).
//!
//! The policy ([`Spells`], [`nap`]) is pure; [`install`] wires it into the runtime's park
//! hooks.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// After bulk work ends, how long naps stay off: longer than the gaps between an initial
/// sync's pages and between a full diff's batches.
pub const BULK_HOLD_OFF: Duration = Duration::from_millis(100);

/// What a worker thread knows of its own recent past.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spells {
    parked_at: Option<Instant>,
    last_idle: Option<Duration>,
}

impl Spells {
    /// The worker parks (after any nap) at `at`.
    pub fn parked(&mut self, at: Instant) {
        self.parked_at = Some(at);
    }

    /// The worker wakes at `at`: the idle spell since it parked is over.
    pub fn unparked(&mut self, at: Instant) {
        self.last_idle = self
            .parked_at
            .take()
            .map(|p| at.saturating_duration_since(p));
    }
}

/// How long a worker about to park should sleep first: `window` when its last idle spell was
/// shorter than `window` (wake-ups are coming close together) and nothing holds naps off
/// (start-up, recent bulk work); otherwise none. A zero window turns moderation off.
pub fn nap(window: Duration, spells: &Spells, held_off: bool) -> Option<Duration> {
    if window.is_zero() || held_off {
        return None;
    }
    match spells.last_idle {
        Some(idle) if idle < window => Some(window),
        _ => None,
    }
}

/// Naps taken and their total length, process-wide (`/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NapStats {
    pub naps: u64,
    pub nap_micros: u64,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static NAPS: AtomicU64 = AtomicU64::new(0);
static NAP_MICROS: AtomicU64 = AtomicU64::new(0);

/// Naps may start: the agent's initial sync is done.
pub fn arm() {
    ARMED.store(true, Ordering::Relaxed);
}

pub fn stats() -> NapStats {
    NapStats {
        naps: NAPS.load(Ordering::Relaxed),
        nap_micros: NAP_MICROS.load(Ordering::Relaxed),
    }
}

thread_local! {
    static SPELLS: Cell<Spells> = Cell::new(Spells::default());
}

/// Moderates the wake-ups of `runtime`'s workers with `window` (nothing when zero).
pub fn install(runtime: &mut tokio::runtime::Builder, window: Duration) {
    if window.is_zero() {
        return;
    }
    runtime
        .on_thread_park(move || {
            let mut spells = SPELLS.get();
            let held_off =
                !ARMED.load(Ordering::Relaxed) || meshd_kvstore::bulk_work_within(BULK_HOLD_OFF);
            if let Some(d) = nap(window, &spells, held_off) {
                // A plain sleep of the thread, on purpose: the runtime's I/O driver is polled
                // only when the worker parks, so nothing wakes it meanwhile.
                std::thread::sleep(d);
                NAPS.fetch_add(1, Ordering::Relaxed);
                NAP_MICROS.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
            }
            spells.parked(Instant::now());
            SPELLS.set(spells);
        })
        .on_thread_unpark(|| {
            let mut spells = SPELLS.get();
            spells.unparked(Instant::now());
            SPELLS.set(spells);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(1);

    fn after(idle: Duration) -> Spells {
        let t0 = Instant::now();
        let mut s = Spells::default();
        s.parked(t0);
        s.unparked(t0 + idle);
        s
    }

    #[test]
    fn naps_only_when_wake_ups_come_closer_than_the_window() {
        assert_eq!(
            nap(WINDOW, &after(Duration::from_micros(300)), false),
            Some(WINDOW)
        );
        assert_eq!(nap(WINDOW, &after(Duration::from_millis(5)), false), None);
        assert_eq!(
            nap(WINDOW, &after(WINDOW), false),
            None,
            "a spell of exactly the window"
        );
    }

    #[test]
    fn the_first_wake_up_and_a_change_after_a_quiet_spell_never_wait() {
        assert_eq!(nap(WINDOW, &Spells::default(), false), None);
        let quiet = after(Duration::from_secs(2));
        assert_eq!(nap(WINDOW, &quiet, false), None);
    }

    #[test]
    fn holding_off_and_a_zero_window_turn_it_off() {
        let busy = after(Duration::from_micros(100));
        assert_eq!(nap(WINDOW, &busy, true), None);
        assert_eq!(nap(Duration::ZERO, &busy, false), None);
    }

    /// A spell counts from the park after the nap: under steady churn the wake-up after a nap
    /// finds work at once, so the worker naps again rather than every other time.
    #[test]
    fn under_steady_churn_every_wake_up_naps() {
        let mut s = Spells::default();
        let mut t = Instant::now();
        let mut naps = 0;
        for _ in 0..10 {
            if let Some(d) = nap(WINDOW, &s, false) {
                naps += 1;
                t += d;
            }
            s.parked(t);
            t += Duration::from_micros(20); // the next response was already waiting
            s.unparked(t);
            t += Duration::from_micros(150); // the work it brought
        }
        assert_eq!(naps, 9, "every wake-up after the first");
    }

    /// The hooks on a real runtime: a worker woken by a 1 ms timer (tokio's resolution) over
    /// and over naps before each park, and the naps are counted (the counters are
    /// process-wide and only grow).
    #[test]
    fn a_runtime_with_the_hooks_naps_between_close_wake_ups() {
        let window = Duration::from_millis(5);
        let before = stats();
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        install(&mut builder, window);
        arm();
        let runtime = builder.build().unwrap();
        runtime.block_on(async {
            tokio::spawn(async {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .unwrap();
        });
        let after = stats();
        let naps = after.naps - before.naps;
        assert!(naps >= 10, "{naps} naps in 20 close wake-ups");
        assert_eq!(after.nap_micros - before.nap_micros, naps * 5_000);
    }
}
