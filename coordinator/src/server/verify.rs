//! `ferry verify -t T -c tj`: compares a one-way dup's two tables at a consistent point.
//!
//! The source's digest is taken while no write commits in any partition (each partition's
//! digest is `stable`), which fixes each partition's decree D. The target's digest counts once
//! it applied exactly D of every source partition: more means the source moved on, and the
//! comparison starts again (bounded by the timeout); less means waiting. Tables with the same
//! partition count are compared per partition (entries and the ordered digest), others by their
//! totals and order-independent hashes.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferry_admin::api::{TableDigest, Verify, VerifyPartition, VerifyView};
use ferry_meta::{list_nodes, MetaError, MetaStore, TableState};

use super::failover::remote;
use super::http::ApiError;
use super::Shared;

/// How long one attempt waits for the target to apply the source's decrees.
const CATCH_UP: Duration = Duration::from_secs(10);

/// `GET /v1/tables/{table}/digest`: every partition's digest, from the node that hosts it;
/// `Ok(Err(why))` if a node could not give it.
pub async fn table_digest(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
) -> Result<Result<TableDigest, String>, MetaError> {
    let desc = meta.describe_table(table).await?;
    let nodes = list_nodes(meta).await?;
    let mut hosts: Vec<String> = desc
        .partitions
        .iter()
        .filter_map(|e| e.as_ref().and_then(|e| e.node.clone()))
        .collect();
    hosts.sort();
    hosts.dedup();
    let mut out = TableDigest {
        table: table.to_owned(),
        entries: 0,
        content_hash: String::new(),
        partitions: Vec::new(),
        applied: Vec::new(),
    };
    let mut sum = 0u64;
    for host in &hosts {
        let Some(addr) = nodes
            .iter()
            .find(|n| &n.name == host)
            .and_then(|n| n.http_addr.clone())
        else {
            return Ok(Err(format!(
                "node {host} of table {table} is not registered with an HTTP address (is it running?)"
            )));
        };
        let d: Result<TableDigest, reqwest::Error> = async {
            shared
                .http
                .get(format!("http://{addr}/digest"))
                .timeout(Duration::from_secs(60))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        .await;
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                return Ok(Err(format!(
                    "node {host} ({addr}) did not give its digest: {e}"
                )))
            }
        };
        for p in d.partitions {
            let ours = desc
                .partitions
                .get(p.partition as usize)
                .and_then(|e| e.as_ref())
                .and_then(|e| e.node.as_deref())
                == Some(host.as_str());
            if ours {
                out.entries += p.entries;
                out.partitions.push(p);
            }
        }
        sum = sum.wrapping_add(u64::from_str_radix(&d.content_hash, 16).unwrap_or(0));
        for a in d.applied {
            match out
                .applied
                .iter_mut()
                .find(|b| (b.cluster_id, b.partition) == (a.cluster_id, a.partition))
            {
                Some(b) => b.decree = b.decree.min(a.decree),
                None => out.applied.push(a),
            }
        }
    }
    // One node per table today: its hash is the table's. With several, each node's hash covers
    // its partitions only, and the sum is the table's again.
    out.content_hash = format!("{sum:016x}");
    out.partitions.sort_by_key(|p| p.partition);
    Ok(Ok(out))
}

/// `POST /v1/tables/{table}/verify`, on the source.
pub async fn verify(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &Verify,
) -> Result<VerifyView, ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let Some((dupid, dup)) = meta.live_dup_to(table, &req.to).await? else {
        return Err(conflict(format!(
            "table {table} has no duplication to cluster {}; verify compares a dup's two tables",
            req.to
        )));
    };
    let client =
        remote(&shared.config, &req.to).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let state_path = format!("/v1/tables/{}/failover", dup.remote_table);
    let theirs: ferry_admin::api::FailoverView = client
        .get(&state_path)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("cluster {}: {e}", req.to)))?;
    if theirs.state == TableState::Available {
        return Err(conflict(format!(
            "table `{}` on cluster {} takes writes of its own (available), so the two sides differ by design; verify compares a one-way dup's target (demoted or read_only)",
            dup.remote_table, req.to
        )));
    }
    let me = shared.config.cluster.id;
    let digest_path = format!("/v1/tables/{}/digest", dup.remote_table);
    let give_up = Instant::now() + Duration::from_millis(req.timeout_ms);
    let mut attempts = 0u32;
    let mut last_why = String::from("no attempt finished");
    while Instant::now() < give_up {
        attempts += 1;
        let src = table_digest(shared, meta, table)
            .await?
            .map_err(|m| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m))?;
        if let Some(p) = src.partitions.iter().find(|p| !p.stable) {
            last_why = format!(
                "partition {} of {table} took writes during its digest",
                p.partition
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let decrees: Vec<u64> = src.partitions.iter().map(|p| p.committed_decree).collect();
        let wait_until = (Instant::now() + CATCH_UP).min(give_up);
        loop {
            let tgt: TableDigest = client.get(&digest_path).await.map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, format!("cluster {}: {e}", req.to))
            })?;
            let applied = |p: usize| {
                tgt.applied
                    .iter()
                    .find(|a| a.cluster_id == me && a.partition as usize == p)
                    .map_or(0, |a| a.decree)
            };
            let ahead = (0..decrees.len()).find(|&p| applied(p) > decrees[p]);
            let behind = (0..decrees.len()).find(|&p| applied(p) < decrees[p]);
            let unstable = tgt.partitions.iter().any(|p| !p.stable);
            if let Some(p) = ahead {
                last_why = format!(
                    "partition {p} moved on from decree {} while the target caught up",
                    decrees[p]
                );
                break;
            }
            if behind.is_none() && !unstable {
                tracing::info!(%table, to = %req.to, %dupid, attempts, "verify: compared at a consistent point");
                return Ok(compare(
                    table,
                    &req.to,
                    &dup.remote_table,
                    &src,
                    &tgt,
                    decrees,
                    attempts,
                ));
            }
            if Instant::now() >= wait_until {
                last_why = match behind {
                    Some(p) => format!(
                        "cluster {} had applied partition {p} up to decree {} of {}",
                        req.to,
                        applied(p),
                        decrees[p]
                    ),
                    None => format!("cluster {} took writes during its digest", req.to),
                };
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "no consistent point of table {table} and its copy on {} within the timeout ({attempts} attempts; last: {last_why}); verify a table while its writes pause, or during a failover (`ferry failover --verify`)",
            req.to
        ),
    ))
}

fn compare(
    table: &str,
    remote: &str,
    remote_table: &str,
    src: &TableDigest,
    tgt: &TableDigest,
    decrees: Vec<u64>,
    attempts: u32,
) -> VerifyView {
    let mut partitions = Vec::new();
    let mut equal = src.entries == tgt.entries && src.content_hash == tgt.content_hash;
    if src.partitions.len() == tgt.partitions.len() {
        for (s, t) in src.partitions.iter().zip(&tgt.partitions) {
            let same = s.entries == t.entries && s.digest == t.digest;
            equal &= same;
            partitions.push(VerifyPartition {
                partition: s.partition,
                source_entries: s.entries,
                target_entries: t.entries,
                source_digest: s.digest.clone(),
                target_digest: t.digest.clone(),
                equal: same,
            });
        }
    }
    VerifyView {
        table: table.to_owned(),
        remote: remote.to_owned(),
        remote_table: remote_table.to_owned(),
        equal,
        decrees,
        source_entries: src.entries,
        target_entries: tgt.entries,
        partitions,
        attempts,
    }
}
