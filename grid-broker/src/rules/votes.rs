//! Replicas and quorum: how a task's replicas' results decide it.
//!
//! A replica's result is a vote (its `digest`: the outcome and the outputs). A task is decided
//! when `quorum` votes agree (the lowest replica of the winning group becomes its result); when
//! every replica given has voted without a quorum it gets one more replica, up to
//! [`max_replicas`], and is then `disputed`. One node votes at most once per task and round: a
//! node's claim keeps it to one replica of a task, so a second vote from it is a forgery that
//! would let one node reach a quorum alone.

use super::{Dispatch, Rules, VoteOutcome, VoteStep};
use grid_proto::{Outcome, Reason, ResultMsg, Sha256Hex, TaskRecord, TaskState, Vote};
use std::collections::HashMap;

/// Replicas a task may get in all: two more than asked, to break a disagreement (none more
/// without replicas).
pub fn max_replicas(replicas: u32) -> u32 {
    if replicas > 1 { replicas + 2 } else { 1 }
}

/// Whether `vote` may join `votes`: no other replica of the task from the same node.
pub fn one_per_node(votes: &[ResultMsg], vote: &ResultMsg) -> bool {
    !votes
        .iter()
        .any(|v| v.node_id == vote.node_id && v.replica != vote.replica)
}

/// What a task's votes so far decide.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// More votes are coming: fewer than the replicas given have voted.
    Waiting,
    /// Every replica given voted, without a quorum: give it one more.
    OneMore,
    /// Decided: `Some` of the winning vote, or `None` when the replicas ran out (disputed).
    Decided(Option<Box<ResultMsg>>),
}

/// Decides a task from its `votes`, with `dispatched` replicas given of at most
/// `max_replicas(replicas)`.
pub fn decide(votes: &[ResultMsg], replicas: u32, quorum: u32, dispatched: u32) -> Decision {
    let mut groups: HashMap<&Sha256Hex, Vec<&ResultMsg>> = HashMap::new();
    for vote in votes {
        groups.entry(&vote.digest).or_default().push(vote);
    }
    // The largest group; of equal ones, the one with the lowest replica (the same answer
    // whatever order the votes came in).
    let best = groups
        .values()
        .max_by_key(|g| {
            let lowest = g.iter().map(|v| v.replica).min().unwrap_or(u32::MAX);
            (g.len(), std::cmp::Reverse(lowest))
        })
        .cloned()
        .unwrap_or_default();
    if best.len() as u32 >= quorum {
        Decision::Decided(
            best.iter()
                .min_by_key(|v| v.replica)
                .map(|v| Box::new((*v).clone())),
        )
    } else if (votes.len() as u32) < dispatched {
        Decision::Waiting
    } else if dispatched < max_replicas(replicas) {
        Decision::OneMore
    } else {
        Decision::Decided(None)
    }
}

/// Replicas a task has been given, judged from its votes: at least the job's `replicas`, and
/// one past the highest replica that voted.
pub fn given(votes: &[ResultMsg], replicas: u32) -> u32 {
    votes
        .iter()
        .map(|v| v.replica + 1)
        .max()
        .unwrap_or(0)
        .max(replicas)
}

/// The final record of a task decided by its `votes` (`winner` `None`: disputed), in `round`
/// whose first attempt is `first_attempt`.
pub fn decided_record(
    votes: &[ResultMsg],
    winner: Option<ResultMsg>,
    round: u32,
    first_attempt: u32,
) -> Option<TaskRecord> {
    let (state, result) = match &winner {
        Some(w) if w.outcome == Outcome::Succeeded => (TaskState::Succeeded, w.clone()),
        Some(w) => (TaskState::Failed, w.clone()),
        None => (TaskState::Disputed, votes.first()?.clone()),
    };
    Some(TaskRecord {
        state,
        attempts: result.attempt.saturating_sub(first_attempt) + 1,
        round,
        earlier: Vec::new(),
        failures: result.failure().into_iter().collect(),
        votes: votes
            .iter()
            .map(|v| Vote {
                replica: v.replica,
                node_id: v.node_id.clone(),
                digest: v.digest,
                agreed: winner.as_ref().is_some_and(|w| w.digest == v.digest),
            })
            .collect(),
        result,
    })
}

/// A replica's result for a task its round already decided (`record`): `Some(agreed)` when it
/// is a vote the decision did not count — it changes only its node's tally, once — or `None`
/// (no replicas, or a vote the decision counted).
pub fn late_vote(record: &TaskRecord, result: &ResultMsg) -> Option<bool> {
    if record.votes.is_empty() || record.votes.iter().any(|v| v.replica == result.replica) {
        return None;
    }
    Some(record.state != TaskState::Disputed && record.result.digest == result.digest)
}

/// A replica's result, as events of the rules.
impl Rules {
    /// The first step of a replica's result (after [`super::Step::Vote`]).
    pub fn vote_step(&mut self, result: &ResultMsg) -> VoteStep {
        let Some(job) = self.jobs.get(&result.job_id) else {
            return VoteStep::Ignore;
        };
        if result.outcome == Outcome::Failed(Reason::Cancelled) {
            return VoteStep::Ignore;
        }
        if result.outcome == Outcome::Failed(Reason::Lost)
            && job.record.retries_left(result.attempt)
            && !job.has_counted(result.index)
        {
            tracing::info!(job = %result.job_id, index = result.index, replica = result.replica, "replica lost; running it again");
            return VoteStep::RunAgain(Dispatch {
                job_id: result.job_id.clone(),
                index: result.index,
                count: 1,
                attempt: result.attempt + 1,
                replica: result.replica,
            });
        }
        VoteStep::Check {
            round: job.record.retried,
        }
    }

    /// Whether the broker holds no votes of `result`'s task yet: the shell then reads the
    /// stored ones (every replica's key of the round) for [`Rules::add_vote`].
    pub fn needs_stored_votes(&self, result: &ResultMsg) -> bool {
        self.jobs
            .get(&result.job_id)
            .is_some_and(|job| !job.votes.contains_key(&result.index))
    }

    /// A replica's result, stored as a vote (`fresh`: this store created it); `stored`: the
    /// task's votes read from `grid_votes` when [`Rules::needs_stored_votes`] said so.
    pub fn add_vote(
        &mut self,
        result: ResultMsg,
        fresh: bool,
        stored: Vec<ResultMsg>,
    ) -> VoteOutcome {
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return VoteOutcome::Ignored;
        };
        let index = result.index;
        // Stored already: a duplicate if this broker holds the vote, else a vote whose store
        // reached the server but whose reply was lost, or one from before a restart.
        let held = job
            .votes
            .get(&index)
            .is_some_and(|votes| votes.iter().any(|v| v.replica == result.replica));
        if !fresh && held {
            self.duplicate();
            return VoteOutcome::Duplicate;
        }
        let votes = match job.votes.get_mut(&index) {
            Some(votes) if !one_per_node(votes, &result) => {
                tracing::warn!(job = %result.job_id, index, node = %result.node_id, "ignoring a second replica's vote from one node");
                return VoteOutcome::Ignored;
            }
            Some(votes) => {
                votes.push(result);
                votes.clone()
            }
            None => {
                // The first vote this broker sees for the task: the stored ones, this included.
                let mut votes: Vec<ResultMsg> = Vec::new();
                for vote in stored {
                    if vote.index == index && one_per_node(&votes, &vote) {
                        votes.push(vote);
                    }
                }
                job.votes.insert(index, votes.clone());
                votes
            }
        };
        let spec = &job.record.spec;
        let (replicas, quorum) = (spec.replicas, spec.quorum);
        let dispatched = *job
            .dispatched
            .entry(index)
            .or_insert(given(&votes, replicas));
        let winner = match decide(&votes, replicas, quorum, dispatched) {
            Decision::Waiting => return VoteOutcome::Waiting,
            Decision::OneMore => {
                tracing::info!(job = %job.record.id, index, votes = votes.len(), "replicas disagree; one more");
                job.dispatched.insert(index, dispatched + 1);
                return VoteOutcome::OneMore(Dispatch {
                    job_id: job.record.id.clone(),
                    index,
                    count: 1,
                    attempt: job.record.first_attempt(),
                    replica: dispatched,
                });
            }
            Decision::Decided(winner) => winner.map(|w| *w),
        };
        job.votes.remove(&index);
        job.dispatched.remove(&index);
        match decided_record(
            &votes,
            winner,
            job.record.retried,
            job.record.first_attempt(),
        ) {
            Some(record) => VoteOutcome::Decided(Box::new(record)),
            None => VoteOutcome::Waiting,
        }
    }

    /// The extra replica `dispatch` asked for by `voter`'s vote ([`VoteOutcome::OneMore`])
    /// could not be published: the task goes back to where it was before that vote, so that the
    /// vote's redelivery asks for the replica again (held, the vote would be a duplicate, and
    /// the task would wait for a replica nobody sent).
    pub fn one_more_failed(&mut self, dispatch: &Dispatch, voter: u32) {
        if let Some(job) = self.jobs.get_mut(&dispatch.job_id) {
            job.dispatched.insert(dispatch.index, dispatch.replica);
            if let Some(votes) = job.votes.get_mut(&dispatch.index) {
                votes.retain(|v| v.replica != voter);
            }
        }
    }
}
