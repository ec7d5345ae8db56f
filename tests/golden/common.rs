//! Loading the PyTorch golden files written by `tests/golden/gen.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use kiln::Tensor;
use safetensors::{Dtype, SafeTensors};

/// One golden case: its tensors by name and its hyper-parameters.
pub struct Golden {
    pub case: String,
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Golden {
    pub fn load(case: &str) -> Golden {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/data")
            .join(format!("{case}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, metadata) = SafeTensors::read_metadata(&bytes).expect("valid safetensors header");
        let meta = metadata.metadata().clone().unwrap_or_default();
        let file = SafeTensors::deserialize(&bytes).expect("valid safetensors file");
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let tensor = match view.dtype() {
                Dtype::F32 => {
                    let values = data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    Tensor::from_vec::<f32>(values, shape).unwrap()
                }
                // PyTorch indices are int64; kiln's are u32.
                Dtype::I64 => {
                    let values = data
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                        .collect();
                    Tensor::from_indices(values, shape).unwrap()
                }
                other => panic!("{case}: unexpected dtype {other:?} for {name}"),
            };
            tensors.insert(name, tensor);
        }
        Golden {
            case: case.to_string(),
            tensors,
            meta,
        }
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.case))
            .clone()
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn meta(&self, key: &str) -> &str {
        self.meta
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata {key}", self.case))
    }

    pub fn meta_f64(&self, key: &str) -> f64 {
        self.meta(key).parse().unwrap()
    }

    /// A "a,b" metadata pair.
    pub fn meta_pair(&self, key: &str) -> [usize; 2] {
        let v: Vec<usize> = self
            .meta(key)
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        [v[0], v[1]]
    }

    /// Asserts `actual` matches the golden tensor `name` to 1e-5 relative:
    /// |a − e| ≤ 1e-5 · (|e| + max|e|) — relative to each value, with the
    /// tensor's own scale as the floor so values near zero are not over-judged.
    pub fn assert_close(&self, name: &str, actual: &Tensor) {
        assert_close_to(
            &format!("{}.{name}", self.case),
            actual,
            &self.tensor(name),
            1e-5,
        );
    }
}

pub fn assert_close_to(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let a = actual.to_f64_vec();
    let e = expected.to_f64_vec();
    let scale = e.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let tol = rtol * (y.abs() + scale);
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: kiln {x} vs PyTorch {y} (tolerance {tol:e})"
        );
    }
}
