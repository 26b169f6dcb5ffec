//! Completions and man pages come from the CLI definition: every shell gets a script that knows
//! the subcommands, and every subcommand gets a page.

mod common;

use common::meshd;

#[test]
fn completions_know_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_meshd()"),
        ("zsh", "#compdef meshd"),
        ("fish", "complete -c meshd"),
    ] {
        let out = meshd(dir.path(), &["completion", shell]).ok().stdout;
        assert!(out.contains(marker), "{shell}: {out}");
        for sub in ["clustermesh", "certs", "bootstrap", "disconnect"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    meshd(dir.path(), &["completion", "tcsh"]).fails_saying(&["tcsh"]);
}

#[test]
fn man_pages_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let run = meshd(dir.path(), &["man", "--out-dir", "man"]).ok();
    for page in [
        "meshd.1",
        "meshd-certs-issue.1",
        "meshd-clustermesh-connect.1",
        "meshd-etcd-bootstrap.1",
    ] {
        let path = dir.path().join("man").join(page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is no man page"
        );
        assert!(
            run.stdout.contains(page),
            "{page} not listed: {}",
            run.stdout
        );
    }
    let connect =
        std::fs::read_to_string(dir.path().join("man/meshd-clustermesh-connect.1")).unwrap();
    assert!(
        connect.contains("remote\\-CLUSTER") || connect.contains("remote-CLUSTER"),
        "{connect}"
    );
}
