//! Loss scaling: PyTorch's GradScaler defaults, a step with an Inf or NaN
//! gradient skipped with the parameters and optimizer state untouched to
//! the bit, back-off and growth of the scale, and its checkpointed state.

use std::collections::HashMap;

use kiln::optim::{Adam, AdamConfig, GradScaler, GradScalerConfig, Optimizer};
use kiln::{DType, Device, GradStore, Rng, Tensor, autocast};

/// The bits of every parameter and every optimizer state tensor.
fn bits(params: &[Tensor], optimizer: &Adam) -> Vec<Vec<u64>> {
    let state = optimizer.state_dict().into_iter().map(|(_, t)| t);
    params
        .iter()
        .cloned()
        .chain(state)
        // f64 holds every f32 and u32 (the step count) exactly.
        .map(|t| t.to_f64_vec().into_iter().map(f64::to_bits).collect())
        .collect()
}

struct Model {
    w: Tensor,
    b: Tensor,
    x: Tensor,
    y: Tensor,
}

impl Model {
    fn new() -> Model {
        let mut rng = Rng::seed(3);
        let mut randn =
            |dims: &[usize]| Tensor::randn(dims, DType::F32, Device::Cpu, &mut rng).unwrap();
        Model {
            w: randn(&[4, 6]).requires_grad_(),
            b: randn(&[4]).requires_grad_(),
            x: randn(&[8, 6]),
            y: randn(&[8, 4]),
        }
    }

    fn params(&self) -> Vec<Tensor> {
        vec![self.w.clone(), self.b.clone()]
    }

    fn named_params(&self) -> Vec<(String, Tensor)> {
        vec![("w".into(), self.w.clone()), ("b".into(), self.b.clone())]
    }

    /// Scaled gradients of an f16 forward.
    fn grads(&self, scaler: &GradScaler) -> GradStore {
        let loss = {
            let _scope = autocast(DType::F16);
            self.x
                .linear(&self.w, Some(&self.b))
                .unwrap()
                .mse_loss(&self.y, kiln::Reduction::Mean)
                .unwrap()
        };
        scaler.scale(&loss).unwrap().backward().unwrap()
    }
}

/// One scaled step: returns whether the optimizer stepped.
fn step(model: &Model, scaler: &mut GradScaler, optimizer: &mut Adam, poison: Option<f32>) -> bool {
    let mut grads = model.grads(scaler);
    if let Some(value) = poison {
        // One non-finite value in one gradient, as an overflow would leave.
        let g = grads.get(&model.w).unwrap();
        let mut values = g.to_vec::<f32>().unwrap();
        values[5] = value;
        grads.insert(&model.w, Tensor::from_vec(values, g.dims()).unwrap());
    }
    let finite = scaler.unscale(&mut grads).unwrap();
    if finite {
        optimizer.step(&grads).unwrap();
    }
    scaler.update();
    finite
}

/// A scale under which this small model's f16 gradients never overflow
/// (2¹⁶ would, as a real f16 run's first steps do).
fn small_scale() -> GradScalerConfig {
    GradScalerConfig {
        init_scale: 1024.0,
        ..Default::default()
    }
}

#[test]
fn defaults_are_pytorchs() {
    let config = GradScalerConfig::default();
    assert_eq!(config.init_scale, 65536.0);
    assert_eq!(config.growth_factor, 2.0);
    assert_eq!(config.backoff_factor, 0.5);
    assert_eq!(config.growth_interval, 2000);
    assert_eq!(GradScaler::new(config).unwrap().scale_factor(), 65536.0);
}

#[test]
fn an_injected_inf_or_nan_skips_the_step_bit_for_bit_and_halves_the_scale() {
    for poison in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let model = Model::new();
        let mut scaler = GradScaler::new(small_scale()).unwrap();
        let mut optimizer = Adam::new(model.named_params(), AdamConfig::default()).unwrap();
        for _ in 0..3 {
            assert!(step(&model, &mut scaler, &mut optimizer, None));
        }
        let before = bits(&model.params(), &optimizer);
        assert!(!step(&model, &mut scaler, &mut optimizer, Some(poison)));
        assert_eq!(bits(&model.params(), &optimizer), before, "{poison}");
        assert_eq!(scaler.scale_factor(), 512.0);
        // The next clean step moves the parameters again.
        assert!(step(&model, &mut scaler, &mut optimizer, None));
        assert_ne!(bits(&model.params(), &optimizer), before);
    }
}

#[test]
fn unscaled_gradients_are_the_unscaled_ones_and_the_scale_grows_after_the_interval() {
    let model = Model::new();
    let config = GradScalerConfig {
        growth_interval: 3,
        ..small_scale()
    };
    let mut scaler = GradScaler::new(config).unwrap();
    // Unscaling a scaled backward gives the f16 gradients of the plain loss
    // up to f16's rounding (the scale is a power of two).
    let mut grads = model.grads(&scaler);
    assert!(scaler.unscale(&mut grads).unwrap());
    let plain = model.grads(&GradScaler::disabled());
    for p in model.params() {
        let (a, b) = (
            grads.get(&p).unwrap().to_f64_vec(),
            plain.get(&p).unwrap().to_f64_vec(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 2e-3 * y.abs().max(1e-2), "{x} vs {y}");
        }
    }
    scaler.update();
    let mut optimizer = Adam::new(model.named_params(), AdamConfig::default()).unwrap();
    let mut scales = vec![scaler.scale_factor()];
    for poison in [None, None, None, Some(f32::NAN), None, None, None] {
        step(&model, &mut scaler, &mut optimizer, poison);
        scales.push(scaler.scale_factor());
    }
    // 1 clean step already counted; 2 more grow it; a skip halves it and
    // restarts the count; 3 clean steps grow it again.
    let k = 1024.0;
    assert_eq!(scales, vec![k, k, 2.0 * k, 2.0 * k, k, k, k, 2.0 * k]);
}

#[test]
fn state_round_trips_and_a_corrupt_or_missing_state_is_an_error() {
    let model = Model::new();
    let mut scaler = GradScaler::new(small_scale()).unwrap();
    let mut optimizer = Adam::new(model.named_params(), AdamConfig::default()).unwrap();
    step(&model, &mut scaler, &mut optimizer, Some(f32::INFINITY));
    step(&model, &mut scaler, &mut optimizer, None);
    let saved: HashMap<String, Tensor> = scaler.state_dict().into_iter().collect();
    let mut restored = GradScaler::new(GradScalerConfig::default()).unwrap();
    restored.load_state_dict(&saved).unwrap();
    assert_eq!(restored.scale_factor(), 512.0);
    assert_eq!(restored.state_dict().len(), 2);
    for (a, b) in restored.state_dict().iter().zip(scaler.state_dict()) {
        assert_eq!(a.1.to_f64_vec(), b.1.to_f64_vec(), "{}", a.0);
    }

    let err = restored
        .load_state_dict(&HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scale") && err.contains("loss scaling"),
        "{err}"
    );
    let mut corrupt = saved.clone();
    corrupt.insert(
        "scale".into(),
        Tensor::from_vec(vec![-1.0f64], [1]).unwrap(),
    );
    let err = restored.load_state_dict(&corrupt).unwrap_err().to_string();
    assert!(err.contains("corrupt"), "{err}");
    corrupt.insert("scale".into(), Tensor::from_vec(vec![1.0f32], [1]).unwrap());
    let err = restored.load_state_dict(&corrupt).unwrap_err().to_string();
    assert!(err.contains("one f64"), "{err}");
    // A failed load changed nothing.
    assert_eq!(restored.scale_factor(), 512.0);

    let bad = GradScalerConfig {
        backoff_factor: 1.5,
        ..Default::default()
    };
    let err = GradScaler::new(bad).unwrap_err().to_string();
    assert!(err.contains("backoff_factor"), "{err}");
}
