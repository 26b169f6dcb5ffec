//! The subcommands of `meshd`, one module each, and what they share (`output`, `context`).
//! The agent itself (`meshd agent`) is the `meshd-agent` library.

pub mod certs_cmd;
pub mod context;
pub mod endpoint_cmd;
pub mod etcd_auth;
pub mod etcd_cmd;
pub mod lab_cmd;
pub mod manifest_cmd;
pub mod monitor_cmd;
pub mod observe_cmd;
pub mod output;
pub mod shell_cmd;
pub mod status_cmd;
pub mod troubleshoot_cmd;
pub mod workload;
