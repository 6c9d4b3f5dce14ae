//! Fan-out: each job's window topped up, round-robin, in messages of one task or of a run of
//! short ones (see the module docs of [`super`]).

use super::{Dispatch, Fill, Rules};
use grid_proto::{TaskMsg, TaskSource, names};

/// Filling windows, as events of the rules.
impl Rules {
    /// Every job's top-up, round-robin (see the module docs). Nothing changes until the shell
    /// reports a fill stored with [`Rules::filled`]: a fill whose publishes fail is planned
    /// again on the next tick, under the same message ids.
    pub fn plan_fill(&self) -> Vec<Fill> {
        let window = self.window;
        let mut fills = Vec::new();
        // What each tenant's jobs may still put in flight.
        let mut tenant_room: std::collections::HashMap<&str, u64> = Default::default();
        for job in self.jobs.values() {
            let room = tenant_room
                .entry(job.record.spec.tenant.as_str())
                .or_insert(self.tenant_window);
            *room = room.saturating_sub(job.record.counts.in_flight);
        }
        let mut jobs: Vec<&super::ActiveJob> =
            self.jobs.values().filter(|job| job.loaded).collect();
        // A tenant's jobs of higher priority first; ids (times) otherwise.
        jobs.sort_by_key(|job| std::cmp::Reverse(job.record.spec.priority));
        for job in jobs {
            let record = &job.record;
            let tenant_left = tenant_room
                .get(record.spec.tenant.as_str())
                .copied()
                .unwrap_or(0);
            // The saved `enqueued` may lag what a broker before a restart had enqueued, so a
            // task past it may be counted already: it is passed over, not put in flight again
            // (a window of tasks that never report would stall the job).
            let (total, room) = (
                record.counts.total,
                window
                    .saturating_sub(record.counts.in_flight)
                    .min(tenant_left),
            );
            // Room for a whole message of short tasks first, unless fewer are left.
            let per_message = job.per_message(window);
            if room < per_message && total - record.enqueued > room {
                continue;
            }
            let mut last = record.enqueued;
            let mut indices = Vec::new();
            while last < total && (indices.len() as u64) < room {
                if !job.has_counted(last) {
                    indices.push(last);
                }
                last += 1;
            }
            if last == record.enqueued {
                continue;
            }
            if let Some(left) = tenant_room.get_mut(record.spec.tenant.as_str()) {
                *left = left.saturating_sub(indices.len() as u64);
            }
            let (replicas, attempt) = (record.spec.replicas.max(1), record.first_attempt());
            let mut dispatches = Vec::new();
            let mut rest = &indices[..];
            // Consecutive tasks, several to a message when they are short.
            while !rest.is_empty() {
                let mut len = 1;
                while len < rest.len().min(per_message as usize) && rest[len] == rest[len - 1] + 1 {
                    len += 1;
                }
                dispatches.extend((0..replicas).map(|replica| Dispatch {
                    job_id: record.id.clone(),
                    index: rest[0],
                    count: len as u32,
                    attempt,
                    replica,
                }));
                rest = &rest[len..];
            }
            fills.push(Fill {
                job_id: record.id.clone(),
                dispatches,
                next: last,
                tasks: indices.len() as u64,
            });
        }
        fills
    }

    /// Job `job_id`'s runs of `count` tasks carry params lines of `bytes` in all, more than a
    /// message may: its runs are shortened to fit `budget` bytes (at least one task) from now on.
    pub fn shorten_runs(&mut self, job_id: &str, count: u32, bytes: u64, budget: u64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            let fit = (u64::from(count) * budget / bytes.max(1)).max(1);
            job.most_per_message = job.most_per_message.min(fit);
        }
    }

    /// A fill's dispatches are all stored in the work queue.
    pub fn filled(&mut self, fill: &Fill) {
        let Some(job) = self.jobs.get_mut(&fill.job_id) else {
            return;
        };
        job.record.enqueued = fill.next;
        job.record.counts.in_flight += fill.tasks;
        job.dirty = true;
        if job.record.state == grid_proto::JobState::Queued {
            job.record.state = grid_proto::JobState::Running;
        }
    }

    /// The task message of `dispatch`, with its tasks' params lines (none for a job without a
    /// params file), sealed ([`super::seal`]), and the subject it goes to.
    pub fn task_msg(&self, dispatch: &Dispatch, params: Vec<Vec<u8>>) -> Option<(String, TaskMsg)> {
        let job = self.jobs.get(&dispatch.job_id)?;
        let spec = &job.record.spec;
        let input = match &spec.tasks {
            TaskSource::Inputs(files) => usize::try_from(dispatch.index)
                .ok()
                .and_then(|i| files.get(i))
                .cloned(),
            _ => None,
        };
        let task = TaskMsg {
            job_id: job.record.id.clone(),
            index: dispatch.index,
            count: dispatch.count,
            attempt: dispatch.attempt,
            replica: dispatch.replica,
            params,
            input,
            spec: job.task_spec.clone(),
            seal: self.seal.seal(&spec.tenant, dispatch, (self.now)()),
        };
        Some((names::tasks_subject(&spec.class, &job.record.id), task))
    }
}
