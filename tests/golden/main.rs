//! Golden tests: kiln's forward outputs and gradients against PyTorch's, from
//! the committed files of `tests/golden/gen.py`.

mod common;

mod activation;
mod attention;
mod conv;
mod image_folder;
mod misc;
mod norm;
mod optim;
mod state_dict;
