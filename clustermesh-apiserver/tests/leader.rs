//! Leader-only work: identity garbage collection, and replicas that share one etcd without
//! fighting.

mod common;

use clustermesh_apiserver::pb;
use common::*;
use meshd_kvstore::Backend;

#[tokio::test]
async fn unused_identities_are_deleted_after_the_grace_period() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let store = store(&etcd, &certs, false).await;
    // 300 is used by an endpoint; 301 by nobody (its endpoint is gone).
    add_endpoint(&store, "10.1.0.5", 300, "web", "default").await;
    add_endpoint(&store, "10.1.0.6", 301, "old", "default").await;
    remove_endpoint(&store, "10.1.0.6").await;
    let used = format!("meshd/state/identities/v1/c1/id/{}", (1 << 16) | 300);
    let unused = format!("meshd/state/identities/v1/c1/id/{}", (1 << 16) | 301);

    let server = start(config(&etcd, &certs, false)).await;
    eventually("unused identity collected", || async {
        get(&store, &unused).await.is_none().then_some(())
    })
    .await;
    assert!(get(&store, &used).await.is_some());
    // The agents' index entry of the collected identity went with it; the used one stayed.
    let index = keys(&store, "meshd/state/identity-labels/v1/c1/").await;
    assert_eq!(
        index,
        ["meshd/state/identity-labels/v1/c1/app=web,meshd.io/cluster=c1,meshd.io/namespace=default"]
    );

    // The used one becomes unused too once its endpoint goes.
    remove_endpoint(&store, "10.1.0.5").await;
    eventually("second identity collected", || async {
        get(&store, &used).await.is_none().then_some(())
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_identity_in_use_again_survives() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let store = store(&etcd, &certs, false).await;
    let mut cfg = config(&etcd, &certs, false);
    // Long enough that the endpoint below arrives within it.
    cfg.identity_gc_grace = std::time::Duration::from_secs(3);
    let server = start(cfg).await;
    add_endpoint(&store, "10.1.0.6", 301, "old", "default").await;
    remove_endpoint(&store, "10.1.0.6").await;
    // Used again: the agent re-publishes an endpoint with that identity.
    add_endpoint(&store, "10.1.0.7", 301, "old", "default").await;
    // A marker identity written after, unused: once it is collected, the grace period of
    // the first has passed as well.
    add_endpoint(&store, "10.1.0.8", 302, "marker", "default").await;
    remove_endpoint(&store, "10.1.0.8").await;
    let marker = format!("meshd/state/identities/v1/c1/id/{}", (1 << 16) | 302);
    eventually("marker collected", || async {
        get(&store, &marker).await.is_none().then_some(())
    })
    .await;
    let kept = format!("meshd/state/identities/v1/c1/id/{}", (1 << 16) | 301);
    assert!(get(&store, &kept).await.is_some());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn replicas_share_one_etcd_without_fighting_and_fail_over() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let store = store(&etcd, &certs, false).await;
    let a = start(config(&etcd, &certs, false)).await;
    let b = start(config(&etcd, &certs, false)).await;
    let leader_key = "meshd/leader/clustermesh-apiserver/c1";
    eventually("a leader", || async { get(&store, leader_key).await }).await;

    // Both replicas serve the API; the one leader publishes.
    let mut api_a = admin(&a, &certs).await;
    let mut api_b = admin(&b, &certs).await;
    add_endpoint(&store, "10.1.0.5", 300, "echo", "default").await;
    for (api, name) in [(&mut api_a, "one"), (&mut api_b, "two")] {
        api.apply(pb::ApplyRequest {
            documents: vec![pb::SourceDocument {
                file: format!("{name}.yaml"),
                index: 1,
                text: service_yaml(name, "echo", "service.meshd.io/global: \"true\"", ""),
            }],
            dry_run: false,
        })
        .await
        .unwrap();
    }
    for name in ["one", "two"] {
        eventually("published", || async {
            record(&store, name)
                .await
                .filter(|r| backends(r) == ["10.1.0.5:8080"])
        })
        .await;
    }
    // Settled: the records are written once, not rewritten by two writers taking turns.
    let rev_of = |name: &'static str| {
        let store = store.clone();
        async move {
            let key = format!("meshd/state/services/v1/c1/default/{name}");
            store.range(&key, None, 0, 1).await.unwrap().kvs[0].mod_revision
        }
    };
    let before = rev_of("one").await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        rev_of("one").await,
        before,
        "record rewritten while unchanged"
    );

    // The leader goes; the other takes over and keeps records current. (Read the leader again:
    // on a loaded machine leadership may have moved already, which is allowed.)
    let first = get(&store, leader_key).await.unwrap();
    let (leader, follower) = if first == a.replica_id.as_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    leader.shutdown().await.unwrap();
    let second = eventually("a new leader", || async {
        get(&store, leader_key).await.filter(|v| *v != first)
    })
    .await;
    assert_ne!(second, first);
    add_endpoint(&store, "10.1.0.6", 300, "echo", "default").await;
    eventually("new leader publishes", || async {
        record(&store, "two")
            .await
            .filter(|r| backends(r) == ["10.1.0.5:8080", "10.1.0.6:8080"])
    })
    .await;
    follower.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_the_leader_publishes() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let store = store(&etcd, &certs, false).await;
    // Another replica (not running here) holds the leader key.
    let leader_key = "meshd/leader/clustermesh-apiserver/c1";
    store
        .put(leader_key, b"someone-else".to_vec(), None)
        .await
        .unwrap();
    let server = start(config(&etcd, &certs, false)).await;
    let mut api = admin(&server, &certs).await;
    // The API works without leadership: the service is stored...
    api.apply(pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: "a.yaml".into(),
            index: 1,
            text: service_yaml("a", "a", "", ""),
        }],
        dry_run: false,
    })
    .await
    .unwrap();
    // ...and the cluster config is written, so this replica is up and running its loops.
    eventually("ready", || async { server.health.readiness().ok() }).await;
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(record(&store, "a").await.is_none(), "a follower published");
    }
    // The other replica goes away: this one leads and publishes.
    store.delete(leader_key).await.unwrap();
    eventually("published by the new leader", || async {
        record(&store, "a").await
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn publishing_resumes_after_an_etcd_restart() {
    let certs = Certs::new();
    let Some(mut etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let mut api = admin(&server, &certs).await;
    {
        let store = store(&etcd, &certs, false).await;
        add_endpoint(&store, "10.1.0.5", 300, "echo", "default").await;
    }
    api.apply(pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: "echo.yaml".into(),
            index: 1,
            text: service_yaml("echo", "echo", "", ""),
        }],
        dry_run: false,
    })
    .await
    .unwrap();
    {
        let store = store(&etcd, &certs, false).await;
        eventually("published", || async {
            record(&store, "echo")
                .await
                .filter(|r| r.backends.len() == 1)
        })
        .await;
    }
    // etcd goes away (the leader's watch breaks) and comes back on the same data and port.
    etcd.stop();
    etcd.restart().unwrap();
    let store = store(&etcd, &certs, false).await;
    add_endpoint(&store, "10.1.0.6", 300, "echo", "default").await;
    eventually("published after the restart", || async {
        record(&store, "echo")
            .await
            .filter(|r| backends(r) == ["10.1.0.5:8080", "10.1.0.6:8080"])
    })
    .await;
    server.shutdown().await.unwrap();
}
