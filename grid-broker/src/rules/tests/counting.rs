//! Counting once, retries, billing, forgeries, lost replies and restarts.

use super::*;

#[test]
fn a_task_is_counted_once_and_the_job_finishes() {
    let mut w = World::new(10);
    let job = w.submit(spec(2));
    w.fill();
    assert_eq!(w.deliver("n0", vec![ok(&job, 0, 0, "n0")]), Settled::Acked);
    // A redelivery, and another node's run of the same attempt after a lapsed ack.
    assert_eq!(w.deliver("n0", vec![ok(&job, 0, 0, "n0")]), Settled::Acked);
    assert_eq!(w.deliver("n1", vec![ok(&job, 0, 0, "n1")]), Settled::Acked);
    assert_eq!(w.rules.duplicates(), 2);
    assert_eq!(w.state(&job).counts.succeeded, 1);
    assert_eq!(
        w.ledger.len(),
        1,
        "the same attempt is billed once, to the first node"
    );
    assert_eq!(w.ledger.values().next().unwrap().node_id, "n0");
    w.deliver("n1", vec![ok(&job, 1, 0, "n1")]);
    let record = w.state(&job);
    assert_eq!(
        (record.state, record.finished_unix_ms),
        (JobState::Done, Some(now()))
    );
    assert!(w.rules.ended_unsaved());
    w.persist();
    assert!(w.rules.job(&job).is_none(), "let go of once saved");
    assert_eq!(w.saved[&job].counts.in_flight, 0);
}

#[test]
fn a_failure_that_would_be_the_same_again_is_not_retried() {
    for reason in [
        Reason::Exit(1),
        Reason::Trap("unreachable".into()),
        Reason::Limit(Limit::Memory),
        Reason::Limit(Limit::Output),
        Reason::Invalid("bad module".into()),
    ] {
        let mut w = World::new(10);
        let job = w.submit(spec(1));
        w.fill();
        w.take(&job);
        let shown = reason.to_string();
        w.deliver(
            "n0",
            vec![result(&job, 0, 0, 0, "n0", Outcome::Failed(reason))],
        );
        assert!(w.take(&job).is_empty(), "{shown} is retried");
        let record = w.state(&job);
        assert_eq!(record.state, JobState::Failed, "{shown}");
        assert_eq!(w.tasks[&names::task_key(TENANT, &job, 0)].0.attempts, 1);
    }
}

#[test]
fn a_failure_is_retried_until_the_retries_run_out() {
    let mut w = World::new(10);
    let job = w.submit(spec(1));
    w.fill();
    w.take(&job);
    for attempt in 0..2 {
        w.deliver("n0", vec![failed(&job, 0, attempt, "n0")]);
        let retry = w.take(&job);
        assert_eq!(retry.len(), 1);
        assert_eq!((retry[0].index, retry[0].attempt), (0, attempt + 1));
    }
    // A redelivery of the failed attempt republishes its retry under the same id: dropped.
    w.deliver("n0", vec![failed(&job, 0, 1, "n0")]);
    assert!(w.take(&job).is_empty());
    w.deliver("n0", vec![failed(&job, 0, 2, "n0")]);
    assert!(w.take(&job).is_empty(), "no retries left");
    let record = w.state(&job);
    assert_eq!(record.state, JobState::Failed);
    assert_eq!(record.reason.as_deref(), Some("task 0 failed: limit: time"));
    let task = &w.tasks[&names::task_key(TENANT, &job, 0)].0;
    assert_eq!(task.attempts, 3);
    assert_eq!(
        task.failures,
        vec!["limit: time"; 3],
        "a redelivered failure is not one more"
    );
    assert_eq!(w.ledger.len(), 3, "every attempt that ran is billed once");
}

#[test]
fn refused_and_cancelled_tasks_are_not_retried() {
    let mut w = World::new(10);
    let job = w.submit(spec(2));
    w.fill();
    w.take(&job);
    let invalid = result(
        &job,
        0,
        0,
        0,
        "n0",
        Outcome::Failed(Reason::Invalid("bad".into())),
    );
    let cancelled = result(&job, 1, 0, 0, "n0", Outcome::Failed(Reason::Cancelled));
    w.deliver("n0", vec![invalid, cancelled]);
    assert!(w.take(&job).is_empty());
    assert_eq!(w.state(&job).counts.failed, 2);
}

#[test]
fn a_failure_of_a_task_already_counted_is_not_retried() {
    let mut w = World::new(10);
    let job = w.submit(spec(2));
    w.fill();
    w.take(&job);
    w.deliver("n0", vec![ok(&job, 0, 0, "n0")]);
    w.deliver("n1", vec![failed(&job, 0, 0, "n1")]);
    assert!(w.take(&job).is_empty());
    assert_eq!(w.state(&job).counts.succeeded, 1);
    assert_eq!(w.state(&job).counts.failed, 0);
}

#[test]
fn a_result_for_a_task_that_does_not_exist_is_ignored_and_not_billed() {
    let mut w = World::new(10);
    let job = w.submit(spec(2));
    assert_eq!(w.deliver("n0", vec![ok(&job, 7, 0, "n0")]), Settled::Acked);
    assert!(w.ledger.is_empty() && w.tasks.is_empty());
}

#[test]
fn a_lost_report_is_not_billed() {
    let mut w = World::new(10);
    let job = w.submit(spec(1));
    w.deliver(
        "n0",
        vec![result(&job, 0, 0, 0, "n0", Outcome::Failed(Reason::Lost))],
    );
    assert!(w.ledger.is_empty());
    assert_eq!(
        w.take(&job).last().map(|d| d.attempt),
        Some(1),
        "lost is retried"
    );
}

#[test]
fn usage_is_billed_within_the_jobs_limits() {
    let mut w = World::new(10);
    let mut s = spec(1);
    s.limits.timeout_ms = 2_000;
    let job = w.submit(s);
    let mut r = ok(&job, 0, 0, "n0");
    r.usage.cpu_seconds = 600.0;
    r.usage.wall_seconds = f64::NAN;
    r.usage.peak_memory_bytes = u64::MAX;
    w.deliver("n0", vec![r]);
    let entry = w.ledger.values().next().unwrap();
    assert_eq!(entry.usage.cpu_seconds, 2.0);
    assert_eq!(entry.usage.wall_seconds, 0.0);
    assert_eq!(entry.usage.peak_memory_bytes, 512 << 20);
}

#[test]
fn forged_results_are_terminated_and_change_nothing() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 2, 2));
    w.fill();
    let other_node = ok(&job, 0, 0, "n1");
    let mut other_tenant = ok(&job, 0, 0, "n0");
    other_tenant.tenant = "bob".into();
    let past_last_attempt = ok(&job, 0, 3, "n0");
    let past_last_replica = result(&job, 0, 0, 4, "n0", Outcome::Succeeded);
    for forged in [
        other_node,
        other_tenant,
        past_last_attempt,
        past_last_replica,
    ] {
        // Alone, or hidden behind an honest result in the same message.
        let honest = vote(&job, 0, 0, "n0", "a");
        assert_eq!(w.deliver("n0", vec![honest, forged]), Settled::Terminated);
    }
    assert_eq!(w.deliver("n0", vec![]), Settled::Terminated);
    let too_many = (0..=grid_proto::MAX_TASKS_PER_MESSAGE as u64)
        .map(|i| ok(&job, i, 0, "n0"))
        .collect();
    assert_eq!(w.deliver("n0", too_many), Settled::Terminated);
    assert!(w.ledger.is_empty() && w.votes.is_empty() && w.tasks.is_empty());
}

#[test]
fn nothing_is_billed_after_a_job_ends() {
    let mut w = World::new(10);
    let job = w.submit(spec(1));
    w.deliver("n0", vec![ok(&job, 0, 0, "n0")]);
    w.persist();
    assert!(w.rules.job(&job).is_none());
    // Sealed but late — another node's run after a lapsed ack, a replay — or sealed for
    // numbers the job never had: none of it is billed or counted.
    for late in [
        ok(&job, 0, 0, "n1"),
        ok(&job, 0, 1, "n1"),
        ok(&job, 5, 0, "n1"),
    ] {
        assert_eq!(w.deliver("n1", vec![late]), Settled::Acked);
    }
    assert_eq!(w.ledger.len(), 1);
    assert_eq!(w.saved[&job].counts.succeeded, 1);
}

#[test]
fn a_result_without_the_brokers_seal_is_dropped() {
    let mut w = World::new(10);
    let job = w.submit(spec(4));
    w.fill();
    let unsealed = ok(&job, 0, 0, "n0");
    let mut other_key = ok(&job, 0, 0, "n0");
    other_key.seal = SealKey::new([8; 32]).seal(
        TENANT,
        &Dispatch {
            job_id: job.clone(),
            index: 0,
            count: 1,
            attempt: 0,
            replica: 0,
        },
        0,
    );
    // A real seal, moved to another task, attempt or replica, or with its time changed.
    let sealed = sealed(ok(&job, 1, 0, "n0"));
    let mut other_task = sealed.clone();
    other_task.index = 2;
    let mut other_attempt = sealed.clone();
    other_attempt.attempt = 1;
    let mut earlier = sealed.clone();
    earlier.seal.sent_unix_ms = sealed.seal.sent_unix_ms.wrapping_sub(1);
    // Handed over earlier than it was, to bill more time.
    let mut handed_earlier = sealed.clone();
    handed_earlier.seal.handed_unix_ms = 1;
    let mut wider = sealed.clone();
    wider.seal.count = 3;
    for forged in [
        unsealed,
        other_key,
        other_task,
        other_attempt,
        earlier,
        wider,
    ] {
        assert_eq!(w.deliver_as_is("n0", vec![forged]), Settled::Terminated);
    }
    assert!(w.ledger.is_empty() && w.tasks.is_empty());
    // The seal of a run holds for each of its tasks.
    let run = Dispatch {
        job_id: job.clone(),
        index: 1,
        count: 3,
        attempt: 0,
        replica: 0,
    };
    let seal = sealed_for(&run, "n0", 0);
    let results = run
        .indices()
        .map(|i| ResultMsg {
            seal,
            ..ok(&job, i, 0, "n0")
        })
        .collect();
    assert_eq!(w.deliver_as_is("n0", results), Settled::Acked);
    assert_eq!(w.state(&job).counts.succeeded, 3);
}

#[test]
fn billed_time_is_at_most_the_time_the_task_was_out() {
    let mut w = World::new(10);
    let job = w.submit(spec(4));
    // Sent 1.5 s ago, reported as 500 s of CPU.
    let mut r = ok(&job, 0, 0, "n0");
    r.usage.cpu_seconds = 500.0;
    r.usage.wall_seconds = 500.0;
    w.deliver("n0", vec![sealed_at(r, now() - 1_500)]);
    let entry = &w.ledger[&names::usage_key(TENANT, &job, 0, 0, 0)];
    assert_eq!(entry.usage.cpu_seconds, 1.5);
    assert_eq!(entry.usage.wall_seconds, 1.5);
    // A run of three tasks sent 3 s ago, each reported at 2 s: their sum is 3 s.
    let run = Dispatch {
        job_id: job.clone(),
        index: 1,
        count: 3,
        attempt: 0,
        replica: 0,
    };
    let seal = sealed_for(&run, "n0", now() - 3_000);
    let results = run
        .indices()
        .map(|i| {
            let mut r = ok(&job, i, 0, "n0");
            r.usage.wall_seconds = 2.0;
            r.usage.cpu_seconds = 1.0;
            ResultMsg { seal, ..r }
        })
        .collect();
    assert_eq!(w.deliver_as_is("n0", results), Settled::Acked);
    let billed: f64 = (1..4)
        .map(|i| {
            w.ledger[&names::usage_key(TENANT, &job, i, 0, 0)]
                .usage
                .wall_seconds
        })
        .sum();
    assert!((billed - 3.0).abs() < 1e-9, "{billed}");
}

#[test]
fn a_record_stored_without_a_reply_is_counted_when_its_result_returns() {
    let mut w = World::new(10);
    let job = w.submit(spec(2));
    w.lose_reply.insert(names::task_key(TENANT, &job, 0));
    assert_eq!(w.deliver("n0", vec![ok(&job, 0, 0, "n0")]), Settled::Nakked);
    assert_eq!(w.state(&job).counts.succeeded, 0);
    assert_eq!(w.deliver("n0", vec![ok(&job, 0, 0, "n0")]), Settled::Acked);
    assert_eq!(w.state(&job).counts.succeeded, 1);
    assert_eq!(
        w.rules.duplicates(),
        0,
        "counted from the stored record, not dropped"
    );
}

#[test]
fn a_restart_resumes_from_stored_records_and_results_wait_until_loaded() {
    let mut w = World::new(4);
    let job = w.submit(spec(10));
    w.fill();
    w.persist(); // saved with enqueued 4
    w.fill();
    for i in 0..6 {
        w.deliver("n0", vec![ok(&job, i, 0, "n0")]);
        w.fill();
    }
    // Killed before the record with the later `enqueued` and counts was saved.
    w.rules = Rules::new(4, now, seal_key());
    w.rules.hold(w.saved[&job].clone(), false);
    assert_eq!(w.deliver("n0", vec![ok(&job, 6, 0, "n0")]), Settled::Later);
    assert!(
        w.rules.plan_fill().is_empty(),
        "no tasks before its records are counted"
    );
    w.load();
    let record = w.state(&job);
    assert_eq!((record.counts.succeeded, record.enqueued), (6, 4));
    // The refill passes over the counted tasks past `enqueued` and republishes the rest
    // under their old message ids (JetStream drops the copies).
    w.queue.clear();
    let before = w.message_ids.len();
    w.fill();
    let fills: Vec<u64> = w
        .rules
        .plan_fill()
        .iter()
        .flat_map(|f| f.dispatches.iter().map(|d| d.index))
        .collect();
    assert!(fills.is_empty());
    assert_eq!(
        w.message_ids.len(),
        before,
        "tasks 6..10 were published before: same ids"
    );
    for i in 6..10 {
        w.deliver("n0", vec![ok(&job, i, 0, "n0")]);
    }
    assert_eq!(w.state(&job).state, JobState::Done);
}

#[test]
fn a_restart_after_the_last_count_finishes_the_job_from_its_records() {
    let mut w = World::new(4);
    let job = w.submit(spec(2));
    w.fill();
    w.persist();
    w.deliver("n0", vec![ok(&job, 0, 0, "n0"), ok(&job, 1, 0, "n0")]);
    // Killed before the final record was saved.
    w.restart();
    assert_eq!(w.state(&job).state, JobState::Done);
    w.persist();
    assert_eq!(w.saved[&job].state, JobState::Done);
}

#[test]
fn a_failed_read_of_task_records_is_tried_again() {
    let mut w = World::new(4);
    let job = w.submit(spec(2));
    w.persist();
    w.rules = Rules::new(4, now, seal_key());
    w.rules.hold(w.saved[&job].clone(), false);
    assert_eq!(w.rules.loads_to_start(4).len(), 1);
    assert!(
        w.rules.loads_to_start(4).is_empty(),
        "one read at a time per job"
    );
    assert!(!w.rules.loaded(&job, None));
    assert_eq!(
        w.rules.loads_to_start(4),
        vec![(job.clone(), TENANT.to_string())]
    );
}

#[test]
fn loads_run_a_few_at_a_time() {
    let mut w = World::new(4);
    for _ in 0..6 {
        w.submit(spec(1));
    }
    w.persist();
    w.rules = Rules::new(4, now, seal_key());
    for record in w.saved.values() {
        w.rules.hold(record.clone(), false);
    }
    assert_eq!(w.rules.loads_to_start(4).len(), 4);
    assert!(w.rules.loads_to_start(4).is_empty());
}
