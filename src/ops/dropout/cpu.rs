//! CPU kernel for inverted dropout. The keep/drop decision of element `i` is
//! a pure function of (seed, i) — a counter-based generator — so the mask
//! needs no storage, can be recomputed for the backward pass, comes out the
//! same however the work is split across threads, and can be reproduced bit
//! for bit by a GPU kernel that hashes the same 64-bit integers.

use rayon::prelude::*;

use crate::storage::Float;

/// SplitMix64's increment: 2⁶⁴/φ, odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Below this many elements the kernel runs on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// SplitMix64's output function (Stafford's "Mix13"): a bijection on u64
/// whose output bits each depend on every input bit.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator's starting state for `seed`: hashing the seed first keeps
/// nearby seeds (1, 2, 3...) from giving overlapping streams.
#[inline]
pub fn stream_key(seed: u64) -> u64 {
    mix64(seed)
}

/// 53 uniform random bits for element `index`: the `index`-th output of a
/// SplitMix64 generator whose state starts at `key` (= `stream_key(seed)`).
/// Jumping straight to output `index` is one multiply, which is what makes
/// the generator counter-based.
#[inline]
pub fn random_bits(key: u64, index: u64) -> u64 {
    let state = key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    mix64(state) >> 11
}

/// The smallest 53-bit value that is kept: with u = bits / 2⁵³ uniform in
/// [0, 1), "u ≥ p" is exactly "bits ≥ ⌈p · 2⁵³⌉", an integer comparison any
/// device evaluates identically.
#[inline]
pub fn keep_threshold(p: f64) -> u64 {
    (p * (1u64 << 53) as f64).ceil() as u64
}

/// out[i] = x[i] / (1 − p) if element i is kept, else 0. Also the backward:
/// dL/dx = dL/dy · mask / (1 − p) is this same map applied to dL/dy.
pub fn dropout<T: Float>(x: &[T], p: f64, seed: u64) -> Vec<T> {
    let key = stream_key(seed);
    let threshold = keep_threshold(p);
    let scale = T::from_f64(1.0 / (1.0 - p));
    let fill = |first_index: usize, out: &mut [T], x: &[T]| {
        for (k, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let kept = random_bits(key, (first_index + k) as u64) >= threshold;
            *o = if kept { v * scale } else { T::ZERO };
        }
    };
    let mut out = vec![T::ZERO; x.len()];
    if x.len() < PARALLEL_THRESHOLD {
        fill(0, &mut out, x);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (out, x))| fill(c * CHUNK, out, x));
    }
    out
}

/// The same mask drawn the slow, obvious way: one SplitMix64 generator
/// stepped through the elements in order. Kept to test `dropout`.
pub fn dropout_reference<T: Float>(x: &[T], p: f64, seed: u64) -> Vec<T> {
    let mut state = stream_key(seed);
    x.iter()
        .map(|&v| {
            state = state.wrapping_add(GOLDEN_GAMMA);
            let u = (mix64(state) >> 11) as f64 / (1u64 << 53) as f64;
            if u >= p {
                v * T::from_f64(1.0 / (1.0 - p))
            } else {
                T::ZERO
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_based_mask_equals_sequential_generator_across_thread_chunks() {
        // Long enough to take the parallel path with several chunks.
        let x: Vec<f64> = (0..(PARALLEL_THRESHOLD + 3 * CHUNK + 17))
            .map(|i| 1.0 + i as f64 * 1e-3)
            .collect();
        for &p in &[0.1, 0.5, 0.9] {
            assert_eq!(dropout(&x, p, 42), dropout_reference(&x, p, 42));
        }
    }

    #[test]
    fn integer_threshold_is_the_float_comparison() {
        for &p in &[0.0, 1e-9, 0.3, 0.5, 0.999_999] {
            let threshold = keep_threshold(p);
            for index in 0..2000 {
                let bits = random_bits(stream_key(7), index);
                let u = bits as f64 / (1u64 << 53) as f64;
                assert_eq!(bits >= threshold, u >= p, "p {p}, index {index}");
            }
        }
    }
}
