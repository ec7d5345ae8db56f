//! The fused CPU kernels: one plain generic function per optimizer that
//! updates a parameter and its state in place, element by element, with no
//! allocation (kernels/optim.cu mirrors them).

use super::adam::AdamConfig;
use crate::storage::Float;

/// Elements per parallel task of a fused update (small enough to spread a
/// large parameter over every core, large enough to amortise scheduling).
pub(super) const UPDATE_CHUNK: usize = 1 << 14;

/// The scalars of one SGD step, as PyTorch's `torch.optim.SGD`.
#[derive(Clone, Copy, Debug)]
pub struct SgdScalars {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// One SGD step on one parameter, in place:
/// d = g + wd·p;
/// with momentum: buf = d on the first step, else buf = μ·buf + (1 − dampening)·d,
///   then d = d + μ·buf (Nesterov) or d = buf;
/// p = p − lr·d.
pub fn sgd_update<T: Float>(
    param: &mut [T],
    grad: &[T],
    momentum_buffer: Option<&mut [T]>,
    first_step: bool,
    s: &SgdScalars,
) {
    let lr = T::from_f64(s.lr);
    let weight_decay = T::from_f64(s.weight_decay);
    let momentum = T::from_f64(s.momentum);
    let one_minus_dampening = T::from_f64(1.0 - s.dampening);
    let decay = |p: T, g: T| {
        if s.weight_decay != 0.0 {
            g + weight_decay * p
        } else {
            g
        }
    };
    match momentum_buffer {
        None => {
            for (p, &g) in param.iter_mut().zip(grad) {
                let d = decay(*p, g);
                *p -= lr * d;
            }
        }
        Some(buffer) => {
            for ((p, &g), buf) in param.iter_mut().zip(grad).zip(buffer.iter_mut()) {
                let d = decay(*p, g);
                *buf = if first_step {
                    d
                } else {
                    *buf * momentum + one_minus_dampening * d
                };
                let direction = if s.nesterov {
                    d + momentum * *buf
                } else {
                    *buf
                };
                *p -= lr * direction;
            }
        }
    }
}

/// The scalars of one Adam/AdamW step for a parameter at step t (1-based).
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: p ← p·(1 − lr·wd) before the step, instead of g ← g + wd·p.
    pub decoupled_weight_decay: bool,
    /// lr / (1 − β1ᵗ)
    pub step_size: f64,
    /// √(1 − β2ᵗ)
    pub bias_correction2_sqrt: f64,
}

impl AdamScalars {
    pub(super) fn at_step(config: &AdamConfig, decoupled_weight_decay: bool, step: u32) -> Self {
        let t = step as i32;
        let bias_correction1 = 1.0 - config.betas.0.powi(t);
        let bias_correction2 = 1.0 - config.betas.1.powi(t);
        AdamScalars {
            lr: config.lr,
            beta1: config.betas.0,
            beta2: config.betas.1,
            eps: config.eps,
            weight_decay: config.weight_decay,
            decoupled_weight_decay,
            step_size: config.lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
        }
    }
}

/// One Adam step on one parameter, in place, in PyTorch's operation order:
/// (Adam) g = g + wd·p, or (AdamW) p = p·(1 − lr·wd);
/// m = lerp(m, g, 1 − β1) = β1·m + (1 − β1)·g;
/// v = β2·v + (1 − β2)·g²;
/// p = p − step_size · m / (√v / √(1 − β2ᵗ) + eps).
pub fn adam_update<T: Float>(
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    s: &AdamScalars,
) {
    let weight_decay = T::from_f64(s.weight_decay);
    let decay_factor = T::from_f64(1.0 - s.lr * s.weight_decay);
    let one_minus_beta1 = T::from_f64(1.0 - s.beta1);
    let beta2 = T::from_f64(s.beta2);
    let one_minus_beta2 = T::from_f64(1.0 - s.beta2);
    let neg_step_size = T::from_f64(-s.step_size);
    let bias_correction2_sqrt = T::from_f64(s.bias_correction2_sqrt);
    let eps = T::from_f64(s.eps);
    let half = T::from_f64(0.5);
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
    {
        let mut g = g;
        if s.weight_decay != 0.0 {
            if s.decoupled_weight_decay {
                *p *= decay_factor;
            } else {
                g += weight_decay * *p;
            }
        }
        // PyTorch's lerp, which picks the form that is exact at its nearer end.
        *m = if one_minus_beta1 < half {
            *m + one_minus_beta1 * (g - *m)
        } else {
            g - (g - *m) * (T::ONE - one_minus_beta1)
        };
        *v = *v * beta2 + one_minus_beta2 * g * g;
        let denom = v.sqrt() / bias_correction2_sqrt + eps;
        *p += neg_step_size * *m / denom;
    }
}
