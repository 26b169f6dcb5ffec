//! CLI contexts, like kubectl's: named apiservers (address and certificate files) in one YAML
//! file, one of them current. `meshd config set-context | use-context | get-contexts` edit it;
//! `--context NAME` picks another for one command.
//!
//! ```yaml
//! current-context: c1
//! contexts:
//!   - name: c1
//!     server: https://10.0.0.1:9443
//!     ca: c1/ca.pem          # relative paths are relative to this file's directory
//!     cert: c1/admin.pem
//!     key: c1/admin-key.pem
//! ```
//!
//! The file is `$MESHD_CONFIG`, else `~/.config/meshd/config.yaml`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use meshd_certs::TlsFiles;
use serde::{Deserialize, Serialize};

use super::output::Format;

/// Where the contexts file is and which context to use. Global flags of `meshd`, so both
/// `meshd --context c2 get services` and `meshd get services --context c2` work.
#[derive(Debug, Clone, Args)]
pub struct ContextArgs {
    /// Context (apiserver and certificates) to use instead of the current one.
    #[arg(long, global = true, value_name = "NAME", env = "MESHD_CONTEXT")]
    pub context: Option<String>,
    /// Contexts file [default: $MESHD_CONFIG or ~/.config/meshd/config.yaml].
    #[arg(
        long = "meshd-config",
        global = true,
        value_name = "FILE",
        env = "MESHD_CONFIG"
    )]
    pub file: Option<PathBuf>,
}

impl ContextArgs {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.file {
            Some(p) => Ok(p.clone()),
            None => {
                let home = std::env::var_os("HOME")
                    .context("neither --meshd-config, $MESHD_CONFIG nor $HOME is set")?;
                Ok(PathBuf::from(home).join(".config/meshd/config.yaml"))
            }
        }
    }

    /// The selected context, with paths resolved.
    pub fn resolve(&self) -> anyhow::Result<ResolvedContext> {
        let path = self.path()?;
        if !path.exists() {
            bail!(
                "no contexts file at {}; create one with `meshd config set-context NAME --server https://HOST:PORT --ca ... --cert ... --key ...` (the lab writes its own: see `meshd lab status`)",
                path.display()
            );
        }
        let file = ContextFile::load(&path)?;
        let name = match (&self.context, &file.current_context) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n.clone(),
            (None, None) => bail!(
                "{}: no current context; pass --context NAME or run `meshd config use-context NAME`",
                path.display()
            ),
        };
        let ctx = file.get(&name).with_context(|| {
            format!(
                "{}: no context named {name:?} (known: {})",
                path.display(),
                file.names().join(", ")
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(ResolvedContext {
            name: ctx.name.clone(),
            server: ctx.server.clone(),
            tls: TlsFiles::new(
                base.join(&ctx.ca),
                base.join(&ctx.cert),
                base.join(&ctx.key),
            ),
        })
    }
}

/// A context ready to connect with.
#[derive(Debug, Clone)]
pub struct ResolvedContext {
    pub name: String,
    pub server: String,
    pub tls: TlsFiles,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// `https://HOST:PORT` of the cluster's apiserver.
    pub server: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

impl ContextFile {
    /// The file's contexts; a missing file is an empty one.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml::from_str(&text)
                .with_context(|| format!("{}: not a meshd contexts file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes atomically (temp file + rename), creating the directory, mode 0600: the file
    /// points at private keys.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_yaml::to_string(self)?;
        let tmp = path.with_extension("yaml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.contexts.iter().map(|c| c.name.as_str()).collect()
    }

    /// Adds every context of `other` (replacing those of the same name), as `kind` merges its
    /// clusters into kubeconfig; the names merged. The current context stays; with none,
    /// `other`'s current (or first) becomes current.
    pub fn merge(&mut self, other: &ContextFile) -> Vec<String> {
        let had_current = self.current_context.is_some();
        for ctx in &other.contexts {
            self.set(ctx.clone());
        }
        if !had_current {
            self.current_context = other
                .current_context
                .clone()
                .or_else(|| other.contexts.first().map(|c| c.name.clone()));
        }
        other.contexts.iter().map(|c| c.name.clone()).collect()
    }

    /// Removes the contexts `merge` added from `other`: same name *and* same server, so a
    /// context of the same name the user pointed elsewhere stays. The names removed.
    pub fn unmerge(&mut self, other: &ContextFile) -> Vec<String> {
        let mut removed = Vec::new();
        self.contexts.retain(|c| {
            let ours = other
                .contexts
                .iter()
                .any(|o| o.name == c.name && o.server == c.server);
            if ours {
                removed.push(c.name.clone());
            }
            !ours
        });
        if self
            .current_context
            .as_ref()
            .is_some_and(|cur| removed.contains(cur))
        {
            self.current_context = self.contexts.first().map(|c| c.name.clone());
        }
        removed
    }

    /// Adds or replaces the context of that name; the first context becomes current.
    pub fn set(&mut self, ctx: Context) {
        match self.contexts.iter_mut().find(|c| c.name == ctx.name) {
            Some(existing) => *existing = ctx,
            None => {
                if self.current_context.is_none() {
                    self.current_context = Some(ctx.name.clone());
                }
                self.contexts.push(ctx);
            }
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Add or replace a context: an apiserver and the certificate files to reach it with.
    SetContext(SetContextArgs),
    /// Make a context the current one.
    UseContext(UseContextArgs),
    /// List the contexts (the current one marked with *).
    GetContexts(GetContextsArgs),
}

#[derive(Debug, Args)]
pub struct SetContextArgs {
    pub name: String,
    /// The apiserver, https://HOST:PORT.
    #[arg(long)]
    pub server: String,
    /// The mesh CA.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Admin client certificate of the cluster (e.g. c1/admin.pem).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct UseContextArgs {
    pub name: String,
}

#[derive(Debug, Args)]
pub struct GetContextsArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

pub fn run(cmd: ConfigCommand, file: &ContextArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::SetContext(a) => {
            let path = file.path()?;
            let mut file = ContextFile::load(&path)?;
            if !a.server.starts_with("https://") {
                bail!("--server {:?}: expected https://HOST:PORT", a.server);
            }
            // Paths given on the command line are relative to where the command runs; store
            // them absolute so the file works from anywhere.
            file.set(Context {
                name: a.name.clone(),
                server: a.server,
                ca: absolute(a.ca)?,
                cert: absolute(a.cert)?,
                key: absolute(a.key)?,
            });
            file.save(&path)?;
            println!("context {:?} set in {}", a.name, path.display());
        }
        ConfigCommand::UseContext(a) => {
            let path = file.path()?;
            let mut file = ContextFile::load(&path)?;
            if file.get(&a.name).is_none() {
                bail!(
                    "{}: no context named {:?} (known: {})",
                    path.display(),
                    a.name,
                    file.names().join(", ")
                );
            }
            file.current_context = Some(a.name.clone());
            file.save(&path)?;
            println!("switched to context {:?}", a.name);
        }
        ConfigCommand::GetContexts(a) => {
            let path = file.path()?;
            let file = ContextFile::load(&path)?;
            match a.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&file)?),
                Format::Table => {
                    println!("CURRENT  NAME{:12}SERVER", "");
                    for c in &file.contexts {
                        let mark = if file.current_context.as_deref() == Some(&c.name) {
                            "*"
                        } else {
                            ""
                        };
                        println!("{mark:<8} {:<15} {}", c.name, c.server);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(name: &str, server: &str) -> Context {
        Context {
            name: name.into(),
            server: server.into(),
            ca: "ca.pem".into(),
            cert: "admin.pem".into(),
            key: "admin-key.pem".into(),
        }
    }

    #[test]
    fn a_lab_merges_its_contexts_and_takes_only_its_own_back() {
        let mut user = ContextFile::default();
        user.set(ctx("prod", "https://10.0.0.1:9443"));
        user.set(ctx("lab-c2", "https://192.0.2.1:9443"));
        let lab = ContextFile {
            current_context: Some("lab-c1".into()),
            contexts: vec![
                ctx("lab-c1", "https://10.77.0.101:9443"),
                ctx("lab-c2", "https://10.77.0.102:9443"),
            ],
        };
        assert_eq!(user.merge(&lab), ["lab-c1", "lab-c2"]);
        assert_eq!(
            user.current_context.as_deref(),
            Some("prod"),
            "the user's stays"
        );
        assert_eq!(
            user.get("lab-c2").unwrap().server,
            "https://10.77.0.102:9443"
        );
        let mut removed = user.unmerge(&lab);
        removed.sort();
        assert_eq!(removed, ["lab-c1", "lab-c2"]);
        assert_eq!(user.names(), ["prod"]);

        // A user context of the same name pointing elsewhere is not the lab's to remove.
        let mut other = ContextFile::default();
        other.set(ctx("lab-c1", "https://192.0.2.9:9443"));
        assert!(other.unmerge(&lab).is_empty());
        // With no current context the lab's becomes current, and goes with it.
        let mut empty = ContextFile::default();
        empty.merge(&lab);
        assert_eq!(empty.current_context.as_deref(), Some("lab-c1"));
        empty.unmerge(&lab);
        assert_eq!(empty.current_context, None);
    }

    #[test]
    fn set_use_and_resolve_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.yaml");
        let mut file = ContextFile::load(&path).unwrap();
        assert!(file.contexts.is_empty());
        file.set(Context {
            name: "c1".into(),
            server: "https://127.0.0.1:1".into(),
            ca: "certs/ca.pem".into(),
            cert: "/abs/admin.pem".into(),
            key: "certs/admin-key.pem".into(),
        });
        file.set(Context {
            name: "c2".into(),
            server: "https://127.0.0.1:2".into(),
            ca: "ca.pem".into(),
            cert: "a.pem".into(),
            key: "k.pem".into(),
        });
        assert_eq!(file.current_context.as_deref(), Some("c1"));
        file.save(&path).unwrap();
        let args = ContextArgs {
            context: None,
            file: Some(path.clone()),
        };
        let r = args.resolve().unwrap();
        assert_eq!(r.name, "c1");
        assert_eq!(r.tls.ca, dir.path().join("sub/certs/ca.pem"));
        assert_eq!(r.tls.cert, PathBuf::from("/abs/admin.pem"));
        let r = ContextArgs {
            context: Some("c2".into()),
            file: Some(path.clone()),
        }
        .resolve()
        .unwrap();
        assert_eq!(r.server, "https://127.0.0.1:2");
        let err = ContextArgs {
            context: Some("c3".into()),
            file: Some(path),
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("c1, c2"), "{err}");
    }
}
