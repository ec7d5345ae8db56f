//! `Dropout` with reproducible masks: each training forward uses a seed
//! derived from the module's base seed and its call count, so masks differ
//! from step to step yet a rerun with the same seed draws the same ones.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::nn::{Module, TensorRole};
use crate::tensor::Tensor;

/// Zeroes each value with probability p in training and scales the rest by
/// 1/(1 − p); the identity in eval mode.
pub struct Dropout {
    p: f64,
    seed: u64,
    calls: AtomicU64,
    training: AtomicBool,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "Dropout",
                format!("probability must lie in [0, 1), got {p}"),
            ));
        }
        Ok(Dropout {
            p,
            seed,
            calls: AtomicU64::new(0),
            training: AtomicBool::new(true),
        })
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
}

/// SplitMix64's finaliser: spreads (base seed, call number) over 64 bits so
/// that consecutive calls get unrelated masks.
fn mix_seed(base: u64, call: u64) -> u64 {
    let mut z = base ^ call.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Module for Dropout {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_training() || self.p == 0.0 {
            return Ok(x.clone());
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        x.dropout(self.p, mix_seed(self.seed, call))
    }

    fn visit(&self, _prefix: &str, _visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {}

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
}
