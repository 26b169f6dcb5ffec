//! clustermesh-apiserver: the per-cluster control plane of meshd.
//!
//! - owns `meshd/cluster-config/<cluster>`;
//! - serves the gRPC API (`proto/apiserver.proto`, mTLS with the cluster's admin certificate)
//!   to apply, delete and list Services and NetworkPolicies, each request one etcd transaction;
//! - allocates service VIPs from the service CIDR, and node ports from the node port range;
//! - as leader among its replicas: publishes `meshd/state/services/v1/<cluster>/<ns>/<name>`
//!   from the applied services and the cluster's endpoints, and deletes identities no endpoint
//!   used for a grace period;
//! - with `--kvstoremesh`: mirrors every remote cluster's shared state into the local etcd
//!   (`meshd/cache/<cluster>/`, see [`mirror`]);
//! - answers `/healthz` and `/readyz`.
//!
//! The API's messages and its client (`meshd_api::apiserver`) live in `meshd-api`, so the
//! `meshd` CLI reaches the apiserver without this crate. etcd keys of its own are documented in
//! `keys`.

pub mod allocator;
pub mod config;
pub mod controller;
pub mod error;
pub mod grpc;
pub mod health;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod node_ports;
pub mod plan;
pub mod server;
pub mod store;
pub mod tls;
pub mod view;
pub mod vip;

/// Generated messages, client and server of `meshd.apiserver.v1`.
pub use meshd_api::apiserver::pb;

pub use config::{Config, ConfigArgs};
pub use error::ApiserverError;
pub use server::Apiserver;
