//! Where every random draw of a run comes from. Each use gets its own
//! generator, derived from the run's seed, a stream (what the numbers are
//! for) and an index (the step, the epoch...). No generator is carried from
//! one step to the next, so a run resumed at step k draws exactly what an
//! uninterrupted run draws from step k on.

use crate::Rng;

/// The independent random streams of a run.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// Model initialisation (index 0).
    Init = 1,
    /// Everything a training step draws: noise, eps, text windows (index: the global step).
    Step = 2,
    /// The order of the training examples in an epoch (index: the epoch).
    EpochOrder = 3,
    /// The fixed noise behind samples.png (index 0).
    FixedNoise = 4,
    /// Dropout masks' base seed (index 0).
    Dropout = 5,
    /// Evaluation draws (index 0).
    Eval = 6,
    /// Sampling and generation (index 0).
    Sampling = 7,
}

/// SplitMix64's finaliser applied to `seed` combined with `index`: nearby
/// seeds and indices give unrelated 64-bit outputs.
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of draw `index` of `stream` in a run seeded with `seed`.
pub fn stream_rng(seed: u64, stream: Stream, index: u64) -> Rng {
    Rng::seed(mix(mix(seed, stream as u64), index))
}

/// A uniformly random permutation of 0..n (Fisher–Yates; the bounded draw
/// is Lemire's multiply-shift, whose bias is below 2⁻⁴⁰ for any n here).
pub fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_reproducible_shuffle_of_every_index() {
        let a = permutation(100, &mut stream_rng(3, Stream::EpochOrder, 1));
        let b = permutation(100, &mut stream_rng(3, Stream::EpochOrder, 1));
        let c = permutation(100, &mut stream_rng(3, Stream::EpochOrder, 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }

    #[test]
    fn streams_and_indices_give_different_seeds() {
        assert_ne!(mix(mix(0, 1), 0), mix(mix(0, 2), 0));
        assert_ne!(mix(0, 5), mix(0, 6));
        assert_ne!(mix(0, 5), mix(1, 5));
    }
}
