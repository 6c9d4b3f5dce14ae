//! Replicas: quorum, disputes, one vote per node, late votes.

use super::*;

#[test]
fn a_quorum_decides_with_the_lowest_replica_of_the_winners() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "good")]);
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "bad")]);
    assert_eq!(w.state(&job).counts.succeeded, 0, "no quorum yet");
    w.deliver("n1", vec![vote(&job, 0, 1, "n1", "good")]);
    let task = &w.tasks[&names::task_key(TENANT, &job, 0)].0;
    assert_eq!((task.state, task.result.replica), (TaskState::Succeeded, 1));
    assert_eq!(task.votes.len(), 3);
    assert_eq!(w.tally["n1"], (1, 0));
    assert_eq!(w.tally["n0"], (0, 1));
    assert_eq!(w.ledger.len(), 3, "every replica is billed");
    assert_eq!(w.state(&job).state, JobState::Done);
}

#[test]
fn replicas_that_disagree_get_more_then_the_task_is_disputed() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 2, 2));
    w.fill();
    w.take(&job);
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    w.deliver("n1", vec![vote(&job, 0, 1, "n1", "b")]);
    let more = w.take(&job);
    assert_eq!(more.iter().map(|d| d.replica).collect::<Vec<_>>(), vec![2]);
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "c")]);
    assert_eq!(
        w.take(&job).iter().map(|d| d.replica).collect::<Vec<_>>(),
        vec![3]
    );
    w.deliver("n3", vec![vote(&job, 0, 3, "n3", "d")]);
    assert!(w.take(&job).is_empty(), "two more than asked, and no more");
    let record = w.state(&job);
    assert_eq!(
        (record.state, record.counts.disputed),
        (JobState::Failed, 1)
    );
    assert_eq!(record.reason.as_deref(), Some("task 0 disputed"));
    assert!(w.tally.values().all(|t| *t == (0, 1)));
}

#[test]
fn one_node_cannot_win_a_vote_alone() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "forged")]);
    assert_eq!(
        w.deliver("n0", vec![vote(&job, 0, 1, "n0", "forged")]),
        Settled::Acked
    );
    assert_eq!(w.state(&job).counts.succeeded, 0);
    // The honest replicas still decide.
    w.deliver("n1", vec![vote(&job, 0, 1, "n1", "good")]);
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "good")]);
    let task = &w.tasks[&names::task_key(TENANT, &job, 0)].0;
    assert_eq!(task.result.node_id, "n1");
}

#[test]
fn one_node_cannot_win_a_vote_alone_after_a_restart() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.persist();
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "forged")]);
    w.restart();
    w.deliver("n0", vec![vote(&job, 0, 1, "n0", "forged")]);
    assert_eq!(w.state(&job).counts.succeeded, 0);
}

#[test]
fn a_duplicate_vote_changes_nothing() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    assert_eq!(w.rules.duplicates(), 1);
    assert_eq!(w.state(&job).counts.succeeded, 0);
}

#[test]
fn a_late_replica_changes_only_its_nodes_tally_once() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    w.deliver("n1", vec![vote(&job, 0, 1, "n1", "a")]);
    assert_eq!(w.state(&job).state, JobState::Done);
    // While the job is still held, and after it ended.
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "b")]);
    assert_eq!(w.tally["n2"], (0, 1));
    w.persist();
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "b")]);
    assert_eq!(w.tally["n2"], (0, 1), "once");
    assert_eq!(w.saved[&job].counts.succeeded, 1);
}

#[test]
fn a_lost_replica_runs_again_instead_of_voting() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 2, 2));
    w.fill();
    w.take(&job);
    w.deliver(
        "n0",
        vec![result(&job, 0, 0, 1, "n0", Outcome::Failed(Reason::Lost))],
    );
    let again = w.take(&job);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].replica, again[0].attempt), (1, 1));
    assert!(w.votes.is_empty());
}

#[test]
fn a_decision_stored_without_a_reply_is_counted_by_the_next_replica() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 3, 2));
    w.fill();
    w.lose_reply.insert(names::task_key(TENANT, &job, 0));
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    assert_eq!(
        w.deliver("n1", vec![vote(&job, 0, 1, "n1", "a")]),
        Settled::Nakked
    );
    assert_eq!(w.state(&job).counts.succeeded, 0);
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "a")]);
    assert_eq!(w.state(&job).counts.succeeded, 1);
    assert_eq!(w.tally["n0"], (1, 0));
    assert_eq!(w.tally["n2"], (1, 0), "the late vote agreed");
}

#[test]
fn decide_waits_asks_for_more_and_disputes() {
    let a = vote("j", 0, 0, "n0", "a");
    let b = vote("j", 0, 1, "n1", "b");
    assert_eq!(
        votes::decide(std::slice::from_ref(&a), 2, 2, 2),
        votes::Decision::Waiting
    );
    let both = [a.clone(), b.clone()];
    assert_eq!(votes::decide(&both, 2, 2, 2), votes::Decision::OneMore);
    assert_eq!(votes::decide(&both, 2, 2, 4), votes::Decision::Waiting);
    assert_eq!(
        votes::decide(&both, 2, 1, 2),
        votes::Decision::Decided(Some(Box::new(a.clone())))
    );
    let four = [a, b, vote("j", 0, 2, "n2", "c"), vote("j", 0, 3, "n3", "d")];
    assert_eq!(
        votes::decide(&four, 2, 2, 4),
        votes::Decision::Decided(None)
    );
    assert_eq!(votes::given(&four, 2), 4);
    assert_eq!(votes::max_replicas(1), 1);
    assert_eq!(votes::max_replicas(3), 5);
}

#[test]
fn an_extra_replica_that_could_not_be_sent_is_asked_for_again() {
    let mut w = World::new(10);
    let job = w.submit(replicated(1, 2, 2));
    w.fill();
    w.take(&job);
    w.deliver("n0", vec![vote(&job, 0, 0, "n0", "a")]);
    w.publishes_fail = true;
    assert_eq!(
        w.deliver("n1", vec![vote(&job, 0, 1, "n1", "b")]),
        Settled::Nakked
    );
    assert!(w.take(&job).is_empty());
    // The redelivered vote asks for the extra replica again, rather than counting as held.
    w.publishes_fail = false;
    assert_eq!(
        w.deliver("n1", vec![vote(&job, 0, 1, "n1", "b")]),
        Settled::Acked
    );
    let more = w.take(&job);
    assert_eq!(more.iter().map(|d| d.replica).collect::<Vec<_>>(), vec![2]);
    assert_eq!(w.rules.duplicates(), 0);
    w.deliver("n2", vec![vote(&job, 0, 2, "n2", "b")]);
    assert_eq!(w.state(&job).counts.succeeded, 1);
}
