//! The alert rules and the dashboard in `deploy/` against the real thing: `promtool` checks the
//! rules and runs their unit tests, and every metric the rules and the dashboard's queries name
//! is exported by a running deployment (two clusters with a dup, every process scraped).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};

use ferry_tests::dup::{set_keys, wait_converged, TwoClusters};
use ferry_tests::etcd::http_get;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .context("run promtool (Debian's `prometheus` package; scripts/setup.sh installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn promtool_checks_the_rules_and_runs_their_tests() -> Result<()> {
    let out = promtool(&["check", "rules", "ferry-alerts.yml"])?;
    ensure!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let out = promtool(&["test", "rules", "ferry-alerts.test.yml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

/// Every ferry metric name in a PromQL expression (`dup_*`, `ferry_*`, `coordinator_*`).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if ["dup_", "ferry_", "coordinator_"]
                .iter()
                .any(|p| word.starts_with(p))
            {
                into.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
}

/// Whether the exposition `text` exports `name` (a sample, or a family whose samples would be
/// `name`: counters as `_total`, histograms as `_bucket`).
fn exported(text: &str, name: &str) -> bool {
    let family = name
        .strip_suffix("_total")
        .or_else(|| name.strip_suffix("_bucket"))
        .unwrap_or(name);
    text.lines().any(|l| {
        l.starts_with(&format!("{name}{{"))
            || l.starts_with(&format!("{name} "))
            || l.starts_with(&format!("# TYPE {family} "))
    })
}

#[test]
fn every_metric_of_the_rules_and_the_dashboard_is_exported() -> Result<()> {
    let mut names = BTreeSet::new();
    let rules = std::fs::read_to_string(deploy().join("prometheus/ferry-alerts.yml"))?;
    for line in rules.lines() {
        if !line.trim_start().starts_with("summary:") && !line.trim_start().starts_with("runbook:")
        {
            metric_names(line, &mut names);
        }
    }
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        deploy().join("grafana/ferry.json"),
    )?)
    .context("parse the dashboard")?;
    let panels = dash["panels"].as_array().context("panels")?;
    ensure!(
        panels.len() >= 8,
        "the dashboard has {} panels",
        panels.len()
    );
    for p in panels {
        for t in p["targets"].as_array().context("targets")? {
            metric_names(t["expr"].as_str().context("expr")?, &mut names);
        }
    }
    ensure!(names.len() >= 15, "only {names:?}");

    let w = TwoClusters::start("users", 4, 4)?;
    w.bj.add_dup("users", "tj")?;
    set_keys(&mut w.bj.redis()?, "m", 2000, "value")?;
    wait_converged(&w.bj, &w.tj, std::time::Duration::from_secs(60))?;
    let mut text = String::new();
    for (what, addr) in [
        ("bj coordinator", w.bj.coordinator.addr),
        ("bj node", w.bj.node.http),
        ("bj shipper", w.bj.shipper_http),
        ("tj coordinator", w.tj.coordinator.addr),
        ("tj node", w.tj.node.http),
        ("tj receiver", w.tj.receiver_http),
    ] {
        let (code, body) = http_get(addr, "/metrics")?;
        ensure!(code == 200, "{what}'s /metrics answered {code}");
        text.push_str(&body);
    }
    let missing: Vec<&String> = names.iter().filter(|n| !exported(&text, n)).collect();
    if !missing.is_empty() {
        bail!("no running process exports {missing:?}");
    }
    eprintln!("all {} metrics are exported: {names:?}", names.len());
    Ok(())
}
