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
    /// Ascend: g ← −g before everything else (weight decay included).
    pub maximize: bool,
}

/// One SGD step on one parameter, in place:
/// g = −g (maximize);
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
        let g = if s.maximize { -g } else { g };
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
    /// Ascend: g ← −g before everything else (weight decay included).
    pub maximize: bool,
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
            maximize: config.maximize,
            step_size: config.lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
        }
    }
}

/// An Adam step's scalars in the parameter's float type, and the two
/// halves of the update of one element, shared by [`adam_update`] and
/// [`adam_amsgrad_update`] (which differ only in the second moment that
/// divides the step).
struct AdamElementStep<T> {
    s: AdamScalars,
    weight_decay: T,
    decay_factor: T,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    neg_step_size: T,
    bias_correction2_sqrt: T,
    eps: T,
    half: T,
}

impl<T: Float> AdamElementStep<T> {
    fn new(s: &AdamScalars) -> Self {
        AdamElementStep {
            s: *s,
            weight_decay: T::from_f64(s.weight_decay),
            decay_factor: T::from_f64(1.0 - s.lr * s.weight_decay),
            one_minus_beta1: T::from_f64(1.0 - s.beta1),
            beta2: T::from_f64(s.beta2),
            one_minus_beta2: T::from_f64(1.0 - s.beta2),
            neg_step_size: T::from_f64(-s.step_size),
            bias_correction2_sqrt: T::from_f64(s.bias_correction2_sqrt),
            eps: T::from_f64(s.eps),
            half: T::from_f64(0.5),
        }
    }

    /// Negates g (maximize), applies weight decay (to g, or to p for
    /// AdamW) and returns the new moments (m, v), not yet stored.
    #[inline(always)]
    fn moments(&self, p: &mut T, g: T, m: T, v: T) -> (T, T) {
        let mut g = if self.s.maximize { -g } else { g };
        if self.s.weight_decay != 0.0 {
            if self.s.decoupled_weight_decay {
                *p *= self.decay_factor;
            } else {
                g += self.weight_decay * *p;
            }
        }
        // PyTorch's lerp, which picks the form that is exact at its nearer end.
        let m_new = if self.one_minus_beta1 < self.half {
            m + self.one_minus_beta1 * (g - m)
        } else {
            g - (g - m) * (T::ONE - self.one_minus_beta1)
        };
        let v_new = v * self.beta2 + self.one_minus_beta2 * g * g;
        (m_new, v_new)
    }

    /// p = p − step_size · m / (√second / √(1 − β2ᵗ) + eps).
    #[inline(always)]
    fn descend(&self, p: &mut T, m: T, second_moment: T) {
        let denom = second_moment.sqrt() / self.bias_correction2_sqrt + self.eps;
        *p += self.neg_step_size * m / denom;
    }
}

/// One Adam step on one parameter, in place, in PyTorch's operation order:
/// g = −g (maximize);
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
    let step = AdamElementStep::<T>::new(s);
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
    {
        let (m_new, v_new) = step.moments(p, g, *m, *v);
        step.descend(p, m_new, v_new);
        *m = flush_subnormal(m_new);
        *v = flush_subnormal(v_new);
    }
}

/// One AMSGrad step (`amsgrad=True`) on one parameter, in place: as
/// [`adam_update`], then
/// v_max = max(v_max, v) (NaN propagating, as `torch.maximum`);
/// p = p − step_size · m / (√v_max / √(1 − β2ᵗ) + eps).
pub fn adam_amsgrad_update<T: Float>(
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    max_exp_avg_sq: &mut [T],
    s: &AdamScalars,
) {
    let step = AdamElementStep::<T>::new(s);
    for ((((p, &g), m), v), v_max) in param
        .iter_mut()
        .zip(grad)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
        .zip(max_exp_avg_sq.iter_mut())
    {
        let (m_new, v_new) = step.moments(p, g, *m, *v);
        #[allow(clippy::eq_op)] // v ≠ v: v is NaN
        let v_max_new = if v_new > *v_max || v_new != v_new {
            v_new
        } else {
            *v_max
        };
        step.descend(p, m_new, v_max_new);
        *m = flush_subnormal(m_new);
        *v = flush_subnormal(v_new);
        *v_max = flush_subnormal(v_max_new);
    }
}

/// GradScaler's unscale of one gradient: out = grad · inv_scale, and
/// whether every result is finite (0·x is ±0 for a finite x and NaN for Inf
/// or NaN, which equals nothing), in one pass that vectorises.
pub fn unscale_and_check_finite<T: Float>(grad: &[T], inv_scale: T) -> (Vec<T>, bool) {
    let mut finite = true;
    let out = grad
        .iter()
        .map(|&g| {
            let v = g * inv_scale;
            finite &= v * T::ZERO == T::ZERO;
            v
        })
        .collect();
    (out, finite)
}

/// x, or 0 if x is subnormal. Adam's moments of a weight whose gradient
/// is (nearly) always zero decay geometrically into the subnormal range,
/// where x86 arithmetic takes a microcode assist: after 10 epochs of the
/// VAE, half of fc1's first moments were subnormal and its Adam step was
/// several times slower. PyTorch keeps them. Flushing them after the update
/// leaves the parameters as PyTorch's: a moment below 2⁻¹²⁶ moves a
/// parameter by under 2⁻¹²⁶·lr/eps, less than half an ulp of any parameter
/// above about 1e-26 in size, and in v (or AMSGrad's max of v) it is far
/// below eps² in the denominator.
/// (kernels/optim.cu keeps them: a GPU computes with subnormals at full speed.)
#[inline(always)]
fn flush_subnormal<T: Float>(x: T) -> T {
    if x.abs() < T::MIN_POSITIVE {
        T::ZERO
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars() -> AdamScalars {
        AdamScalars {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
            step_size: 1e-3 / (1.0 - 0.9f64.powi(50)),
            bias_correction2_sqrt: (1.0 - 0.999f64.powi(50)).sqrt(),
        }
    }

    #[test]
    fn adam_moments_that_would_be_subnormal_are_stored_as_zero_and_the_update_is_unchanged() {
        // First moments just above f32's smallest normal decay below it under
        // a zero gradient; a normal moment and the parameters are as before.
        let tiny = f32::MIN_POSITIVE * 1.05;
        let mut param = vec![0.5f32, -0.25, 1.0];
        let grad = vec![0.0f32, 0.0, 0.1];
        let mut exp_avg = vec![tiny, -tiny, 0.02];
        let mut exp_avg_sq = vec![f32::MIN_POSITIVE * 1.0005, 0.0, 1e-4];
        // The same update with nothing flushed, spelled out.
        let s = scalars();
        let expected: Vec<f32> = (0..3)
            .map(|i| {
                let m = exp_avg[i] + 0.1 * (grad[i] - exp_avg[i]);
                let v = exp_avg_sq[i] * 0.999 + 0.001 * grad[i] * grad[i];
                let denom = v.sqrt() / s.bias_correction2_sqrt as f32 + 1e-8;
                param[i] + -(s.step_size as f32) * m / denom
            })
            .collect();
        adam_update(&mut param, &grad, &mut exp_avg, &mut exp_avg_sq, &s);
        assert_eq!(param, expected);
        assert_eq!(&exp_avg[..2], &[0.0, 0.0], "decayed first moments flushed");
        assert_eq!(exp_avg_sq[0], 0.0, "decayed second moment flushed");
        assert!(exp_avg[2].is_normal() && exp_avg_sq[2].is_normal());
    }

    #[test]
    fn amsgrad_max_propagates_nan_as_torch_maximum() {
        // A NaN second moment replaces the max (and stays), where a plain
        // max would keep the old value; a smaller finite one does not.
        let s = AdamScalars {
            maximize: true,
            ..scalars()
        };
        let mut param = vec![0.5f32, -0.5];
        let (mut m, mut v, mut v_max) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![1.0f32, 1.0]);
        adam_amsgrad_update(&mut param, &[f32::NAN, 0.5], &mut m, &mut v, &mut v_max, &s);
        assert!(v_max[0].is_nan() && param[0].is_nan());
        assert_eq!(v_max[1], 1.0, "the larger old max stays");
        // maximize: a positive gradient moves the parameter up.
        assert!(param[1] > -0.5);
    }
}
