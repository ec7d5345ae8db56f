//! Forward copies: the 16-bit copy of each parameter that an optimizer
//! writes beside its update and autocast takes instead of converting the
//! parameter. Rounded to nearest even they change nothing but the work;
//! rounded stochastically they bracket the parameter, are reproducible and
//! come back on resume; any other write to a parameter drops its copy.

use std::collections::HashMap;

use kiln::optim::{
    Adam, AdamConfig, CopyRounding, ForwardCopies, Optimizer, Sgd, SgdConfig, round_bf16_stochastic,
};
use kiln::{DType, Device, Reduction, Rng, Tensor, autocast, bf16, profile};

/// A two-layer perceptron's parameters and a batch.
struct Mlp {
    params: Vec<(String, Tensor)>,
    x: Tensor,
    y: Tensor,
}

impl Mlp {
    fn new(seed: u64) -> Mlp {
        let mut rng = Rng::seed(seed);
        let mut randn =
            |dims: &[usize]| Tensor::randn(dims, DType::F32, Device::Cpu, &mut rng).unwrap();
        let params = [
            ("w1", &[16, 8][..]),
            ("b1", &[16]),
            ("w2", &[4, 16]),
            ("b2", &[4]),
        ]
        .map(|(name, dims)| (name.to_string(), randn(dims).requires_grad_()))
        .to_vec();
        Mlp {
            params,
            x: randn(&[32, 8]),
            y: randn(&[32, 4]),
        }
    }

    fn param(&self, name: &str) -> &Tensor {
        &self.params.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// The bf16-autocast loss (mean squared error, in f32).
    fn loss(&self) -> Tensor {
        let _autocast = autocast(DType::BF16);
        let hidden = self
            .x
            .linear(self.param("w1"), Some(self.param("b1")))
            .unwrap()
            .relu()
            .unwrap();
        let out = hidden
            .linear(self.param("w2"), Some(self.param("b2")))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        out.mse_loss(&self.y, Reduction::Mean).unwrap()
    }

    fn step(&self, optimizer: &mut dyn Optimizer) -> f64 {
        let loss = self.loss();
        optimizer.step(&loss.backward().unwrap()).unwrap();
        loss.item().unwrap()
    }
}

fn adam(mlp: &Mlp) -> Adam {
    Adam::new(mlp.params.clone(), AdamConfig::adam()).unwrap()
}

/// Adam keeping `copies` of `mlp`'s parameters.
fn adam_keeping(mlp: &Mlp, copies: ForwardCopies) -> Adam {
    let mut optimizer = adam(mlp);
    optimizer.keep_forward_copies(Some(copies)).unwrap();
    optimizer
}

/// A float tensor's values as f32 (exact for bf16 and f16).
fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec().unwrap()
}

/// The values rounded to bf16 (to nearest even), as f32.
fn nearest_bf16(t: &Tensor) -> Vec<f32> {
    values(&t.to_dtype(DType::BF16).unwrap())
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_f64_vec().into_iter().map(f64::to_bits).collect()
}

#[test]
fn nearest_even_copies_train_bit_identically_and_the_forward_takes_them() {
    let (with, without) = (Mlp::new(1), Mlp::new(1));
    let mut keeping = adam_keeping(&with, ForwardCopies::nearest_even(DType::BF16));
    let mut converting = adam(&without);
    for step in 0..6 {
        assert_eq!(
            with.step(&mut keeping).to_bits(),
            without.step(&mut converting).to_bits(),
            "loss of step {step}"
        );
        for ((name, p), (_, q)) in with.params.iter().zip(&without.params) {
            assert_eq!(bits(p), bits(q), "{name} after step {step}");
            let copy = p.forward_copy().expect("a copy after each update");
            assert_eq!(copy.dtype(), DType::BF16);
            assert_eq!(
                bits(&copy),
                bits(&p.to_dtype(DType::BF16).unwrap()),
                "{name}"
            );
            assert!(q.forward_copy().is_none(), "{name}: no copies asked for");
        }
    }
    // The forward converts only x: every parameter arrives as its copy.
    let _profiling = profile::profiling();
    let count_casts = |mlp: &Mlp| {
        profile::take();
        drop(mlp.loss());
        let times = profile::take();
        times
            .iter()
            .find(|t| t.name == "to_dtype")
            .map_or(0, |t| t.calls)
    };
    // x to bf16 and the output back to f32; without copies also w1, b1, w2, b2.
    assert_eq!(count_casts(&with), 2);
    assert_eq!(count_casts(&without), 6);
}

/// The values of a 2-D parameter's copy as the forward sees them: the
/// identity times Wᵀ under autocast is Wᵀ's bf16 values, exactly.
fn copy_seen_by_the_forward(w: &Tensor) -> Vec<f32> {
    let (rows, cols) = (w.dims()[0], w.dims()[1]);
    let mut identity = vec![0f32; cols * cols];
    for i in 0..cols {
        identity[i * cols + i] = 1.0;
    }
    let identity = Tensor::from_vec(identity, [cols, cols]).unwrap();
    let _autocast = autocast(DType::BF16);
    let seen = identity.linear(w, None).unwrap().transpose(0, 1).unwrap();
    assert_eq!(seen.dims(), &[rows, cols]);
    values(&seen)
}

#[test]
fn stochastic_copies_bracket_the_parameters_are_reproducible_and_come_back_on_resume() {
    let train = |seed: u64, steps: usize| {
        let mlp = Mlp::new(2);
        let mut optimizer = adam_keeping(&mlp, ForwardCopies::stochastic_bf16(seed));
        for _ in 0..steps {
            mlp.step(&mut optimizer);
        }
        (mlp, optimizer)
    };
    let (mlp, optimizer) = train(5, 3);
    let w = mlp.param("w1");
    let copy = values(&w.forward_copy().unwrap());
    assert_eq!(
        copy_seen_by_the_forward(w),
        copy,
        "the forward takes the copy"
    );
    let values = w.to_vec::<f32>().unwrap();
    let (mut up, mut down) = (0, 0);
    for (&v, &c) in values.iter().zip(&copy) {
        // Each copy value is v with its dropped bits cleared, or the next
        // bf16 away from zero: what adding no carry or a full carry gives.
        let toward_zero = round_bf16_stochastic(v, 0).to_f32();
        let away = round_bf16_stochastic(v, 0xFFFF).to_f32();
        assert!(c == toward_zero || c == away, "{c} does not bracket {v}");
        if c != toward_zero {
            up += 1;
        } else if toward_zero != away {
            down += 1;
        }
    }
    assert!(
        up > 20 && down > 20,
        "rounded away {up} times, toward zero {down} times"
    );
    assert_ne!(
        copy,
        nearest_bf16(w),
        "stochastic copies differ from rounding to nearest"
    );

    // The same seed gives the same copies; another seed other ones.
    let (again, _) = train(5, 3);
    let (other, _) = train(6, 3);
    let copy_bits = |m: &Mlp| bits(&m.param("w1").forward_copy().unwrap());
    assert_eq!(copy_bits(&mlp), copy_bits(&again));
    assert_ne!(copy_bits(&mlp), copy_bits(&other));

    // Resume: the parameters and optimizer state loaded into a fresh model
    // and optimizer recreate the copies of the last update, bit for bit.
    let resumed = Mlp::new(3);
    for ((_, to), (_, from)) in resumed.params.iter().zip(&mlp.params) {
        to.assign(from).unwrap();
    }
    let mut resumed_optimizer = adam_keeping(&resumed, ForwardCopies::stochastic_bf16(5));
    let state: HashMap<String, Tensor> = optimizer.state_dict().into_iter().collect();
    resumed_optimizer.load_state_dict(&state).unwrap();
    for ((name, p), (_, q)) in resumed.params.iter().zip(&mlp.params) {
        assert_eq!(
            bits(&p.forward_copy().unwrap()),
            bits(&q.forward_copy().unwrap()),
            "{name}"
        );
    }
}

#[test]
fn any_other_write_to_a_parameter_drops_its_copy() {
    let mlp = Mlp::new(4);
    let mut optimizer = adam_keeping(&mlp, ForwardCopies::stochastic_bf16(1));
    mlp.step(&mut optimizer);
    let w = mlp.param("w2");
    assert!(w.forward_copy().is_some());
    let new_values = w.mul_scalar(0.5).unwrap();
    // Through a detached handle: it shares the values, so it shares the copy.
    w.detach().assign(&new_values).unwrap();
    assert!(w.forward_copy().is_none(), "assign left a stale copy");
    let nearest = nearest_bf16(&new_values);
    assert_eq!(
        copy_seen_by_the_forward(w),
        nearest,
        "the forward converts again"
    );
}

/// A graph that saved last step's copy keeps those values: the next update
/// writes a new buffer instead of the one the graph holds.
#[test]
fn a_copy_saved_by_a_live_graph_is_not_overwritten() {
    let mlp = Mlp::new(5);
    let mut optimizer = adam_keeping(&mlp, ForwardCopies::nearest_even(DType::BF16));
    mlp.step(&mut optimizer);
    let w = mlp.param("w1");
    let before = copy_seen_by_the_forward(w);
    // dL/dx of sum(x · Wᵀ) is the column sums of the saved bf16 Wᵀ.
    let x = Tensor::ones([1, 8], DType::F32, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let held = {
        let _autocast = autocast(DType::BF16);
        x.linear(w, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    mlp.step(&mut optimizer);
    mlp.step(&mut optimizer);
    assert_ne!(copy_seen_by_the_forward(w), before, "the parameter moved");
    let dx = held
        .backward()
        .unwrap()
        .get(&x)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    for (j, &got) in dx.iter().enumerate() {
        let column: f32 = (0..16).map(|i| before[i * 8 + j]).sum();
        let rounded = bf16::from_f32(column).to_f32();
        assert!(
            (got - rounded).abs() <= rounded.abs() * 1e-2,
            "dx[{j}] {got} vs {rounded}"
        );
    }
}

#[test]
fn unsupported_copies_are_refused_with_the_reason() {
    let mlp = Mlp::new(6);
    let message = |result: kiln::Result<()>| result.unwrap_err().to_string();
    let f32_copies = ForwardCopies::nearest_even(DType::F32);
    assert!(message(adam(&mlp).keep_forward_copies(Some(f32_copies))).contains("bf16 or f16"));
    let stochastic_f16 = ForwardCopies {
        dtype: DType::F16,
        rounding: CopyRounding::Stochastic { seed: 1 },
    };
    assert!(message(adam(&mlp).keep_forward_copies(Some(stochastic_f16))).contains("for bf16"));
    let mut sgd = Sgd::new(mlp.params.clone(), SgdConfig::new(0.1)).unwrap();
    assert!(
        message(sgd.keep_forward_copies(Some(ForwardCopies::stochastic_bf16(1))))
            .contains("step count")
    );
    // Sgd with nearest-even copies trains as it does without.
    sgd.keep_forward_copies(Some(ForwardCopies::nearest_even(DType::BF16)))
        .unwrap();
    let plain = Mlp::new(6);
    let mut plain_sgd = Sgd::new(plain.params.clone(), SgdConfig::new(0.1)).unwrap();
    for _ in 0..3 {
        assert_eq!(
            mlp.step(&mut sgd).to_bits(),
            plain.step(&mut plain_sgd).to_bits()
        );
    }
    assert_eq!(mlp.param("w1").forward_copy().unwrap().dtype(), DType::BF16);
}
