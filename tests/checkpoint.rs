//! Checkpoints: round trips, clear errors for bad files and mismatched
//! models (which are then left unchanged), atomic saves, and optimizer state
//! that resumes a run bit-identically.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use kiln::checkpoint::{self, LoadOptions, load, load_module, load_module_with, save, save_module};
use kiln::nn::{BatchNorm2d, Conv2d, Flatten, Init, LeakyRelu, Linear, Module, Sequential};
use kiln::ops::conv::Conv2dParams;
use kiln::optim::{Adam, AdamConfig, Optimizer};
use kiln::{DType, Device, Error, Reduction, Rng, Tensor};

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("kiln-checkpoint-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// conv → BN → leaky ReLU → flatten → linear, on [N, 1, 4, 4] inputs.
fn model(seed: u64, dtype: DType) -> Sequential {
    let mut rng = Rng::seed(seed);
    let mut init = Init::new(&mut rng, Device::Cpu, dtype);
    let same = Conv2dParams {
        padding: [1, 1].into(),
        ..Conv2dParams::default()
    };
    Sequential::new()
        .with(Conv2d::new(1, 3, [3, 3], same, true, &mut init).unwrap())
        .with(BatchNorm2d::new(3, &mut init).unwrap())
        .with(LeakyRelu(0.2))
        .with(Flatten)
        .with(Linear::new(48, 2, true, &mut init).unwrap())
}

fn input(seed: u64, dtype: DType) -> Tensor {
    Tensor::randn([5, 1, 4, 4], dtype, Device::Cpu, &mut Rng::seed(seed)).unwrap()
}

fn values(module: &dyn Module) -> Vec<(String, Vec<f64>)> {
    module
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.to_f64_vec()))
        .collect()
}

fn checkpoint_message(err: Error) -> String {
    match err {
        Error::Checkpoint { msg, .. } => msg,
        other => panic!("expected a checkpoint error, got {other}"),
    }
}

#[test]
fn saved_model_loads_into_a_fresh_one_with_identical_outputs() {
    for dtype in [DType::F32, DType::F64] {
        let dir = TempDir::new(&format!("round-trip-{dtype}"));
        let path = dir.path("model.safetensors");
        let trained = model(1, dtype);
        trained.forward(&input(9, dtype)).unwrap(); // moves the running statistics
        trained.eval();
        let metadata = BTreeMap::from([("step".to_string(), "17".to_string())]);
        save_module(&path, &trained, &metadata).unwrap();

        let restored = model(2, dtype);
        assert_ne!(values(&restored), values(&trained));
        let loaded_metadata = load_module(&path, &restored).unwrap();
        assert_eq!(loaded_metadata, metadata);
        assert_eq!(values(&restored), values(&trained));
        restored.eval();
        let x = input(3, dtype);
        assert_eq!(
            restored.forward(&x).unwrap().to_f64_vec(),
            trained.forward(&x).unwrap().to_f64_vec()
        );
        // Dtypes survive the file: floats as saved, the BN counter as u32.
        let file = load(&path).unwrap();
        assert_eq!(file.tensors["0.weight"].dtype(), dtype);
        assert_eq!(file.tensors["1.num_batches_tracked"].dtype(), DType::U32);
        assert_eq!(file.tensors["1.num_batches_tracked"].item().unwrap(), 1.0);
    }
}

#[test]
fn missing_file_error_names_the_path_and_says_what_to_do() {
    let dir = TempDir::new("missing");
    let path = dir.path("nowhere.safetensors");
    let err = load(&path).err().expect("no such file");
    let text = err.to_string();
    assert!(
        text.contains("nowhere.safetensors") && text.contains("not found"),
        "{text}"
    );
}

#[test]
fn truncated_file_is_reported_as_truncated_or_corrupt() {
    let dir = TempDir::new("truncated");
    let path = dir.path("model.safetensors");
    save_module(&path, &model(1, DType::F32), &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 10, 3] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let msg = checkpoint_message(load(&path).err().expect("truncated file"));
        assert!(msg.contains("truncated or corrupt"), "{keep} bytes: {msg}");
    }
}

#[test]
fn garbage_bytes_are_reported_as_corrupt() {
    let dir = TempDir::new("garbage");
    let path = dir.path("model.safetensors");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, garbage).unwrap();
    let msg = checkpoint_message(load(&path).err().expect("garbage"));
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn int64_values_that_do_not_fit_u32_and_unsupported_dtypes_are_named() {
    let dir = TempDir::new("dtypes");
    let write = |name: &str, dtype: safetensors::Dtype, bytes: Vec<u8>, shape: Vec<usize>| {
        let path = dir.path(name);
        let view = safetensors::tensor::TensorView::new(dtype, shape, &bytes).unwrap();
        std::fs::write(
            &path,
            safetensors::serialize([("ids", view)], None).unwrap(),
        )
        .unwrap();
        path
    };
    let negative = write(
        "negative.safetensors",
        safetensors::Dtype::I64,
        (-1i64).to_le_bytes().to_vec(),
        vec![1],
    );
    let msg = checkpoint_message(load(&negative).err().expect("-1 is no u32"));
    assert!(msg.contains("ids") && msg.contains("-1"), "{msg}");

    let fine = write(
        "fine.safetensors",
        safetensors::Dtype::I64,
        7i64.to_le_bytes().to_vec(),
        vec![1],
    );
    assert_eq!(
        load(&fine).unwrap().tensors["ids"].to_indices().unwrap(),
        [7]
    );

    let half = write(
        "half.safetensors",
        safetensors::Dtype::F16,
        vec![0, 60],
        vec![1],
    );
    let loaded = load(&half).unwrap().tensors["ids"].clone();
    assert_eq!(
        (loaded.dtype(), loaded.to_f64_vec()),
        (DType::F16, vec![1.0])
    );

    let short = write(
        "int16.safetensors",
        safetensors::Dtype::I16,
        vec![1, 0],
        vec![1],
    );
    let msg = checkpoint_message(load(&short).err().expect("int16 is not loadable"));
    assert!(msg.contains("ids") && msg.contains("I16"), "{msg}");
}

/// Loads a modified copy of a good checkpoint into a fresh model and checks
/// that the error names `expected_words` and that the model is unchanged.
fn assert_rejected(edit: impl FnOnce(&mut HashMap<String, Tensor>), expected_words: &[&str]) {
    let mut tensors: HashMap<String, Tensor> =
        model(1, DType::F32).state_dict().into_iter().collect();
    edit(&mut tensors);
    let target = model(2, DType::F32);
    let before = values(&target);
    let err = target.load_state_dict(&tensors).unwrap_err().to_string();
    for word in expected_words {
        assert!(err.contains(word), "error does not name {word}: {err}");
    }
    assert!(err.contains("nothing was loaded"), "{err}");
    assert_eq!(values(&target), before, "a rejected load changed the model");
}

#[test]
fn missing_tensor_is_named_and_nothing_is_loaded() {
    assert_rejected(|t| drop(t.remove("4.bias")), &["missing", "4.bias"]);
}

#[test]
fn unexpected_tensor_is_named_and_nothing_is_loaded() {
    assert_rejected(
        |t| {
            drop(t.insert(
                "head.weight".into(),
                Tensor::zeros([2], DType::F32, Device::Cpu).unwrap(),
            ))
        },
        &["unexpected", "head.weight"],
    );
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes_and_nothing_is_loaded() {
    assert_rejected(
        |t| {
            drop(t.insert(
                "0.weight".into(),
                Tensor::zeros([3, 1, 5, 5], DType::F32, Device::Cpu).unwrap(),
            ))
        },
        &["0.weight", "[3, 1, 5, 5]", "[3, 1, 3, 3]"],
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    assert_rejected(
        |t| {
            t.remove("1.running_var");
            t.insert(
                "extra".into(),
                Tensor::zeros([1], DType::F32, Device::Cpu).unwrap(),
            );
            t.insert(
                "4.weight".into(),
                Tensor::zeros([2, 47], DType::F32, Device::Cpu).unwrap(),
            );
        },
        &["1.running_var", "extra", "4.weight"],
    );
}

#[test]
fn load_module_wraps_mismatches_as_checkpoint_errors_naming_the_file() {
    let dir = TempDir::new("mismatch");
    let path = dir.path("small.safetensors");
    let linear = Linear::new(
        3,
        2,
        true,
        &mut Init::new(&mut Rng::seed(0), Device::Cpu, DType::F32),
    )
    .unwrap();
    save_module(&path, &linear, &BTreeMap::new()).unwrap();
    let err = load_module(&path, &model(1, DType::F32)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Checkpoint { .. }), "{text}");
    assert!(
        text.contains("small.safetensors") && text.contains("0.weight"),
        "{text}"
    );
}

#[test]
fn a_tensor_holding_nan_or_inf_is_refused_by_name_unless_allowed() {
    let dir = TempDir::new("non-finite");
    let path = dir.path("diverged.safetensors");
    let source = model(3, DType::F32);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut tensors: Vec<(String, Tensor)> = source.state_dict();
        let index = tensors.iter().position(|(n, _)| n == "0.weight").unwrap();
        let mut poisoned = tensors[index].1.to_f64_vec();
        poisoned[4] = bad;
        poisoned[5] = bad;
        let dims = tensors[index].1.dims().to_vec();
        tensors[index].1 =
            Tensor::from_vec(poisoned.iter().map(|&v| v as f32).collect(), dims).unwrap();
        save(&path, &tensors, &BTreeMap::new()).unwrap();

        let target = model(4, DType::F32);
        let before = values(&target);
        let err = load_module(&path, &target).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Checkpoint { .. }), "{text}");
        assert!(
            text.contains("diverged.safetensors")
                && text.contains("tensor 0.weight")
                && text.contains("2 non-finite value(s)")
                && text.contains("flat index 4")
                && text.contains(&format!("{bad}")),
            "{text}"
        );
        assert_eq!(values(&target), before, "nothing is loaded");

        let allow = LoadOptions {
            allow_non_finite: true,
        };
        load_module_with(&path, &target, allow).unwrap();
        let loaded = target.state_dict();
        let weight = &loaded.iter().find(|(n, _)| n == "0.weight").unwrap().1;
        assert!(!weight.to_f64_vec()[4].is_finite());
    }
}

#[test]
fn atomic_save_leaves_only_the_target_and_replaces_it_whole() {
    let dir = TempDir::new("atomic");
    let path = dir.path("model.safetensors");
    let first = model(1, DType::F32);
    let second = model(2, DType::F32);
    save_module(&path, &first, &BTreeMap::new()).unwrap();
    assert_eq!(dir.entries(), ["model.safetensors"]);
    save_module(&path, &second, &BTreeMap::new()).unwrap();
    assert_eq!(
        dir.entries(),
        ["model.safetensors"],
        "a temporary file was left behind"
    );
    let restored = model(3, DType::F32);
    load_module(&path, &restored).unwrap();
    assert_eq!(values(&restored), values(&second));
}

#[test]
fn failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file() {
    let dir = TempDir::new("failed");
    let path = dir.path("model.safetensors");
    let original = model(1, DType::F32);
    save_module(&path, &original, &BTreeMap::new()).unwrap();
    let original_bytes = std::fs::read(&path).unwrap();

    // Rejected before writing: two tensors under one name.
    let w = Tensor::zeros([2], DType::F32, Device::Cpu).unwrap();
    let duplicate = [
        ("0.weight".to_string(), w.clone()),
        ("0.weight".to_string(), w.clone()),
    ];
    let err = save(&path, &duplicate, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");

    // Fails at the rename: the target is a directory; the written temporary must go.
    let blocked = dir.path("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let err = save(&blocked, &[("w".to_string(), w.clone())], &BTreeMap::new()).unwrap_err();
    assert!(checkpoint_message(err).contains("unchanged"));
    assert!(blocked.join("keep").exists());

    assert_eq!(std::fs::read(&path).unwrap(), original_bytes);
    assert_eq!(dir.entries(), ["blocked", "model.safetensors"]);
}

#[test]
fn saving_into_a_missing_directory_fails_and_creates_nothing() {
    let dir = TempDir::new("no-dir");
    let path = dir.path("absent").join("model.safetensors");
    let err = save_module(&path, &model(1, DType::F32), &BTreeMap::new()).unwrap_err();
    let msg = checkpoint_message(err);
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(dir.entries().is_empty());
}

/// Three Adam steps of the model on a fixed regression batch.
fn train(model: &Sequential, optimizer: &mut Adam, steps: usize) {
    let x = input(5, DType::F32);
    let y = Tensor::randn([5, 2], DType::F32, Device::Cpu, &mut Rng::seed(6)).unwrap();
    for _ in 0..steps {
        let loss = model
            .forward(&x)
            .unwrap()
            .mse_loss(&y, Reduction::Mean)
            .unwrap();
        optimizer.step(&loss.backward().unwrap()).unwrap();
    }
}

#[test]
fn resumed_training_continues_bit_identically() {
    let dir = TempDir::new("resume");
    let (model_path, optim_path) = (dir.path("model.safetensors"), dir.path("optim.safetensors"));
    let config = AdamConfig {
        lr: 0.01,
        weight_decay: 0.01,
        ..AdamConfig::adam()
    };

    let uninterrupted = model(1, DType::F32);
    let mut optimizer = Adam::new(uninterrupted.named_parameters(), config).unwrap();
    train(&uninterrupted, &mut optimizer, 3);
    save_module(&model_path, &uninterrupted, &BTreeMap::new()).unwrap();
    checkpoint::save(&optim_path, &optimizer.state_dict(), &BTreeMap::new()).unwrap();
    train(&uninterrupted, &mut optimizer, 3);

    let resumed = model(2, DType::F32);
    load_module(&model_path, &resumed).unwrap();
    let mut resumed_optimizer = Adam::new(resumed.named_parameters(), config).unwrap();
    resumed_optimizer
        .load_state_dict(&load(&optim_path).unwrap().tensors)
        .unwrap();
    train(&resumed, &mut resumed_optimizer, 3);

    assert_eq!(values(&resumed), values(&uninterrupted));
}

#[test]
fn optimizer_state_with_a_wrong_shape_or_unknown_name_is_rejected_whole() {
    let m = model(1, DType::F32);
    let mut optimizer = Adam::new(m.named_parameters(), AdamConfig::adam()).unwrap();
    train(&m, &mut optimizer, 1);
    let good: HashMap<String, Tensor> = optimizer.state_dict().into_iter().collect();

    let mut bad = good.clone();
    bad.insert(
        "0.weight.exp_avg".into(),
        Tensor::zeros([1], DType::F32, Device::Cpu).unwrap(),
    );
    bad.insert(
        "ghost.exp_avg".into(),
        Tensor::zeros([1], DType::F32, Device::Cpu).unwrap(),
    );
    bad.remove("4.bias.exp_avg_sq");
    let err = optimizer.load_state_dict(&bad).unwrap_err().to_string();
    for word in [
        "0.weight.exp_avg",
        "ghost.exp_avg",
        "4.bias.exp_avg_sq",
        "nothing was loaded",
    ] {
        assert!(err.contains(word), "{word} not in {err}");
    }
    let after: HashMap<String, Vec<f64>> = optimizer
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.to_f64_vec()))
        .collect();
    for (name, tensor) in &good {
        assert_eq!(after[name], tensor.to_f64_vec(), "{name} changed");
    }
}
