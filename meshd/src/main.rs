//! `meshd`: the node agent and the command-line tool of the mesh.
//!
//! main only parses the command line and dispatches; each subcommand lives in its own module
//! under `cli/`, and the agent runtime in the `meshd-agent` crate.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::{
    certs_cmd, context, endpoint_cmd, etcd_cmd, lab_cmd, manifest_cmd, monitor_cmd, observe_cmd,
    output, shell_cmd, status_cmd, troubleshoot_cmd, workload,
};

/// meshd joins independent clusters of Linux nodes into one network: endpoints in any cluster
/// reach each other over a VXLAN overlay that carries the sender's security identity, so
/// identity-based policy holds across clusters.
#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    telemetry: meshd_telemetry::TelemetryArgs,
    #[command(flatten)]
    context: context::ContextArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // Subcommands are added by their modules.
    /// Mesh CA and cluster certificates: create, issue, rotate, inspect, check.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Prepare a cluster's etcd for the mesh: users, roles, auth.
    #[command(subcommand)]
    Etcd(etcd_cmd::EtcdCommand),
    /// Test workloads for endpoints: an HTTP echo server and a request client.
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
    /// Run the node agent (datapath, endpoints, cluster mesh).
    Agent(Box<meshd_agent::config::AgentArgs>),
    /// Endpoints of the local node: add, del, list.
    #[command(subcommand)]
    Endpoint(endpoint_cmd::EndpointCommand),
    /// The node, its endpoints, the datapath and every cluster it sees.
    Status(status_cmd::StatusArgs),
    /// The clusters of the mesh as this node sees them.
    #[command(subcommand)]
    Clustermesh(status_cmd::ClustermeshCommand),
    /// Packets the node's datapath drops, as they happen: reason, addresses, identities.
    ///
    /// One line per drop, e.g.
    ///
    ///   09:56:06.869 DROP policy-denied  ingress tcp  10.1.1.1:45966 (c1/256 app=web) ->
    ///   10.1.2.1:8080 (c1/257 app=echo) ifindex 3
    ///
    /// Identities read `<cluster>/<number>` with their labels as this node knows them;
    /// `world`, `host` and `remote-node` are the reserved ones. `meshd status` counts every
    /// drop by reason, also those that happened while nobody watched.
    Monitor(monitor_cmd::MonitorArgs),
    /// Every new connection and every drop on the node, as it happens, with both sides'
    /// identities and labels and the service a connection was sent to.
    ///
    /// One line per flow, e.g.
    ///
    ///   09:56:06.869 n1 FORWARDED forwarded-tunnel egress tcp 10.1.1.1:45966 (c1/256 app=web)
    ///   -> 10.2.1.1:8080 (c2/257 app=echo) via service 10.96.0.10:80
    ///
    /// Filter with --from-label, --to-label, --verdict, --protocol, --port and --cluster; start
    /// with the recent past with --since. The datapath reports at most `flow_event_rate` events
    /// per second per CPU (agent config); what it did not send is counted and shown.
    Observe(observe_cmd::ObserveArgs),
    /// Find out why something does not work: `troubleshoot clustermesh` checks every remote
    /// cluster step by step and says what to fix.
    #[command(subcommand)]
    Troubleshoot(troubleshoot_cmd::TroubleshootCommand),
    /// The multi-cluster lab in network namespaces: up, down, status, check, exec.
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
    /// Apply Service and NetworkPolicy manifests to a cluster's apiserver (whole or not at all).
    Apply(manifest_cmd::ApplyArgs),
    /// Delete the objects named by manifests from a cluster's apiserver.
    Delete(manifest_cmd::DeleteArgs),
    /// List services or policies of a cluster's apiserver.
    Get(manifest_cmd::GetArgs),
    /// CLI contexts (apiservers and their certificates): set-context, use-context, get-contexts.
    #[command(subcommand)]
    Config(context::ConfigCommand),
    /// Print version information.
    Version(output::OutputArgs),
    /// Shell completions (bash, zsh, fish, elvish, powershell) on standard output.
    Completion(shell_cmd::CompletionArgs),
    /// Man pages of meshd and every subcommand, into a directory.
    Man(shell_cmd::ManArgs),
}

/// Commands that print and exit die quietly when their reader goes away (`meshd status |
/// head`), as Unix tools do, instead of panicking on a broken pipe. Rust ignores SIGPIPE by
/// default; the long-running commands (agent, workloads) and the lab's `up` and `down` (which
/// must not stop half-way through starting or removing processes) keep it so, handling write
/// errors where they occur.
fn default_sigpipe_for(command: &Command) {
    if matches!(
        command,
        Command::Agent(_)
            | Command::Workload(_)
            | Command::Lab(lab_cmd::LabCommand::Up(_) | lab_cmd::LabCommand::Down(_))
    ) {
        return;
    }
    // SAFETY: called before any thread is started; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    default_sigpipe_for(&cli.command);
    // Held to the end of main: dropping it flushes exported spans.
    let _telemetry = match meshd_telemetry::init(&cli.telemetry, "meshd") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("meshd: {e}");
            return ExitCode::from(64);
        }
    };
    let result = match cli.command {
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Etcd(cmd) => etcd_cmd::run(cmd),
        Command::Workload(cmd) => workload::run(cmd),
        Command::Agent(args) => meshd_agent::run(*args),
        Command::Endpoint(cmd) => endpoint_cmd::run(cmd),
        Command::Status(args) => status_cmd::run_status(args),
        Command::Clustermesh(cmd) => status_cmd::run_clustermesh(cmd),
        Command::Monitor(args) => monitor_cmd::run(args),
        Command::Observe(args) => observe_cmd::run(args),
        Command::Troubleshoot(cmd) => troubleshoot_cmd::run(cmd),
        Command::Lab(cmd) => lab_cmd::run(cmd, &cli.context),
        Command::Apply(args) => manifest_cmd::apply(args, &cli.context),
        Command::Delete(args) => manifest_cmd::delete(args, &cli.context),
        Command::Get(args) => manifest_cmd::get(args, &cli.context),
        Command::Config(cmd) => context::run(cmd, &cli.context),
        Command::Version(out) => output::print_version(&out),
        Command::Completion(args) => shell_cmd::completion(&args, Cli::command()),
        Command::Man(args) => shell_cmd::man(&args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
