//! Golden tests: kiln's forward outputs and gradients against PyTorch's, from
//! the committed files of `tests/golden/gen.py`.

mod common;

mod activation;
mod attention;
mod conv;
mod embedding;
mod image_folder;
mod loss;
mod misc;
mod norm;
mod optim;
mod state_dict;
