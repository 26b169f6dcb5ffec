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
//! Changes made one at a time, each after the last has shown (a script, an operator), come as
//! close together as churn does but gain nothing from a nap: [`SINGLES_TO_BACK_OFF`] naps in a
//! row that each gathered one event turn naps off for the next [`NAP_BACKOFF`] wake-ups, so
//! two in `2 + NAP_BACKOFF` of them wait (the events counted as etcd watch events received,
//! [`meshd_kvstore::watch_events_received`], whatever becomes of them). Under churn a nap
//! gathers one event now and then (the changes come in bursts); one such nap alone says
//! nothing. A wake-up that already found a batch ([`BATCH_ENOUGH`] events: a flood, a busy
//! cluster) takes no nap either: its wake-up is paid for, and a nap would only hold a quiet
//! cluster's change back behind it.
//!
//! The policy ([`Spells`], [`nap`]) is pure; [`install`] wires it into the runtime's park
//! hooks.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// After bulk work ends, how long naps stay off: longer than the gaps between an initial
/// sync's pages and between a full diff's batches.
pub const BULK_HOLD_OFF: Duration = Duration::from_millis(100);

/// After [`SINGLES_TO_BACK_OFF`] naps that each gathered a single event, the wake-ups that go
/// without a nap: changes made one at a time, each waiting for the last to show (a script, an
/// operator), gain nothing from a nap and would each wait out a window; so only two in
/// `2 + NAP_BACKOFF` of them do.
pub const NAP_BACKOFF: u32 = 8;

/// Naps in a row that each gathered a single event before naps back off. One says little:
/// under churn the changes come in bursts (a writer's puts committed together), and a nap
/// between two bursts gathers a single event now and then; each such back-off costs the churn
/// [`NAP_BACKOFF`] wake-ups of one event each. Changes made one at a time give a single event
/// after every nap, so two in a row still tell them apart (BENCHMARKS.md, issue 11, session
/// 14: no cost to either measured).
pub const SINGLES_TO_BACK_OFF: u32 = 2;

/// A wake-up that handled this many events or more takes no nap: its wake-up cost is already
/// shared by a batch (a flood, a busy cluster), and a nap would only delay the next change of
/// a quiet cluster behind it.
pub const BATCH_ENOUGH: u64 = 16;

/// What a worker thread knows of its own recent past.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spells {
    parked_at: Option<Instant>,
    last_idle: Option<Duration>,
    /// Watch events received ([`meshd_kvstore::watch_events_received`]) when the worker last
    /// woke.
    events_at_wake: u64,
    /// Whether the worker napped before it last parked.
    napped: bool,
    /// Naps in a row whose wake-up handled exactly one event.
    singles: u32,
    /// Wake-ups left to go without a nap.
    backoff: u32,
}

impl Spells {
    /// The worker parks (after any nap) at `at`.
    pub fn parked(&mut self, at: Instant) {
        self.parked_at = Some(at);
    }

    /// The worker wakes at `at`, `events` counted so far: the idle spell since it parked is
    /// over.
    pub fn unparked(&mut self, at: Instant, events: u64) {
        self.last_idle = self
            .parked_at
            .take()
            .map(|p| at.saturating_duration_since(p));
        self.events_at_wake = events;
    }
}

/// How long a worker about to park, `events` counted so far, should sleep first: `window` when
/// its last idle spell was shorter than `window` (wake-ups are coming close together), nothing
/// holds naps off (start-up, recent bulk work), the wake-up now ending handled fewer than
/// [`BATCH_ENOUGH`] events and naps are paying; otherwise none. A nap pays unless the wake-up
/// after it handled exactly one event (none: it woke for something else, a timer, and says
/// nothing); after [`SINGLES_TO_BACK_OFF`] in a row that did not, [`NAP_BACKOFF`] wake-ups go
/// without. A zero window turns moderation off.
pub fn nap(window: Duration, spells: &mut Spells, events: u64, held_off: bool) -> Option<Duration> {
    let handled = events.wrapping_sub(spells.events_at_wake);
    if std::mem::take(&mut spells.napped) {
        match handled {
            0 => {}
            1 => spells.singles += 1,
            _ => spells.singles = 0,
        }
        if spells.singles >= SINGLES_TO_BACK_OFF {
            spells.singles = 0;
            spells.backoff = NAP_BACKOFF;
            BACKOFFS.fetch_add(1, Ordering::Relaxed);
        }
    }
    if window.is_zero() || held_off || handled >= BATCH_ENOUGH {
        return None;
    }
    if spells.backoff > 0 {
        spells.backoff -= 1;
        return None;
    }
    match spells.last_idle {
        Some(idle) if idle < window => {
            spells.napped = true;
            Some(window)
        }
        _ => None,
    }
}

/// Naps taken and their total length, process-wide (`/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NapStats {
    pub naps: u64,
    pub nap_micros: u64,
    /// Times naps turned themselves off for [`NAP_BACKOFF`] wake-ups.
    pub backoffs: u64,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static NAPS: AtomicU64 = AtomicU64::new(0);
static NAP_MICROS: AtomicU64 = AtomicU64::new(0);
static BACKOFFS: AtomicU64 = AtomicU64::new(0);

/// Naps may start: the agent's initial sync is done.
pub fn arm() {
    ARMED.store(true, Ordering::Relaxed);
}

pub fn stats() -> NapStats {
    NapStats {
        naps: NAPS.load(Ordering::Relaxed),
        nap_micros: NAP_MICROS.load(Ordering::Relaxed),
        backoffs: BACKOFFS.load(Ordering::Relaxed),
    }
}

thread_local! {
    static SPELLS: Cell<Spells> = Cell::new(Spells::default());
}

/// Moderates the wake-ups of `runtime`'s workers with `window` (nothing when zero), once
/// [`arm`]ed and while no bulk work is recent.
pub fn install(runtime: &mut tokio::runtime::Builder, window: Duration) {
    install_with(runtime, window, || {
        !ARMED.load(Ordering::Relaxed) || meshd_kvstore::bulk_work_within(BULK_HOLD_OFF)
    });
}

fn install_with(
    runtime: &mut tokio::runtime::Builder,
    window: Duration,
    held_off: impl Fn() -> bool + Send + Sync + 'static,
) {
    if window.is_zero() {
        return;
    }
    runtime
        .on_thread_park(move || {
            let mut spells = SPELLS.get();
            if let Some(d) = nap(
                window,
                &mut spells,
                meshd_kvstore::watch_events_received(),
                held_off(),
            ) {
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
            spells.unparked(Instant::now(), meshd_kvstore::watch_events_received());
            SPELLS.set(spells);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(1);

    /// A worker that parked, stayed idle for `idle` and woke with no event counted yet.
    fn after(idle: Duration) -> Spells {
        let t0 = Instant::now();
        let mut s = Spells::default();
        s.parked(t0);
        s.unparked(t0 + idle, 0);
        s
    }

    #[test]
    fn naps_only_when_wake_ups_come_closer_than_the_window() {
        let close = Duration::from_micros(300);
        assert_eq!(nap(WINDOW, &mut after(close), 1, false), Some(WINDOW));
        let far = Duration::from_millis(5);
        assert_eq!(nap(WINDOW, &mut after(far), 1, false), None);
        assert_eq!(
            nap(WINDOW, &mut after(WINDOW), 1, false),
            None,
            "a spell of exactly the window"
        );
    }

    #[test]
    fn the_first_wake_up_and_a_change_after_a_quiet_spell_never_wait() {
        assert_eq!(nap(WINDOW, &mut Spells::default(), 0, false), None);
        let mut quiet = after(Duration::from_secs(2));
        assert_eq!(nap(WINDOW, &mut quiet, 1, false), None);
    }

    #[test]
    fn holding_off_and_a_zero_window_turn_it_off() {
        let busy = after(Duration::from_micros(100));
        assert_eq!(nap(WINDOW, &mut busy.clone(), 1, true), None);
        assert_eq!(nap(Duration::ZERO, &mut busy.clone(), 1, false), None);
    }

    /// A worker's cycles: `arrivals(i)` events waiting when it wakes for the i-th time, each
    /// wake-up 20 us after it parks (the next response already there) and busy 150 us. Returns
    /// the naps taken in `cycles` wake-ups.
    fn naps_in(cycles: u64, arrivals: impl Fn(u64) -> u64) -> u64 {
        let mut s = Spells::default();
        let mut t = Instant::now();
        let mut events = 0;
        let mut naps = 0;
        for i in 0..cycles {
            if let Some(d) = nap(WINDOW, &mut s, events, false) {
                naps += 1;
                t += d;
            }
            s.parked(t);
            t += Duration::from_micros(20);
            s.unparked(t, events);
            events += arrivals(i);
            t += Duration::from_micros(150);
        }
        naps
    }

    /// Under steady churn a nap gathers several events, so the worker naps before every park
    /// after the first: a spell counts from the park after the nap.
    #[test]
    fn under_steady_churn_every_wake_up_naps() {
        assert_eq!(naps_in(10, |_| 3), 9);
    }

    /// Changes made one at a time: two naps in a row that each gather one event back off for
    /// NAP_BACKOFF wake-ups; wake-ups for no event (timers) neither pay nor cost.
    #[test]
    fn naps_that_gather_one_event_back_off() {
        let singles = u64::from(SINGLES_TO_BACK_OFF);
        let period = singles + u64::from(NAP_BACKOFF);
        let cycles = 1 + 5 * period;
        // Naps at cycles 1-2, 11-12, 21-22, 31-32, 41-42: two in ten.
        assert_eq!(naps_in(cycles, |_| 1), 5 * singles);
        // Every wake-up for a timer: nothing learnt, naps continue.
        assert_eq!(naps_in(10, |_| 0), 9);
    }

    /// Churn in bursts: a nap that gathers one event between naps that gather several does not
    /// turn naps off.
    #[test]
    fn a_single_event_nap_among_busier_ones_does_not_back_off() {
        // Wake-up i handles the events that came before it: 1, 3, 1, 3, ...
        assert_eq!(naps_in(20, |i| if i % 2 == 0 { 1 } else { 3 }), 19);
        // Two singles in a row among them do.
        let pattern = |i: u64| if i % 6 < 2 { 1 } else { 3 };
        assert!(naps_in(20, pattern) < 19);
    }

    /// A flood: every wake-up finds a batch already, and a nap would only hold a quiet
    /// cluster's change back behind it.
    #[test]
    fn a_wake_up_that_found_a_batch_takes_no_nap() {
        assert_eq!(naps_in(10, |_| BATCH_ENOUGH), 0);
        assert_eq!(naps_in(10, |_| BATCH_ENOUGH - 1), 9);
        // Wake-ups alternating between a batch and a few events: a nap after each of the few
        // (cycles 2, 4, ... 18), none after a batch.
        assert_eq!(naps_in(20, |i| if i % 2 == 0 { 100 } else { 3 }), 9);
    }

    /// The hooks on a real runtime: a worker woken by a 1 ms timer (tokio's resolution) over
    /// and over naps before each park, and the naps are counted (the counters are
    /// process-wide; only this test naps). Nothing held off: other tests' bulk work would.
    #[test]
    fn a_runtime_with_the_hooks_naps_between_close_wake_ups() {
        let window = Duration::from_millis(5);
        let before = stats();
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        install_with(&mut builder, window, || false);
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
