//! What a submit must satisfy before the job is stored: the spec's own rules
//! ([`grid_proto::JobSpec::validate`], the same check `grid submit` makes), the tenant of the
//! request's subject, and the live nodes (a job no live node takes is refused rather than left
//! to wait). Whether its objects were uploaded is the shell's to check (it reads the store).

use anyhow::{Result, bail};
use grid_proto::{JobRecord, JobSpec, JobState, NodeInfo, TaskCounts, names};

/// The spec of a job `tenant` submitted, checked against the live `nodes` (see [`own`] and
/// [`placeable`]).
pub fn check(tenant: &str, spec: JobSpec, nodes: &[NodeInfo]) -> Result<JobSpec> {
    let spec = own(tenant, spec)?;
    placeable(&spec, nodes)?;
    Ok(spec)
}

/// The spec of a job `tenant` submitted, as a spec of its own: its `tenant` is the subject's
/// (a client may leave the default name there; another tenant's name is refused), and it
/// passes [`JobSpec::validate`]. Checked before anything is read.
pub fn own(tenant: &str, mut spec: JobSpec) -> Result<JobSpec> {
    // The subject is the tenant's own (NATS lets a tenant publish only there).
    if spec.tenant != tenant && spec.tenant != names::DEFAULT_TENANT {
        bail!(
            "permission denied: tenant {tenant} cannot submit as tenant {}",
            spec.tenant
        );
    }
    spec.tenant = tenant.to_string();
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

/// Whether the live `nodes` can run `spec`'s tasks, now or once nodes join.
pub fn placeable(spec: &JobSpec, nodes: &[NodeInfo]) -> Result<()> {
    let of_class: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| n.classes.contains(&spec.class))
        .collect();
    // A CPU job may wait for nodes to join; a GPU job on a grid without GPUs would wait
    // forever, so it is refused while no node offers the class. Checked at submit only: if the
    // class's nodes leave later, `grid status` says so.
    if spec.class != names::DEFAULT_CLASS && of_class.is_empty() {
        bail!(
            "no node of this grid has a GPU: start grid-node on a machine with one (a CPU-only \
             machine can serve GPU jobs with lavapipe: apt-get install mesa-vulkan-drivers)"
        );
    }
    // Providers take no job over their caps: refuse one that no live node of its class takes,
    // rather than let it wait. (With no node online, a job waits for one to join.)
    if !of_class.is_empty()
        && of_class
            .iter()
            .all(|n| spec.limits.over(&n.accepts).is_some())
    {
        let why: Vec<String> = of_class
            .iter()
            .take(3)
            .map(|n| {
                format!(
                    "node {}: {}",
                    n.id,
                    spec.limits.over(&n.accepts).unwrap_or_default()
                )
            })
            .collect();
        bail!(
            "no live node of class {} takes a job this large ({}): ask for less, or wait for a provider that offers more",
            spec.class,
            why.join("; ")
        );
    }
    // Replicas run on distinct nodes: fewer nodes than replicas could never finish.
    if spec.replicas > 1 && (of_class.len() as u32) < spec.replicas {
        bail!(
            "--replicas {} needs {} nodes of class {}; {} online",
            spec.replicas,
            spec.replicas,
            spec.class,
            of_class.len()
        );
    }
    Ok(())
}

/// The record of a new job `id` of `spec`, submitted at `now_ms`.
pub fn new_record(id: String, spec: JobSpec, now_ms: u64) -> JobRecord {
    let total = spec.tasks.len();
    JobRecord {
        id,
        spec,
        state: JobState::Queued,
        reason: None,
        created_unix_ms: now_ms,
        finished_unix_ms: None,
        counts: TaskCounts {
            total,
            ..TaskCounts::default()
        },
        enqueued: 0,
        retried: 0,
    }
}
