//! The tenant's side of a grid: a connection as one tenant ([`Session`]), its typed requests
//! to the broker ([`Session::ask`]), and reads of its own records. The `grid` commands and the
//! Python package build on it; nothing of the request wire is written twice.

use crate::{Grid, auth};
use anyhow::{Context, Result, anyhow, bail};
use grid_proto::{Answer, JobRecord, Request, TaskRecord, decode, encode, names};
use std::path::Path;

/// A connection to a grid as one tenant: the tenant is the one the credentials name (the
/// default tenant on a grid without auth, and for the operator's credentials).
pub struct Session {
    pub grid: Grid,
    pub tenant: String,
    /// Who the credentials name (`None` on a grid without auth).
    pub identity: Option<auth::Identity>,
}

impl std::ops::Deref for Session {
    type Target = Grid;
    fn deref(&self) -> &Grid {
        &self.grid
    }
}

impl Session {
    /// Connects to the grid at `nats` (else `GRID_NATS_URL`, else the local default) with the
    /// credentials `creds` (else `GRID_CREDS`, else the default tenant's of `grid up`), for
    /// `grid COMMAND`, a tenant's command: a provider's credentials are refused here, with the
    /// line to fix it, rather than by the server after a timeout.
    pub async fn open(nats: Option<&str>, creds: Option<&Path>, command: &str) -> Result<Self> {
        let url = crate::nats_url(nats);
        let creds = auth::creds_path(creds);
        // Read once: who the credentials name, and what the connection presents.
        let text = creds.as_deref().map(auth::read_creds).transpose()?;
        let identity = match (&text, &creds) {
            (Some(text), Some(path)) => Some(
                auth::Identity::of_creds(text)
                    .with_context(|| format!("credentials {}", path.display()))?,
            ),
            _ => None,
        };
        if let Some(who) = &identity
            && who.role == auth::Role::Provider
        {
            bail!(
                "permission denied: provider {} cannot use `grid {command}` (a tenant's command: pass a tenant's --creds)",
                who.name
            );
        }
        let tenant = match &identity {
            Some(who) if who.role == auth::Role::Tenant => who.name.clone(),
            _ => names::DEFAULT_TENANT.to_string(),
        };
        let client = crate::connect_named(&url, false, text.as_deref(), creds.as_deref()).await?;
        Ok(Session {
            grid: Grid::open(client).await?,
            tenant,
            identity,
        })
    }

    /// Whose jobs these credentials may read: a tenant's own (`Some`), or every tenant's for the
    /// operator and on a grid without auth (`None`).
    pub fn scope(&self) -> Option<String> {
        match &self.identity {
            Some(who) if who.role == auth::Role::Tenant => Some(who.name.clone()),
            _ => None,
        }
    }

    /// Sends `request` to the broker and reads its answer: granted, or refused with one line
    /// for the user. An error is the grid's (no broker answered, an unreadable answer).
    pub async fn ask<R: Request>(&self, request: &R) -> Result<Answer<R::Reply>> {
        let reply = self
            .client
            .request(
                names::api_subject(&self.tenant, R::VERB),
                encode(request).into(),
            )
            .await
            .map_err(|e| {
                anyhow!("no broker answered ({e}); is `grid up` or `grid-broker` running?")
            })?;
        decode::<Answer<R::Reply>>(&reply.payload).map_err(|e| anyhow!("{e}"))
    }

    /// As [`Session::ask`], with a refusal as an error.
    pub async fn grant<R: Request>(&self, request: &R) -> Result<R::Reply> {
        match self.ask(request).await? {
            Answer::Granted(reply) => Ok(reply),
            Answer::Refused(why) => Err(anyhow!("{why}")),
        }
    }

    /// The tenant's object store, made by the broker on first use.
    pub async fn ensure_store(&self) -> Result<()> {
        match self.store(&self.tenant).await {
            Ok(_) => Ok(()),
            Err(e) if e.downcast_ref::<crate::NoStore>().is_some() => {
                self.grant(&grid_proto::StorageRequest {}).await?;
                self.store(&self.tenant).await.map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// The tenant's job `job`; when it has none of that id, the broker says why in one line
    /// (another tenant's job, or none at all).
    pub async fn job_record(&self, job: &str) -> Result<JobRecord> {
        let bytes = if names::valid_name(job) {
            self.jobs()
                .await?
                .get(names::job_key(&self.tenant, job))
                .await
                .map_err(|e| anyhow!("reading job {job}: {e}"))?
        } else {
            None
        };
        let Some(bytes) = bytes else {
            self.grant(&grid_proto::OwnerRequest { job_id: job.into() })
                .await?;
            bail!("unknown job {job}");
        };
        decode::<JobRecord>(&bytes).map_err(|e| anyhow!("job {job}: {e}"))
    }

    /// The id of the tenant's job that `job` names: its id; a unique prefix of one (`grid
    /// status 01a2332f`); or its `--name`, the newest job of that name. Anything else comes
    /// back as it is, for [`Session::job_record`] to say whose it is or that there is none.
    pub async fn resolve_job(&self, job: &str) -> Result<String> {
        if names::valid_name(job)
            && self
                .jobs()
                .await?
                .get(names::job_key(&self.tenant, job))
                .await
                .is_ok_and(|b| b.is_some())
        {
            return Ok(job.to_string());
        }
        let records: Vec<JobRecord> = self
            .entries(names::JOBS_BUCKET, Some(&self.tenant))
            .await?
            .into_iter()
            .filter_map(|(_, bytes)| decode::<JobRecord>(&bytes).ok())
            .collect();
        let started: Vec<&str> = records
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| !job.is_empty() && id.starts_with(job))
            .collect();
        match started.as_slice() {
            [one] => return Ok(one.to_string()),
            [] => {}
            many => bail!(
                "{job} starts {} jobs' ids ({}{}): give more of the id",
                many.len(),
                many.iter().take(3).copied().collect::<Vec<_>>().join(", "),
                if many.len() > 3 { ", …" } else { "" }
            ),
        }
        // Ids grow with time: the newest of a name has the largest.
        Ok(records
            .iter()
            .filter(|r| r.spec.name == job)
            .map(|r| r.id.clone())
            .max()
            .unwrap_or_else(|| job.to_string()))
    }

    /// Task `index`'s final record of the tenant's job `job`, once it is decided.
    pub async fn task_record(&self, job: &str, index: u64) -> Result<Option<TaskRecord>> {
        let bytes = self
            .tasks()
            .await?
            .get(names::task_key(&self.tenant, job, index))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        bytes
            .map(|b| decode::<TaskRecord>(&b).map_err(|e| anyhow!("task {index}: {e}")))
            .transpose()
    }
}
