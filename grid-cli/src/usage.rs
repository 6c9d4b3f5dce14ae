//! `grid usage`: the usage ledger summed per job, per tenant and per provider.
//!
//! The ledger (`grid_usage`, written by the broker) holds one entry per billable attempt; this
//! command reads the entries that pass the filters and sums them. A tenant is billed for every
//! entry. A provider is paid for every entry but one *withheld*: a replica whose result did not
//! agree with its task's accepted result (or whose task is disputed or not decided yet), which
//! is found by comparing the entry's digest with the task's record — with the decision of the
//! entry's own round, for a task `grid retry` ran again.

use crate::conn::Conn;
use anyhow::{Context, Result, bail};
use clap::Args;
use grid_proto::{TaskRecord, TaskState, decode, names};
use grid_proto::{Usage, UsageEntry};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Only this tenant's attempts.
    #[arg(long, value_name = "NAME")]
    pub tenant: Option<String>,
    /// Only attempts this provider's node ran (a node id).
    #[arg(long, value_name = "NODE")]
    pub provider: Option<String>,
    /// Only this job's attempts: its whole id as the ledger records it (not a prefix or a
    /// --name: the ledger outlives the jobs it names).
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Only attempts recorded since then: a duration back from now (`1h`, `7days`) or an RFC
    /// 3339 time (`2026-11-30T00:00:00Z`).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Print one JSON object: total, and the lists jobs, tenants and providers, each sum
    /// with attempts, cpu_seconds, wall_seconds, gpu_seconds, peak_memory_bytes, bytes_in,
    /// bytes_out, withheld (attempts not paid for) and the paid_* seconds.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Unix milliseconds of `--since`.
fn since_unix_ms(when: &str) -> Result<u64> {
    let time = match humantime::parse_duration(when) {
        Ok(back) => SystemTime::now()
            .checked_sub(back)
            .context("--since reaches before 1970")?,
        Err(_) => humantime::parse_rfc3339_weak(when).map_err(|_| {
            anyhow::anyhow!(
                "--since {when:?}: not a duration (`1h`, `7days`) or a time (`2026-11-30T00:00:00Z`)"
            )
        })?,
    };
    Ok(time
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64)
}

/// The sum of some entries: how many attempts, what they used, and what of it is not paid.
#[derive(Default)]
struct Sum {
    attempts: u64,
    usage: Usage,
    withheld: u64,
    withheld_usage: Usage,
}

impl Sum {
    fn add(&mut self, entry: &UsageEntry, paid: bool) {
        self.attempts += 1;
        self.usage.add(&entry.usage);
        if !paid {
            self.withheld += 1;
            self.withheld_usage.add(&entry.usage);
        }
    }

    fn json(&self) -> Value {
        let u = &self.usage;
        json!({
            "attempts": self.attempts,
            "cpu_seconds": u.cpu_seconds,
            "wall_seconds": u.wall_seconds,
            "gpu_seconds": u.gpu_seconds,
            "peak_memory_bytes": u.peak_memory_bytes,
            "bytes_in": u.bytes_in,
            "bytes_out": u.bytes_out,
            "withheld": self.withheld,
            "paid_cpu_seconds": u.cpu_seconds - self.withheld_usage.cpu_seconds,
            "paid_wall_seconds": u.wall_seconds - self.withheld_usage.wall_seconds,
            "paid_gpu_seconds": u.gpu_seconds - self.withheld_usage.gpu_seconds,
        })
    }

    fn row(&self, name: &str) -> String {
        let u = &self.usage;
        format!(
            "{name:<20} {:>8} {:>8} {:>10.2} {:>10.2} {:>8.2} {:>10} {:>10} {:>10}",
            self.attempts,
            self.withheld,
            u.cpu_seconds,
            u.wall_seconds,
            u.gpu_seconds,
            bytesize::ByteSize(u.peak_memory_bytes).to_string(),
            bytesize::ByteSize(u.bytes_in).to_string(),
            bytesize::ByteSize(u.bytes_out).to_string(),
        )
    }
}

pub fn usage(args: UsageArgs) -> Result<ExitCode> {
    let since = args.since.as_deref().map(since_unix_ms).transpose()?;
    if let Some(t) = &args.tenant
        && (t.is_empty() || t.contains(['.', '*', '>', ' ']))
    {
        bail!("--tenant {t:?}: not a tenant name");
    }
    let runtime = crate::conn::runtime()?;
    let (entries, paid) = runtime.block_on(async {
        let grid = args.conn.open("usage").await?;
        // A tenant's JOB is found as every command finds it (id, prefix or name).
        let job = match (&args.job, &grid.identity) {
            (Some(job), Some(who)) if who.role == grid_client::auth::Role::Tenant => {
                Some(grid.resolve_job(job).await?)
            }
            (job, _) => job.clone(),
        };
        let wanted = |e: &UsageEntry| {
            args.provider.as_ref().is_none_or(|p| *p == e.node_id)
                && job.as_ref().is_none_or(|j| *j == e.job_id)
                && since.is_none_or(|s| e.recorded_unix_ms >= s)
        };
        // A tenant sees its own usage only (its NATS permissions allow no other).
        let tenant = match &grid.identity {
            Some(who) if who.role == grid_client::auth::Role::Tenant => {
                if let Some(other) = args.tenant.as_ref().filter(|t| **t != who.name) {
                    bail!(
                        "permission denied: tenant {} cannot read the usage of tenant {other}",
                        who.name
                    );
                }
                Some(who.name.clone())
            }
            _ => args.tenant.clone(),
        };
        let entries: Vec<UsageEntry> = grid
            .usage_entries(tenant.as_deref())
            .await?
            .into_iter()
            .filter(|e| wanted(e))
            .collect();
        if let Some(job) = &job
            && entries.is_empty()
        {
            eprintln!(
                "grid: no usage recorded for job {job}: an unknown job, or none of its tasks has ended yet"
            );
        }
        // Replicas are paid when they agreed: one task record read per replicated task.
        let mut decided: HashMap<(String, u64), Option<TaskRecord>> = HashMap::new();
        let mut paid = Vec::with_capacity(entries.len());
        for e in &entries {
            if e.replicas <= 1 {
                paid.push(true);
                continue;
            }
            let key = (e.job_id.clone(), e.index);
            if !decided.contains_key(&key) {
                let record = grid
                    .tasks()
                    .await?
                    .get(names::task_key(&e.tenant, &e.job_id, e.index))
                    .await
                    .map_err(|err| anyhow::anyhow!("reading task {}.{}: {err}", e.job_id, e.index))?
                    .and_then(|bytes| decode::<TaskRecord>(&bytes).ok());
                decided.insert(key.clone(), record);
            }
            // Judged by its own round's decision: `grid retry` does not change what an
            // earlier round paid.
            paid.push(
                decided[&key]
                    .as_ref()
                    .and_then(|r| r.verdict(e.round))
                    .is_some_and(|(state, digest)| {
                        state != TaskState::Disputed && digest == e.digest
                    }),
            );
        }
        anyhow::Ok((entries, paid))
    })?;
    let (mut total, mut jobs, mut tenants, mut providers) = (
        Sum::default(),
        BTreeMap::<(String, String), Sum>::new(),
        BTreeMap::<String, Sum>::new(),
        BTreeMap::<String, Sum>::new(),
    );
    for (entry, paid) in entries.iter().zip(paid) {
        total.add(entry, paid);
        jobs.entry((entry.job_id.clone(), entry.tenant.clone()))
            .or_default()
            .add(entry, paid);
        tenants
            .entry(entry.tenant.clone())
            .or_default()
            .add(entry, paid);
        providers
            .entry(entry.node_id.clone())
            .or_default()
            .add(entry, paid);
    }
    if args.json {
        let with = |mut v: Value, fields: &[(&str, &str)]| {
            for (k, x) in fields {
                v[*k] = json!(x);
            }
            v
        };
        let line = json!({
            "total": total.json(),
            "jobs": jobs.iter().map(|((job, tenant), s)| with(s.json(), &[("job_id", job), ("tenant", tenant)])).collect::<Vec<_>>(),
            "tenants": tenants.iter().map(|(t, s)| with(s.json(), &[("tenant", t)])).collect::<Vec<_>>(),
            "providers": providers.iter().map(|(p, s)| with(s.json(), &[("provider", p)])).collect::<Vec<_>>(),
        });
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    let header = |what: &str| {
        format!(
            "{what:<20} {:>8} {:>8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
            "attempts", "withheld", "cpu s", "wall s", "gpu s", "peak mem", "in", "out"
        )
    };
    for (what, rows) in [
        (
            "job",
            jobs.iter().map(|((j, _), s)| s.row(j)).collect::<Vec<_>>(),
        ),
        ("tenant", tenants.iter().map(|(t, s)| s.row(t)).collect()),
        (
            "provider",
            providers.iter().map(|(p, s)| s.row(p)).collect(),
        ),
    ] {
        println!("{}", header(what));
        for row in rows {
            println!("{row}");
        }
        println!();
    }
    println!("{}", total.row("total"));
    Ok(ExitCode::SUCCESS)
}
