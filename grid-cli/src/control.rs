//! Changing a job: `grid cancel`, `grid retry --failed`, `grid delete`.

use crate::conn::{Conn, runtime};
use crate::status::{follow_to_end, print_status};
use anyhow::Result;
use clap::Args;
use grid_proto::CancelRequest;
use serde_json::json;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Print the job's status once cancelled as one line of JSON, as `grid status --json` does.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn cancel(args: CancelArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("cancel").await?;
        let request = CancelRequest {
            job_id: grid.resolve_job(&args.job).await?,
        };
        let job = grid.grant(&request).await?;
        let record = grid.job_record(&job.job_id).await?;
        print_status(&record, args.json);
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Run the job's failed and disputed tasks again (required: the tasks to retry).
    #[arg(long, required = true)]
    pub failed: bool,
    /// Follow the job to its end (exit status 0 only if every task succeeds).
    #[arg(long)]
    pub wait: bool,
    /// New limits for the tasks run again (the others keep the job's): `--memory 1GiB` for
    /// tasks that failed `limit: memory`, `--timeout 1h` for `limit: time`, …
    #[command(flatten)]
    pub limits: crate::flags::LimitFlags,
    /// Print one JSON object: {job_id, tasks_retried}; with --wait, the job's status at its
    /// end instead, as `grid status --json` prints it.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `grid retry JOB --failed`: an ended job's failed and disputed tasks run again in the same
/// job, with its retries afresh; the tasks that succeeded keep their results, and `grid
/// results` then collects them all together.
pub fn retry(args: RetryArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("retry").await?;
        let job = grid.resolve_job(&args.job).await?;
        let limits = match args.limits.any() {
            true => Some(args.limits.over(&grid.job_record(&job).await?.spec.limits)),
            false => None,
        };
        let request = grid_proto::RetryRequest {
            job_id: job,
            limits,
        };
        let grid_proto::Retrying { job_id, tasks } = grid.grant(&request).await?;
        if !args.wait {
            if args.json {
                println!("{}", json!({"job_id": job_id, "tasks_retried": tasks}));
            } else {
                println!("{job_id}");
                eprintln!(
                    "grid: running {tasks} task(s) of job {job_id} again (those that did not succeed); follow it with `grid status {job_id} --wait`"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        follow_to_end(&grid, &job_id, args.json).await
    })
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(value_name = "JOB", help = crate::help::JOB)]
    pub job: String,
    /// Print one JSON object: {job_id, objects_deleted, bytes_freed}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `grid delete JOB`: the job's records, outputs and logs, and the inputs and module no other
/// job of the tenant's uses, are removed; the usage ledger keeps its entries (they are what the
/// tenant was billed).
pub fn delete(args: DeleteArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let grid = args.conn.open("delete").await?;
        let request = grid_proto::DeleteRequest {
            job_id: grid.resolve_job(&args.job).await?,
        };
        let grid_proto::Deleted {
            job_id,
            objects,
            bytes,
        } = grid.grant(&request).await?;
        if args.json {
            println!(
                "{}",
                json!({"job_id": job_id, "objects_deleted": objects, "bytes_freed": bytes})
            );
        } else {
            println!(
                "deleted job {job_id}: {objects} stored object(s), {} freed",
                bytesize::ByteSize(bytes)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
