use kiln::{DType, Device, Tensor};

use crate::harness::V;

// ----- operand validity ----------------------------------------------------

/// A float tensor is fine on the CPU in every dtype; on CUDA f32 is, while
/// the 16-bit dtypes have kernels for some ops only (and f64 is never there).
pub(crate) fn float_v(t: &Tensor) -> V {
    match (t.dtype(), t.device()) {
        (DType::U32, _) => V::Invalid,
        (DType::F32, _) | (_, Device::Cpu) => V::Valid,
        _ => V::Maybe,
    }
}

pub(crate) fn device_v(ts: &[&Tensor]) -> V {
    V::from(ts.iter().all(|t| t.device() == ts[0].device()))
}

/// One device and one float dtype; a 16-bit dtype beside another float one
/// is promoted or widened by some ops and refused by others.
pub(crate) fn operands_v(ts: &[&Tensor]) -> V {
    let dtypes_v = if ts.iter().all(|t| t.dtype() == ts[0].dtype()) {
        ts.iter().map(|t| float_v(t)).fold(V::Valid, V::and)
    } else if ts.iter().any(|t| t.dtype() == DType::U32) {
        V::Invalid
    } else if ts.iter().any(|t| t.dtype().is_half()) {
        V::Maybe
    } else {
        V::Invalid
    };
    device_v(ts).and(dtypes_v)
}

/// `operands_v` inside an autocast scope, where f32 operands are cast to
/// 16 bits and f64 ones are not, so mixed float dtypes may meet promotion:
/// only a device mismatch or a u32 operand is certainly refused.
pub(crate) fn cast_operands_v(ts: &[&Tensor], autocast: Option<DType>) -> V {
    if autocast.is_none() {
        return operands_v(ts);
    }
    let u32_v = V::from(ts.iter().all(|t| t.dtype() != DType::U32));
    device_v(ts).and(u32_v).and(V::Maybe)
}

// ----- shape oracles (written independently of kiln's) ---------------------

pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |d: &[usize], i: usize| {
        let pad = rank - d.len();
        if i < pad { 1 } else { d[i - pad] }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

pub(crate) fn reduced(dims: &[usize], reduce: &[usize], keepdim: bool) -> Vec<usize> {
    dims.iter()
        .enumerate()
        .filter_map(|(d, &size)| match (reduce.contains(&d), keepdim) {
            (false, _) => Some(size),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}

/// op(a) @ op(b) with batch broadcasting.
pub(crate) fn gemm_shape(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Option<Vec<usize>> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (l0, l1) = (a[a.len() - 2], a[a.len() - 1]);
    let (r0, r1) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = if ta { (l1, l0) } else { (l0, l1) };
    let (k2, n) = if tb { (r1, r0) } else { (r0, r1) };
    if k != k2 {
        return None;
    }
    let mut out = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
    out.extend([m, n]);
    Some(out)
}

/// PyTorch's `matmul`: a 1-D operand is a vector whose dim is added for the
/// product and removed from the result.
pub(crate) fn matmul_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    match (a.len(), b.len()) {
        (1, 1) => (a[0] == b[0]).then(Vec::new),
        (1, r) if r >= 2 => {
            let mut out = gemm_shape(&[1, a[0]], b, false, false)?;
            out.remove(out.len() - 2);
            Some(out)
        }
        (l, 1) if l >= 2 => {
            let mut out = gemm_shape(a, &[b[0], 1], false, false)?;
            out.pop();
            Some(out)
        }
        _ => gemm_shape(a, b, false, false),
    }
}

/// kiln's rule for a shape's element count: the product of its non-zero
/// dims must fit a usize.
pub(crate) fn numel_fits(dims: &[usize]) -> bool {
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some()
}
