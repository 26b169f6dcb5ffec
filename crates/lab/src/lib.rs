//! The multi-cluster lab: the topology of DESIGN.md ("Test topology on one machine") built for
//! real, as a newcomer meets it with `make lab` and as the end-to-end lab test runs it.
//!
//! - one underlay bridge in its own namespace (`<prefix>-ul`), reachable from the host through
//!   a veth (`<prefix>-host`) so the CLI and the check can talk to etcd and the apiservers; the
//!   host namespace forwards nothing (Docker's FORWARD=DROP policy does not matter);
//! - per cluster a control-plane namespace (`<prefix>-<cluster>-cp`) with etcd (TLS,
//!   client-certificate auth, RBAC bootstrapped) and the clustermesh-apiserver;
//! - per node a namespace (`<prefix>-<cluster>-<node>`) running `meshd agent`, with endpoints
//!   created through the agent (`meshd endpoint add`), echo workloads in the `app=echo` ones.
//!
//! Everything the lab creates is recorded in `<run dir>/lab.json` as it is created, so
//! [`down`] removes exactly that, also after a half-finished `up`.

pub mod capture;
pub mod check;
pub mod otlp;
pub mod proc;
pub mod prometheus;
pub mod spec;
pub mod state;
pub mod up;

pub use check::{run_check, CheckReport, CheckResult};
pub use spec::LabSpec;
pub use state::LabState;
pub use up::{down, up, UpOptions};
