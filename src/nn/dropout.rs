//! `Dropout` with reproducible masks: each training forward uses a seed
//! derived from the module's base seed, its stream and its call count in
//! that stream, so masks differ from call to call yet a rerun with the same
//! seed draws the same ones. A training loop that starts stream k before
//! step k ([`Dropout::restart_stream`]) makes the masks a function of the
//! step alone: a run resumed at step k draws what it would have drawn.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::nn::{Module, TensorRole};
use crate::tensor::Tensor;

/// Zeroes each value with probability p in training and scales the rest by
/// 1/(1 − p); the identity in eval mode.
pub struct Dropout {
    p: f64,
    seed: u64,
    /// The mask stream (0 until a loop restarts one).
    stream: AtomicU64,
    /// Training forwards since the stream started.
    calls: AtomicU64,
    training: AtomicBool,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "Dropout",
                format!("probability must lie in [0, 1], got {p}"),
            ));
        }
        Ok(Dropout {
            p,
            seed,
            stream: AtomicU64::new(0),
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

    /// Starts mask stream `stream`: the next forward draws its first mask.
    /// Stream 0 is where a new module starts.
    pub fn restart_stream(&self, stream: u64) {
        self.stream.store(stream, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
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
        // Stream 0 keeps the base seed; other streams move it by an odd
        // multiple of the stream, far from the neighbouring modules' bases.
        let stream = self.stream.load(Ordering::Relaxed);
        let base = self
            .seed
            .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        x.dropout(self.p, mix_seed(base, call))
    }

    fn visit(&self, _prefix: &str, _visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {}

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
}
