//! Which images `kiln train gan|vae|classifier` read, where they live, and
//! how a run records them so that `--resume` and `kiln eval` find them again.
//!
//! - `fashion-mnist` and `mnist`: the IDX files in `DATA/fashion-mnist/` and
//!   `DATA/mnist/` (train and t10k splits, 28×28 grey, labelled);
//! - `folder`: every PNG/JPEG under a folder (`kiln::data::folder`),
//!   resized and centre-cropped to the model's side, unlabelled, no test split.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::args::{DatasetArg, TrainArgs};
use super::budget::human_bytes;
use super::progress::Progress;
use super::run_dir::TrainingConfig;
use crate::data::folder::ImageFolder;
use crate::data::idx::{ImageSet, Split, load_split};

/// The data directory when `--data` is not given.
pub const DEFAULT_DATA_DIR: &str = "data";

/// Side of the images in the IDX sets.
const IDX_IMAGE_SIZE: usize = 28;

/// Why `scripts/fetch-data.sh` cannot fetch MNIST, and what to do instead.
const MNIST_HINT: &str = "no Debian or PyPI package ships the MNIST digits, so scripts/fetch-data.sh \
     cannot fetch them: put the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, \
     t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz, as published with MNIST) in";

/// An image dataset and where it lives.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSource {
    pub dataset: DatasetArg,
    /// IDX sets: the data directory holding `fashion-mnist/` or `mnist/`;
    /// a folder: the image folder itself.
    pub path: PathBuf,
}

impl ImageSource {
    /// The images of a training run: the flags, checked against (or filled
    /// from) the resumed run's record.
    pub fn for_training(args: &TrainArgs, saved: Option<&TrainingConfig>) -> Result<ImageSource> {
        let saved_dataset = saved.map(recorded_dataset).transpose()?;
        let dataset = super::train::setting(
            "dataset",
            args.images.dataset,
            saved_dataset,
            DatasetArg::FashionMnist,
        )?;
        let path = match dataset {
            DatasetArg::Folder => args
                .data
                .clone()
                .or_else(|| saved.and_then(|t| t.image_folder.as_ref().map(PathBuf::from)))
                .context("--dataset folder reads the images under --data FOLDER; add --data with the folder of PNG/JPEG files")?,
            _ => data_dir(args.data.as_deref()),
        };
        Ok(ImageSource { dataset, path })
    }

    /// The images a finished run was trained on, for `kiln eval`: the
    /// recorded dataset under `data` (IDX sets), or the folder `data`.
    pub fn of_run(training: &TrainingConfig, data: Option<&Path>) -> Result<ImageSource> {
        let dataset = recorded_dataset(training)?;
        let path = match dataset {
            DatasetArg::Folder => data.map(Path::to_path_buf).context(
                "the model was trained on an image folder, which has no test split; \
                 pass --data with a folder of held-out PNG/JPEG images",
            )?,
            _ => data_dir(data),
        };
        Ok(ImageSource { dataset, path })
    }

    /// What a run records: the dataset's name, and the folder if it is one.
    pub fn record(&self) -> (Option<String>, Option<String>) {
        let folder =
            (self.dataset == DatasetArg::Folder).then(|| self.path.to_string_lossy().into_owned());
        (Some(self.dataset.name().to_string()), folder)
    }

    /// Images of `size × size` pixels with `channels` channels: a folder
    /// decoded to that size, or an IDX split (grey 28×28, which the caller
    /// pads to `size`; `size` must be at least 28 and `channels` 1).
    pub fn load(&self, split: Split, size: usize, channels: usize) -> Result<ImageSet> {
        match self.dataset {
            DatasetArg::Folder => load_folder(&self.path, size, channels),
            _ => {
                if channels != 1 {
                    bail!(
                        "{} is grey: --channels {channels} needs --dataset folder (a folder of colour images)",
                        self.dataset
                    );
                }
                if size < IDX_IMAGE_SIZE {
                    bail!(
                        "{}'s images are {IDX_IMAGE_SIZE}x{IDX_IMAGE_SIZE}; an image size of {size} would crop them",
                        self.dataset
                    );
                }
                self.load_idx(split)
            }
        }
    }

    /// One labelled split of an IDX set (a folder has neither splits nor labels).
    pub fn load_idx(&self, split: Split) -> Result<ImageSet> {
        let name = self.dataset.name();
        if self.dataset == DatasetArg::Folder {
            bail!(
                "an image folder has no labels or splits; this needs --dataset fashion-mnist or mnist"
            );
        }
        let dir = self.path.join(name);
        let loaded = load_split(&dir, split);
        match (&loaded, self.dataset) {
            (Err(crate::Error::Io(e)), DatasetArg::Mnist)
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                bail!(
                    "{} has no MNIST files; {MNIST_HINT} {}",
                    dir.display(),
                    dir.display()
                )
            }
            _ => loaded.with_context(|| format!("loading {name} from {}", dir.display())),
        }
    }
}

/// `--data`, or the default data directory.
pub fn data_dir(data: Option<&Path>) -> PathBuf {
    data.map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), Path::to_path_buf)
}

/// The dataset a run recorded (runs from before the choice: Fashion-MNIST).
pub fn recorded_dataset(training: &TrainingConfig) -> Result<DatasetArg> {
    match training.dataset.as_deref() {
        None => Ok(DatasetArg::FashionMnist),
        Some(name) => DatasetArg::from_name(name)
            .with_context(|| format!("the checkpoint names an unknown dataset {name:?}")),
    }
}

/// Decodes a folder's images with a progress bar, saying first how much
/// memory the decoded set takes.
fn load_folder(root: &Path, size: usize, channels: usize) -> Result<ImageSet> {
    let folder = ImageFolder::scan(root)?;
    let bytes = folder.decoded_bytes(size, channels);
    println!(
        "decoding {} images under {} to {size}x{size}x{channels} ({} in memory)",
        folder.len(),
        root.display(),
        human_bytes(bytes as u64)
    );
    let progress = Progress::new(folder.len(), 0);
    let set = folder.load(size, channels, &|| progress.advance(1));
    progress.finish();
    Ok(set?)
}
