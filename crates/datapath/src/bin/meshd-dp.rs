//! `meshd-dp`: operate a node's datapath outside the agent.
//!
//! - `meshd-dp reload --pin-dir DIR`: load the embedded programs in this (new) process, reuse
//!   the maps pinned under DIR and swap the programs of every pinned link atomically, then
//!   exit; what the agent does at every start, usable on its own to upgrade or repair.
//! - `meshd-dp status --pin-dir DIR`: pinned links and non-zero counters.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshd_datapath::{Datapath, DatapathMaps};
use meshd_ebpf::abi;

#[derive(Parser)]
#[command(about = "Operate a meshd node's eBPF datapath")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the programs and swap them into every pinned link (maps are reused).
    Reload {
        /// The node's pin directory on bpffs.
        #[arg(long)]
        pin_dir: PathBuf,
    },
    /// Print pinned links and non-zero counters.
    Status {
        #[arg(long)]
        pin_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Reload { pin_dir } => {
            let datapath = Datapath::load(&pin_dir)
                .with_context(|| format!("loading the datapath at {}", pin_dir.display()))?;
            let replaced = datapath.replaced_at_load();
            println!("replaced the programs of {} link(s)", replaced.len());
            for (point, ifname) in replaced {
                println!("  {point:?} {ifname}");
            }
        }
        Cmd::Status { pin_dir } => {
            for (point, ifname) in meshd_datapath::loader::pinned_links(&pin_dir)? {
                println!("link {point:?} {ifname}");
            }
            let maps = DatapathMaps::open(&pin_dir)?;
            for c in maps.counters()? {
                println!(
                    "{:?} {} packets={} bytes={}",
                    c.direction,
                    abi::reason_name(c.reason),
                    c.packets,
                    c.bytes
                );
            }
        }
    }
    Ok(())
}
