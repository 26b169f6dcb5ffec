//! Output formats shared by every subcommand: a table for people, `-o json` for scripts.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn print_version(out: &OutputArgs) -> anyhow::Result<ExitCode> {
    let version = env!("CARGO_PKG_VERSION");
    match out.format {
        Format::Table => println!("meshd {version}"),
        Format::Json => println!("{}", serde_json::json!({ "version": version })),
    }
    Ok(ExitCode::SUCCESS)
}
