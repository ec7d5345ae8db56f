//! The `kiln` command line end to end on tiny synthetic data (IDX files and
//! a short text written here): training writes a checkpoint that reloads,
//! a resumed run continues bit-identically, sampling / generation /
//! evaluation work, and every bad input fails with exit code 1, one
//! `error: ...` line, and untouched checkpoint files.

mod common;
mod datasets;
mod quality;

use std::fs;
use std::path::Path;

use common::*;
use kiln::checkpoint;

#[test]
fn vae_training_writes_every_output_and_its_checkpoint_samples_and_evaluates() {
    let s = Scratch::new("vae");
    train(
        &s,
        "vae",
        "run",
        &["--steps", "5", "--checkpoint-every", "2"],
    );
    let run = s.path("run");
    for file in [
        "checkpoint.safetensors",
        "checkpoint.json",
        "metrics.csv",
        "loss.png",
        "samples.png",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let json = state(&run);
    assert_eq!(json["model"], "vae");
    assert_eq!(json["step"], 5);
    assert_eq!(json["config"]["latent"], 4);
    let metrics = fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(metrics.starts_with("step,epoch,loss,reconstruction,kl,samples_per_s\n"));
    assert_eq!(metrics.lines().count(), 6);
    // 12 images in batches of 5: 3 steps per epoch, so step 4 is in epoch 1.
    assert!(metrics.lines().nth(4).unwrap().starts_with("4,1,"));
    assert_eq!(json["epoch"], 1);

    let grid = s.arg("grid.png");
    let raw = s.arg("raw.safetensors");
    let run_arg = s.arg("run");
    kiln_ok(&[
        "sample",
        "vae",
        "--checkpoint",
        &run_arg,
        "--n",
        "7",
        "--out",
        &grid,
        "--raw",
        &raw,
    ]);
    assert!(s.path("grid.png").is_file());
    let samples = &checkpoint::load(&raw).unwrap().tensors["samples"];
    assert_eq!(samples.dims(), &[7, 1, 28, 28]);
    assert!(
        samples
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|v| (0.0..=1.0).contains(v))
    );

    let data = s.data().display().to_string();
    let json_arg = s.arg("run/checkpoint.json");
    let printed = kiln_ok(&["eval", "vae", "--checkpoint", &json_arg, "--data", &data]);
    assert!(printed.contains("test negative ELBO"), "{printed}");
    assert!(printed.contains("over 12 test images"), "{printed}");
    let value: f64 = printed.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(value.is_finite() && value > 0.0, "{printed}");
    let again = kiln_ok(&["eval", "vae", "--checkpoint", &json_arg, "--data", &data]);
    assert_eq!(
        printed, again,
        "the evaluation's eps comes from a fixed seed"
    );
}

#[test]
fn gan_training_writes_a_checkpoint_whose_generator_samples_in_range() {
    let s = Scratch::new("gan");
    train(&s, "gan", "run", &["--steps", "3"]);
    let run = s.path("run");
    for file in [
        "checkpoint.safetensors",
        "checkpoint.json",
        "metrics.csv",
        "loss.png",
        "samples.png",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let names = checkpoint_values(&run);
    assert!(names.keys().any(|n| n.starts_with("generator.")));
    assert!(names.keys().any(|n| n.starts_with("discriminator.")));
    assert!(names.keys().any(|n| n.starts_with("optim_d.")));
    assert!(names.keys().any(|n| n.starts_with("optim_g.")));
    let raw = s.arg("raw.safetensors");
    let grid = s.arg("grid.png");
    let weights = s.arg("run/checkpoint.safetensors");
    kiln_ok(&[
        "sample",
        "gan",
        "--checkpoint",
        &weights,
        "--n",
        "5",
        "--out",
        &grid,
        "--raw",
        &raw,
    ]);
    let samples = &checkpoint::load(&raw).unwrap().tensors["samples"];
    assert_eq!(samples.dims(), &[5, 1, 32, 32]);
    assert!(
        samples
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|v| (-1.0..=1.0).contains(v))
    );
}

#[test]
fn gpt_training_then_generate_continues_the_prompt_and_eval_prints_a_loss() {
    let s = Scratch::new("gpt");
    train(&s, "gpt", "run", &["--steps", "4"]);
    let run = s.path("run");
    let json = state(&run);
    assert_eq!(json["model"], "gpt");
    assert_eq!(json["config"]["vocab_size"], 23);
    assert!(json["vocab"].is_string());
    assert!(run.join("loss.png").is_file());

    let run_arg = s.arg("run");
    let printed = kiln_ok(&[
        "generate",
        "--checkpoint",
        &run_arg,
        "--prompt",
        "To be",
        "--max-new-tokens",
        "20",
        "--temperature",
        "1.0",
        "--top-k",
        "5",
        "--seed",
        "3",
    ]);
    assert!(printed.starts_with("To be"), "{printed}");
    assert_eq!(
        printed.trim_end_matches('\n').chars().count(),
        25,
        "{printed:?}"
    );

    let data = s.data().display().to_string();
    let printed = kiln_ok(&[
        "eval",
        "gpt",
        "--checkpoint",
        &run_arg,
        "--data",
        &data,
        "--batches",
        "3",
    ]);
    let loss: f64 = printed.split_whitespace().nth(2).unwrap().parse().unwrap();
    // Near ln(23) ≈ 3.1 after four steps from a small random init.
    assert!(loss > 1.0 && loss < 5.0, "{printed}");

    // --full scores every window of the split: close to the sampled estimate.
    let full = kiln_ok(&[
        "eval",
        "gpt",
        "--checkpoint",
        &run_arg,
        "--data",
        &data,
        "--full",
    ]);
    assert!(full.contains("consecutive windows"), "{full}");
    let full_loss: f64 = full.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((full_loss - loss).abs() < 0.5, "{full} vs {printed}");
}

/// Trains `model` six steps straight, and three then three more with
/// --resume, and requires identical checkpoints and metrics.
fn resume_is_bit_identical(model: &str, extra: &[&str]) {
    let s = Scratch::new(&format!("resume-{model}"));
    let mut straight = vec!["--steps", "6"];
    straight.extend_from_slice(extra);
    let mut first = vec!["--steps", "3"];
    first.extend_from_slice(extra);
    if model == "gpt" {
        // A decaying rate, whose schedule spans the whole run: the resumed
        // half must carry on along it.
        straight.extend(["--lr-decay-steps", "6"]);
        first.extend(["--lr-decay-steps", "6"]);
    }
    train(&s, model, "straight", &straight);
    train(&s, model, "resumed", &first);
    assert_eq!(state(&s.path("resumed"))["step"], 3);
    train(&s, model, "resumed", &["--steps", "6", "--resume"]);

    let straight = s.path("straight");
    let resumed = s.path("resumed");
    assert_eq!(state(&resumed)["step"], 6);
    let a = checkpoint_values(&straight);
    let b = checkpoint_values(&resumed);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, value) in &a {
        assert!(
            value == &b[name],
            "{model}: tensor {name} differs after resuming"
        );
    }
    assert_eq!(
        metrics_without_timing(&straight),
        metrics_without_timing(&resumed)
    );
}

#[test]
fn vae_resumed_after_three_steps_matches_six_straight_steps_bit_for_bit() {
    // Batches of 5 over 12 images: the resume point falls at an epoch boundary.
    resume_is_bit_identical("vae", &[]);
}

#[test]
fn gan_resumed_after_three_steps_matches_six_straight_steps_bit_for_bit() {
    // Batches of 2 over 12 images: the resume point falls mid-epoch.
    resume_is_bit_identical("gan", &[]);
}

#[test]
fn gpt_resumed_after_three_steps_matches_six_straight_steps_bit_for_bit() {
    resume_is_bit_identical("gpt", &[]);
}

#[test]
fn gpt_with_dropout_resumes_bit_for_bit_because_each_step_restarts_the_masks() {
    resume_is_bit_identical("gpt", &["--dropout", "0.2"]);
}

#[test]
fn mixed_precision_runs_resume_bit_for_bit_with_the_loss_scaler_in_the_checkpoint() {
    // f16 scales the loss: its scale and clean-step count must be restored.
    resume_is_bit_identical("vae", &["--precision", "f16"]);
    resume_is_bit_identical("gpt", &["--precision", "bf16"]);
    resume_is_bit_identical("gan", &["--precision", "bf16"]);
}

#[test]
fn stochastic_rounding_is_recorded_resumes_bit_for_bit_and_needs_bf16() {
    // The resumed run recreates the copies of its last update from the
    // optimizer's step counts: without them its first forward would round
    // the weights to nearest and the runs would part.
    resume_is_bit_identical("gpt", &["--precision", "bf16", "--stochastic-rounding"]);
    let s = Scratch::new("stochastic");
    train(
        &s,
        "vae",
        "stochastic",
        &[
            "--steps",
            "3",
            "--precision",
            "bf16",
            "--stochastic-rounding",
        ],
    );
    train(
        &s,
        "vae",
        "nearest",
        &["--steps", "3", "--precision", "bf16"],
    );
    let (stochastic, nearest) = (s.path("stochastic"), s.path("nearest"));
    assert_eq!(state(&stochastic)["training"]["stochastic_rounding"], true);
    assert!(
        state(&nearest)["training"]
            .get("stochastic_rounding")
            .is_none()
    );
    assert_ne!(
        checkpoint_values(&stochastic)["model.fc1.weight"],
        checkpoint_values(&nearest)["model.fc1.weight"],
        "the copies' rounding changes the forward passes, so the training"
    );
    train_fails(
        &s,
        "vae",
        "f32",
        &["--stochastic-rounding"],
        &["--stochastic-rounding", "--precision bf16"],
    );
}

#[test]
fn gpt_init_and_beta2_are_recorded_kept_on_resume_and_checked() {
    let s = Scratch::new("gpt-recipe");
    train(&s, "gpt", "default", &["--steps", "2"]);
    let training = &state(&s.path("default"))["training"];
    assert_eq!(training["init"], "pytorch");
    assert_eq!(training["beta2"], 0.999);
    assert_eq!(training["lr_decay_steps"], 0, "a constant rate");
    train(
        &s,
        "gpt",
        "gpt2",
        &["--steps", "2", "--init", "gpt2", "--beta2", "0.99"],
    );
    assert_ne!(
        checkpoint_values(&s.path("default"))["model.wte.weight"],
        checkpoint_values(&s.path("gpt2"))["model.wte.weight"],
        "the initialisation differs"
    );
    train(&s, "gpt", "gpt2", &["--steps", "3", "--resume"]);
    let training = &state(&s.path("gpt2"))["training"];
    assert_eq!(
        (training["init"].clone(), training["beta2"].clone()),
        ("gpt2".into(), 0.99.into())
    );
    train_fails(
        &s,
        "gpt",
        "gpt2",
        &["--steps", "4", "--resume", "--beta2", "0.9"],
        &["--beta2", "resumed run"],
    );
    train_fails(
        &s,
        "gpt",
        "bad",
        &["--beta2", "1.0"],
        &["--beta2", "[0, 1)"],
    );
}

#[test]
fn precision_is_recorded_kept_on_resume_and_used_by_sample_and_eval() {
    let s = Scratch::new("precision");
    train(&s, "vae", "half", &["--steps", "2", "--precision", "f16"]);
    let run = s.path("half");
    assert_eq!(state(&run)["training"]["precision"], "f16");
    let values = checkpoint_values(&run);
    // From 2¹⁶, halved by each step whose f16 gradients overflowed (the
    // first steps of a run, here), then counting clean steps towards growth.
    let scale = f64::from_bits(values["grad_scaler.scale"].1[0]);
    let clean = f64::from_bits(values["grad_scaler.growth_tracker"].1[0]);
    let skipped = 2.0 - clean;
    assert_eq!(
        scale,
        65536.0 * 0.5f64.powf(skipped),
        "scale {scale}, clean {clean}"
    );
    // Parameters stay f32 (the master weights).
    let loaded = checkpoint::load(run.join("checkpoint.safetensors")).unwrap();
    assert!(
        loaded
            .tensors
            .iter()
            .filter(|(name, _)| name.starts_with("model."))
            .all(|(_, t)| t.dtype() == kiln::DType::F32)
    );
    let data = s.data().display().to_string();
    let out = s.arg("half");
    let err = kiln_fails(
        &[
            "train",
            "vae",
            "--data",
            &data,
            "--out",
            &out,
            "--resume",
            "--steps",
            "3",
            "--precision",
            "bf16",
        ],
        &["--precision bf16", "f16"],
    );
    assert!(err.contains("resumed run"), "{err}");

    train(&s, "vae", "bf16", &["--steps", "2", "--precision", "bf16"]);
    let run_arg = s.arg("bf16");
    let grid = s.arg("grid.png");
    let raw = s.arg("raw.safetensors");
    kiln_ok(&[
        "sample",
        "vae",
        "--checkpoint",
        &run_arg,
        "--n",
        "4",
        "--out",
        &grid,
        "--raw",
        &raw,
    ]);
    let samples = &checkpoint::load(&raw).unwrap().tensors["samples"];
    assert_eq!(samples.dtype(), kiln::DType::F32);
    let printed = kiln_ok(&["eval", "vae", "--checkpoint", &run_arg, "--data", &data]);
    assert!(printed.contains("test negative ELBO"), "{printed}");
    // An unknown precision is refused by the parser, naming the choices.
    let output = kiln(&[
        "train",
        "vae",
        "--data",
        &data,
        "--out",
        &out,
        "--precision",
        "fp8",
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
}

#[test]
fn missing_data_directory_error_names_the_fetch_script() {
    let s = Scratch::new("no-data");
    let missing = s.arg("nowhere");
    let out = s.arg("run");
    for model in ["vae", "gan", "gpt"] {
        kiln_fails(
            &["train", model, "--data", &missing, "--out", &out],
            &["scripts/fetch-data.sh"],
        );
    }
    assert!(!s.path("run").join("checkpoint.json").exists());
}

#[test]
fn truncated_idx_file_is_an_error_naming_the_file() {
    let s = Scratch::new("truncated");
    let images = s.path("data/fashion-mnist/train-images-idx3-ubyte");
    let bytes = fs::read(&images).unwrap();
    fs::write(&images, &bytes[..bytes.len() - 100]).unwrap();
    let data = s.data().display().to_string();
    let out = s.arg("run");
    kiln_fails(
        &["train", "vae", "--data", &data, "--out", &out],
        &["train-images-idx3-ubyte"],
    );
}

#[test]
fn bad_inputs_fail_clearly_and_leave_the_checkpoint_files_byte_identical() {
    let s = Scratch::new("bad-inputs");
    train(&s, "vae", "vae", &["--steps", "2"]);
    train(&s, "gpt", "gpt", &["--steps", "2"]);
    let vae_before = snapshot(&s.path("vae"));
    let gpt_before = snapshot(&s.path("gpt"));
    let (vae, gpt, data) = (s.arg("vae"), s.arg("gpt"), s.data().display().to_string());
    let grid = s.arg("grid.png");

    // A checkpoint of another model says what it holds.
    kiln_fails(
        &["sample", "gan", "--checkpoint", &vae, "--out", &grid],
        &["is a vae checkpoint, not a gan one"],
    );
    kiln_fails(
        &["eval", "gpt", "--checkpoint", &vae, "--data", &data],
        &["is a vae checkpoint"],
    );
    kiln_fails(
        &["generate", "--checkpoint", &vae],
        &["is a vae checkpoint, not a gpt one"],
    );
    kiln_fails(
        &["train", "gpt", "--data", &data, "--out", &vae, "--resume"],
        &["is a vae checkpoint, not a gpt one"],
    );
    // A prompt with characters the model never saw names them.
    kiln_fails(
        &["generate", "--checkpoint", &gpt, "--prompt", "To be Z"],
        &["--prompt", "\"Z\""],
    );
    // Training over an existing checkpoint without --resume.
    kiln_fails(
        &["train", "vae", "--data", &data, "--out", &vae],
        &["already holds a checkpoint", "--resume"],
    );
    // Resuming with a setting that would change the run.
    kiln_fails(
        &[
            "train", "vae", "--data", &data, "--out", &vae, "--resume", "--lr", "0.5",
        ],
        &["--lr 0.5 differs"],
    );
    // Resuming from missing data.
    let missing = s.arg("nowhere");
    kiln_fails(
        &[
            "train", "vae", "--data", &missing, "--out", &vae, "--resume", "--steps", "4",
        ],
        &["scripts/fetch-data.sh"],
    );
    // A checkpoint path that does not exist, and a file that is not one.
    kiln_fails(
        &[
            "sample",
            "vae",
            "--checkpoint",
            &s.arg("missing"),
            "--out",
            &grid,
        ],
        &["does not exist"],
    );
    kiln_fails(
        &[
            "sample",
            "vae",
            "--checkpoint",
            &s.arg("vae/metrics.csv"),
            "--out",
            &grid,
        ],
        &["metrics.csv"],
    );

    assert_eq!(
        snapshot(&s.path("vae")),
        vae_before,
        "the vae run directory changed"
    );
    assert_eq!(
        snapshot(&s.path("gpt")),
        gpt_before,
        "the gpt run directory changed"
    );
    assert!(!s.path("grid.png").exists());
}

#[test]
fn a_checkpoint_holding_nan_is_refused_by_name_unless_allowed() {
    let s = Scratch::new("nan-weights");
    train(&s, "vae", "run", &["--steps", "2"]);
    let weights = s.path("run/checkpoint.safetensors");
    let mut loaded = checkpoint::load(&weights).unwrap();
    let name = "model.fc21.weight";
    let original = loaded.tensors[name].clone();
    let mut values = original.to_vec::<f32>().unwrap();
    values[7] = f32::NAN;
    loaded.tensors.insert(
        name.to_string(),
        kiln::Tensor::from_vec(values, original.dims().to_vec()).unwrap(),
    );
    let tensors: Vec<(String, kiln::Tensor)> = loaded.tensors.into_iter().collect();
    checkpoint::save(&weights, &tensors, &loaded.metadata).unwrap();
    let before = snapshot(&s.path("run"));

    let (run, grid) = (s.arg("run"), s.arg("grid.png"));
    let expected = [name, "1 non-finite value(s)", "NaN", "--allow-non-finite"];
    kiln_fails(
        &["sample", "vae", "--checkpoint", &run, "--out", &grid],
        &expected,
    );
    train_fails(&s, "vae", "run", &["--resume", "--steps", "3"], &expected);
    assert_eq!(
        snapshot(&s.path("run")),
        before,
        "the run directory changed"
    );
    assert!(!s.path("grid.png").exists());

    kiln_ok(&[
        "sample",
        "vae",
        "--checkpoint",
        &run,
        "--out",
        &grid,
        "--allow-non-finite",
    ]);
    assert!(s.path("grid.png").exists());
}

#[test]
fn sampling_streams_any_count_in_batches_and_refuses_a_count_that_cannot_fit() {
    let s = Scratch::new("sample-n");
    train(&s, "vae", "run", &["--steps", "2"]);
    let run = s.arg("run");
    let sample = |n: &str, name: &str| {
        let (grid, raw) = (
            s.arg(&format!("{name}.png")),
            s.arg(&format!("{name}.safetensors")),
        );
        let stdout = kiln_ok(&[
            "sample",
            "vae",
            "--checkpoint",
            &run,
            "--n",
            n,
            "--out",
            &grid,
            "--raw",
            &raw,
        ]);
        let tensors = checkpoint::load(&raw).unwrap().tensors;
        (stdout, tensors["samples"].clone())
    };
    // 700 images: three batches of the generator, 27 grid rows of 27.
    let (stdout, many) = sample("700", "many");
    assert!(stdout.contains("into a 812x782 grid"), "{stdout}");
    assert_eq!(many.dims(), [700, 1, 28, 28]);
    let decoder = png::Decoder::new(std::io::BufReader::new(
        fs::File::open(s.path("many.png")).unwrap(),
    ));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (812, 782));
    // The noise is drawn in image order: the first five are those of --n 5
    // (up to the rounding of a batch of 256 against one of 5), and unlike
    // the next five.
    let (_, few) = sample("5", "few");
    let max_difference = |a: &kiln::Tensor, b: &kiln::Tensor| {
        let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let first = many.narrow(0, 0, 5).unwrap();
    let next = many.narrow(0, 5, 5).unwrap();
    assert!(max_difference(&first, &few) < 1e-5);
    assert!(max_difference(&next, &few) > 1e-2);

    let before: Vec<_> = fs::read_dir(s.root_path()).unwrap().collect();
    let huge = s.arg("huge.png");
    let raw = s.arg("huge.safetensors");
    kiln_fails(
        &[
            "sample",
            "vae",
            "--checkpoint",
            &run,
            "--n",
            "100000000000",
            "--out",
            &huge,
            "--raw",
            &raw,
        ],
        &[
            "--n 100000000000 needs up to",
            "huge.png and",
            "huge.safetensors",
            "is free there",
            "lower --n",
        ],
    );
    assert_eq!(
        fs::read_dir(s.root_path()).unwrap().count(),
        before.len(),
        "files were written"
    );
}

#[test]
fn a_model_too_large_for_the_memory_is_refused_before_it_is_built() {
    let s = Scratch::new("too-large");
    for (model, sizes, what) in [
        (
            "gpt",
            vec!["--n-embd", "100000", "--n-head", "1"],
            "training the GPT",
        ),
        ("gpt", vec!["--n-layer", "1000000"], "training the GPT"),
        ("gan", vec!["--ngf", "1000000"], "training the DCGAN"),
        ("vae", vec!["--hidden", "100000000000"], "training the VAE"),
    ] {
        let started = std::time::Instant::now();
        train_fails(
            &s,
            model,
            "run",
            &sizes,
            &[what, "needs at least", "GiB", "choose smaller sizes"],
        );
        assert!(
            started.elapsed().as_secs() < 10,
            "{model} {sizes:?} took long to refuse"
        );
    }
    assert!(!s.path("run").exists());
}

#[test]
fn resume_without_a_checkpoint_is_an_error_that_creates_nothing() {
    let s = Scratch::new("resume-nothing");
    let data = s.data().display().to_string();
    let out = s.arg("run");
    kiln_fails(
        &["train", "gan", "--data", &data, "--out", &out, "--resume"],
        &["--resume", "holds no checkpoint"],
    );
    assert!(!s.path("run").exists());
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if kiln::Device::cuda(0).is_ok() {
        println!("skipped: a CUDA device is present, so --device cuda succeeds here");
        return;
    }
    let s = Scratch::new("cuda");
    let data = s.data().display().to_string();
    let out = s.arg("run");
    kiln_fails(
        &[
            "train", "vae", "--data", &data, "--out", &out, "--device", "cuda", "--steps", "1",
        ],
        &["--device cuda"],
    );
    assert!(!s.path("run").exists());
}

#[test]
fn resuming_a_finished_run_changes_nothing_and_a_longer_one_continues() {
    let s = Scratch::new("finished");
    train(&s, "vae", "run", &["--steps", "2"]);
    let before = snapshot(&s.path("run"));
    let printed = train(&s, "vae", "run", &["--resume"]);
    assert!(printed.contains("already trained for 2 steps"), "{printed}");
    assert_eq!(snapshot(&s.path("run")), before);
    train(&s, "vae", "run", &["--resume", "--steps", "3"]);
    assert_eq!(state(&s.path("run"))["step"], 3);
    assert_eq!(metrics_without_timing(&s.path("run")).len(), 4);
}

#[test]
fn the_library_entry_point_runs_a_command_and_reports_usage_errors() {
    let s = Scratch::new("library");
    let data = s.data().display().to_string();
    let out = s.arg("run");
    let mut args = vec![
        "kiln", "train", "vae", "--data", &data, "--out", &out, "--steps", "1",
    ];
    args.extend(tiny("vae"));
    kiln::cli::run(args).unwrap();
    assert!(s.path("run/checkpoint.safetensors").is_file());
    let error = kiln::cli::run(["kiln", "train", "mlp"])
        .unwrap_err()
        .to_string();
    assert!(error.contains("mlp"), "{error}");
}

/// A profiled run's profile.json: its rows, the table's total, and the
/// step time metrics.csv gives for the same steps.
/// `kiln train MODEL` with `tiny`'s flags but wider layers, so that a step
/// takes a millisecond or more: `check_profile` compares two timings of the
/// same steps within 5%, which a 0.1 ms step cannot resolve against the
/// loop's fixed cost. Batches and data stay `tiny`'s.
fn train_profiled(scratch: &Scratch, model: &str, out: &str, extra: &[&str]) -> String {
    let widened: &[(&str, &str)] = match model {
        "vae" => &[("--hidden", "1024")],
        "gan" => &[("--ngf", "32"), ("--ndf", "32")],
        _ => &[("--n-embd", "128")],
    };
    let mut sizes = tiny(model);
    for (flag, value) in widened {
        let at = sizes.iter().position(|f| f == flag).unwrap();
        sizes[at + 1] = value;
    }
    let data = scratch.data().display().to_string();
    let out = scratch.arg(out);
    let mut args = vec!["train", model, "--data", &data, "--out", &out];
    args.extend(sizes);
    args.extend_from_slice(extra);
    let output = kiln(&args);
    assert!(
        output.status.success(),
        "kiln train {model} {extra:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn check_profile(dir: &Path, model: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("profile.json")).unwrap()).unwrap();
    let total = json["ms_per_step"].as_f64().unwrap();
    let ops = json["ops"].as_array().unwrap();
    let phases: Vec<&str> = ops.iter().map(|op| op["phase"].as_str().unwrap()).collect();
    assert!(
        phases.contains(&"forward") && phases.contains(&"backward"),
        "{model}: {phases:?}"
    );
    let rows: f64 = ops.iter().map(|op| op["ms"].as_f64().unwrap()).sum::<f64>()
        + json["outside_op_scopes_ms"].as_f64().unwrap();
    assert!(
        (rows - total).abs() <= 1e-9 * total.max(1.0),
        "{model}: rows {rows} of {total}"
    );
    // The same steps timed by the training loop (metrics.csv's samples/s):
    // the table accounts for the whole step, within 5%.
    let (first, last) = (
        json["first_step"].as_u64().unwrap() as usize,
        json["last_step"].as_u64().unwrap() as usize,
    );
    let metrics = fs::read_to_string(dir.join("metrics.csv")).unwrap();
    // Examples per step with `tiny`'s sizes: the VAE's 12 images in batches
    // of 5 (5, 5, 2), the GAN's batches of 2, the GPT's 4 windows.
    let examples_in_step = |step: usize| match model {
        "vae" => [5.0, 5.0, 2.0][(step - 1) % 3],
        "gan" => 2.0,
        _ => 4.0,
    };
    let step_ms: Vec<f64> = metrics
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let step: usize = fields[0].parse().unwrap();
            let samples_per_s: f64 = fields[fields.len() - 1].parse().unwrap();
            (first..=last)
                .contains(&step)
                .then(|| 1e3 * examples_in_step(step) / samples_per_s)
        })
        .collect();
    assert_eq!(
        step_ms.len(),
        last + 1 - first,
        "{model}: profiled steps in metrics.csv"
    );
    let loop_ms = step_ms.iter().sum::<f64>() / step_ms.len() as f64;
    eprintln!("{model}: profiled step {total:.3} ms, loop's {loop_ms:.3} ms");
    assert!(
        (total - loop_ms).abs() <= 0.05 * loop_ms,
        "{model}: the table's step of {total} ms against the loop's {loop_ms} ms"
    );
    fs::read_to_string(dir.join("profile.md")).unwrap()
}

#[test]
fn profiled_runs_print_and_write_a_table_that_accounts_for_the_step() {
    let s = Scratch::new("profile");
    for model in ["vae", "gan", "gpt"] {
        let printed = train_profiled(&s, model, model, &["--steps", "8", "--profile", "4"]);
        assert!(
            printed.contains("| op | calls | ms | % of step |"),
            "{printed}"
        );
        assert!(printed.contains("backward |"), "{printed}");
        let table = check_profile(&s.path(model), model);
        assert!(
            table.contains("steps 4..7 (4 profiled after 3 of warm-up)"),
            "{table}"
        );
    }
    // The profiled run trained as an unprofiled one does.
    train_profiled(&s, "vae", "plain", &["--steps", "8"]);
    assert_eq!(
        metrics_without_timing(&s.path("vae")),
        metrics_without_timing(&s.path("plain"))
    );
    // A run shorter than warm-up plus window profiles what it can.
    let printed = train(&s, "vae", "short", &["--steps", "2", "--profile", "5"]);
    assert!(
        printed.contains("(2 profiled after 0 of warm-up)"),
        "{printed}"
    );
    train_fails(
        &s,
        "vae",
        "zero",
        &["--profile", "0"],
        &["--profile", "at least 1"],
    );
    if kiln::Device::cuda(0).is_ok() {
        let printed = train(
            &s,
            "gpt",
            "cuda",
            &["--steps", "5", "--profile", "2", "--device", "cuda"],
        );
        assert!(printed.contains("synchronises the device"), "{printed}");
        check_profile(&s.path("cuda"), "gpt");
    }
}

#[test]
fn mixed_precision_trains_every_model_on_cuda() {
    if kiln::Device::cuda(0).is_err() {
        println!("skipped: no CUDA device");
        return;
    }
    let s = Scratch::new("cuda-bf16");
    // Every op of the three has a 16-bit CUDA path: tensor-core matmul and
    // convolutions, batch norm in x's format, elementwise, activations, shape
    // copies, conversions and attention; layer norm, softmax and the losses
    // widen to f32 on the device.
    for model in ["vae", "gan", "gpt"] {
        train(
            &s,
            model,
            model,
            &["--steps", "2", "--device", "cuda", "--precision", "bf16"],
        );
        let json = state(&s.path(model));
        assert_eq!(
            (
                json["step"].as_u64(),
                json["training"]["precision"].as_str()
            ),
            (Some(2), Some("bf16")),
            "{model}"
        );
    }
}

#[test]
fn tiny_runs_train_sample_and_generate_on_cuda_when_a_gpu_is_present() {
    if kiln::Device::cuda(0).is_err() {
        println!("skipped: no CUDA device");
        return;
    }
    let s = Scratch::new("cuda-runs");
    for model in ["vae", "gan", "gpt"] {
        train(&s, model, model, &["--steps", "2", "--device", "cuda"]);
        assert_eq!(state(&s.path(model))["step"], 2);
    }
    let grid = s.arg("grid.png");
    for model in ["vae", "gan"] {
        let run = s.arg(model);
        kiln_ok(&[
            "sample",
            model,
            "--checkpoint",
            &run,
            "--n",
            "4",
            "--out",
            &grid,
            "--device",
            "cuda",
        ]);
    }
    let run = s.arg("gpt");
    let printed = kiln_ok(&[
        "generate",
        "--checkpoint",
        &run,
        "--prompt",
        "To",
        "--max-new-tokens",
        "5",
        "--device",
        "cuda",
    ]);
    assert!(printed.starts_with("To"), "{printed}");
}

/// The numbers of metrics.csv by row, without the header and timing column.
fn metric_values(dir: &Path) -> Vec<Vec<f64>> {
    metrics_without_timing(dir)
        .iter()
        .skip(1)
        .map(|row| row.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// End to end on the CUDA path — the GPU where there is one, else the
/// emulator (KILN_CUDA=emulate for the runs): `kiln train vae --steps 20` and
/// `kiln train gpt --steps 5` at tiny sizes log the same losses as the same
/// runs on the CPU, step for step, within the parity suite's tolerance for a
/// training step.
#[test]
fn training_on_cuda_logs_the_same_losses_as_on_the_cpu() {
    let env: &[(&str, &str)] = if kiln::Device::cuda(0).is_ok() {
        &[]
    } else {
        &[("KILN_CUDA", "emulate")]
    };
    let s = Scratch::new("cuda-parity");
    for (model, steps) in [("vae", "20"), ("gpt", "5")] {
        let run = |device: &str| {
            let out = format!("{model}-{device}");
            let extra = ["--steps", steps, "--device", device];
            let output = train_with_env(&s, model, &out, &extra, env);
            assert!(
                output.status.success(),
                "kiln train {model} {extra:?} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            println!("{}", stdout.lines().next().unwrap_or_default());
            metric_values(&s.path(&out))
        };
        let (cpu, cuda) = (run("cpu"), run("cuda"));
        assert_eq!(
            cpu.len(),
            steps.parse::<usize>().unwrap(),
            "{model}: one row a step"
        );
        assert_eq!(cpu.len(), cuda.len(), "{model}: rows");
        let mut worst = 0f64;
        for (step, (c, g)) in cpu.iter().zip(&cuda).enumerate() {
            for (column, (a, b)) in c.iter().zip(g).enumerate() {
                let error = (a - b).abs() / (1.0 + a.abs());
                assert!(
                    error <= 1e-4,
                    "{model} step {step} column {column}: cpu {a} vs cuda {b}"
                );
                worst = worst.max(error);
            }
        }
        println!(
            "{model}: {} steps, worst relative loss difference {worst:.2e}",
            cpu.len()
        );
    }
}

#[test]
fn the_emulator_without_a_cxx_compiler_is_a_clear_error() {
    let s = Scratch::new("no-compiler");
    let cache = s.arg("cache");
    let env = [
        ("KILN_CUDA", "emulate"),
        ("KILN_CXX", "/nonexistent/c++"),
        ("KILN_CACHE_DIR", cache.as_str()),
    ];
    let output = train_with_env(
        &s,
        "vae",
        "run",
        &["--steps", "1", "--device", "cuda"],
        &env,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("KILN_CXX"),
        "{stderr}"
    );
    assert!(!s.path("run/checkpoint.safetensors").exists());
}

#[test]
fn an_unknown_cuda_backend_or_emulator_setting_is_a_clear_error() {
    let s = Scratch::new("backend");
    let cases: [(&[(&str, &str)], &str); 6] = [
        (
            &[("KILN_CUDA", "emulated")],
            "KILN_CUDA=emulated is not a backend",
        ),
        (
            &[
                ("KILN_CUDA", "emulate"),
                ("KILN_CUDA_EMULATE_ORDER", "sideways"),
            ],
            "KILN_CUDA_EMULATE_ORDER=sideways is not an order",
        ),
        (
            &[
                ("KILN_CUDA", "emulate"),
                ("KILN_CUDA_EMULATE_GUARD", "middle"),
            ],
            "KILN_CUDA_EMULATE_GUARD=middle is not a placement",
        ),
        (
            &[
                ("KILN_CUDA", "emulate"),
                ("KILN_CUDA_EMULATE_ARCH", "sm_70"),
            ],
            "KILN_CUDA_EMULATE_ARCH=sm_70 is not emulated",
        ),
        (
            &[
                ("KILN_CUDA", "emulate"),
                ("KILN_CUDA_EMULATE_RACECHECK", "yes"),
            ],
            "KILN_CUDA_EMULATE_RACECHECK=yes is not a switch",
        ),
        (
            &[
                ("KILN_CUDA", "emulate"),
                ("KILN_CUDA_EMULATE_TIMEOUT", "-3"),
            ],
            "KILN_CUDA_EMULATE_TIMEOUT=-3 is not a time limit",
        ),
    ];
    for (env, expected) in cases {
        let output = train_with_env(&s, "vae", "run", &["--steps", "1", "--device", "cuda"], env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{env:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{env:?}: {stderr}"
        );
        assert!(!s.path("run").exists(), "{env:?}");
    }
}

/// Keeping freed memory for reuse (kiln::host_memory) changes where tensors
/// live, never what they hold: the checkpoints of runs with and without it
/// are identical.
#[test]
fn training_results_do_not_depend_on_host_memory_reuse() {
    let s = Scratch::new("memory-reuse");
    for (out, setting) in [("kept", "1"), ("returned", "0")] {
        let env = [("KILN_KEEP_FREED_MEMORY", setting)];
        let output = train_with_env(&s, "gpt", out, &["--steps", "3"], &env);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        checkpoint_values(&s.path("kept")),
        checkpoint_values(&s.path("returned"))
    );
}

#[test]
fn threads_flag_sets_the_cpu_thread_count_and_zero_is_an_error() {
    let s = Scratch::new("threads");
    let printed = train(&s, "vae", "one", &["--steps", "1", "--threads", "1"]);
    assert!(printed.contains("on cpu (1 thread)"), "{printed}");
    let printed = train(&s, "vae", "two", &["--steps", "1", "--threads", "2"]);
    assert!(printed.contains("on cpu (2 threads)"), "{printed}");
    assert_eq!(
        checkpoint_values(&s.path("one")),
        checkpoint_values(&s.path("two")),
        "the thread count changes no result"
    );
    train_fails(
        &s,
        "vae",
        "zero",
        &["--threads", "0"],
        &["--threads 0", "at least 1"],
    );
}
