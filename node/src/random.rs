//! Randomness for ids and epochs. Normally the thread's OS-seeded generator; a deterministic
//! simulation seeds it per thread so a run replays exactly. Secrets (nonces, session tokens)
//! do not come from here.

use std::cell::RefCell;

use rand::distr::{Distribution, StandardUniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// A random value: from the seeded generator if this thread has one.
pub fn random<T>() -> T
where
    StandardUniform: Distribution<T>,
{
    SEEDED.with(|seeded| match seeded.borrow_mut().as_mut() {
        Some(rng) => rng.random(),
        None => rand::random(),
    })
}

/// Makes this thread's ids and epochs a function of `seed` (`None`: random again).
pub fn seed_thread(seed: Option<u64>) {
    SEEDED.with(|seeded| *seeded.borrow_mut() = seed.map(StdRng::seed_from_u64));
}
