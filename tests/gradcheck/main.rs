//! gradcheck: every differentiable op's backward() against central finite
//! differences in f64, on shapes and values drawn by proptest (odd sizes and
//! size-1 dims included).

mod attention;
mod common;
mod conv;
mod core;
mod embedding;
mod loss;
mod misc;
mod norm;
