//! The agent's settings for traffic leaving the mesh (`masquerade`, `non_masquerade_cidrs`,
//! `snat_port_range`), checked like every other field of the config (see `config.rs`).
//!
//! ```yaml
//! masquerade: true                    # default: endpoints' world traffic leaves as node_ip
//! non_masquerade_cidrs: [192.168.0.0/16]   # destinations that see the endpoint's own address
//! snat_port_range: 61000-65535        # must not overlap net.ipv4.ip_local_port_range
//! ```

use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

use super::config::ConfigProblem;

/// Default SNAT ports: above Linux's default ephemeral range (32768-60999), so the node's own
/// connections (which take ephemeral ports) never hold a port a masqueraded flow holds.
pub const DEFAULT_SNAT_PORT_RANGE: RangeInclusive<u16> = 61000..=65535;

const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Checked egress settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    pub masquerade: bool,
    pub non_masquerade_cidrs: Vec<Ipv4Net>,
    pub snat_port_range: RangeInclusive<u16>,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            masquerade: true,
            non_masquerade_cidrs: Vec::new(),
            snat_port_range: DEFAULT_SNAT_PORT_RANGE,
        }
    }
}

/// The node's ephemeral port range (of the agent's network namespace, where the node's own
/// connections are made), `None` if it cannot be read.
pub fn node_ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string(EPHEMERAL_RANGE_FILE).ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>());
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Some(lo..=hi),
        _ => None,
    }
}

/// Parses `LOW-HIGH` (inclusive).
fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range LOW-HIGH"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{s:?}: {p:?} is not a port: {e}"))
    };
    Ok(port(lo)?..=port(hi)?)
}

/// Checks the egress fields. `ephemeral` is the node's ephemeral range (None: unknown, not
/// checked). Problems are pushed with their field's name.
pub fn resolve(
    masquerade: Option<bool>,
    non_masquerade_cidrs: Option<Vec<String>>,
    snat_port_range: Option<String>,
    ephemeral: Option<RangeInclusive<u16>>,
    problems: &mut Vec<ConfigProblem>,
) -> EgressSettings {
    let mut problem =
        |field: String, reason: String| problems.push(ConfigProblem { field, reason });
    let mut cidrs: Vec<Ipv4Net> = Vec::new();
    for (i, s) in non_masquerade_cidrs.unwrap_or_default().iter().enumerate() {
        let field = format!("non_masquerade_cidrs[{i}]");
        match s.parse::<Ipv4Net>() {
            Ok(net) if net.trunc() != net => problem(
                field,
                format!("{net} has host bits set (expected {})", net.trunc()),
            ),
            Ok(net) => {
                if let Some(other) = cidrs.iter().find(|o| o.contains(&net) || net.contains(*o)) {
                    problem(field, format!("{net} overlaps {other}, listed before it"));
                } else {
                    cidrs.push(net);
                }
            }
            Err(e) => problem(field, format!("{s:?} is not an IPv4 prefix: {e}")),
        }
    }
    let mut range = DEFAULT_SNAT_PORT_RANGE;
    match snat_port_range.as_deref().map(parse_port_range) {
        None => {}
        Some(Err(reason)) => problem("snat_port_range".into(), reason),
        Some(Ok(r)) if r.is_empty() => problem(
            "snat_port_range".into(),
            format!("{}-{} is empty", r.start(), r.end()),
        ),
        Some(Ok(r)) if *r.start() == 0 => {
            problem("snat_port_range".into(), "port 0 is not a port".into())
        }
        Some(Ok(r)) => range = r,
    }
    if let Some(eph) = ephemeral {
        if range.start() <= eph.end() && eph.start() <= range.end() {
            problem(
                "snat_port_range".into(),
                format!(
                    "{}-{} overlaps the node's ephemeral port range {}-{} (net.ipv4.ip_local_port_range): the node's own connections could take a masqueraded flow's port",
                    range.start(),
                    range.end(),
                    eph.start(),
                    eph.end()
                ),
            );
        }
    }
    EgressSettings {
        masquerade: masquerade.unwrap_or(true),
        non_masquerade_cidrs: cidrs,
        snat_port_range: range,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        cidrs: &[&str],
        range: Option<&str>,
        eph: Option<RangeInclusive<u16>>,
    ) -> (EgressSettings, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let s = resolve(
            None,
            Some(cidrs.iter().map(|s| s.to_string()).collect()),
            range.map(str::to_owned),
            eph,
            &mut problems,
        );
        (s, problems)
    }

    #[test]
    fn defaults_masquerade_above_the_linux_default_ephemeral_range() {
        let (s, problems) = check(&[], None, Some(32768..=60999));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s, EgressSettings::default());
        assert!(s.masquerade);
    }

    #[test]
    fn bad_cidrs_and_ranges_name_their_field() {
        let (s, problems) = check(
            &[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.1.1/24",
                "nonsense",
                "172.16.0.0/12",
            ],
            Some("100-99"),
            None,
        );
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "non_masquerade_cidrs[1]",
                "non_masquerade_cidrs[2]",
                "non_masquerade_cidrs[3]",
                "snat_port_range"
            ]
        );
        assert!(problems[0].reason.contains("overlaps 10.0.0.0/8"));
        assert!(problems[3].reason.contains("empty"));
        assert_eq!(
            s.non_masquerade_cidrs,
            [
                "10.0.0.0/8".parse::<Ipv4Net>().unwrap(),
                "172.16.0.0/12".parse().unwrap()
            ]
        );

        let (_, problems) = check(&[], Some("61000"), None);
        assert_eq!(problems[0].field, "snat_port_range");
        let (_, problems) = check(&[], Some("0-10"), None);
        assert_eq!(problems[0].field, "snat_port_range");
    }

    #[test]
    fn a_range_overlapping_the_ephemeral_range_is_refused() {
        let (_, problems) = check(&[], Some("60000-60007"), Some(32768..=60999));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "snat_port_range");
        assert!(problems[0].reason.contains("ip_local_port_range"));
        let (s, problems) = check(&[], Some("61000-61007"), Some(32768..=60999));
        assert!(problems.is_empty());
        assert_eq!(s.snat_port_range, 61000..=61007);
    }
}
