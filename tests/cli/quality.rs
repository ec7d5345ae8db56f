//! `kiln train classifier` and `kiln eval gan|vae|classifier` on tiny
//! synthetic runs: the scores print within their ranges and are seeded, a
//! resumed classifier run matches a straight one, a classifier judges only
//! its own dataset, and bad arguments are clear errors.

use std::fs;

use crate::common::*;

/// `kiln train MODEL --data ... --out NAME` with tiny sizes for the
/// quality tests, 3 steps unless `extra` says --steps.
fn train_tiny(scratch: &Scratch, model: &str, out: &str, extra: &[&str]) {
    let (data, out) = (scratch.data().display().to_string(), scratch.arg(out));
    let mut args = vec!["train", model, "--data", &data, "--out", &out];
    args.extend_from_slice(match model {
        "gan" => &["--nz", "4", "--ngf", "4", "--ndf", "4", "--batch-size", "4"],
        "vae" => &["--hidden", "8", "--latent", "2", "--batch-size", "4"],
        "classifier" => &["--width", "2", "--features", "6", "--batch-size", "8"],
        _ => unreachable!(),
    });
    args.extend_from_slice(&["--limit", "16"]);
    if !extra.contains(&"--steps") {
        args.extend_from_slice(&["--steps", "3"]);
    }
    args.extend_from_slice(extra);
    kiln_ok(&args);
}

/// The number after `label: ` on the line starting with `label`.
fn value(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{stdout}"));
    line[label.len() + 2..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("no number in `{line}`"))
}

/// The three scores, each finite and within its range.
fn check_scores(stdout: &str, samples: &str) {
    let fid = value(stdout, "classifier-feature FID");
    let coverage = value(stdout, "class-histogram entropy");
    let sharpness = value(stdout, "mean prediction entropy");
    assert!(fid.is_finite() && fid >= 0.0, "{stdout}");
    let ln10 = 10f64.ln() + 1e-4;
    assert!((0.0..=ln10).contains(&coverage), "{stdout}");
    assert!((0.0..=ln10).contains(&sharpness), "{stdout}");
    assert!(stdout.contains(samples), "{stdout}");
}

#[test]
fn eval_prints_the_scores_of_gan_and_vae_samples_and_the_classifiers_floor() {
    let scratch = Scratch::new("eval");
    train_tiny(&scratch, "classifier", "classifier", &[]);
    train_tiny(&scratch, "gan", "gan", &[]);
    train_tiny(&scratch, "vae", "vae", &[]);
    let (data, classifier) = (
        scratch.data().display().to_string(),
        scratch.arg("classifier"),
    );
    let common = ["--data", &data, "--n", "30"];

    let mut args = vec!["eval", "gan", "--checkpoint"];
    let gan = scratch.arg("gan");
    args.extend([gan.as_str(), "--classifier", &classifier]);
    args.extend(common);
    let stdout = kiln_ok(&args);
    check_scores(&stdout, "30 generated images vs 12 test images");
    // Seeded: the same command prints the same numbers.
    assert_eq!(kiln_ok(&args), stdout);

    let vae = scratch.arg("vae");
    let mut args = vec![
        "eval",
        "vae",
        "--checkpoint",
        &vae,
        "--classifier",
        &classifier,
    ];
    args.extend(common);
    let stdout = kiln_ok(&args);
    assert!(stdout.contains("test negative ELBO"), "{stdout}");
    check_scores(&stdout, "30 decoded prior samples vs 12 test images");

    let mut args = vec!["eval", "classifier", "--checkpoint", &classifier];
    args.extend(common);
    let stdout = kiln_ok(&args);
    let accuracy = value(&stdout, "test accuracy");
    assert!((0.0..=100.0).contains(&accuracy), "{stdout}");
    assert!(stdout.contains("of 12 test images"), "{stdout}");
    check_scores(&stdout, "30 training images (the floor) vs 12 test images");
}

#[test]
fn a_resumed_classifier_run_matches_a_straight_one_bit_for_bit() {
    let scratch = Scratch::new("resume");
    train_tiny(&scratch, "classifier", "straight", &["--steps", "6"]);
    train_tiny(&scratch, "classifier", "resumed", &[]);
    train_tiny(
        &scratch,
        "classifier",
        "resumed",
        &["--steps", "6", "--resume"],
    );
    let read = |run: &str| fs::read(scratch.path(run).join("checkpoint.safetensors")).unwrap();
    assert!(
        read("straight") == read("resumed"),
        "the checkpoints of the straight and the resumed run differ"
    );
    let metrics = |run: &str| -> Vec<String> {
        fs::read_to_string(scratch.path(run).join("metrics.csv"))
            .unwrap()
            .lines()
            // The last column is the measured speed.
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(metrics("straight"), metrics("resumed"));
}

#[test]
fn bad_classifier_arguments_are_clear_errors() {
    let scratch = Scratch::new("errors");
    train_tiny(&scratch, "gan", "gan", &[]);
    train_tiny(&scratch, "vae", "vae", &[]);
    train_tiny(&scratch, "classifier", "classifier", &[]);
    let (data, gan, vae) = (
        scratch.data().display().to_string(),
        scratch.arg("gan"),
        scratch.arg("vae"),
    );
    let missing = scratch.arg("no-such-run");
    let classifier = scratch.arg("classifier");
    let eval_gan = |extra: &[&str], expected: &[&str]| {
        let mut args = vec!["eval", "gan", "--checkpoint", &gan, "--data", &data];
        args.extend_from_slice(extra);
        kiln_fails(&args, expected);
    };
    eval_gan(
        &[],
        &["kiln eval gan needs --classifier", "kiln train classifier"],
    );
    eval_gan(
        &["--classifier", &missing],
        &["--classifier", "no-such-run", "kiln train classifier"],
    );
    eval_gan(
        &["--classifier", &vae],
        &["is a vae checkpoint, not a classifier one"],
    );
    eval_gan(
        &["--classifier", &classifier, "--n", "1"],
        &["--n 1", "at least 2"],
    );
    // A classifier where the generator belongs.
    kiln_fails(
        &[
            "eval",
            "gan",
            "--checkpoint",
            &classifier,
            "--classifier",
            &classifier,
        ],
        &["is a classifier checkpoint, not a gan one"],
    );
    kiln_fails(
        &[
            "eval",
            "gpt",
            "--checkpoint",
            &gan,
            "--classifier",
            &classifier,
        ],
        &["--classifier scores images"],
    );
}

#[test]
fn a_classifier_scores_only_models_of_its_own_dataset() {
    let scratch = Scratch::new("datasets");
    // The same synthetic IDX files serve as MNIST too.
    let (fashion, mnist) = (
        scratch.data().join("fashion-mnist"),
        scratch.data().join("mnist"),
    );
    fs::create_dir_all(&mnist).unwrap();
    for entry in fs::read_dir(&fashion).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, mnist.join(path.file_name().unwrap())).unwrap();
    }
    train_tiny(&scratch, "classifier", "fashion-judge", &[]);
    train_tiny(
        &scratch,
        "classifier",
        "mnist-judge",
        &["--dataset", "mnist"],
    );
    train_tiny(&scratch, "gan", "gan", &["--dataset", "mnist"]);
    let (data, gan) = (scratch.data().display().to_string(), scratch.arg("gan"));
    let eval = |judge: &str| {
        let judge = scratch.arg(judge);
        let args = [
            "eval",
            "gan",
            "--checkpoint",
            &gan,
            "--classifier",
            &judge,
            "--data",
            &data,
            "--n",
            "10",
        ];
        args.map(str::to_string)
    };
    let args = eval("fashion-judge");
    kiln_fails(
        &args.each_ref().map(String::as_str),
        &[
            "the GAN was trained on mnist but the classifier on fashion-mnist",
            "kiln train classifier --dataset mnist",
        ],
    );
    let args = eval("mnist-judge");
    let stdout = kiln_ok(&args.each_ref().map(String::as_str));
    check_scores(&stdout, "10 generated images vs 12 test images");
}
