//! Wake-ups for a directory whose files are configuration (the remote-clusters directory):
//! inotify, through the `notify` crate, on the directory and on its parent, so that a file
//! added, changed, removed or renamed into place, and the directory itself created, removed or
//! replaced, are noticed at once.
//!
//! An event only says "look again": the owner rescans the whole directory and compares with
//! what it runs, so a coalesced or lost event costs nothing but latency. A slow periodic rescan
//! stays as the safety net for what inotify does not say: a full kernel queue (notify reports
//! it as a rescan, which wakes us too), a file that is a symlink to one changed elsewhere, a
//! watch that could not be set up (inotify limits reached, no parent directory), in which case
//! the directory is read every second as before. See [`Periods`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How often the directory is read while it is watched (the safety net), and while it cannot
/// be.
#[derive(Debug, Clone, Copy)]
pub struct Periods {
    pub rescan: Duration,
    pub poll: Duration,
}

impl Default for Periods {
    fn default() -> Self {
        Self {
            rescan: Duration::from_secs(30),
            poll: Duration::from_secs(1),
        }
    }
}

/// A burst of events (an editor writing, `cp`, a directory swapped in) is waited out for this
/// long without a further event before the directory is read, so a half-written file is not
/// taken for a broken one; bounded by `SETTLE_MAX`.
const SETTLE: Duration = Duration::from_millis(25);
const SETTLE_MAX: u32 = 20;

/// Which directory a watch follows: replacing the directory (a rename over it, a removal and a
/// new one) changes it, and the watch is set up again on the new one. Not alone: a directory
/// removed and made anew may get the same inode number, so an event about the directory itself
/// also marks the watch for renewal (`DirWatch::renew`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Absent,
    Dir { dev: u64, ino: u64 },
}

fn identity(dir: &Path) -> Identity {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Identity::Dir {
            dev: m.dev(),
            ino: m.ino(),
        },
        _ => Identity::Absent,
    }
}

pub struct DirWatch {
    /// Absolute, as notify makes the paths it reports.
    dir: PathBuf,
    periods: Periods,
    wake_tx: mpsc::Sender<()>,
    wake_rx: mpsc::Receiver<()>,
    /// The watcher and the directory it follows; `None` while it cannot be set up (polling).
    watching: Option<(RecommendedWatcher, Identity)>,
    /// Set by the watcher on an event about the directory itself (created, removed, renamed,
    /// replaced) or a lost event: the watch is set up again before the next read.
    renew: Arc<AtomicBool>,
    /// Whether the last attempt to watch failed, so the warning is logged once per outage.
    degraded: bool,
}

impl DirWatch {
    pub fn new(dir: &Path, periods: Periods) -> Self {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        // One pending wake-up is enough: the owner reads the whole directory.
        let (wake_tx, wake_rx) = mpsc::channel(1);
        Self {
            dir,
            periods,
            wake_tx,
            wake_rx,
            watching: None,
            renew: Arc::new(AtomicBool::new(false)),
            degraded: false,
        }
    }

    /// Sets the watches up again unless they follow the directory as it is now (first call,
    /// directory created, removed or replaced). Call it before each read of the directory: a
    /// change after it wakes the next [`Self::changed`].
    pub fn refresh(&mut self) {
        let renew = self.renew.swap(false, Ordering::SeqCst);
        let now = identity(&self.dir);
        if !renew && matches!(&self.watching, Some((_, watched)) if *watched == now) {
            return;
        }
        // The old watcher (and its thread) goes first, so events of the replaced directory stop.
        self.watching = None;
        match self.start(now) {
            Ok(watcher) => {
                if self.degraded {
                    tracing::info!(dir = %self.dir.display(), "watching the directory again");
                }
                self.degraded = false;
                self.watching = Some((watcher, now));
            }
            Err(e) => {
                if !self.degraded {
                    tracing::warn!(dir = %self.dir.display(), error = %e, every = ?self.periods.poll,
                        "cannot watch the directory; reading it periodically instead");
                }
                self.degraded = true;
            }
        }
    }

    fn start(&self, now: Identity) -> notify::Result<RecommendedWatcher> {
        let tx = self.wake_tx.clone();
        let renew = self.renew.clone();
        let dir = self.dir.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let wake = match &event {
                Ok(event) => {
                    if about_the_directory_itself(event, &dir) {
                        renew.store(true, Ordering::SeqCst);
                    }
                    concerns(event, &dir)
                }
                // A watcher error (e.g. reading the inotify fd failed): look again.
                Err(_) => true,
            };
            if wake {
                // Full: a wake-up is pending already.
                let _ = tx.try_send(());
            }
        })?;
        // The parent tells when the directory itself is created, removed or renamed over.
        let parent = self
            .dir
            .parent()
            .ok_or_else(|| notify::Error::generic("the directory has no parent"))?;
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
        if now != Identity::Absent {
            watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        }
        Ok(watcher)
    }

    /// Waits until the directory may have changed: an event (and the end of its burst), or the
    /// periodic rescan.
    pub async fn changed(&mut self) {
        let period = if self.watching.is_some() {
            self.periods.rescan
        } else {
            self.periods.poll
        };
        tokio::select! {
            _ = self.wake_rx.recv() => {
                for _ in 0..SETTLE_MAX {
                    tokio::time::sleep(SETTLE).await;
                    if self.wake_rx.try_recv().is_err() {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Whether an event may change what the directory configures: anything about the directory
/// itself or an entry in it, except mere opening and reading (our own rescans open the
/// directory and its files, which must not wake us again). Events about the parent's other
/// entries are not.
fn concerns(event: &Event, dir: &Path) -> bool {
    if event.need_rescan() {
        return true;
    }
    if let EventKind::Access(kind) = event.kind {
        if kind != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event.paths.is_empty()
        || event
            .paths
            .iter()
            .any(|p| p == dir || p.parent() == Some(dir))
}

/// Whether an event says the directory itself may be another one now (or events were lost).
fn about_the_directory_itself(event: &Event, dir: &Path) -> bool {
    event.need_rescan()
        || (!matches!(event.kind, EventKind::Access(_)) && event.paths.iter().any(|p| p == dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn events_about_the_directory_and_its_entries_wake_others_do_not() {
        let dir = Path::new("/etc/meshd/clusters");
        let ev = |kind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
        let create = EventKind::Create(CreateKind::File);
        assert!(concerns(&ev(create, "/etc/meshd/clusters/c2"), dir));
        assert!(concerns(
            &ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/meshd/clusters"
            ),
            dir
        ));
        assert!(concerns(
            &ev(EventKind::Remove(RemoveKind::Folder), "/etc/meshd/clusters"),
            dir
        ));
        assert!(concerns(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/etc/meshd/clusters/c2"
            ),
            dir
        ));
        // Our own reads, and the parent's other entries.
        assert!(!concerns(
            &ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/etc/meshd/clusters/c2"
            ),
            dir
        ));
        assert!(!concerns(&ev(create, "/etc/meshd/agent.yaml"), dir));
        assert!(!concerns(&ev(create, "/etc/meshd/clusters/sub/x"), dir));
        // Only events about the directory itself renew the watch.
        assert!(about_the_directory_itself(
            &ev(EventKind::Remove(RemoveKind::Folder), "/etc/meshd/clusters"),
            dir
        ));
        assert!(!about_the_directory_itself(
            &ev(create, "/etc/meshd/clusters/c2"),
            dir
        ));
        // A full kernel queue says nothing about paths: look again.
        assert!(concerns(
            &Event::new(EventKind::Other).set_flag(Flag::Rescan),
            dir
        ));
    }
}
