//! Which vector unit this CPU has, and element loops compiled once per unit.
//!
//! kiln builds for the x86-64 baseline (SSE2), so that one binary runs on
//! every x86-64. A loop written as plain Rust is auto-vectorised for that
//! baseline only: 4 f32 lanes, no FMA. Loops whose cost is arithmetic (GELU's
//! tanh, the fused optimizer updates) run 2–4× faster when the same source is
//! compiled for AVX2 or AVX-512, so [`per_isa!`] compiles a function body
//! three times (baseline, AVX2+FMA, AVX-512) and picks one at run time from
//! what the CPU reports ([`Isa::detect`]), never from its vendor or model.
//!
//! Results do not depend on the unit: Rust never contracts `a * b + c` into
//! an FMA on its own, so every version performs the same IEEE operations in
//! the same order and is bit-identical to the others (tested in
//! `ops::elementwise::cpu`).
//!
//! `KILN_CPU_ISA=baseline|avx2|avx512` caps the unit used (to compare them,
//! or to rule one out); a value the CPU lacks falls back to what it has.

use std::sync::OnceLock;

/// A vector instruction set the element loops are compiled for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// x86-64's SSE2 (or whatever the target's baseline is off x86-64).
    Baseline,
    /// AVX2 with FMA (Haswell, Zen and later).
    Avx2,
    /// AVX-512 F/VL/BW/DQ (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// The widest unit this CPU supports, probed once per process (the
    /// dispatch of every [`per_isa!`] call reads it).
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
                    return Isa::Avx512;
                }
                if has!("avx2") && has!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Baseline
        })
    }

    /// The unit kiln's loops use: [`Isa::detect`], capped by `KILN_CPU_ISA`.
    /// Read once per process.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let detected = Isa::detect();
            match std::env::var("KILN_CPU_ISA").ok().as_deref() {
                Some("baseline") => Isa::Baseline,
                Some("avx2") => detected.min(Isa::Avx2),
                _ => detected,
            }
        })
    }

    /// Every unit this CPU can run, narrowest first (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= Isa::detect())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "AVX2",
            Isa::Avx512 => "AVX-512",
        }
    }
}

/// Defines `fn $name(args)` that runs its body compiled for [`Isa::active`],
/// and `fn $name_with(isa, args)` that runs it compiled for `isa`, or for
/// the widest unit the CPU has if `isa` is wider.
///
/// ```ignore
/// per_isa! {
///     pub fn scale<T>(out: &mut [T], by: T) where [T: Float] {
///         out.iter_mut().for_each(|v| *v = *v * by);
///     }
/// }
/// ```
///
/// The body is written once and pasted into three functions; the two with
/// `#[target_feature]` let LLVM use the wider registers for it (and for the
/// closures it calls, which it inlines).
#[macro_export]
#[doc(hidden)]
macro_rules! per_isa {
    ($(#[$meta:meta])* $vis:vis fn $name:ident / $with:ident <$($g:ident),*>
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? where [$($bounds:tt)*] $body:block) => {
        $(#[$meta])*
        #[inline]
        $vis fn $name<$($g),*>($($arg: $ty),*) $(-> $ret)? where $($bounds)* {
            $with($crate::simd::Isa::active(), $($arg),*)
        }

        /// The same function compiled for `isa`.
        $vis fn $with<$($g),*>(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? where $($bounds)* {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512<$($g),*>($($arg: $ty),*) $(-> $ret)? where $($bounds)* $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$($g),*>($($arg: $ty),*) $(-> $ret)? where $($bounds)* $body
                match isa.min($crate::simd::Isa::detect()) {
                    // SAFETY: the CPU reported the features each version is compiled for.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Isa::Baseline => {}
                }
            }
            #[allow(unreachable_code)]
            $body
        }
    };
}

/// Σ f(a[j], b[j]) in f64 over equal-length slices with eight running
/// partial sums: one f64 sum is a chain of dependent adds (4 cycles an
/// element, LayerNorm at 1 GB/s), eight are independent lanes that
/// vectorise. The order is fixed, so the result is too. Call it inside a
/// [`per_isa!`] function to have it compiled for the wider units.
#[inline(always)]
pub fn sum_f64<T: crate::storage::Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    let mut sums = LaneSums::default();
    sums.add(a, b, f);
    sums.total()
}

/// [`sum_f64`]'s eight lanes kept open across many slices (the planes of
/// one batch-norm channel), so that short slices pay for the final
/// reduction once instead of once each.
#[derive(Default)]
pub struct LaneSums {
    lanes: [f64; LaneSums::LANES],
    tail: f64,
}

impl LaneSums {
    const LANES: usize = 8;

    /// Adds Σ f(a[j], b[j]) over equal-length slices.
    #[inline(always)]
    pub fn add<T: crate::storage::Float>(&mut self, a: &[T], b: &[T], f: impl Fn(T, T) -> f64) {
        let (a_chunks, b_chunks) = (a.chunks_exact(Self::LANES), b.chunks_exact(Self::LANES));
        for (&a, &b) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
            self.tail += f(a, b);
        }
        for (a, b) in a_chunks.zip(b_chunks) {
            for lane in 0..Self::LANES {
                self.lanes[lane] += f(a[lane], b[lane]);
            }
        }
    }

    #[inline(always)]
    pub fn total(&self) -> f64 {
        self.lanes.iter().sum::<f64>() + self.tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_active_unit_is_one_the_cpu_has() {
        assert!(Isa::available().contains(&Isa::active()));
        assert_eq!(Isa::available()[0], Isa::Baseline);
    }
}
