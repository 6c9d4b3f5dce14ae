//! Intake and fill: what a submit must satisfy, and how windows are topped up.

use super::*;

#[test]
fn a_submit_names_its_own_tenant_only() {
    let err = intake::check("bob", spec(1), &nodes(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "permission denied: tenant bob cannot submit as tenant alice"
    );
    let defaulted = JobSpec {
        tenant: names::DEFAULT_TENANT.into(),
        ..spec(1)
    };
    assert_eq!(
        intake::check("bob", defaulted, &nodes(1)).unwrap().tenant,
        "bob"
    );
}

#[test]
fn a_submit_is_validated_by_the_broker_too() {
    let cases = [
        (
            JobSpec {
                class: "tpu".into(),
                ..spec(1)
            },
            "unknown class \"tpu\"",
        ),
        (spec(0), "the job has no tasks"),
        (replicated(1, 17, 9), "--replicas must be 1..=16"),
        (
            replicated(1, 2, 3),
            "--replicas must be 1..=16 and --quorum 1..=replicas (got 2 and 3)",
        ),
        (replicated(1, 0, 0), "--replicas must be 1..=16"),
    ];
    for (spec, want) in cases {
        let err = intake::check(TENANT, spec, &nodes(20))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{err}");
    }
}

#[test]
fn a_job_no_live_node_takes_is_refused_but_one_may_wait_for_nodes() {
    let mut big = spec(1);
    big.limits.memory_bytes = 64 << 30;
    let err = intake::check(TENANT, big.clone(), &nodes(2))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no live node of class cpu takes a job this large (node n0: "),
        "{err}"
    );
    // With no node online, a CPU job waits for one to join; a GPU job is refused.
    intake::check(TENANT, big, &[]).unwrap();
    let gpu = JobSpec {
        class: "gpu".into(),
        ..spec(1)
    };
    let err = intake::check(TENANT, gpu, &nodes(2))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("no node of this grid has a GPU"), "{err}");
    let err = intake::check(TENANT, replicated(1, 3, 2), &nodes(2))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "--replicas 3 needs 3 nodes of class cpu; 2 online");
}

#[test]
fn a_job_has_at_most_a_window_in_flight() {
    let mut w = World::new(4);
    let job = w.submit(spec(10));
    w.fill();
    assert_eq!(w.queue.len(), 4);
    assert_eq!(w.state(&job).state, JobState::Running);
    w.fill();
    assert_eq!(w.queue.len(), 4, "no room, no more");
    assert_eq!(w.deliver("n0", vec![ok(&job, 0, 0, "n0")]), Settled::Acked);
    w.fill();
    let indices: Vec<u64> = w.queue.iter().map(|d| d.index).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    assert_eq!(w.state(&job).counts.in_flight, 4);
}

#[test]
fn windows_fill_round_robin_so_a_small_job_waits_one_window() {
    let mut w = World::new(2);
    let big = w.submit(spec(100));
    let small = w.submit(spec(2));
    w.fill();
    let jobs: Vec<&str> = w.queue.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(
        jobs,
        vec![big.as_str(), big.as_str(), small.as_str(), small.as_str()]
    );
}

/// A job of 1000 tasks whose first window went out one task to a message (their time unknown)
/// and whose first 10 results say they are short (10 ms).
fn job_of_known_short_tasks(w: &mut World) -> String {
    let job = w.submit(spec(1000));
    w.fill();
    assert!(
        w.queue.iter().all(|d| d.count == 1),
        "unknown task time: one each"
    );
    let first: Vec<Dispatch> = w.take(&job);
    let results: Vec<ResultMsg> = first[..10]
        .iter()
        .map(|d| ok(&job, d.index, 0, "n0"))
        .collect();
    w.deliver("n0", results);
    job
}

#[test]
fn short_tasks_travel_several_to_a_message_but_replicas_and_inputs_alone() {
    let mut w = World::new(256);
    let job = job_of_known_short_tasks(&mut w);
    w.fill();
    let runs = w.take(&job);
    // 10 ms tasks, 50 ms a message: about five to a message, consecutive, none left out.
    assert!(runs.iter().all(|d| (2..=5).contains(&d.count)), "{runs:?}");
    let covered: Vec<u64> = runs.iter().flat_map(Dispatch::indices).collect();
    assert_eq!(covered, (256..266).collect::<Vec<_>>());
    let first = &runs[0];
    assert_eq!(first.message_id(), format!("{job}.256.0.0+{}", first.count));

    let rep = w.submit(replicated(100, 2, 2));
    w.rules
        .jobs
        .get_mut(&rep)
        .unwrap()
        .observe(&ok(&rep, 0, 0, "n0"));
    let inputs = w.submit(JobSpec {
        tasks: TaskSource::Inputs(
            (0..50)
                .map(|i| InputRef {
                    name: format!("{i}.txt"),
                    sha256: Sha256Hex::of(b"x"),
                    bytes: 1,
                })
                .collect(),
        ),
        ..spec(0)
    });
    w.rules
        .jobs
        .get_mut(&inputs)
        .unwrap()
        .observe(&ok(&inputs, 0, 0, "n0"));
    w.fill();
    assert!(w.take(&rep).iter().all(|d| d.count == 1));
    let input_tasks = w.take(&inputs);
    assert!(input_tasks.iter().all(|d| d.count == 1));
    let (_, msg) = w.rules.task_msg(&input_tasks[7], Vec::new()).unwrap();
    assert_eq!(msg.input.unwrap().name, "7.txt");
    assert_eq!(
        msg.spec.tasks,
        TaskSource::Count(50),
        "the task list stays home"
    );
}

#[test]
fn every_replica_is_its_own_message() {
    let mut w = World::new(10);
    let job = w.submit(replicated(2, 3, 2));
    w.fill();
    let ids: Vec<String> = w.queue.iter().map(Dispatch::message_id).collect();
    assert_eq!(
        ids,
        [0, 1, 2]
            .map(|r| format!("{job}.0.0.{r}"))
            .into_iter()
            .chain([0, 1, 2].map(|r| format!("{job}.1.0.{r}")))
            .collect::<Vec<_>>()
    );
}

/// Holds a job of `tasks` tasks of `tenant`'s at `priority`.
fn submit_as(w: &mut World, tenant: &str, tasks: u64, priority: i32) -> String {
    w.next_id += 1;
    let id = format!("job{:03}", w.next_id);
    let spec = JobSpec {
        tenant: tenant.into(),
        priority,
        ..spec(tasks)
    };
    let record = intake::new_record(id.clone(), spec, now());
    w.rules.hold(record, true);
    id
}

#[test]
fn a_tenant_window_caps_each_tenants_jobs_together_and_priority_goes_first() {
    let mut w = World::new(10);
    w.rules = Rules::new(10, now, seal_key()).with_tenant_window(15);
    let low = submit_as(&mut w, "alice", 100, 0);
    let high = submit_as(&mut w, "alice", 100, 5);
    let other = submit_as(&mut w, "bob", 100, 0);
    w.fill();
    // Alice's higher-priority job fills its whole window first, her older job gets the rest
    // of her 15; Bob's job is not held back by Alice's.
    assert_eq!(w.take(&high).len(), 10);
    assert_eq!(w.take(&low).len(), 5);
    assert_eq!(w.take(&other).len(), 10);
    // Nothing finished: nothing more goes out.
    w.fill();
    assert!(w.queue.is_empty(), "{:?}", w.queue);
}

#[test]
fn runs_too_large_for_a_message_are_shortened_to_fit() {
    let mut w = World::new(256);
    let job = job_of_known_short_tasks(&mut w);
    // The shell found a run of 4 carrying 800 KB of params, over a budget of 200 KB: one task
    // to a message from now on.
    w.rules.shorten_runs(&job, 4, 800_000, 200_000);
    w.fill();
    let runs = w.take(&job);
    assert!(!runs.is_empty());
    assert!(runs.iter().all(|d| d.count == 1), "{runs:?}");
}
