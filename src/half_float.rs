//! Conversions between f32 and the 16-bit floats kiln stores, fast enough
//! to sit inside every 16-bit op: a 16-bit tensor is never computed on
//! directly, its values are widened to f32 a chunk at a time, computed, and
//! rounded back.
//!
//! bf16 is the top half of an f32, so widening is a shift and rounding to
//! nearest even is an integer add: both are written as branch-free loops and
//! compiled per vector unit ([`crate::per_isa!`]); they give exactly the bits
//! of `half`'s conversions (tested on all 2³² f32 values in tests/dtypes.rs).
//! f16 goes through `half`'s slice conversions, which use the CPU's F16C
//! instructions where it has them.

use std::mem::MaybeUninit;

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::ops::elementwise::cpu::filled;
use crate::per_isa;
pub use half::{bf16, f16};

/// Elements per parallel task and per chunk of a 16-bit elementwise op:
/// the f32 copies of a chunk stay in the L1/L2 cache.
pub(crate) const CHUNK: usize = 1 << 13;

/// Below this many elements a conversion runs on one thread. (Raising it
/// to 2¹⁹ or 2²⁰ made a bf16 DCGAN step 8-15% slower and the VAE's no
/// faster: the pool is awake between a step's ops.)
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// A 16-bit float kiln stores: f16 or bf16.
pub trait HalfFloat: Copy + Send + Sync + 'static {
    /// dst[i] = src[i] as f32 (exact).
    fn widen_into(src: &[Self], dst: &mut [MaybeUninit<f32>]);
    /// dst[i] = src[i] rounded to nearest even (NaN stays NaN, values past
    /// the largest finite one become ±∞).
    fn narrow_into(src: &[f32], dst: &mut [MaybeUninit<Self>]);
}

impl HalfFloat for bf16 {
    fn widen_into(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        widen_bf16(src, dst);
    }

    fn narrow_into(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        narrow_bf16(src, dst);
    }
}

impl HalfFloat for f16 {
    fn widen_into(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
        let dst = initialised(dst, 0.0);
        src.convert_to_f32_slice(dst);
    }

    fn narrow_into(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
        let dst = initialised(dst, f16::ZERO);
        dst.convert_from_f32_slice(src);
    }
}

/// `dst` with every element set to `zero`, for `half`'s converters, which
/// take initialised slices.
fn initialised<E: Copy>(dst: &mut [MaybeUninit<E>], zero: E) -> &mut [E] {
    for d in dst.iter_mut() {
        d.write(zero);
    }
    // SAFETY: every element was just written; MaybeUninit<E> has E's layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<E>] as *mut [E]) }
}

/// bf16 → f32: the 16 bits become the top of the f32.
#[inline(always)]
pub fn widen_bf16_value(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// f32 → bf16, rounding to nearest even: adding 0x7FFF plus the lowest kept
/// bit carries into the kept half exactly when the dropped half is over one
/// half, or one half with the kept half odd. A NaN keeps its sign and top
/// payload bits and is made quiet.
#[inline(always)]
pub fn narrow_bf16_value(x: f32) -> bf16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x0040;
    let is_nan = bits & 0x7FFF_FFFF > 0x7F80_0000;
    bf16::from_bits((if is_nan { quiet_nan } else { rounded }) as u16)
}

per_isa! {
    /// bf16 → f32 over a slice ([`widen_bf16_value`]).
    fn widen_bf16 / widen_bf16_with<>(src: &[bf16], dst: &mut [MaybeUninit<f32>]) where [] {
        assert_eq!(src.len(), dst.len());
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(widen_bf16_value(s));
        }
    }
}

per_isa! {
    /// f32 → bf16 over a slice ([`narrow_bf16_value`]).
    fn narrow_bf16 / narrow_bf16_with<>(src: &[f32], dst: &mut [MaybeUninit<bf16>]) where [] {
        assert_eq!(src.len(), dst.len());
        for (d, &x) in dst.iter_mut().zip(src) {
            d.write(narrow_bf16_value(x));
        }
    }
}

/// `src` widened to f32, in parallel for large slices.
pub fn widen<H: HalfFloat>(src: &[H]) -> Vec<f32> {
    convert_in_parallel(src, H::widen_into)
}

/// `src` rounded to a 16-bit float, in parallel for large slices.
pub fn narrow<H: HalfFloat>(src: &[f32]) -> Vec<H> {
    convert_in_parallel(src, H::narrow_into)
}

/// A new vector of `convert(src)`, one thread per block of large slices.
fn convert_in_parallel<S: Sync, D: Copy + Send>(
    src: &[S],
    convert: fn(&[S], &mut [MaybeUninit<D>]),
) -> Vec<D> {
    filled(src.len(), |dst| {
        if src.len() < PARALLEL_THRESHOLD {
            convert(src, dst);
        } else {
            dst.par_chunks_mut(PARALLEL_THRESHOLD)
                .zip(src.par_chunks(PARALLEL_THRESHOLD))
                .for_each(|(d, s)| convert(s, d));
        }
    })
}

/// out = kernel(x) for an elementwise f32 kernel over 16-bit values: each
/// chunk of [`CHUNK`] values is widened, computed and rounded back, so the
/// f32 copies never exceed a chunk per thread.
pub fn map_chunks<H: HalfFloat>(x: &[H], kernel: impl Fn(&[f32]) -> Vec<f32> + Sync) -> Vec<H> {
    let run = |out: &mut [MaybeUninit<H>], x: &[H]| {
        let wide = filled(x.len(), |w| H::widen_into(x, w));
        H::narrow_into(&kernel(&wide), out);
    };
    filled(x.len(), |out| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| run(o, x));
    })
}

/// out = kernel(x, y) for an elementwise f32 kernel over two 16-bit slices
/// of one length, a chunk at a time (see [`map_chunks`]).
pub fn zip_chunks<H: HalfFloat>(
    x: &[H],
    y: &[H],
    kernel: impl Fn(&[f32], &[f32]) -> Vec<f32> + Sync,
) -> Vec<H> {
    assert_eq!(x.len(), y.len(), "zip_chunks: operand lengths");
    let run = |out: &mut [MaybeUninit<H>], x: &[H], y: &[H]| {
        let wide_x = filled(x.len(), |w| H::widen_into(x, w));
        let wide_y = filled(y.len(), |w| H::widen_into(y, w));
        H::narrow_into(&kernel(&wide_x, &wide_y), out);
    };
    filled(x.len(), |out| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| run(o, x, y));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Isa;

    #[test]
    fn every_vector_unit_converts_bf16_like_half() {
        // Ties, overflow to ∞, NaNs with payloads, subnormals and zeros.
        let values: Vec<f32> = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -(1.0 + 2f32.powi(-8)),
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC1_2345),
            f32::from_bits(1),
            -0.0,
            0.0,
            0.1,
        ]
        .into_iter()
        .cycle()
        .take(1000)
        .collect();
        for isa in Isa::available() {
            let narrowed = filled(values.len(), |d| narrow_bf16_with(isa, &values, d));
            for (&x, &got) in values.iter().zip(&narrowed) {
                let expected = bf16::from_f32(x);
                assert!(
                    got.to_bits() == expected.to_bits() || got.is_nan() && expected.is_nan(),
                    "{isa:?}: {x:e} -> {got:?}, half gives {expected:?}"
                );
            }
            let widened = filled(narrowed.len(), |d| widen_bf16_with(isa, &narrowed, d));
            for (&h, &w) in narrowed.iter().zip(&widened) {
                assert_eq!(w.to_bits(), h.to_f32().to_bits());
            }
        }
    }

    #[test]
    fn chunked_maps_round_each_value_once() {
        let x: Vec<bf16> = (0..3 * CHUNK + 5)
            .map(|i| bf16::from_f32(i as f32 * 0.01 - 40.0))
            .collect();
        let y: Vec<bf16> = x.iter().rev().copied().collect();
        let mapped = map_chunks(&x, |c| c.iter().map(|v| v.exp()).collect());
        let zipped = zip_chunks(&x, &y, |a, b| a.iter().zip(b).map(|(a, b)| a * b).collect());
        for i in 0..x.len() {
            assert_eq!(mapped[i], bf16::from_f32(x[i].to_f32().exp()));
            assert_eq!(zipped[i], bf16::from_f32(x[i].to_f32() * y[i].to_f32()));
        }
    }
}
