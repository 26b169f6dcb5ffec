//! `meshd completion SHELL` and `meshd man`: shell completions and man pages generated from the
//! CLI definition itself, so they never drift from the flags (`make install` puts both in
//! place).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Command};

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell, e.g. `meshd completion bash > /etc/bash_completion.d/meshd`.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for meshd.1 and one page per subcommand (meshd-certs-issue.1, ...); created if
    /// missing.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

pub fn completion(args: &CompletionArgs, mut cli: Command) -> anyhow::Result<ExitCode> {
    clap_complete::generate(args.shell, &mut cli, "meshd", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: &ManArgs, cli: Command) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut written = Vec::new();
    write_pages(&cli.clone(), "meshd", &args.out_dir, &mut written)?;
    for path in &written {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One page for `cmd` (named `name`, e.g. `meshd-certs-issue`) and one for each subcommand.
fn write_pages(
    cmd: &Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // The page's title is the full command path, so `man meshd-certs-issue` names what it is.
    let page = cmd.clone().name(name.to_owned());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
