//! Where a tensor's numbers live. Storage is always contiguous and row-major;
//! views with strides do not exist in kiln (permute, narrow... are copies), so
//! every op is one kernel with a clear cost.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

pub use half::{bf16, f16};

use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::half_float;
use crate::tensor::{DType, Device};

/// The numbers of a tensor, on some device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device().ordinal()),
        }
    }

    /// A copy on the same device.
    pub fn try_clone(&self) -> crate::Result<Storage> {
        Ok(match self {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone()?),
        })
    }

    /// The values on the host (a copy from the device for CUDA storage).
    pub fn to_cpu(&self) -> crate::Result<CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s.clone()),
            Storage::Cuda(s) => s.to_cpu(),
        }
    }
}

/// Host memory, one variant per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// IEEE half precision: storage only (arithmetic widens to f32).
    F16(Vec<f16>),
    /// bfloat16: storage only (arithmetic widens to f32).
    BF16(Vec<bf16>),
    /// Indices (token ids, class targets, argmax positions).
    U32(Vec<u32>),
}

/// An empty vector with room for `len` values, or an error naming `op` when
/// the host cannot reserve that much: a shape far beyond the machine's memory
/// is refused instead of aborting the process.
pub(crate) fn host_vec<T>(op: &'static str, len: usize) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values.try_reserve_exact(len).map_err(|_| {
        let bytes = (len as u128) * std::mem::size_of::<T>() as u128;
        Error::invalid(
            op,
            format!(
                "cannot allocate {len} values ({bytes} bytes) in host memory; choose a smaller shape"
            ),
        )
    })?;
    Ok(values)
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    pub fn len(&self) -> usize {
        crate::any_slice!(self, |v| v.len())
    }

    /// The values as little-endian bytes, as they lie in memory (every
    /// target kiln builds for is little-endian).
    pub fn as_bytes(&self) -> &[u8] {
        crate::any_slice!(self, |v| bytemuck::cast_slice(v))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as f64 (exact for all supported dtypes).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            CpuStorage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::F64(v) => v.clone(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            CpuStorage::U32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// Builds storage of `dtype` from f64 values (rounding to nearest even
    /// for the float types, truncating for u32).
    /// `len` copies of `value` in `dtype` (converted as [`Self::from_f64_vec`]
    /// converts), or an error naming `op` when the host cannot hold them.
    pub(crate) fn try_filled(
        op: &'static str,
        value: f64,
        len: usize,
        dtype: DType,
    ) -> Result<Self> {
        fn filled<T: Clone>(op: &'static str, value: T, len: usize) -> Result<Vec<T>> {
            let mut values = host_vec(op, len)?;
            values.resize(len, value);
            Ok(values)
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(filled(op, value as f32, len)?),
            DType::F64 => CpuStorage::F64(filled(op, value, len)?),
            DType::F16 => CpuStorage::F16(filled(op, f16::from_f64(value), len)?),
            DType::BF16 => CpuStorage::BF16(filled(op, bf16::from_f64(value), len)?),
            DType::U32 => CpuStorage::U32(filled(op, value as u32, len)?),
        })
    }

    pub fn from_f64_vec(values: Vec<f64>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(values.into_iter().map(|x| x as f32).collect()),
            DType::F64 => CpuStorage::F64(values),
            DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f64).collect()),
            DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f64).collect()),
            DType::U32 => CpuStorage::U32(values.into_iter().map(|x| x as u32).collect()),
        }
    }

    /// The values converted to `dtype`, rounding to nearest even and keeping
    /// NaN and ±∞ (as `half` does). f32 ↔ 16-bit goes through the
    /// vectorised loops of [`crate::half_float`]; everything else through
    /// f64, which holds every f32, 16-bit and u32 value exactly.
    pub fn converted(&self, dtype: DType) -> Self {
        match (self, dtype) {
            (_, dtype) if dtype == self.dtype() => self.clone(),
            (CpuStorage::F32(v), DType::F16) => CpuStorage::F16(half_float::narrow(v)),
            (CpuStorage::F32(v), DType::BF16) => CpuStorage::BF16(half_float::narrow(v)),
            (CpuStorage::F16(v), DType::F32) => CpuStorage::F32(half_float::widen(v)),
            (CpuStorage::BF16(v), DType::F32) => CpuStorage::F32(half_float::widen(v)),
            (other, dtype) => CpuStorage::from_f64_vec(other.to_f64_vec(), dtype),
        }
    }
}

impl CpuStorage {
    /// The values as `dtype`, reusing the buffer when it already is.
    pub fn into_dtype(self, dtype: DType) -> Self {
        if self.dtype() == dtype {
            self
        } else {
            self.converted(dtype)
        }
    }

    /// A 16-bit storage mapped by an elementwise f32 kernel a chunk at a
    /// time (see [`half_float::map_chunks`]); `None` for other dtypes.
    pub fn map_half_chunks(
        &self,
        kernel: impl Fn(&[f32]) -> Vec<f32> + Sync,
    ) -> Option<CpuStorage> {
        match self {
            CpuStorage::F16(v) => Some(CpuStorage::F16(half_float::map_chunks(v, kernel))),
            CpuStorage::BF16(v) => Some(CpuStorage::BF16(half_float::map_chunks(v, kernel))),
            _ => None,
        }
    }

    /// Two 16-bit storages of one dtype and length zipped by an elementwise
    /// f32 kernel a chunk at a time; `None` for any other pair.
    pub fn zip_half_chunks(
        &self,
        other: &CpuStorage,
        kernel: impl Fn(&[f32], &[f32]) -> Vec<f32> + Sync,
    ) -> Option<CpuStorage> {
        match (self, other) {
            (CpuStorage::F16(a), CpuStorage::F16(b)) if a.len() == b.len() => {
                Some(CpuStorage::F16(half_float::zip_chunks(a, b, kernel)))
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) if a.len() == b.len() => {
                Some(CpuStorage::BF16(half_float::zip_chunks(a, b, kernel)))
            }
            _ => None,
        }
    }

    /// A 16-bit storage widened to f32 for computing; any other as it is.
    pub fn widened(&self) -> std::borrow::Cow<'_, CpuStorage> {
        if self.dtype().is_half() {
            std::borrow::Cow::Owned(self.converted(DType::F32))
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }
}

/// The float types the CPU reference computes in: `f32` (the working dtype)
/// and `f64` (so that gradcheck's finite differences mean something).
pub trait Float:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Element
{
    const ZERO: Self;
    const ONE: Self;
    /// The smallest positive normal number (below it lie the subnormals).
    const MIN_POSITIVE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Rounded to f32 (exact for f32 itself).
    fn to_f32(self) -> f32;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn powf(self, p: Self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn ln_1p(self) -> Self;
    /// ln(1 + eˣ) for x ≤ 0 (softplus on its stable side; BCE with logits
    /// uses it as ln(1 + e^−|x|)).
    fn ln_1p_exp_nonpositive(self) -> Self;
    /// eˣ for x ≤ 0 (softmax's logits less their maximum), in f32 through
    /// a polynomial that vectorises instead of a libm call.
    fn exp_nonpositive(self) -> Self;
    fn is_nan(self) -> bool;
    fn erf(self) -> Self {
        Self::from_f64(erf_f64(self.to_f64()))
    }
}

/// Any type a CPU storage can hold; shape ops are generic over it.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// Wraps a vector of this type as storage.
    fn wrap(values: Vec<Self>) -> CpuStorage;
    /// The slice inside `storage`, if it has this dtype.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! impl_element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap(values: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(values)
            }
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }

        impl From<Vec<$t>> for CpuStorage {
            fn from(v: Vec<$t>) -> Self {
                CpuStorage::$variant(v)
            }
        }
    };
}

impl_element!(f32, F32);
impl_element!(f64, F64);
impl_element!(f16, F16);
impl_element!(bf16, BF16);
impl_element!(u32, U32);

/// A float type a tensor stores, as the CPU kernels compute with it: f32
/// and f64 compute as themselves; bf16 and f16 are widened to f32 where a
/// kernel reads them (while it packs a GEMM panel or an im2col row, say) and
/// rounded to nearest even where it writes them, so a 16-bit operand never
/// needs a whole f32 copy.
pub trait Stored: Element {
    /// The type arithmetic on these values is done in.
    type Computed: Float;
    fn widen(self) -> Self::Computed;
    fn narrow(value: Self::Computed) -> Self;
    /// The values themselves when they are already `Computed` (no copy).
    fn as_computed(values: &[Self]) -> Option<&[Self::Computed]>;
    fn as_computed_mut(values: &mut [Self]) -> Option<&mut [Self::Computed]>;

    /// dst[i] = src[i] widened.
    #[inline]
    fn widen_slice(src: &[Self], dst: &mut [Self::Computed]) {
        assert_eq!(src.len(), dst.len(), "widen_slice: lengths");
        match Self::as_computed(src) {
            Some(src) => dst.copy_from_slice(src),
            None => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.widen()),
        }
    }

    /// dst[i] = src[i] rounded to this type.
    #[inline]
    fn narrow_slice(src: &[Self::Computed], dst: &mut [Self]) {
        assert_eq!(src.len(), dst.len(), "narrow_slice: lengths");
        match Self::as_computed_mut(dst) {
            Some(dst) => dst.copy_from_slice(src),
            None => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = Self::narrow(s)),
        }
    }

    /// A whole slice as `Computed`: borrowed when it already is.
    fn computed(values: &[Self]) -> std::borrow::Cow<'_, [Self::Computed]> {
        match Self::as_computed(values) {
            Some(values) => std::borrow::Cow::Borrowed(values),
            None => std::borrow::Cow::Owned(values.iter().map(|v| v.widen()).collect()),
        }
    }

    /// A vector of computed values as this type (moved when it already is).
    fn from_computed(values: Vec<Self::Computed>) -> Vec<Self>;
}

macro_rules! impl_stored_as_itself {
    ($t:ty) => {
        impl Stored for $t {
            type Computed = $t;
            #[inline(always)]
            fn widen(self) -> $t {
                self
            }
            #[inline(always)]
            fn narrow(value: $t) -> $t {
                value
            }
            fn as_computed(values: &[$t]) -> Option<&[$t]> {
                Some(values)
            }
            fn as_computed_mut(values: &mut [$t]) -> Option<&mut [$t]> {
                Some(values)
            }
            fn from_computed(values: Vec<$t>) -> Vec<$t> {
                values
            }
        }
    };
}

impl_stored_as_itself!(f32);
impl_stored_as_itself!(f64);

macro_rules! impl_stored_as_f32 {
    ($t:ty, $widen:path, $narrow:path) => {
        impl Stored for $t {
            type Computed = f32;
            #[inline(always)]
            fn widen(self) -> f32 {
                $widen(self)
            }
            #[inline(always)]
            fn narrow(value: f32) -> $t {
                $narrow(value)
            }
            fn as_computed(_: &[$t]) -> Option<&[f32]> {
                None
            }
            fn as_computed_mut(_: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
            fn from_computed(values: Vec<f32>) -> Vec<$t> {
                half_float::narrow(&values)
            }
            fn computed(values: &[$t]) -> std::borrow::Cow<'_, [f32]> {
                std::borrow::Cow::Owned(half_float::widen(values))
            }
        }
    };
}

impl_stored_as_f32!(
    bf16,
    half_float::widen_bf16_value,
    half_float::narrow_bf16_value
);
impl_stored_as_f32!(f16, f16::to_f32, f16::from_f32);

macro_rules! impl_float {
    ($t:ty, $variant:ident, $tanh:path, $softplus:path, $exp_nonpositive:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const MIN_POSITIVE: Self = <$t>::MIN_POSITIVE;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                $tanh(self)
            }
            fn powf(self, p: Self) -> Self {
                <$t>::powf(self, p)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn min(self, other: Self) -> Self {
                <$t>::min(self, other)
            }
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            fn ln_1p_exp_nonpositive(self) -> Self {
                $softplus(self)
            }
            fn exp_nonpositive(self) -> Self {
                $exp_nonpositive(self)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

impl_float!(
    f32,
    F32,
    tanh_f32,
    ln_1p_exp_nonpositive_f32,
    exp_nonpositive_f32
);
impl_float!(f64, F64, f64::tanh, ln_1p_exp_nonpositive_f64, f64::exp);

fn ln_1p_exp_nonpositive_f64(x: f64) -> f64 {
    x.exp().ln_1p()
}

/// tanh in f32 with no libm call, so that loops over it (GELU's tanh form,
/// the tanh activation) vectorise: libm's `tanhf` made GELU a third of a
/// GPT training step on the CPU. tanh(x) = m / (m + 2) with m = eˣ⁽²⁾ − 1
/// = expm1(2x), which has no cancellation near 0. Within a few ulp of the
/// exact value (tested against f64 below); |x| ≥ 9 gives ±1 as f32 rounds.
#[inline]
pub fn tanh_f32(x: f32) -> f32 {
    let m = expm1_f32(2.0 * x.clamp(-9.0, 9.0));
    m / (m + 2.0)
}

/// eʸ − 1 for |y| ≤ 18, branch-free: y = k·ln2 + r with |r| ≤ ln2/2, then
/// eʸ − 1 = 2ᵏ·(eʳ − 1) + (2ᵏ − 1), which has no cancellation when k = 0.
/// ln 2 is split in two (Cody–Waite) so that k·LN2_HI is exact, and eʳ − 1
/// comes from its Taylor series to r⁹ (the next term is below f32's
/// resolution at |r| ≤ 0.35). NaN gives a NaN result.
///
/// k = round(y·log₂e) is found without a float-to-int conversion: adding
/// 1.5·2²³ rounds to an integer whose value sits in the low mantissa bits.
/// Rust's `as i32` saturates, and LLVM turns that into sixteen scalar
/// conversions per AVX-512 vector (GELU at 10 cycles an element).
#[inline]
fn expm1_f32(y: f32) -> f32 {
    let (two_k, em1_r) = exp_split_f32(y);
    two_k * em1_r + (two_k - 1.0)
}

/// eʸ = 2ᵏ·(eʳ − 1) + 2ᵏ, the same reduction as [`expm1_f32`], for
/// −87 ≤ y ≤ 88 (2ᵏ stays a normal f32).
#[inline]
fn exp_f32(y: f32) -> f32 {
    let (two_k, em1_r) = exp_split_f32(y);
    two_k * em1_r + two_k
}

/// (2ᵏ, eʳ − 1) with y = k·ln2 + r, |r| ≤ ln2/2 (see [`expm1_f32`]).
#[inline]
fn exp_split_f32(y: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUNDER: f32 = 12_582_912.0; // 1.5·2²³
    let shifted = y * std::f32::consts::LOG2_E + ROUNDER;
    let kf = shifted - ROUNDER;
    // The bits of `shifted` are ROUNDER's plus k (two's complement for k < 0).
    let k = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let r = (y - kf * LN2_HI) - kf * LN2_LO;
    // eʳ − 1 = r + r²/2! + … + r⁹/9!, in Horner form.
    let mut p = 1.0 / 362_880.0;
    for factorial in [40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0] {
        p = p * r + 1.0 / factorial;
    }
    (f32::from_bits(k.wrapping_add(127) << 23), p * r)
}

/// eˣ for x ≤ 0 in f32, branch-free so that softmax's loops vectorise
/// (libm's `expf` is a call per element). Below x = −87 the exact value is
/// under 2⁻¹²⁵, subnormal or zero, and the result is 0; NaN stays NaN.
#[inline]
pub fn exp_nonpositive_f32(x: f32) -> f32 {
    // A comparison, not f32::max, so that NaN propagates.
    let value = exp_f32(if x < -87.0 { -87.0 } else { x });
    if x < -87.0 { 0.0 } else { value }
}

/// ln(1 + eˣ) for x ≤ 0 in f32, branch-free so that loops over it vectorise
/// (libm's f64 exp and log1p made BCE with logits 14 ns an element, a fifth
/// of a VAE step). With u = eˣ ∈ (0, 1] and t = u/(2 + u) ∈ (0, 1/3],
/// ln(1 + u) = 2·atanh(t) = 2(t + t³/3 + t⁵/5 + …), summed to t¹⁷ (the next
/// term is below 2⁻²⁹ relative); t ≈ u/2 keeps full precision as u → 0.
/// Below x = −87, eˣ underflows f32's normals and the result, < 2⁻¹²⁵, is 0.
#[inline]
pub fn ln_1p_exp_nonpositive_f32(x: f32) -> f32 {
    // A comparison, not f32::max, so that NaN propagates.
    let u = exp_f32(if x < -87.0 { -87.0 } else { x });
    let t = u / (2.0 + u);
    let t2 = t * t;
    let mut p = 1.0 / 17.0;
    for odd in [15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
        p = p * t2 + 1.0 / odd;
    }
    let value = 2.0 * t * p;
    if x < -87.0 { 0.0 } else { value }
}

/// The error function, accurate to about 1e-15, for the exact GELU (the
/// standard library's `erf` is not stable yet).
///
/// |x| < 3: the Maclaurin series erf(x) = 2/√π Σ (-1)ⁿ x^(2n+1) / (n! (2n+1));
/// otherwise the continued fraction of erfc, which converges fast there.
pub fn erf_f64(x: f64) -> f64 {
    let two_over_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
    let a = x.abs();
    if a < 3.0 {
        let x2 = x * x;
        // term_n = (-1)^n x^(2n+1) / n!
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let contribution = term / (2 * n + 1) as f64;
            sum += contribution;
            if contribution.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        two_over_sqrt_pi * sum
    } else {
        // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + 2/(a + ...)))))
        let mut fraction = a;
        for k in (1..60).rev() {
            fraction = a + (k as f64 / 2.0) / fraction;
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / fraction;
        (1.0 - erfc).copysign(x)
    }
}

/// Runs `$body` with `$v` bound to the typed slice of a float CPU storage
/// (f32 or f64); any other dtype returns `Error::DType` from the caller.
#[macro_export]
#[doc(hidden)]
macro_rules! float_slice {
    ($op:expr, $storage:expr, |$v:ident| $body:expr) => {
        match $storage {
            $crate::storage::CpuStorage::F32($v) => $body,
            $crate::storage::CpuStorage::F64($v) => $body,
            other => return Err($crate::Error::unsupported_dtype($op, other.dtype())),
        }
    };
}

/// Like `float_slice!`, for two storages that must share one float dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float_slice2 {
    ($op:expr, $a:expr, $b:expr, |$x:ident, $y:ident| $body:expr) => {
        match ($a, $b) {
            ($crate::storage::CpuStorage::F32($x), $crate::storage::CpuStorage::F32($y)) => $body,
            ($crate::storage::CpuStorage::F64($x), $crate::storage::CpuStorage::F64($y)) => $body,
            (a, b) if a.dtype() == b.dtype() => {
                return Err($crate::Error::unsupported_dtype($op, a.dtype()))
            }
            (a, b) => return Err($crate::Error::dtype_mismatch($op, a.dtype(), b.dtype())),
        }
    };
}

/// Like `float_slice!` for ops that keep their input's dtype and also take
/// 16-bit storage: an f16/bf16 storage is widened to f32, `$body` (which
/// returns a `CpuStorage`) computes on it in f32, and the result is rounded
/// back to the input's dtype. No arithmetic is ever done in 16 bits.
#[macro_export]
#[doc(hidden)]
macro_rules! float_or_half_slice {
    ($op:expr, $storage:expr, |$v:ident| $body:expr) => {
        match $storage {
            $crate::storage::CpuStorage::F32($v) => $body,
            $crate::storage::CpuStorage::F64($v) => $body,
            half @ ($crate::storage::CpuStorage::F16(_) | $crate::storage::CpuStorage::BF16(_)) => {
                let wide = half.converted($crate::DType::F32);
                let $crate::storage::CpuStorage::F32($v) = &wide else {
                    unreachable!("converted to f32")
                };
                let out: $crate::storage::CpuStorage = $body;
                out.converted(half.dtype())
            }
            other => return Err($crate::Error::unsupported_dtype($op, other.dtype())),
        }
    };
}

/// `float_or_half_slice!` for two storages that share one dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float_or_half_slice2 {
    ($op:expr, $a:expr, $b:expr, |$x:ident, $y:ident| $body:expr) => {
        match ($a, $b) {
            (a, b) if a.dtype() == b.dtype() && a.dtype().is_half() => {
                let (wide_a, wide_b) = (
                    a.converted($crate::DType::F32),
                    b.converted($crate::DType::F32),
                );
                let ($crate::storage::CpuStorage::F32($x), $crate::storage::CpuStorage::F32($y)) =
                    (&wide_a, &wide_b)
                else {
                    unreachable!("converted to f32")
                };
                let out: $crate::storage::CpuStorage = $body;
                out.converted(a.dtype())
            }
            (a, b) => $crate::float_slice2!($op, a, b, |$x, $y| $body),
        }
    };
}

/// Runs `$body` on the slice of any float storage, f16 and bf16 included, as
/// it is stored: for kernels generic over [`Stored`], which widen 16-bit
/// values where they read them. `$body` returns a `CpuStorage`.
#[macro_export]
#[doc(hidden)]
macro_rules! stored_slice {
    ($op:expr, $storage:expr, |$v:ident| $body:expr) => {
        match $storage {
            $crate::storage::CpuStorage::F32($v) => $body,
            $crate::storage::CpuStorage::F64($v) => $body,
            $crate::storage::CpuStorage::F16($v) => $body,
            $crate::storage::CpuStorage::BF16($v) => $body,
            other => return Err($crate::Error::unsupported_dtype($op, other.dtype())),
        }
    };
}

/// [`stored_slice!`] for two storages of one float dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! stored_slice2 {
    ($op:expr, $a:expr, $b:expr, |$x:ident, $y:ident| $body:expr) => {
        match ($a, $b) {
            ($crate::storage::CpuStorage::F32($x), $crate::storage::CpuStorage::F32($y)) => $body,
            ($crate::storage::CpuStorage::F64($x), $crate::storage::CpuStorage::F64($y)) => $body,
            ($crate::storage::CpuStorage::F16($x), $crate::storage::CpuStorage::F16($y)) => $body,
            ($crate::storage::CpuStorage::BF16($x), $crate::storage::CpuStorage::BF16($y)) => $body,
            (a, b) if a.dtype() == b.dtype() => {
                return Err($crate::Error::unsupported_dtype($op, a.dtype()))
            }
            (a, b) => return Err($crate::Error::dtype_mismatch($op, a.dtype(), b.dtype())),
        }
    };
}

/// Runs `$body` for any CPU storage dtype (for dtype-agnostic copies).
#[macro_export]
#[doc(hidden)]
macro_rules! any_slice {
    ($storage:expr, |$v:ident| $body:expr) => {
        match $storage {
            $crate::storage::CpuStorage::F32($v) => $body,
            $crate::storage::CpuStorage::F64($v) => $body,
            $crate::storage::CpuStorage::F16($v) => $body,
            $crate::storage::CpuStorage::BF16($v) => $body,
            $crate::storage::CpuStorage::U32($v) => $body,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{erf_f64, exp_nonpositive_f32, ln_1p_exp_nonpositive_f32, tanh_f32};

    /// The worst error in f32 ulps of `f` against `exact` on [-100, 0] in
    /// steps of 1e-4, where every value below 1e-37 must come out below it too.
    fn worst_ulp_on_nonpositive(name: &str, f: fn(f32) -> f32, exact: fn(f64) -> f64) -> f64 {
        let mut worst = 0f64;
        for i in 0..=1_000_000 {
            let x = -(i as f32) * 1e-4;
            let (exact, got) = (exact(x as f64), f(x) as f64);
            if exact < 1e-37 {
                assert!(got.abs() < 1e-37, "{name}({x}) = {got}");
                continue;
            }
            let ulp = exact as f32;
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            worst = worst.max((got - exact).abs() / ulp);
        }
        worst
    }

    #[test]
    fn exp_f32_of_nonpositive_values_is_within_a_few_ulp_of_the_exact_value() {
        let worst = worst_ulp_on_nonpositive("exp", exp_nonpositive_f32, f64::exp);
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive_f32(0.0), 1.0);
        assert!(exp_nonpositive_f32(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn tanh_f32_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4; // [-20, 20]; dense near 0
            let exact = (x as f64).tanh();
            let ulp = (exact.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            worst = worst.max(((tanh_f32(x) as f64) - exact).abs() / ulp);
        }
        for x in [1e-30f32, -1e-20, 1e-8, 3e-4, f32::MAX, f32::MIN] {
            let exact = (x as f64).tanh();
            assert!(
                ((tanh_f32(x) as f64) - exact).abs() <= 4.0 * exact.abs() * f32::EPSILON as f64,
                "tanh({x})"
            );
        }
        assert!(worst <= 4.0, "worst error {worst} ulp");
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn softplus_f32_is_within_a_few_ulp_of_the_exact_value() {
        let softplus = |x: f64| x.exp().ln_1p();
        let worst = worst_ulp_on_nonpositive("softplus", ln_1p_exp_nonpositive_f32, softplus);
        assert!(worst <= 4.0, "worst error {worst} ulp");
        assert!(ln_1p_exp_nonpositive_f32(f32::NAN).is_nan());
        assert_eq!(ln_1p_exp_nonpositive_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn erf_matches_known_values() {
        // Reference values of erf from tables (Abramowitz & Stegun 7.1).
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ];
        for (x, want) in cases {
            assert!((erf_f64(x) - want).abs() < 1e-14, "erf({x})");
        }
    }
}
