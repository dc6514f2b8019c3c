//! The `ferry` admin CLI: argument parsing and output. The binary only calls [`run`].
//!
//! Output is an aligned table for people, or the API's JSON with `--json` for scripts.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use ferry_admin::api::{
    AddDup, CopyView, CreateTable, DupView, FailoverView, ForceFailover, RebootstrapView,
    RecoverFailover, SetFailMode, SetRate, SetTableState, StartFailover, StatusView, TableDetail,
    TableView, Verify, VerifyView,
};
use ferry_admin::client::{AdminClient, ClientError};
use ferry_meta::failover::{Role, Step};
use ferry_meta::status::DupStatus;
use ferry_meta::{DupInfo, DupMode};
use ferry_proto::DupId;
use indicatif::{ProgressBar, ProgressStyle};

/// ferry's admin CLI: tables and duplications of one cluster.
#[derive(Debug, Parser)]
#[command(name = "ferry", version)]
pub struct Cli {
    /// Coordinator admin address(es), comma-separated; the first that answers is used
    /// (a standby forwards to the leader).
    #[arg(
        long,
        short = 'C',
        env = "FERRY_COORDINATOR",
        value_delimiter = ',',
        default_value = "127.0.0.1:34601",
        global = true
    )]
    pub coordinator: Vec<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for an answer, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration, global = true)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, describe and drop tables.
    #[command(subcommand)]
    Table(TableCommand),
    /// Add, list, pause, start and remove duplications.
    #[command(subcommand)]
    Dup(DupCommand),
    /// The cluster: leader, coordinators, nodes, table and dup counts.
    Status,
    /// Compare a table with its copy on another cluster (a one-way dup's target) at a
    /// consistent point: equal, or the partitions that differ. Exits 1 if they differ.
    Verify {
        /// The table (on this cluster).
        #[arg(long, short = 't')]
        table: String,
        /// The cluster holding the copy.
        #[arg(long, short = 'c')]
        cluster: String,
        /// How long to look for a moment when no write commits on this side.
        #[arg(long, default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
        within: Duration,
    },
    /// Hand a table's writes over to another cluster with no loss (planned failover, on the
    /// source's CLI), take them over when the source is gone (`--force`, on the target's), ship
    /// what a forced failover missed (`--recover`, on the old source's), or show the table's
    /// last failover (`--status`).
    Failover(FailoverArgs),
    /// A RESP proxy that sends each command to the table's current primary (docs/proxy.md).
    Proxy(crate::proxy::ProxyArgs),
}

/// `ferry failover ...`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// The table.
    #[arg(long, short = 't')]
    pub table: String,
    /// The cluster that takes the writes over (the table's dup to it must be in DS_LOG, and its
    /// table must refuse writes: `demoted` or `read_only`).
    #[arg(long, required_unless_present_any = ["status", "recover"])]
    pub to: Option<String>,
    /// Add the duplication back (target → this cluster) from the hand-over, so a failback
    /// needs no full copy.
    #[arg(long)]
    pub reverse: bool,
    /// How long the failover may take before it is rolled back and this cluster serves again.
    #[arg(long, default_value = "60s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub deadline: Duration,
    /// Take over only if the target's content equals this side's at the fence (per-partition
    /// digests, compared once the target applied the last decrees); otherwise roll back.
    #[arg(long, conflicts_with_all = ["force", "recover"])]
    pub verify: bool,
    /// Return once the failover is recorded instead of waiting for it to end.
    #[arg(long)]
    pub no_wait: bool,
    /// Show the table's last failover: its step, each partition's drain, the elapsed time.
    #[arg(long, conflicts_with_all = ["to", "force", "recover"])]
    pub status: bool,
    /// Unplanned failover, on the target cluster's CLI when the source is gone (`--to` names
    /// this cluster): the table takes writes at once; the report names, per source partition,
    /// the last write it had applied (later writes on the source may be missing).
    #[arg(long)]
    pub force: bool,
    /// With --force: the source cluster, if the duplication group has several others.
    #[arg(long, requires = "force")]
    pub from: Option<String>,
    /// On the old source after a forced failover: ship the writes the new primary never got
    /// (last-writer-wins merges them there) and report how many, per partition.
    #[arg(long, conflicts_with = "force")]
    pub recover: bool,
}

/// `ferry table ...`.
#[derive(Debug, Subcommand)]
pub enum TableCommand {
    /// Create a table; partitions are placed round-robin on the registered nodes.
    Create {
        /// Table name.
        name: String,
        /// Number of partitions.
        #[arg(long, short = 'p', default_value_t = 8)]
        partitions: u32,
    },
    /// List tables.
    List,
    /// Show a table and its partition table.
    Describe {
        /// Table name.
        name: String,
    },
    /// Drop a table (refused while it has duplications).
    Drop {
        /// Table name.
        name: String,
    },
    /// Set a table's state: `read_only` makes nodes refuse writes, `demoted` marks the old
    /// source after a failover.
    SetState {
        /// Table name.
        name: String,
        /// The new state.
        state: TableStateArg,
    },
}

/// Table states an operator may set.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TableStateArg {
    /// Serving reads and writes.
    #[value(name = "available")]
    Available,
    /// Refusing writes.
    #[value(name = "read_only")]
    ReadOnly,
    /// The old source after a failover.
    #[value(name = "demoted")]
    Demoted,
}

/// `ferry dup ...`.
#[derive(Debug, Subcommand)]
pub enum DupCommand {
    /// Duplicate a table to a remote cluster.
    Add {
        /// Source table.
        #[arg(long, short = 't')]
        table: String,
        /// Remote cluster name.
        #[arg(long, short = 'c')]
        cluster: String,
        /// Copy the table's existing data first (full duplication: DS_PREPARE → DS_APP →
        /// DS_LOG); the remote cluster creates the target table itself. Without it only new
        /// writes are shipped (starts in DS_LOG) to a table that must exist there.
        #[arg(long)]
        full: bool,
        /// With --full: the target table's partition count (default: the source's).
        #[arg(long, requires = "full")]
        remote_partitions: Option<u32>,
        /// With --full: bandwidth limit of the checkpoint copy, in MB/s (10^6 bytes) on the wire,
        /// for the whole dup (e.g. 0.5); change it later with `ferry dup set-rate`.
        #[arg(long = "rate-mb", requires = "full", value_parser = mb_per_s)]
        rate: Option<u64>,
        /// With --full: wait until the dup reaches DS_LOG, showing the copy's progress; exits
        /// non-zero if the dup is removed first.
        #[arg(long, requires = "full")]
        wait: bool,
    },
    /// List a table's duplications.
    List {
        /// Source table.
        #[arg(long, short = 't')]
        table: String,
    },
    /// Pause shipping (only from DS_LOG).
    Pause(DupTarget),
    /// Start shipping again (only from DS_PAUSE).
    Start(DupTarget),
    /// Remove a duplication and its progress.
    Remove(DupTarget),
    /// Set a full dup's checkpoint bandwidth limit, also while its copy runs.
    SetRate {
        /// Which dup.
        #[command(flatten)]
        target: DupTarget,
        /// MB/s (10^6 bytes) on the wire for the whole dup (e.g. 0.5); 0 lifts the limit.
        #[arg(long = "mb", value_parser = mb_per_s)]
        rate: u64,
    },
    /// Set what shipping does when a batch keeps failing.
    SetFailMode {
        /// Which dup.
        #[command(flatten)]
        target: DupTarget,
        /// slow: retry forever; skip: skip the batch after bounded retries; fast: stop and alert.
        mode: FailModeArg,
    },
}

/// `-t TABLE -d DUPID`.
#[derive(Debug, clap::Args)]
pub struct DupTarget {
    /// Source table.
    #[arg(long, short = 't')]
    pub table: String,
    /// The dupid (see `ferry dup list`).
    #[arg(long, short = 'd')]
    pub dupid: u64,
}

/// `ferry failover`: starts one and waits for its end (or shows the last with `--status`).
async fn failover(
    client: &AdminClient,
    json: bool,
    args: FailoverArgs,
) -> Result<String, ClientError> {
    let path = format!("/v1/tables/{}/failover", seg(&args.table));
    if args.status {
        let v: FailoverView = client.get(&path).await?;
        return render(json, &v, render_failover);
    }
    let timeout_ms = args.deadline.as_millis() as u64;
    let started: FailoverView = if args.recover {
        client
            .post(&format!("{path}/recover"), &RecoverFailover { timeout_ms })
            .await?
    } else {
        let Some(to) = args.to.clone() else {
            return Err(ClientError::Api("give the target cluster with --to".into()));
        };
        if args.force {
            client
                .post(
                    &format!("{path}/force"),
                    &ForceFailover {
                        to,
                        from: args.from.clone(),
                        timeout_ms,
                    },
                )
                .await?
        } else {
            client
                .post(
                    &path,
                    &StartFailover {
                        to,
                        reverse: args.reverse,
                        verify: args.verify,
                        timeout_ms,
                    },
                )
                .await?
        }
    };
    let Some(id) = started.record.as_ref().map(|r| r.id) else {
        return Err(ClientError::Api(
            "the coordinator accepted the failover but shows no record of it".into(),
        ));
    };
    if args.no_wait {
        return render(json, &started, render_failover);
    }
    // The deadline is the coordinator's; this only bounds the wait for an answer after it.
    let give_up = std::time::Instant::now() + args.deadline + Duration::from_secs(60);
    let mut last_step = None;
    let mut failures = 0;
    loop {
        let v: FailoverView = match client.get(&path).await {
            Ok(v) => {
                failures = 0;
                v
            }
            Err(e) if failures < 20 => {
                failures += 1;
                eprintln!("(retrying: {e})");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(r) = v.record.as_ref().filter(|r| r.id == id) else {
            return Err(ClientError::Api(format!(
                "failover {id} was replaced by another one; see `ferry failover -t {} --status`",
                args.table
            )));
        };
        if !json && last_step != Some(r.step) {
            eprintln!("{:>8} ms  {}", v.elapsed_ms, r.step);
            last_step = Some(r.step);
        }
        // A recover ends in `recovered`, or back in `done` with the reason it did not finish.
        let ended = if args.recover {
            matches!(r.step, Step::Recovered | Step::Done)
        } else {
            r.step.is_final()
        };
        if ended {
            let out = render(json, &v, render_failover)?;
            return match (r.step, &r.error) {
                (Step::Recovered, _) => Ok(out),
                (Step::Done, Some(e)) if args.recover => Err(ClientError::Api(format!(
                    "recover of table {} did not finish: {e}; run --recover again once the cause is fixed",
                    args.table
                ))),
                (Step::Done, _) => Ok(out),
                _ => Err(ClientError::Api(format!(
                    "failover {id} of table {} was {}: {}; the table serves here again",
                    args.table,
                    r.step,
                    r.error.as_deref().unwrap_or("no reason recorded")
                ))),
            };
        }
        if std::time::Instant::now() > give_up {
            return Err(ClientError::Api(format!(
                "failover {id} is still {} after its deadline; see `ferry failover -t {} --status`",
                r.step, args.table
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A hybrid-clock time (µs since the Unix epoch) as UTC, or `unknown` for 0.
fn utc_us(us: u64) -> String {
    if us == 0 {
        return "unknown".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_micros(us);
    humantime_serde::re::humantime::format_rfc3339_millis(t).to_string()
}

fn render_failover(v: &FailoverView) -> String {
    let mut out = String::new();
    let Some(r) = &v.record else {
        let _ = writeln!(
            out,
            "table {} on cluster {} ({}) has never taken part in a failover",
            v.table, v.cluster, v.state
        );
        return out;
    };
    let (from, to) = match r.role {
        Role::Source => (v.cluster.as_str(), r.remote.as_str()),
        Role::Target => (r.remote.as_str(), v.cluster.as_str()),
    };
    let _ = writeln!(
        out,
        "failover {} of table {}: {from} -> {to}, step {}, {} ms{}",
        r.id,
        v.table,
        r.step,
        v.elapsed_ms,
        if r.step.is_final() { "" } else { " so far" }
    );
    let _ = writeln!(out, "table here ({}): {}", v.cluster, v.state);
    if let Some(f) = r.fenced_at_ms {
        let _ = writeln!(
            out,
            "fenced:   {} ms after the start",
            f.saturating_sub(r.started_at_ms)
        );
    }
    if let Some(p) = r.promoted_at_ms {
        let _ = writeln!(
            out,
            "took over: {} ms after the start",
            p.saturating_sub(r.started_at_ms)
        );
    }
    if let Some(d) = r.reverse_dupid {
        let _ = writeln!(out, "dup back:  {d} ({to} -> {from}, DS_LOG)");
    }
    if let (Some(d), Step::Done) = (&r.source_digest, r.step) {
        let _ = writeln!(
            out,
            "verified: {to}'s content equalled {from}'s at the fence ({} entries, hash {})",
            d.entries, d.content_hash
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "error:    {e}");
    }
    if let Some(w) = r.extra.get("waiting").and_then(|w| w.as_str()) {
        if !r.step.is_final() {
            let _ = writeln!(out, "waiting:  {w}");
        }
    }
    if r.forced {
        let _ = writeln!(
            out,
            "forced:   {from} was not asked; writes it took after these may be missing on {to} until `ferry failover -t {} --recover` on {from}",
            r.remote_table
        );
        let rows = r
            .applied
            .iter()
            .map(|a| {
                let recovered = r
                    .recovered
                    .get(a.partition as usize)
                    .map_or_else(|| "-".to_string(), |n| n.to_string());
                vec![
                    a.partition.to_string(),
                    a.decree.to_string(),
                    utc_us(a.timestamp_us),
                    recovered,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "SOURCE_PARTITION",
                "LAST_APPLIED_DECREE",
                "WRITTEN_AT",
                "RECOVERED",
            ],
            rows,
        ));
        if !r.recovered.is_empty() {
            let _ = writeln!(
                out,
                "recovered: {} writes {to} had not applied were shipped to it",
                r.recovered.iter().sum::<u64>()
            );
        }
    }
    out.push('\n');
    let opt = |d: Option<u64>| d.map_or_else(|| "-".to_string(), |d| d.to_string());
    let rows = v
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                p.node.clone().unwrap_or_else(|| "-".into()),
                opt(p.decree),
                match r.role {
                    Role::Source => opt(p.confirmed_decree),
                    Role::Target => match p.caught_up {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => "-".into(),
                    },
                },
                match p.fenced {
                    Some(true) => "refused".into(),
                    Some(false) => "taken".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let head = match r.role {
        Role::Source => ["PARTITION", "NODE", "LAST_DECREE", "CONFIRMED", "WRITES"],
        Role::Target => ["PARTITION", "NODE", "DECREE", "CAUGHT_UP", "WRITES"],
    };
    out.push_str(&table(&head, rows));
    out
}

fn render_verify(v: &VerifyView) -> String {
    let mut out = format!(
        "table {} here and `{}` on {}: {} ({} entries here, {} there; at decrees {:?}, {} attempt{})\n",
        v.table,
        v.remote_table,
        v.remote,
        if v.equal { "equal" } else { "DIFFERENT" },
        v.source_entries,
        v.target_entries,
        v.decrees,
        v.attempts,
        if v.attempts == 1 { "" } else { "s" }
    );
    if !v.partitions.is_empty() {
        let rows = v
            .partitions
            .iter()
            .map(|p| {
                vec![
                    p.partition.to_string(),
                    p.source_entries.to_string(),
                    p.target_entries.to_string(),
                    p.source_digest.clone(),
                    p.target_digest.clone(),
                    if p.equal { "equal" } else { "DIFFERENT" }.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "PARTITION",
                "ENTRIES_HERE",
                "ENTRIES_THERE",
                "DIGEST_HERE",
                "DIGEST_THERE",
                "",
            ],
            rows,
        ));
    }
    out
}

/// Fail modes as typed on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FailModeArg {
    /// FAIL_SLOW.
    Slow,
    /// FAIL_SKIP.
    Skip,
    /// FAIL_FAST.
    Fast,
}

/// Runs one command and returns what to print.
pub async fn run(cli: Cli) -> Result<String, ClientError> {
    let client = AdminClient::new(&cli.coordinator, cli.timeout)?;
    let json = cli.json;
    match cli.command {
        Command::Status => {
            let s: StatusView = client.get("/v1/status").await?;
            render(json, &s, render_status)
        }
        Command::Failover(args) => failover(&client, json, args).await,
        Command::Verify {
            table,
            cluster,
            within,
        } => {
            let v: VerifyView = client
                .post(
                    &format!("/v1/tables/{}/verify", seg(&table)),
                    &Verify {
                        to: cluster,
                        timeout_ms: within.as_millis() as u64,
                    },
                )
                .await?;
            let out = render(json, &v, render_verify)?;
            if v.equal {
                Ok(out)
            } else {
                Err(ClientError::Api(format!("the tables differ:\n{out}")))
            }
        }
        Command::Proxy(args) => crate::proxy::run(args)
            .await
            .map(|()| String::new())
            .map_err(|e| ClientError::Api(format!("{e:#}"))),
        Command::Table(TableCommand::Create { name, partitions }) => {
            let t: TableDetail = client
                .post("/v1/tables", &CreateTable { name, partitions })
                .await?;
            render(json, &t, |t| {
                format!(
                    "created table {} (id {}, {} partitions, {})\n",
                    t.name, t.info.id, t.info.partition_count, t.info.state
                )
            })
        }
        Command::Table(TableCommand::List) => {
            let ts: Vec<TableView> = client.get("/v1/tables").await?;
            render(json, &ts, |ts| {
                let rows = ts
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.info.id.to_string(),
                            t.info.partition_count.to_string(),
                            t.info.state.to_string(),
                            time(t.info.create_timestamp_ms),
                        ]
                    })
                    .collect();
                table(&["NAME", "ID", "PARTITIONS", "STATE", "CREATED"], rows)
            })
        }
        Command::Table(TableCommand::Describe { name }) => {
            let t: TableDetail = client.get(&format!("/v1/tables/{}", seg(&name))).await?;
            render(json, &t, |t| {
                let mut out = table(
                    &["NAME", "ID", "PARTITIONS", "STATE", "CREATED"],
                    vec![vec![
                        t.name.clone(),
                        t.info.id.to_string(),
                        t.info.partition_count.to_string(),
                        t.info.state.to_string(),
                        time(t.info.create_timestamp_ms),
                    ]],
                );
                out.push('\n');
                let rows = t
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(p, e)| {
                        let node = match e {
                            Some(e) => e.node.clone().unwrap_or_else(|| "(unplaced)".into()),
                            None => "(not written)".into(),
                        };
                        vec![p.to_string(), node]
                    })
                    .collect();
                out.push_str(&table(&["PARTITION", "NODE"], rows));
                out
            })
        }
        Command::Table(TableCommand::Drop { name }) => {
            let t: TableView = client.delete(&format!("/v1/tables/{}", seg(&name))).await?;
            render(json, &t, |t| format!("dropped table {}\n", t.name))
        }
        Command::Table(TableCommand::SetState { name, state }) => {
            let state = match state {
                TableStateArg::Available => "available",
                TableStateArg::ReadOnly => "read_only",
                TableStateArg::Demoted => "demoted",
            };
            let t: TableView = client
                .put(
                    &format!("/v1/tables/{}/state", seg(&name)),
                    &SetTableState {
                        state: state.into(),
                    },
                )
                .await?;
            render(json, &t, |t| {
                format!("table {} is now {}\n", t.name, t.info.state)
            })
        }
        Command::Dup(DupCommand::Add {
            table,
            cluster,
            full,
            remote_partitions,
            rate,
            wait,
        }) => {
            let d: DupView = client
                .post(
                    &format!("/v1/tables/{}/dups", seg(&table)),
                    &AddDup {
                        remote: cluster,
                        full,
                        remote_partitions,
                        rate_bytes: rate,
                    },
                )
                .await?;
            let added = render(json, &d, |d| {
                format!(
                    "added dup {} of table {} to cluster {} ({}, {})\n",
                    d.dupid, d.table, d.info.remote, d.info.mode, d.info.status
                )
            })?;
            if !wait {
                return Ok(added);
            }
            if !json {
                eprint!("{added}");
            }
            let copied = wait_for_log(&client, &table, d.dupid).await?;
            render(json, &copied, |c| {
                format!(
                    "dup {} of table {} is {}: {} checkpoint bytes copied, {} of {} partitions \
                     installed\n",
                    c.dupid,
                    c.table,
                    c.status,
                    c.bytes_total,
                    c.staged,
                    c.partitions.len()
                )
            })
        }
        Command::Dup(DupCommand::List { table: t }) => {
            let ds: Vec<DupView> = client.get(&format!("/v1/tables/{}/dups", seg(&t))).await?;
            render(json, &ds, |ds| {
                let rows = ds
                    .iter()
                    .map(|d| {
                        vec![
                            d.dupid.to_string(),
                            d.info.remote.clone(),
                            d.info.status.to_string(),
                            d.info.fail_mode.to_string(),
                            d.info.mode.to_string(),
                            d.info.remote_table.clone(),
                            copy_text(&d.info),
                            time(d.info.create_timestamp_ms),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "DUPID",
                        "REMOTE",
                        "STATUS",
                        "FAIL_MODE",
                        "MODE",
                        "REMOTE_TABLE",
                        "COPY",
                        "CREATED",
                    ],
                    rows,
                )
            })
        }
        Command::Dup(DupCommand::Pause(t)) => dup_action(&client, json, &t, "pause").await,
        Command::Dup(DupCommand::Start(t)) => dup_action(&client, json, &t, "start").await,
        Command::Dup(DupCommand::Remove(t)) => {
            let d: DupView = client
                .delete(&format!("/v1/tables/{}/dups/{}", seg(&t.table), t.dupid))
                .await?;
            render(json, &d, |d| {
                format!("removed dup {} of table {}\n", d.dupid, d.table)
            })
        }
        Command::Dup(DupCommand::SetRate { target, rate }) => {
            let d: DupView = client
                .put(
                    &format!(
                        "/v1/tables/{}/dups/{}/rate",
                        seg(&target.table),
                        target.dupid
                    ),
                    &SetRate { rate_bytes: rate },
                )
                .await?;
            render(json, &d, |d| {
                format!(
                    "dup {} of table {} now copies checkpoints at {}\n",
                    d.dupid,
                    d.table,
                    rate_text(&d.info)
                )
            })
        }
        Command::Dup(DupCommand::SetFailMode { target, mode }) => {
            let mode = match mode {
                FailModeArg::Slow => "slow",
                FailModeArg::Skip => "skip",
                FailModeArg::Fast => "fast",
            };
            let d: DupView = client
                .put(
                    &format!(
                        "/v1/tables/{}/dups/{}/fail_mode",
                        seg(&target.table),
                        target.dupid
                    ),
                    &SetFailMode {
                        fail_mode: mode.into(),
                    },
                )
                .await?;
            render(json, &d, |d| {
                format!(
                    "dup {} of table {} now has fail mode {}\n",
                    d.dupid, d.table, d.info.fail_mode
                )
            })
        }
    }
}

async fn dup_action(
    client: &AdminClient,
    json: bool,
    t: &DupTarget,
    action: &str,
) -> Result<String, ClientError> {
    let d: DupView = client
        .post(
            &format!("/v1/tables/{}/dups/{}/{action}", seg(&t.table), t.dupid),
            &(),
        )
        .await?;
    render(json, &d, |d| {
        format!(
            "dup {} of table {} is now {}\n",
            d.dupid, d.table, d.info.status
        )
    })
}

/// Polls a full dup's copy until it reaches `DS_LOG`, drawing a progress bar on a terminal (a
/// line every few seconds otherwise). An error if the dup is removed first.
async fn wait_for_log(
    client: &AdminClient,
    table: &str,
    dupid: DupId,
) -> Result<CopyView, ClientError> {
    use std::io::IsTerminal as _;
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let path = format!("/v1/tables/{}/dups/{dupid}/copy", seg(table));
    let mut failures = 0;
    let mut last_line: Option<std::time::Instant> = None;
    loop {
        let v: CopyView = match client.get(&path).await {
            Ok(v) => {
                failures = 0;
                v
            }
            Err(ClientError::NotFound(m)) => {
                bar.abandon();
                return Err(ClientError::Api(format!(
                    "the dup was removed before it reached DS_LOG ({m})"
                )));
            }
            Err(e) if failures < 20 => {
                failures += 1;
                bar.set_message(format!("(retrying: {e})"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let msg = format!(
            "{} · {}/{} checkpoints staged{}",
            v.status,
            v.staged,
            v.partitions.len(),
            v.waiting
                .as_deref()
                .map(|w| format!(" · {w}"))
                .unwrap_or_default()
        );
        bar.set_length(v.bytes_total.max(1));
        bar.set_position(v.bytes_done.min(v.bytes_total));
        bar.set_message(msg.clone());
        if !tty && last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            eprintln!("{} of {} bytes copied · {msg}", v.bytes_done, v.bytes_total);
            last_line = Some(std::time::Instant::now());
        }
        match v.status.as_str() {
            "DS_LOG" | "DS_PAUSE" => {
                bar.finish();
                return Ok(v);
            }
            "DS_REMOVED" => {
                bar.abandon();
                return Err(ClientError::Api(
                    "the dup was removed before it reached DS_LOG".into(),
                ));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn render<T: Serialize>(
    json: bool,
    v: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<String, ClientError> {
    if json {
        let mut s = serde_json::to_string_pretty(v).map_err(|e| ClientError::Api(e.to_string()))?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(human(v))
    }
}

fn render_status(s: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "cluster:  {} (id {})", s.cluster, s.cluster_id);
    let _ = writeln!(out, "leader:   {}", s.leader);
    let _ = writeln!(out, "tables:   {}", s.tables);
    let dups: Vec<String> = s.dups.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(
        out,
        "dups:     {}",
        if dups.is_empty() {
            "none".into()
        } else {
            dups.join(", ")
        }
    );
    out.push('\n');
    let rows = s
        .coordinators
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.addr.clone(),
                if c.leader { "leader" } else { "standby" }.into(),
            ]
        })
        .collect();
    out.push_str(&table(&["COORDINATOR", "ADDRESS", "ROLE"], rows));
    out.push('\n');
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.resp_addr.clone(),
                n.receiver_addr.clone().unwrap_or_else(|| "-".into()),
                n.http_addr.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(&["NODE", "RESP", "RECEIVER", "HTTP"], rows));
    if !s.progress.is_empty() {
        out.push('\n');
        let rows = s
            .progress
            .iter()
            .map(|p| {
                vec![
                    p.table.clone(),
                    p.dupid.to_string(),
                    p.remote.clone(),
                    p.status.clone(),
                    p.partition.to_string(),
                    p.confirmed_decree.to_string(),
                    p.committed_decree.to_string(),
                    p.pending_mutations.to_string(),
                    p.lag_ms.to_string(),
                    format!("{:.1}s", p.age_ms as f64 / 1000.0),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "TABLE",
                "DUPID",
                "REMOTE",
                "STATUS",
                "PARTITION",
                "CONFIRMED",
                "COMMITTED",
                "PENDING",
                "LAG_MS",
                "UPDATED",
            ],
            rows,
        ));
        for p in s.progress.iter() {
            if let Some(e) = &p.last_error {
                out.push_str(&format!(
                    "partition {} of table {} (dup {}) is not shipping: {e}\n",
                    p.partition, p.table, p.dupid
                ));
            }
        }
    }
    if !s.copies.is_empty() {
        out.push('\n');
        out.push_str(&render_copies(&s.copies));
    }
    if !s.rebootstraps.is_empty() {
        out.push('\n');
        out.push_str(&render_rebootstraps(&s.rebootstraps));
    }
    if !s.failovers.is_empty() {
        out.push('\n');
        let now = ferry_meta::now_ms();
        let rows = s
            .failovers
            .iter()
            .map(|(t, r)| {
                vec![
                    t.clone(),
                    r.id.to_string(),
                    match r.role {
                        Role::Source => format!("{} -> {}", s.cluster, r.remote),
                        Role::Target => format!("{} -> {}", r.remote, s.cluster),
                    },
                    r.step.to_string(),
                    r.finished_at_ms
                        .unwrap_or(now)
                        .saturating_sub(r.started_at_ms)
                        .to_string(),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "FAILOVER_TABLE",
                "ID",
                "DIRECTION",
                "STEP",
                "ELAPSED_MS",
                "ERROR",
            ],
            rows,
        ));
    }
    out
}

/// The re-bootstrap rows of `ferry status`: each partition's last one.
fn render_rebootstraps(rs: &[RebootstrapView]) -> String {
    let rows = rs
        .iter()
        .map(|r| {
            let state = match (&r.transfer, r.done_at_ms) {
                (_, Some(ms)) => format!("done {}", time(ms)),
                (Some(t), None) => format!(
                    "{} {:.1}/{:.1} MB",
                    t.state,
                    t.bytes_done as f64 / 1e6,
                    t.bytes_total as f64 / 1e6
                ),
                (None, None) => serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            };
            vec![
                r.table.clone(),
                r.dupid.to_string(),
                r.partition.to_string(),
                r.generation.to_string(),
                state,
                r.confirmed_decree.to_string(),
                r.decree.map_or("-".into(), |d| d.to_string()),
                time(r.requested_at_ms),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "TABLE",
            "DUPID",
            "PARTITION",
            "REBOOTSTRAP",
            "STATE",
            "CONFIRMED_THEN",
            "CHECKPOINT",
            "REQUESTED",
        ],
        rows,
    );
    for r in rs.iter().filter(|r| r.done_at_ms.is_none()) {
        out.push_str(&format!(
            "partition {} of table {} (dup {}) re-bootstraps: {}\n",
            r.partition, r.table, r.dupid, r.reason
        ));
    }
    out
}

/// Parses MB/s (10^6 bytes) into bytes per second.
fn mb_per_s(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(mb) if mb.is_finite() && (0.0..=1e9).contains(&mb) => Ok((mb * 1e6).round() as u64),
        _ => Err(format!(
            "{s:?} is not a rate in MB/s: give a number from 0 to 1e9, like 0.5 or 100"
        )),
    }
}

/// A dup's checkpoint copy in one cell of `ferry dup list`.
fn copy_text(d: &DupInfo) -> String {
    if d.mode != DupMode::Full {
        return "-".into();
    }
    let stage = match d.status {
        DupStatus::Prepare => "checkpointing".to_string(),
        DupStatus::App => "copying".to_string(),
        DupStatus::Init | DupStatus::Removed => "-".to_string(),
        DupStatus::Log | DupStatus::Pause => {
            match d
                .extra
                .get(DupInfo::TARGET_INSTALL_COMPLETE)
                .and_then(|v| v.as_u64())
            {
                Some(ms) => format!("install complete {}", time(ms)),
                None => "installed, catching up".to_string(),
            }
        }
    };
    match d.checkpoint_rate_bytes() {
        Some(_) if matches!(d.status, DupStatus::Prepare | DupStatus::App) => {
            format!("{stage} at {}", rate_text(d))
        }
        _ => stage,
    }
}

/// A dup's checkpoint bandwidth limit.
fn rate_text(d: &DupInfo) -> String {
    match d.checkpoint_rate_bytes() {
        Some(r) => format!("at most {:.1} MB/s", r as f64 / 1e6),
        None => "no bandwidth limit".into(),
    }
}

/// The copy rows of `ferry status`: one per partition of every full dup not yet install-complete.
fn render_copies(copies: &[CopyView]) -> String {
    let mut rows = Vec::new();
    for c in copies {
        for p in &c.partitions {
            let (state, files, bytes, rate, eta) = match (&p.transfer, p.install_complete_at_ms) {
                (_, Some(_)) => (
                    "install complete".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
                (_, None) if c.status == "DS_LOG" || c.status == "DS_PAUSE" => (
                    "installed, catching up".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
                (Some(t), None) => (
                    t.state.clone(),
                    format!("{}/{}", t.files_done, t.files_total),
                    format!(
                        "{:.1}/{:.1} MB",
                        t.bytes_done as f64 / 1e6,
                        t.bytes_total as f64 / 1e6
                    ),
                    format!("{:.1} MB/s", t.rate / 1e6),
                    t.eta_ms
                        .map_or("-".into(), |ms| format!("{:.0}s", ms as f64 / 1000.0)),
                ),
                (None, None) if p.decree.is_some() => (
                    "checkpoint made".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
                (None, None) => (
                    "checkpointing".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            };
            rows.push(vec![
                c.table.clone(),
                c.dupid.to_string(),
                c.status.clone(),
                p.partition.to_string(),
                state,
                files,
                bytes,
                rate,
                eta,
            ]);
        }
    }
    let mut out = table(
        &[
            "TABLE",
            "DUPID",
            "STATUS",
            "PARTITION",
            "COPY",
            "FILES",
            "BYTES",
            "RATE",
            "ETA",
        ],
        rows,
    );
    for c in copies {
        if let Some(w) = &c.waiting {
            out.push_str(&format!(
                "dup {} of table {} waits: {w}\n",
                c.dupid, c.table
            ));
        }
        for p in &c.partitions {
            if let Some(e) = p.transfer.as_ref().and_then(|t| t.last_error.as_ref()) {
                out.push_str(&format!(
                    "partition {} of table {} (dup {}) is not copying: {e}\n",
                    p.partition, c.table, c.dupid
                ));
            }
        }
    }
    out
}

/// An aligned text table: columns padded to their widest cell, two spaces apart.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(s, "{cell:<w$}  ");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for row in &rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// A timestamp in ms as UTC RFC 3339, to the second.
fn time(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

/// Percent-encodes a path segment (names are validated server-side; this only keeps a stray
/// `/` or `?` from changing the route).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned() {
        let t = table(&["A", "LONGER"], vec![vec!["wide cell".into(), "x".into()]]);
        assert_eq!(t, "A          LONGER\nwide cell  x\n");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(seg("users"), "users");
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
    }
}
