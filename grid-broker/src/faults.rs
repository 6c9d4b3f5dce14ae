//! Test-only fault injection, switched on by environment variables the fault tests set: the
//! way they kill the broker at an exact moment, or make the server "lose" a reply.

/// With `GRID_TEST_CRASH_AT=<point>` in its environment, the broker aborts the first time it
/// reaches that point (`after-store`: a task's record is stored, its result not yet acked;
/// `after-retry`: a retry is published, the failed result not yet acked; `before-finish`: every
/// task of a job is counted, its final record not yet saved; `retry-saved`: a retried job's new
/// round is saved, its tasks not yet sent; `after-replace`: a retried task's record took its
/// earlier round's place, its result not yet acked).
pub fn crash_point(point: &str) {
    if std::env::var("GRID_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::warn!("GRID_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

/// The error a lost reply is reported with.
pub const REPLY_LOST: &str = "reply lost (GRID_TEST_LOSE_REPLIES)";

/// With `GRID_TEST_LOSE_REPLIES=1` in its environment, the broker takes the first successful
/// store of each task record and each vote for a failure — as if the server had died between
/// storing and replying — so every result goes back to JetStream and returns to find its key
/// taken.
pub fn reply_lost(key: &str) -> bool {
    static LOST: std::sync::OnceLock<Option<std::sync::Mutex<std::collections::HashSet<String>>>> =
        std::sync::OnceLock::new();
    let lost = LOST.get_or_init(|| {
        std::env::var("GRID_TEST_LOSE_REPLIES")
            .is_ok_and(|v| v == "1")
            .then(Default::default)
    });
    lost.as_ref().is_some_and(|keys| {
        keys.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_string())
    })
}
