//! Retry rounds and cancel.

use super::*;

/// A job of 3 tasks whose task 1 failed every attempt, ended and saved.
fn failed_job(w: &mut World) -> String {
    let job = w.submit(JobSpec {
        retries: 0,
        ..spec(3)
    });
    w.fill();
    w.take(&job);
    w.deliver(
        "n0",
        vec![
            ok(&job, 0, 0, "n0"),
            failed(&job, 1, 0, "n0"),
            ok(&job, 2, 0, "n0"),
        ],
    );
    w.persist();
    assert_eq!(w.saved[&job].state, JobState::Failed);
    job
}

#[test]
fn a_retry_runs_only_the_failed_tasks_in_a_round_of_their_own() {
    let mut w = World::new(10);
    let job = failed_job(&mut w);
    assert_eq!(w.retry(&job).unwrap(), 1);
    let record = w.state(&job);
    assert_eq!(
        (record.retried, record.state, record.counts.succeeded),
        (1, JobState::Queued, 2)
    );
    w.fill();
    let sent = w.take(&job);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].index, sent[0].attempt),
        (1, 1),
        "round 1 owns attempt 1"
    );
    // A late result of round 0 is billed, and counts for nothing.
    w.deliver("n1", vec![ok(&job, 1, 0, "n1")]);
    assert_eq!(w.state(&job).counts.succeeded, 2);
    w.deliver("n0", vec![ok(&job, 1, 1, "n0")]);
    let record = w.state(&job);
    assert_eq!(
        (record.state, record.counts.succeeded, record.reason),
        (JobState::Done, 3, None)
    );
    let task = &w.tasks[&names::task_key(TENANT, &job, 1)].0;
    assert_eq!(
        (task.state, task.round, task.attempts),
        (TaskState::Succeeded, 1, 2)
    );
    assert_eq!(task.earlier.len(), 1);
    assert_eq!(task.earlier[0].state, TaskState::Failed);
    assert_eq!(task.failures, vec!["limit: time"]);
    let rounds: Vec<u32> = w
        .ledger
        .values()
        .filter(|e| e.index == 1)
        .map(|e| e.round)
        .collect();
    assert_eq!(
        rounds,
        vec![0, 1],
        "the late round-0 attempt was billed already"
    );
}

#[test]
fn a_retry_is_refused_for_running_and_done_jobs() {
    let mut w = World::new(10);
    let running = w.submit(spec(1));
    assert!(w.retry(&running).is_err());
    let record = w.saved[&running].clone();
    let done = JobRecord {
        state: JobState::Done,
        ..record.clone()
    };
    assert_eq!(
        rounds::retry(done, None).unwrap_err().to_string(),
        format!("job {running} has no failed tasks (done)")
    );
    // A saved round whose reply was lost (queued, held by no broker) is taken up as it is.
    assert_eq!(
        rounds::retry(record.clone(), None).unwrap(),
        rounds::Retry::TakeUp(record)
    );
}

#[test]
fn a_retried_round_has_attempt_numbers_of_its_own() {
    let mut w = World::new(10);
    let job = failed_job(&mut w);
    w.retry(&job).unwrap();
    w.fill();
    // Round 1 with no retries owns attempt 1 only: attempt 2 was never sent out.
    assert_eq!(
        w.deliver("n0", vec![ok(&job, 1, 2, "n0")]),
        Settled::Terminated
    );
    let mut record = w.saved[&job].clone();
    record.retried = u32::MAX / 2;
    record.spec.retries = 3;
    record.state = JobState::Failed;
    record.counts.failed = 1;
    let err = rounds::retry(record, None).unwrap_err().to_string();
    assert!(err.contains("submit it again"), "{err}");
}

#[test]
fn a_round_that_fails_again_keeps_both_rounds_failures() {
    let mut w = World::new(10);
    let job = failed_job(&mut w);
    w.retry(&job).unwrap();
    w.fill();
    w.deliver("n0", vec![failed(&job, 1, 1, "n0")]);
    w.persist();
    let record = &w.saved[&job];
    assert_eq!(
        (record.state, record.counts.failed, record.counts.succeeded),
        (JobState::Failed, 1, 2)
    );
    let task = &w.tasks[&names::task_key(TENANT, &job, 1)].0;
    assert_eq!(task.failures.len(), 2);
    assert_eq!(task.attempts, 2);
    // And it can be retried again.
    assert_eq!(w.retry(&job).unwrap(), 1);
}

#[test]
fn reconcile_counts_what_is_stored_unless_it_is_an_earlier_failure() {
    let job = intake::new_record("j".into(), spec(1), now());
    let record = |round, state| TaskRecord {
        state,
        round,
        ..results::final_record(&job, &ok("j", 0, 0, "n0"), Vec::new())
    };
    let mine = record(1, TaskState::Succeeded);
    for stored in [
        record(1, TaskState::Failed),
        record(0, TaskState::Succeeded),
    ] {
        assert_eq!(
            results::reconcile(&mine, stored.clone()),
            Reconcile::Count(stored)
        );
    }
    let earlier = record(0, TaskState::Failed);
    assert_eq!(
        results::reconcile(&mine, earlier.clone()),
        Reconcile::Replace(mine.after(&earlier))
    );
}

#[test]
fn a_cancelled_job_counts_nothing_more() {
    let mut w = World::new(10);
    let job = w.submit(spec(3));
    w.fill();
    w.deliver("n0", vec![ok(&job, 0, 0, "n0")]);
    let cancelled = rounds::cancel(w.state(&job), now()).unwrap();
    assert_eq!(cancelled.reason.as_deref(), Some("cancelled"));
    w.saved.insert(job.clone(), cancelled.clone());
    w.rules.release(&job);
    w.rules.settle(cancelled.clone());
    w.deliver(
        "n1",
        vec![result(
            &job,
            1,
            0,
            0,
            "n1",
            Outcome::Failed(Reason::Cancelled),
        )],
    );
    w.deliver("n1", vec![ok(&job, 2, 0, "n1")]);
    assert_eq!(
        w.ledger.len(),
        3,
        "attempts sent before the cancel are billed"
    );
    assert_eq!(
        w.tasks.len(),
        1,
        "and not counted: the job ended with the cancel"
    );
    assert!(rounds::cancel(cancelled, now()).is_err(), "already ended");
}

#[test]
fn a_cancel_mid_round_leaves_no_more_tasks_to_send() {
    let mut w = World::new(2);
    let job = failed_job(&mut w);
    w.retry(&job).unwrap();
    w.rules.release(&job);
    w.fill();
    assert!(w.queue.is_empty());
    assert!(w.rules.loads_to_start(4).is_empty());
}

#[test]
fn a_cancelled_job_ends_its_unfinished_tasks_bills_what_ran_and_can_be_retried() {
    let mut w = World::new(10);
    let job = w.submit(JobSpec {
        retries: 0,
        ..spec(3)
    });
    w.fill();
    w.take(&job);
    w.deliver("n0", vec![ok(&job, 0, 0, "n0")]);
    w.persist();
    // Cancelled 20 s before the results below come in.
    let cancelled_at = now() - 20_000;
    let record = rounds::cancel(w.state(&job), cancelled_at).unwrap();
    assert_eq!(
        (
            record.state,
            record.counts.succeeded,
            record.counts.cancelled
        ),
        (JobState::Cancelled, 1, 2)
    );
    assert_eq!(record.counts.in_flight, 0, "nothing runs after a cancel");
    w.saved.insert(job.clone(), record.clone());
    w.rules.release(&job);
    w.rules.settle(record);

    // Task 1, sent 10 s before the cancel, stopped by it: billed as it ran, up to the cancel
    // and its grace (20 s), not the 25 s its node claims.
    let mut stopped = result(&job, 1, 0, 0, "n0", Outcome::Failed(Reason::Cancelled));
    stopped.usage.wall_seconds = 25.0;
    stopped.usage.cpu_seconds = 25.0;
    w.deliver("n0", vec![sealed_at(stopped, cancelled_at - 10_000)]);
    // Task 2, claimed sent after the cancel: nothing to bill.
    let late = result(&job, 2, 0, 0, "n0", Outcome::Failed(Reason::Cancelled));
    w.deliver("n0", vec![sealed_at(late, cancelled_at + 1_000)]);
    let billed: Vec<(u64, f64)> = w
        .ledger
        .values()
        .filter(|e| e.index > 0)
        .map(|e| (e.index, e.usage.wall_seconds))
        .collect();
    assert_eq!(billed, vec![(1, 20.0)]);
    assert_eq!(
        w.ledger
            .values()
            .find(|e| e.index == 1)
            .unwrap()
            .usage
            .cpu_seconds,
        20.0
    );

    // A retry runs the two tasks that did not succeed, in a round of their own.
    assert_eq!(w.retry(&job).unwrap(), 2);
    w.fill();
    let sent: Vec<u64> = w.take(&job).iter().map(|d| d.index).collect();
    assert_eq!(sent, vec![1, 2]);
    w.deliver("n0", vec![ok(&job, 1, 1, "n0"), ok(&job, 2, 1, "n0")]);
    let record = w.state(&job);
    assert_eq!(
        (
            record.state,
            record.counts.succeeded,
            record.counts.cancelled
        ),
        (JobState::Done, 3, 0)
    );
}

#[test]
fn a_retry_may_give_the_round_new_limits_checked_as_a_submit() {
    let mut w = World::new(10);
    let job = failed_job(&mut w);
    let record = w.saved[&job].clone();
    let more = JobLimits {
        memory_bytes: 1 << 30,
        ..record.spec.limits.clone()
    };
    match rounds::retry(record.clone(), Some(more.clone())).unwrap() {
        rounds::Retry::Save(saved) => assert_eq!(saved.spec.limits, more),
        other => panic!("{other:?}"),
    }
    let none = JobLimits {
        memory_bytes: 0,
        ..record.spec.limits.clone()
    };
    assert!(rounds::retry(record, Some(none)).is_err());
}
