//! The files an operator (or whoever can write to /etc/meshd) hands the daemons: the agent's
//! config, the apiserver's config and a remote-cluster file, all from the same text.
//! Invariants beyond "no panic": a refusal names the file; every problem of a parsed agent
//! config names its field.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshd_agent::config::{parse_text, resolve, AgentArgs};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let agent = Path::new("/etc/meshd/agent.yaml");
    match parse_text(agent, text) {
        Err(e) => assert!(e.contains("/etc/meshd/agent.yaml"), "names no file: {e}"),
        Ok(file) => {
            if let Err(problems) = resolve(file, &AgentArgs::default()) {
                assert!(!problems.is_empty(), "a refusal without a problem");
                for p in &problems {
                    assert!(!p.field.is_empty(), "a problem that names no field: {p}");
                }
            }
        }
    }

    let apiserver = Path::new("/etc/meshd/apiserver.yaml");
    match clustermesh_apiserver::config::ConfigArgs::from_text(apiserver, text) {
        Err(e) => assert!(e.contains("/etc/meshd/apiserver.yaml"), "names no file: {e}"),
        Ok(args) => {
            if let Err(problems) = args.build() {
                assert!(!problems.is_empty(), "a refusal without a problem");
            }
        }
    }

    let remote = Path::new("/etc/meshd/clusters/c2.yaml");
    if let Err(e) = meshd_agent::remotes::parse(remote, text) {
        assert!(e.contains("/etc/meshd/clusters/c2.yaml"), "names no file: {e}");
    }
});
