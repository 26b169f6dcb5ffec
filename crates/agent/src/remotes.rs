//! Remote clusters, configured by a directory with one file per cluster (file name = cluster
//! name, an optional `.yaml`/`.yml`/`.json` extension is ignored):
//!
//! ```yaml
//! endpoints: [https://192.168.60.200:2379]
//! ca: c2/ca.pem            # relative paths are relative to the directory
//! cert: c1/remote.pem      # this cluster's (c1's) remote certificate: CN remote-c1
//! key: c1/remote-key.pem
//! ```
//!
//! The certificate is this cluster's own `remote-<cluster>` certificate, the same in every
//! remote file: each remote cluster lets it read (`meshd clustermesh connect <cluster>` there)
//! or cuts it off, on its own.
//!
//! The directory is watched (inotify, [`crate::dir_watch`]), so a change takes effect at once:
//! a new file starts a watcher of that cluster, a changed file restarts it (keeping the view's
//! state of the cluster, which the relist then sweeps), a removed file stops it and drains
//! everything of that cluster from the view. Each change is found by reading the whole
//! directory and comparing it with what runs; that read also happens every 30 s as a safety
//! net, and every second while the directory cannot be watched ([`Periods`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshd_certs::TlsFiles;
use meshd_mesh::{ClusterEvent, EventKind};
use meshd_state::ClusterName;
use tokio::sync::watch;

use crate::dir_watch::{DirWatch, Periods};
use crate::inputs::InputQueues;
use crate::watcher::{ClusterWatcher, Connection, Probe, RemoteLimits, ViewInput};

/// One remote cluster as status shows it.
#[derive(Debug, Clone)]
pub struct RemoteEntry {
    pub endpoints: String,
    /// The file could not be used (parse error, the local cluster's name...).
    pub config_error: Option<String>,
    pub connection: Option<watch::Receiver<Connection>>,
    /// The files the cluster is read with, for the certificate expiry report.
    pub tls: Option<TlsFiles>,
}

pub type Registry = BTreeMap<ClusterName, RemoteEntry>;

pub use meshd_kvstore::remote_file::{check_remote_certificate, cluster_of, parse};

struct Running {
    text: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Watches the directory until the agent stops.
pub async fn run(
    dir: PathBuf,
    local: ClusterName,
    queues: InputQueues,
    registry: watch::Sender<Arc<Registry>>,
    limits: RemoteLimits,
) {
    run_with_periods(dir, local, queues, registry, limits, Periods::default()).await
}

/// [`run`] with the periods of the reads that no event asked for as a parameter (tests set them
/// out of reach, to see the watch alone at work).
pub async fn run_with_periods(
    dir: PathBuf,
    local: ClusterName,
    queues: InputQueues,
    registry: watch::Sender<Arc<Registry>>,
    limits: RemoteLimits,
    periods: Periods,
) {
    let mut remotes = Remotes {
        local,
        queues,
        limits,
        running: BTreeMap::new(),
        registry: BTreeMap::new(),
    };
    let mut watch = DirWatch::new(&dir, periods);
    loop {
        // Before the read: whatever changes after it wakes the next round.
        watch.refresh();
        remotes
            .apply(meshd_kvstore::remote_file::read_dir(&dir))
            .await;
        registry.send_replace(Arc::new(remotes.registry.clone()));
        watch.changed().await;
    }
}

/// The remote clusters running, against which each read of the directory is compared.
struct Remotes {
    local: ClusterName,
    queues: InputQueues,
    /// What each remote cluster may make this node hold.
    limits: RemoteLimits,
    running: BTreeMap<ClusterName, Running>,
    registry: Registry,
}

impl Remotes {
    /// Drives the running watchers to the files `present`.
    async fn apply(&mut self, present: BTreeMap<ClusterName, (PathBuf, String)>) {
        let local = &self.local;
        let queues = &self.queues;
        let running = &mut self.running;
        let reg = &mut self.registry;
        // Removed (or changed) files stop their watcher.
        let gone: Vec<ClusterName> = running
            .iter()
            .filter(|(c, r)| present.get(*c).is_none_or(|(_, t)| *t != r.text))
            .map(|(c, _)| c.clone())
            .collect();
        for cluster in gone {
            let r = running.remove(&cluster).expect("listed");
            if let Some(task) = r.task {
                task.abort();
            }
            reg.remove(&cluster);
            if !present.contains_key(&cluster) {
                tracing::info!(%cluster, "remote cluster file removed; disconnecting and draining");
                // The cluster's own queue: after whatever its aborted watcher queued.
                let _ = queues
                    .sender(&cluster)
                    .send(ViewInput::Cluster(ClusterEvent::new(
                        cluster.clone(),
                        EventKind::ClusterRemoved,
                    )))
                    .await;
            } else {
                tracing::info!(%cluster, "remote cluster file changed; reconnecting");
            }
        }

        for (cluster, (path, text)) in present {
            if running.contains_key(&cluster) {
                continue;
            }
            let mut entry = RemoteEntry {
                endpoints: String::new(),
                config_error: None,
                connection: None,
                tls: None,
            };
            let config = meshd_kvstore::remote_file::load(&cluster, &path, &text, local);
            let task = match config {
                Err(e) => {
                    tracing::error!(%cluster, error = %e, "remote cluster refused");
                    entry.config_error = Some(e);
                    None
                }
                Ok(config) => {
                    entry.endpoints = config.describe();
                    entry.tls = config.tls.clone();
                    match meshd_kvstore::connect_lazy(&config).await {
                        Err(e) => {
                            tracing::error!(%cluster, error = %e, "remote cluster refused");
                            entry.config_error = Some(e.to_string());
                            None
                        }
                        Ok(store) => {
                            tracing::info!(%cluster, endpoints = entry.endpoints, "connecting to remote cluster");
                            let (conn_tx, conn_rx) = watch::channel(Connection::default());
                            entry.connection = Some(conn_rx);
                            let watcher = ClusterWatcher {
                                cluster: cluster.clone(),
                                probe: Probe::Etcd(Box::new(store.clone())),
                                backend: store,
                                local: false,
                                tx: queues.sender(&cluster),
                                connection: conn_tx,
                                limits: self.limits.clone(),
                            };
                            Some(tokio::spawn(watcher.run()))
                        }
                    }
                }
            };
            reg.insert(cluster.clone(), entry);
            running.insert(cluster, Running { text, task });
        }
    }
}

/// The remote clusters configured right now (for the start-up gate).
pub fn configured(dir: &Path, local: &ClusterName) -> Vec<ClusterName> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .filter_map(|e| cluster_of(&e.path()))
                .filter(|c| c != local)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run_with_periods` on a directory, with every read that no event asked for an hour
    /// away: what it sees within a test's deadline came through the watch.
    struct Watched {
        registry: watch::Receiver<Arc<Registry>>,
        view: crate::inputs::Inputs,
        task: tokio::task::JoinHandle<()>,
    }

    const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
    const AN_HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    impl Watched {
        async fn start(dir: &Path) -> Self {
            let (queues, view) = crate::inputs::input_queues(1024);
            let (registry_tx, mut registry) = watch::channel(Arc::new(Registry::new()));
            let task = tokio::spawn(run_with_periods(
                dir.to_owned(),
                ClusterName::new("c1").unwrap(),
                queues,
                registry_tx,
                RemoteLimits::default(),
                Periods {
                    rescan: AN_HOUR,
                    poll: AN_HOUR,
                },
            ));
            // The first read of the directory is done; the watch is in place.
            tokio::time::timeout(DEADLINE, registry.changed())
                .await
                .expect("first read of the directory")
                .unwrap();
            Self {
                registry,
                view,
                task,
            }
        }

        /// Waits until the registry names exactly `clusters`, each connected to its endpoints.
        async fn until_clusters(&mut self, clusters: &[&str]) {
            let want: Vec<&str> = clusters.to_vec();
            let reached = matches!(
                tokio::time::timeout(
                    DEADLINE,
                    self.registry.wait_for(|r| {
                        r.keys().map(|c| c.as_str()).eq(want.iter().copied())
                            && r.values()
                                .all(|e| e.config_error.is_none() && e.connection.is_some())
                    }),
                )
                .await,
                Ok(Ok(_))
            );
            assert!(
                reached,
                "the registry did not come to {want:?} within {DEADLINE:?}: {:?}",
                self.registry.borrow().keys().collect::<Vec<_>>()
            );
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn write_cluster_file(dir: &Path, name: &str) {
        // An address where nothing listens: the watcher starts and keeps retrying, which is
        // all the registry shows.
        std::fs::write(dir.join(name), "endpoints: [http://127.0.0.1:9]\n").unwrap();
    }

    #[tokio::test]
    async fn a_new_cluster_file_takes_effect_without_a_periodic_read() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("clusters");
        std::fs::create_dir(&dir).unwrap();
        let mut w = Watched::start(&dir).await;
        assert!(w.registry.borrow().is_empty());

        write_cluster_file(&dir, "c2");
        w.until_clusters(&["c2"]).await;

        // Our own reads of the directory and its files do not wake the watch again: idle, it
        // stays idle (a feedback loop would re-read it every few milliseconds).
        let mut rounds = 0;
        let idle = tokio::time::sleep(std::time::Duration::from_secs(2));
        tokio::pin!(idle);
        loop {
            tokio::select! {
                _ = &mut idle => break,
                r = w.registry.changed() => { r.unwrap(); rounds += 1; }
            }
        }
        assert!(rounds <= 2, "{rounds} reads of an unchanged directory");
    }

    #[tokio::test]
    async fn a_removed_cluster_file_disconnects_and_drains_the_cluster() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("clusters");
        std::fs::create_dir(&dir).unwrap();
        write_cluster_file(&dir, "c2");
        write_cluster_file(&dir, "c3");
        let mut w = Watched::start(&dir).await;
        w.until_clusters(&["c2", "c3"]).await;

        std::fs::remove_file(dir.join("c2")).unwrap();
        w.until_clusters(&["c3"]).await;
        // The view is told to drain everything of c2.
        let drained = tokio::time::timeout(DEADLINE, async {
            let mut turn = Vec::new();
            while w.view.next_turn(&mut turn).await {
                for input in turn.drain(..) {
                    if let ViewInput::Cluster(ev) = input {
                        if ev.cluster.as_str() == "c2"
                            && matches!(ev.kind, EventKind::ClusterRemoved)
                        {
                            return true;
                        }
                    }
                }
            }
            false
        })
        .await;
        assert_eq!(
            drained,
            Ok(true),
            "no ClusterRemoved for c2 reached the view"
        );
    }

    #[tokio::test]
    async fn renamed_files_and_a_replaced_or_recreated_directory_are_followed() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("clusters");
        // The directory does not exist yet: its parent's watch sees it come.
        let mut w = Watched::start(&dir).await;
        std::fs::create_dir(&dir).unwrap();
        write_cluster_file(&dir, "c2");
        w.until_clusters(&["c2"]).await;

        // Written aside and renamed into place, as editors and config tools do.
        write_cluster_file(&dir, "c3.tmp");
        std::fs::rename(dir.join("c3.tmp"), dir.join("c3")).unwrap();
        w.until_clusters(&["c2", "c3"]).await;

        // The whole directory replaced by another one.
        let next = base.path().join("clusters.next");
        std::fs::create_dir(&next).unwrap();
        write_cluster_file(&next, "c4");
        std::fs::rename(&dir, base.path().join("clusters.old")).unwrap();
        std::fs::rename(&next, &dir).unwrap();
        w.until_clusters(&["c4"]).await;

        // Removed, then made anew.
        std::fs::remove_dir_all(&dir).unwrap();
        w.until_clusters(&[]).await;
        std::fs::create_dir(&dir).unwrap();
        write_cluster_file(&dir, "c5");
        w.until_clusters(&["c5"]).await;
    }
}
