//! Sample quality measured by kiln's own Fashion-MNIST classifier: the
//! classifier-feature FID is 0 for a set against itself and grows with the
//! noise added to the images, and the classifier learns (on the fetched
//! data). The command line's scores are tested in `tests/cli/quality.rs`.

use std::path::{Path, PathBuf};

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
