//! 16-bit forward copies of the parameters (as llm.c keeps them).
//!
//! Under autocast every f32 weight that a matrix product or a convolution
//! takes is rounded to bf16/f16 on each forward pass: twice a step for a
//! DCGAN discriminator that sees a real and a fake batch, and each rounded
//! copy lives beside the activations until backward frees it. An optimizer
//! asked to keep forward copies ([`crate::optim::Optimizer::keep_forward_copies`])
//! writes each parameter's 16-bit copy in the same pass that updates the
//! parameter (the fused update kernels write both), and autocast takes that
//! copy instead of converting. The conversions leave the step, and the
//! copies become part of the model's state (2 bytes per parameter) instead
//! of the step's memory. The master weights, their gradients and the
//! optimizer state stay f32.
//!
//! Rounding is to nearest even by default: the copy then holds exactly what
//! autocast's own conversion would give, so training is bit-identical with
//! or without copies. Stochastic rounding (bf16 only) rounds each value up
//! with probability equal to the part of it that bf16 drops, so the copy is
//! unbiased: a long run of small updates still moves the copy on average
//! where round-to-nearest would hide them. Its random bits are a hash of
//! (seed, step, parameter name, element index): reproducible, independent
//! of the thread count, the same on the CPU and in `kernels/optim.cu`, and
//! recomputable from the optimizer's step count, so a resumed run
//! recreates the copies its last step wrote.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::half_float::narrow_bf16_value;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, SharedStorage, Tensor};

/// How a forward copy is rounded from its f32 parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyRounding {
    /// Round to nearest even (what `to_dtype` does).
    NearestEven,
    /// Round up with probability equal to the dropped fraction (bf16 only),
    /// with random bits drawn from `seed`.
    Stochastic { seed: u64 },
}

/// Which 16-bit copy of its parameters an optimizer keeps for autocast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardCopies {
    /// `DType::BF16` or `DType::F16`: autocast's lower precision.
    pub dtype: DType,
    pub rounding: CopyRounding,
}

impl ForwardCopies {
    /// Copies in `dtype`, rounded to nearest even.
    pub fn nearest_even(dtype: DType) -> Self {
        ForwardCopies {
            dtype,
            rounding: CopyRounding::NearestEven,
        }
    }

    /// bf16 copies, rounded stochastically with random bits drawn from `seed`.
    pub fn stochastic_bf16(seed: u64) -> Self {
        ForwardCopies {
            dtype: DType::BF16,
            rounding: CopyRounding::Stochastic { seed },
        }
    }

    /// An error naming `optimizer` unless this is a setting kiln supports.
    pub(super) fn check(&self, optimizer: &'static str) -> Result<()> {
        if !self.dtype.is_half() {
            return Err(Error::invalid(
                optimizer,
                format!(
                    "forward copies are bf16 or f16 (autocast's lower precision), not {}",
                    self.dtype
                ),
            ));
        }
        if matches!(self.rounding, CopyRounding::Stochastic { .. }) && self.dtype != DType::BF16 {
            return Err(Error::invalid(
                optimizer,
                format!(
                    "stochastic rounding of forward copies is for bf16, not {} \
                     (use CopyRounding::NearestEven)",
                    self.dtype
                ),
            ));
        }
        Ok(())
    }

    /// How the parameter named `name` is copied after its update `step`.
    pub(super) fn format_at(&self, step: u32, name: &str) -> CopyFormat {
        match (self.dtype, self.rounding) {
            (DType::F16, _) => CopyFormat::F16Nearest,
            (_, CopyRounding::NearestEven) => CopyFormat::Bf16Nearest,
            (_, CopyRounding::Stochastic { seed }) => CopyFormat::Bf16Stochastic {
                stream: random_stream(seed, step, name),
            },
        }
    }
}

/// How one update writes one copy; mirrored by the COPY_* modes of
/// kernels/optim.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyFormat {
    Bf16Nearest,
    F16Nearest,
    /// Stochastic bf16 with this (seed, step, parameter)'s random stream.
    Bf16Stochastic {
        stream: u32,
    },
}

impl CopyFormat {
    pub(super) fn dtype(self) -> DType {
        match self {
            CopyFormat::F16Nearest => DType::F16,
            CopyFormat::Bf16Nearest | CopyFormat::Bf16Stochastic { .. } => DType::BF16,
        }
    }

    /// The kernel's mode number (0 means no copy).
    pub(super) fn mode(self) -> u32 {
        match self {
            CopyFormat::Bf16Nearest => 1,
            CopyFormat::F16Nearest => 2,
            CopyFormat::Bf16Stochastic { .. } => 3,
        }
    }

    pub(super) fn stream(self) -> u32 {
        match self {
            CopyFormat::Bf16Stochastic { stream } => stream,
            _ => 0,
        }
    }
}

/// A 32-bit integer hash with good avalanche (Wellons' "lowbias32"); a
/// bijection, so distinct inputs give distinct outputs.
#[inline(always)]
pub(super) fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The random stream of one parameter at one step, from the seed. The
/// parameter is known by its name's FNV-1a hash: unique names (which
/// optimizers require) keep the streams of two groups' parameters apart,
/// whatever order they are listed in.
pub(super) fn random_stream(seed: u64, step: u32, name: &str) -> u32 {
    let name_hash = name.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let seeded = mix32(seed as u32 ^ mix32((seed >> 32) as u32));
    mix32(mix32(seeded ^ mix32(step)) ^ name_hash)
}

/// The random bits of element `index` in a stream: distinct elements get
/// distinct inputs to the hash (multiplying by an odd number is a bijection).
#[inline(always)]
pub(super) fn element_bits(stream: u32, index: usize) -> u32 {
    mix32(stream ^ (index as u32).wrapping_mul(0x9E37_79B9))
}

/// x rounded to bf16 stochastically: the low 16 bits of `bits` are added to
/// the dropped half of x's magnitude, which carries into the kept half with
/// probability (dropped half) / 2¹⁶. ±∞ and NaN round as to nearest even.
#[inline(always)]
pub fn round_bf16_stochastic(x: f32, bits: u32) -> bf16 {
    let magnitude_and_sign = x.to_bits();
    if magnitude_and_sign & 0x7FFF_FFFF >= 0x7F80_0000 {
        return narrow_bf16_value(x);
    }
    bf16::from_bits((magnitude_and_sign.wrapping_add(bits & 0xFFFF) >> 16) as u16)
}

/// copy[i] = param[i] rounded as `format` says, for a run of a parameter
/// starting at element `first` (the CPU half of the fused updates).
pub(super) fn write_copy<T: Float>(
    param: &[T],
    copy: &mut [u16],
    format: CopyFormat,
    first: usize,
) {
    assert_eq!(param.len(), copy.len(), "write_copy: lengths");
    let pairs = copy.iter_mut().zip(param);
    match format {
        CopyFormat::Bf16Nearest => {
            pairs.for_each(|(c, &p)| *c = narrow_bf16_value(p.to_f32()).to_bits())
        }
        CopyFormat::F16Nearest => {
            pairs.for_each(|(c, &p)| *c = f16::from_f32(p.to_f32()).to_bits())
        }
        CopyFormat::Bf16Stochastic { stream } => {
            for (i, (c, &p)) in pairs.enumerate() {
                let bits = element_bits(stream, first + i);
                *c = round_bf16_stochastic(p.to_f32(), bits).to_bits();
            }
        }
    }
}

/// The 16-bit patterns of a bf16 or f16 host buffer, for [`write_copy`].
pub(super) fn copy_bits(copy: &mut CpuStorage) -> &mut [u16] {
    match copy {
        CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
        other => unreachable!("forward copies are 16-bit, not {}", other.dtype()),
    }
}

/// The buffer the next copy of `param` is written into: the previous copy
/// when nothing else holds it, else (a graph still saves the old values, or
/// there is none yet) a new one.
pub(super) fn copy_buffer(param: &Tensor, dtype: DType) -> Result<Arc<SharedStorage>> {
    if let Some(old) = param.shared_storage().take_forward_copy()
        && Arc::strong_count(&old) == 1
        && old.read().dtype() == dtype
    {
        return Ok(old);
    }
    Ok(param.zeros_like()?.to_dtype(dtype)?.shared_storage())
}

/// Rewrites `param`'s copy from its current values on the host (after a
/// state load: what the last update wrote, recomputed from its step).
pub(super) fn refresh_copy(param: &Tensor, format: CopyFormat) -> Result<()> {
    let values = param.host_storage()?;
    let mut bits = vec![0u16; values.len()];
    match &values {
        CpuStorage::F32(v) => write_copy(v, &mut bits, format, 0),
        CpuStorage::F64(v) => write_copy(v, &mut bits, format, 0),
        other => return Err(Error::unsupported_dtype("forward copy", other.dtype())),
    }
    let copy = match format.dtype() {
        DType::F16 => CpuStorage::F16(bytemuck::cast_vec(bits)),
        _ => CpuStorage::BF16(bytemuck::cast_vec(bits)),
    };
    let storage = match param.device() {
        crate::Device::Cpu => Storage::Cpu(copy),
        crate::Device::Cuda(ordinal) => Storage::Cuda(crate::cuda::CudaStorage::from_cpu(
            &crate::cuda::device(ordinal)?,
            &copy,
        )?),
    };
    param.set_forward_copy(SharedStorage::new(storage));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_bf16_rounds_to_a_neighbour_with_the_dropped_fraction_as_chance() {
        // 1 + 2⁻¹⁰ lies an eighth of the way from bf16's 1 to the next bf16,
        // 1 + 2⁻⁷: its dropped 16 bits are 0x2000 of 0x10000.
        let x = 1.0f32 + 2f32.powi(-10);
        let (down, up) = (bf16::from_f32(1.0), bf16::from_f32(1.0 + 2f32.powi(-7)));
        let n = 1 << 16;
        let ups = (0..n)
            .filter(|&i| {
                let r = round_bf16_stochastic(x, element_bits(12345, i));
                assert!(r == down || r == up, "{r} is not a neighbour of {x}");
                r == up
            })
            .count();
        let fraction = ups as f64 / n as f64;
        assert!(
            (fraction - 0.125).abs() < 0.01,
            "rounded up {fraction} of the time"
        );
        // Negative values round away from zero with the same chance, and
        // values bf16 holds exactly, ±∞ and NaN never move.
        for bits in [0u32, 0xFFFF, 0x8000] {
            assert_eq!(
                round_bf16_stochastic(-x, bits),
                -round_bf16_stochastic(x, bits)
            );
            assert_eq!(round_bf16_stochastic(1.5, bits), bf16::from_f32(1.5));
            assert_eq!(round_bf16_stochastic(f32::INFINITY, bits), bf16::INFINITY);
            assert!(round_bf16_stochastic(f32::NAN, bits).is_nan());
        }
    }

    #[test]
    fn random_streams_differ_by_seed_step_and_parameter() {
        let streams = [
            random_stream(0, 1, "fc1.weight"),
            random_stream(1, 1, "fc1.weight"),
            random_stream(1 << 32, 1, "fc1.weight"),
            random_stream(0, 2, "fc1.weight"),
            random_stream(0, 1, "fc2.weight"),
        ];
        for (i, a) in streams.iter().enumerate() {
            for b in &streams[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
