//! Sample quality measured by kiln's own Fashion-MNIST classifier: the
//! classifier-feature FID is 0 for a set against itself and grows with the
//! noise added to the images, the classifier learns (on the fetched data),
//! and `kiln eval gan|vae|classifier` print their scores on tiny synthetic
//! runs and fail clearly on bad input.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::cli::quality::gan_to_classifier_images;
use kiln::data::idx::{ImageSet, Split, load_split};
use kiln::models::classifier::{self, Classifier, ClassifierConfig};
use kiln::models::quality::{FeatureStats, frechet_distance};
use kiln::nn::{Init, Module};
use kiln::{DType, Device, MixedPrecision, Precision, Rng, Tensor, no_grad};

/// A random-weight classifier: its features are fixed random functions of
/// the image, enough for the FID's properties.
fn random_classifier(seed: u64) -> Classifier {
    let mut rng = Rng::seed(seed);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let config = ClassifierConfig {
        width: 4,
        features: 16,
        classes: 10,
    };
    let classifier = Classifier::new(&config, &mut init).unwrap();
    classifier.eval();
    classifier
}

/// `count` synthetic 28×28 images in [0, 1]: a bright rectangle whose
/// place, size and brightness vary from image to image.
fn synthetic_images(count: usize) -> Tensor {
    let mut pixels = vec![0f32; count * 28 * 28];
    for (i, image) in pixels.chunks_mut(28 * 28).enumerate() {
        let (top, left) = ((i * 7) % 13, (i * 5) % 11);
        let (height, width) = (6 + i % 9, 8 + (i * 3) % 7);
        for r in top..top + height {
            for c in left..left + width {
                image[r * 28 + c] = 0.3 + 0.7 * ((i * 13 + r * 5 + c) % 17) as f32 / 17.0;
            }
        }
    }
    Tensor::from_vec(pixels, [count, 1, 28, 28]).unwrap()
}

fn stats(classifier: &Classifier, images: &Tensor) -> FeatureStats {
    let _no_grad = no_grad();
    let features = classifier.features(images).unwrap();
    FeatureStats::from_rows(&features.to_vec::<f32>().unwrap(), 16).unwrap()
}

#[test]
fn fid_of_a_set_against_itself_is_zero_and_rises_with_the_noise_added() {
    let classifier = random_classifier(1);
    let images = synthetic_images(400);
    let reference = stats(&classifier, &images);
    let scale: f64 = (0..16).map(|i| reference.covariance[i * 16 + i]).sum();
    assert!(scale > 0.0, "the features vary");
    let itself = frechet_distance(&reference, &reference).unwrap();
    assert!(
        itself <= 1e-6 * scale,
        "FID against itself {itself} (trace of Σ {scale})"
    );

    let mut rng = Rng::seed(7);
    let mut previous = itself;
    for std in [0.05, 0.1, 0.2, 0.4, 0.8] {
        let noise = Tensor::randn(images.shape().clone(), DType::F32, Device::Cpu, &mut rng)
            .unwrap()
            .mul_scalar(std)
            .unwrap();
        let noisy = images.add(&noise).unwrap();
        let fid = frechet_distance(&stats(&classifier, &noisy), &reference).unwrap();
        assert!(
            fid > previous,
            "noise std {std}: FID {fid} should exceed {previous} (the FID at the smaller noise)"
        );
        previous = fid;
    }
}

#[test]
fn gan_images_convert_back_to_the_classifiers_images_exactly() {
    // Real images as the GAN trains on them (32×32 padded, in [−1, 1])
    // become the classifier's (28×28 in [0, 1]) again.
    let count = 3;
    let mut pixels = Vec::new();
    for i in 0..count * 28 * 28 {
        pixels.push(((i * 37) % 256) as u8);
    }
    let set = ImageSet {
        images: pixels,
        labels: vec![0; count],
        count,
        channels: 1,
        rows: 28,
        cols: 28,
    };
    let indices: Vec<usize> = (0..count).collect();
    let as_gan = set.batch(&indices, 32, -1.0, 1.0).unwrap();
    let expected = set.batch(&indices, 28, 0.0, 1.0).unwrap();
    let converted = gan_to_classifier_images(&as_gan).unwrap();
    assert_eq!(converted.dims(), &[count, 1, 28, 28]);
    let (got, want) = (
        converted.to_vec::<f32>().unwrap(),
        expected.to_vec::<f32>().unwrap(),
    );
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "largest difference {worst}");
}

/// The fetched Fashion-MNIST directory, or None (the test is then skipped).
fn fetched_fashion_mnist() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist");
    if dir.exists() {
        Some(dir)
    } else {
        println!("skipped: data/fashion-mnist is absent (run scripts/fetch-data.sh to fetch it)");
        None
    }
}

fn batch(set: &ImageSet, indices: &[usize]) -> (Tensor, Tensor) {
    let x = set.batch(indices, 28, 0.0, 1.0).unwrap();
    let labels = indices.iter().map(|&i| set.labels[i] as u32).collect();
    (x, Tensor::from_indices(labels, [indices.len()]).unwrap())
}

#[test]
fn a_briefly_trained_classifier_is_far_above_chance_on_held_out_images() {
    let Some(dir) = fetched_fashion_mnist() else {
        return;
    };
    let train = load_split(&dir, Split::Train).unwrap();
    let test = load_split(&dir, Split::Test).unwrap();
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let config = ClassifierConfig {
        width: 8,
        features: 32,
        classes: 10,
    };
    let model = Classifier::new(&config, &mut init).unwrap();
    let mut optimizer = classifier::optimizer(&model, 2e-3).unwrap();
    let mut amp = MixedPrecision::new(Precision::F32);
    // Two passes over the first 3000 training images, in batches of 50.
    for _epoch in 0..2 {
        for start in (0..3000).step_by(50) {
            let indices: Vec<usize> = (start..start + 50).collect();
            let (x, y) = batch(&train, &indices);
            classifier::train_step(&model, &mut optimizer, &x, &y, &mut amp).unwrap();
        }
    }
    model.eval();
    let _no_grad = no_grad();
    let indices: Vec<usize> = (0..1000).collect();
    let (x, y) = batch(&test, &indices);
    let logits = model.forward(&x).unwrap();
    let correct = classifier::correct_predictions(&logits, &y).unwrap();
    println!("{correct} of 1000 held-out images classified right");
    // Chance is 10%; this little training reaches about 75–80%.
    assert!(
        correct >= 600,
        "{correct} of 1000 held-out images classified right"
    );
}

// ----- the command line on tiny synthetic data ---------------------------------

/// A scratch directory with `data/fashion-mnist/` (40 train, 12 test
/// synthetic images, labels 0..9 in turn); removed on drop.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "kiln-quality-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        let images = root.join("data/fashion-mnist");
        fs::create_dir_all(&images).unwrap();
        for (prefix, count) in [("train", 40), ("t10k", 12)] {
            let pixels = synthetic_images(count).to_vec::<f32>().unwrap();
            let bytes: Vec<u8> = pixels.iter().map(|p| (p * 255.0) as u8).collect();
            write_idx(
                &images.join(format!("{prefix}-images-idx3-ubyte")),
                &[count as u32, 28, 28],
                &bytes,
            );
            let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            write_idx(
                &images.join(format!("{prefix}-labels-idx1-ubyte")),
                &[count as u32],
                &labels,
            );
        }
        Scratch { root }
    }

    fn arg(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// `kiln train MODEL --data ... --out NAME` with tiny sizes, 3 steps
    /// unless `extra` says --steps.
    fn train(&self, model: &str, out: &str, extra: &[&str]) {
        let (data, out) = (self.arg("data"), self.arg(out));
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
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn kiln_ok(args: &[&str]) -> String {
    let output = kiln(args);
    assert!(
        output.status.success(),
        "kiln {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Requires exit code 1 and one `error: ...` line holding every `expected`.
fn kiln_fails(args: &[&str], expected: &[&str]) {
    let output = kiln(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "kiln {args:?}: {stderr}");
    let line = stderr.trim_end();
    assert!(
        line.starts_with("error: ") && !line.contains('\n'),
        "expected one error line, got:\n{stderr}"
    );
    for text in expected {
        assert!(line.contains(text), "`{text}` missing from: {line}");
    }
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
    scratch.train("classifier", "classifier", &[]);
    scratch.train("gan", "gan", &[]);
    scratch.train("vae", "vae", &[]);
    let (data, classifier) = (scratch.arg("data"), scratch.arg("classifier"));
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
    scratch.train("classifier", "straight", &["--steps", "6"]);
    scratch.train("classifier", "resumed", &[]);
    scratch.train("classifier", "resumed", &["--steps", "6", "--resume"]);
    let read = |run: &str| fs::read(scratch.root.join(run).join("checkpoint.safetensors")).unwrap();
    assert!(
        read("straight") == read("resumed"),
        "the checkpoints of the straight and the resumed run differ"
    );
    let metrics = |run: &str| -> Vec<String> {
        fs::read_to_string(scratch.root.join(run).join("metrics.csv"))
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
    scratch.train("gan", "gan", &[]);
    scratch.train("vae", "vae", &[]);
    scratch.train("classifier", "classifier", &[]);
    let (data, gan, vae) = (scratch.arg("data"), scratch.arg("gan"), scratch.arg("vae"));
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
        scratch.root.join("data/fashion-mnist"),
        scratch.root.join("data/mnist"),
    );
    fs::create_dir_all(&mnist).unwrap();
    for entry in fs::read_dir(&fashion).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, mnist.join(path.file_name().unwrap())).unwrap();
    }
    scratch.train("classifier", "fashion-judge", &[]);
    scratch.train("classifier", "mnist-judge", &["--dataset", "mnist"]);
    scratch.train("gan", "gan", &["--dataset", "mnist"]);
    let (data, gan) = (scratch.arg("data"), scratch.arg("gan"));
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
