//! `--dataset fashion-mnist|mnist|folder`, `--image-size` and `--channels`:
//! a GAN trains on a folder of PNG and JPEG files of mixed sizes in colour,
//! records the folder and resumes from it bit for bit; MNIST is read from
//! `data/mnist/`, and its absence says where to put it; every misuse is one
//! clear error line.

use std::fs;
use std::path::Path;

use crate::common::*;

/// `count` RGB pictures of mixed sizes and formats in a nested layout
/// (`a/`, `b/deeper/`), plus a text file that is not an image.
fn write_image_folder(root: &Path, count: usize) {
    for i in 0..count {
        let dir = root.join(if i % 2 == 0 { "a" } else { "b/deeper" });
        fs::create_dir_all(&dir).unwrap();
        let (width, height) = (18 + 3 * i as u32, 22 + 5 * (i as u32 % 3));
        let picture = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 7) as u8, (i * 25) as u8])
        });
        let name = if i % 3 == 0 {
            format!("{i}.jpg")
        } else {
            format!("{i}.png")
        };
        picture.save(dir.join(name)).unwrap();
    }
    fs::write(root.join("notes.txt"), "not an image").unwrap();
}

/// `kiln train gan` on the folder `folder` at 16×16 RGB with tiny sizes.
fn train_gan_on_folder(folder: &str, out: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "gan",
        "--dataset",
        "folder",
        "--data",
        folder,
        "--image-size",
        "16",
        "--channels",
        "3",
        "--out",
        out,
        "--nz",
        "4",
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--batch-size",
        "4",
    ];
    args.extend_from_slice(extra);
    kiln_ok(&args)
}

#[test]
fn a_gan_trains_on_an_rgb_image_folder_records_it_samples_it_and_resumes_bit_for_bit() {
    let scratch = Scratch::new("folder-gan");
    let folder = scratch.path("pictures");
    write_image_folder(&folder, 10);
    let (folder, straight, resumed) = (
        scratch.arg("pictures"),
        scratch.arg("straight"),
        scratch.arg("resumed"),
    );
    let stdout = train_gan_on_folder(&folder, &straight, &["--steps", "4"]);
    assert!(
        stdout.contains("decoding 10 images") && stdout.contains("16x16x3"),
        "{stdout}"
    );
    let saved = state(&scratch.path("straight"));
    assert_eq!(saved["training"]["dataset"], "folder");
    assert_eq!(saved["training"]["image_folder"], folder.as_str());
    assert_eq!(saved["training"]["examples"], 10);
    assert_eq!(saved["config"]["image_size"], 16);
    assert_eq!(saved["config"]["channels"], 3);

    // The resumed run finds the folder in its checkpoint: no --data.
    train_gan_on_folder(&folder, &resumed, &["--steps", "2"]);
    kiln_ok(&[
        "train", "gan", "--out", &resumed, "--resume", "--steps", "4",
    ]);
    assert_eq!(
        checkpoint_values(&scratch.path("straight")),
        checkpoint_values(&scratch.path("resumed"))
    );

    let raw = scratch.arg("samples.safetensors");
    let grid = scratch.arg("samples.png");
    kiln_ok(&[
        "sample",
        "gan",
        "--checkpoint",
        &straight,
        "--n",
        "3",
        "--out",
        &grid,
        "--raw",
        &raw,
    ]);
    let samples = kiln::checkpoint::load(Path::new(&raw)).unwrap();
    assert_eq!(samples.tensors["samples"].dims(), [3, 3, 16, 16]);
}

#[test]
fn a_vae_trains_on_a_grey_folder_and_is_evaluated_on_a_held_out_one() {
    let scratch = Scratch::new("folder-vae");
    write_image_folder(&scratch.path("train"), 8);
    write_image_folder(&scratch.path("held-out"), 4);
    let (train, held_out, run) = (
        scratch.arg("train"),
        scratch.arg("held-out"),
        scratch.arg("run"),
    );
    kiln_ok(&[
        "train",
        "vae",
        "--dataset",
        "folder",
        "--data",
        &train,
        "--image-size",
        "12",
        "--out",
        &run,
        "--hidden",
        "8",
        "--latent",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "2",
    ]);
    assert_eq!(state(&scratch.path("run"))["config"]["input"], 144);
    let stdout = kiln_ok(&["eval", "vae", "--checkpoint", &run, "--data", &held_out]);
    assert!(stdout.contains("over 4 held-out images"), "{stdout}");
    kiln_fails(
        &["eval", "vae", "--checkpoint", &run],
        &["image folder", "no test split", "--data"],
    );
}

#[test]
fn mnist_comes_from_data_mnist_and_its_absence_says_where_to_put_the_files() {
    let scratch = Scratch::new("mnist");
    train_fails(
        &scratch,
        "vae",
        "run",
        &["--dataset", "mnist"],
        &[
            "mnist",
            "no Debian or PyPI package ships the MNIST digits",
            "train-images-idx3-ubyte",
        ],
    );
    // The same IDX files under mnist/ are read as MNIST and recorded so.
    let mnist = scratch.data().join("mnist");
    fs::create_dir_all(&mnist).unwrap();
    for entry in fs::read_dir(scratch.data().join("fashion-mnist")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, mnist.join(path.file_name().unwrap())).unwrap();
    }
    train(
        &scratch,
        "vae",
        "run",
        &["--dataset", "mnist", "--steps", "2"],
    );
    let saved = state(&scratch.path("run"));
    assert_eq!(saved["training"]["dataset"], "mnist");
    assert!(saved["training"].get("image_folder").is_none());
    train_fails(
        &scratch,
        "vae",
        "run",
        &["--resume", "--dataset", "fashion-mnist"],
        &["--dataset fashion-mnist differs from the resumed run's mnist"],
    );
}

#[test]
fn image_dataset_misuse_is_one_clear_error() {
    let scratch = Scratch::new("dataset-errors");
    let folder = scratch.path("pictures");
    write_image_folder(&folder, 3);
    let folder_arg = scratch.arg("pictures");
    train_fails(
        &scratch,
        "gan",
        "run",
        &["--channels", "3"],
        &["fashion-mnist is grey", "--dataset folder"],
    );
    train_fails(
        &scratch,
        "gan",
        "run",
        &["--image-size", "48"],
        &["image_size must be a power of two", "48"],
    );
    train_fails(
        &scratch,
        "gpt",
        "run",
        &["--dataset", "mnist"],
        &["kiln train gpt reads the text"],
    );
    let out = scratch.arg("run");
    kiln_fails(
        &["train", "gan", "--dataset", "folder", "--out", &out],
        &["--dataset folder", "--data"],
    );
    kiln_fails(
        &[
            "train",
            "classifier",
            "--dataset",
            "folder",
            "--data",
            &folder_arg,
            "--out",
            &out,
        ],
        &["no labels"],
    );
    kiln_fails(
        &["train", "classifier", "--channels", "3", "--out", &out],
        &["--image-size and --channels are for gan and vae"],
    );

    let empty = scratch.path("empty/sub");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("readme.md"), "nothing to see").unwrap();
    let empty_arg = scratch.arg("empty");
    kiln_fails(
        &[
            "train",
            "gan",
            "--dataset",
            "folder",
            "--data",
            &empty_arg,
            "--out",
            &out,
        ],
        &["holds no PNG or JPEG image", "2 folder(s), 1 other file(s)"],
    );

    fs::write(folder.join("a/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    kiln_fails(
        &[
            "train",
            "gan",
            "--dataset",
            "folder",
            "--data",
            &folder_arg,
            "--out",
            &out,
        ],
        &[
            "broken.png",
            "cannot be decoded",
            "remove or replace the file",
        ],
    );
    assert!(!scratch.path("run").exists(), "a failed start wrote files");
}
