//! Cheap, well-spread random numbers for load balancing and weighted routing (not for secrets):
//! SplitMix64 over a process-wide counter seeded from the clock.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

static STATE: AtomicU64 = AtomicU64::new(0);

pub fn random_u64() -> u64 {
    let mut step = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if step == 0 {
        // First use: start from the clock so processes do not share one sequence.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_nanos() as u64 | 1);
        step = STATE.fetch_add(seed, Ordering::Relaxed).wrapping_add(seed);
    }
    let mut z = step.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `0..bound` (0 when `bound` is 0); the modulo bias is negligible for small bounds.
pub fn random_below(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    random_u64() % bound
}
