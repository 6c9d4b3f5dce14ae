//! Deterministic mode: the same task gives the same bytes on any node.
//!
//! Randomness comes from ChaCha12 seeded with the task's seed (`GRID_SEED`); the wall clock is
//! fixed at 2000-01-01T00:00:00Z; the monotonic clock is virtual — it starts at zero and advances
//! by exactly 1 µs each time it is read, so elapsed-time loops still end and no reading depends on
//! the host. Sleeps still take real time (and count against the task's wall-time limit).

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the fixed wall clock.
pub const FIXED_WALL_CLOCK_SECS: u64 = 946_684_800;
/// How far the virtual monotonic clock advances on each read.
pub const VIRTUAL_TICK_NANOS: u64 = 1_000;

pub struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(FIXED_WALL_CLOCK_SECS)
    }
}

#[derive(Default)]
pub struct VirtualMonotonicClock {
    nanos: AtomicU64,
}

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        VIRTUAL_TICK_NANOS
    }
    fn now(&self) -> u64 {
        self.nanos.fetch_add(VIRTUAL_TICK_NANOS, Ordering::Relaxed) + VIRTUAL_TICK_NANOS
    }
}

/// The RNG behind `random_get` for a task with this seed.
pub fn seeded_rng(seed: u64, stream: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}
