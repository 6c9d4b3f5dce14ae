//! What one task of a grid job sees, prepared once for every place that runs one: a node
//! (`grid-node`) and `grid run --from JOB --task I`, which promises to rerun a task exactly as
//! it ran on the grid. Both fetch the files this lists and run the [`TaskSpec`] it makes; the
//! fetching is theirs (a node's cache, a temporary folder), the rules are here.

use crate::{Limits, Program, TaskSpec};
use grid_proto::{InputRef, JobSpec, Reason, names};
use std::path::{Path, PathBuf};

/// One attempt of one task of a grid job.
#[derive(Clone, Copy, Debug)]
pub struct GridTask<'a> {
    pub job_id: &'a str,
    pub spec: &'a JobSpec,
    /// Tasks in the job (`GRID_TASK_COUNT`).
    pub count: u64,
    pub index: u64,
    pub attempt: u32,
    /// Its params line, its stdin (empty for a job without params).
    pub stdin: &'a [u8],
    /// Its own input file, for a job of input files.
    pub input: Option<&'a InputRef>,
}

impl<'a> GridTask<'a> {
    /// The files the task is given and where each goes under its `/in` folder: its own input
    /// at the top, the job's shared files under `shared/`. A name that is not a plain file name
    /// is refused (`invalid:`): it could point anywhere.
    pub fn inputs(&self) -> Result<Vec<(PathBuf, &'a InputRef)>, Reason> {
        let own = self.input.map(|input| (PathBuf::new(), input));
        let shared = self
            .spec
            .shared
            .iter()
            .map(|input| (PathBuf::from("shared"), input));
        own.into_iter()
            .chain(shared)
            .map(|(dir, input)| {
                if is_plain_file_name(&input.name) {
                    Ok((dir.join(&input.name), input))
                } else {
                    Err(Reason::Invalid(format!(
                        "input name {:?} is not a plain file name",
                        input.name
                    )))
                }
            })
            .collect()
    }

    /// Bytes the task is given (its params line, its input and the shared files): the ledger's
    /// `bytes_in`.
    pub fn bytes_in(&self) -> u64 {
        self.stdin.len() as u64
            + self.input.map_or(0, |i| i.bytes)
            + self.spec.shared.iter().map(|i| i.bytes).sum::<u64>()
    }

    /// The sandbox's spec of the task: its files laid out under `in_dir` (see
    /// [`GridTask::inputs`]), its outputs to go to `out_dir`, and `program` for a job of a
    /// runtime.
    pub fn task_spec(&self, in_dir: PathBuf, out_dir: &Path, program: Option<Program>) -> TaskSpec {
        let spec = self.spec;
        let mut task = TaskSpec::new(out_dir);
        task.args = spec.args.clone();
        task.env = spec.env.clone();
        task.stdin = self.stdin.to_vec();
        task.input_dir = Some(in_dir);
        task.limits = Limits::of_job(&spec.limits);
        task.job_id = self.job_id.to_string();
        task.task_index = self.index;
        task.task_count = self.count;
        task.seed = grid_proto::task_seed(spec.seed, self.index);
        task.attempt = self.attempt;
        task.gpu = spec.class == names::GPU_CLASS;
        task.program = program;
        task
    }
}

/// A file name with no path in it: what inputs and programs may be called in `/in` and `/job`.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_go_under_in_and_names_with_paths_are_refused() {
        let file = |name: &str| InputRef {
            name: name.into(),
            sha256: grid_proto::Sha256Hex::of(name.as_bytes()),
            bytes: 10,
        };
        let spec = JobSpec {
            tenant: "t".into(),
            class: "gpu".into(),
            module_sha256: grid_proto::Sha256Hex::of(b"m"),
            module_name: "m.wasm".into(),
            args: vec!["a".into()],
            env: Vec::new(),
            limits: grid_proto::JobLimits::default(),
            seed: 7,
            retries: 0,
            replicas: 1,
            quorum: 1,
            tasks: grid_proto::TaskSource::Count(3),
            shared: vec![file("ref.csv")],
            program: None,
            priority: 0,
            name: String::new(),
        };
        let own = file("shard-2.csv");
        let task = GridTask {
            job_id: "j",
            spec: &spec,
            count: 3,
            index: 2,
            attempt: 1,
            stdin: b"{}",
            input: Some(&own),
        };
        let places: Vec<PathBuf> = task.inputs().unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            places,
            [
                PathBuf::from("shard-2.csv"),
                PathBuf::from("shared/ref.csv")
            ]
        );
        assert_eq!(task.bytes_in(), 22);
        let run = task.task_spec(PathBuf::from("/in"), Path::new("/out"), None);
        assert_eq!((run.task_index, run.task_count, run.attempt), (2, 3, 1));
        assert_eq!(run.seed, grid_proto::task_seed(7, 2));
        assert!(run.gpu);
        let mut bad = spec.clone();
        bad.shared = vec![file("../etc/passwd")];
        let task = GridTask { spec: &bad, ..task };
        assert!(matches!(task.inputs(), Err(Reason::Invalid(_))));
    }
}
