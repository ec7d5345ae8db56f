//! CUDA parity: every op, forward and backward, on CUDA against the CPU
//! reference, with fresh random inputs, shapes that are not multiples of any
//! tile size, and new device buffers poisoned with NaN. Without a device each
//! test prints "skipped: no CUDA device".

mod common;

mod attention;
mod conv;
mod data;
mod elementwise;
mod embedding;
mod gemm;
mod loss;
mod models;
mod norm;
mod optim;
