//! Embedding with a padding_idx on CUDA against the CPU: the same rows, and
//! the same scatter-added gradient with the padding row exactly zero.
//! Tolerance atol 1e-5 + rtol 1e-5: repeated ids add with atomics, in an
//! order that varies.

use kiln::Tensor;

use crate::common::{check_op, cuda_or_skip, randn};

#[test]
fn embedding_with_padding_idx_matches_cpu() {
    let Some(dev) = cuda_or_skip("embedding_padding_idx") else {
        return;
    };
    // 65 ids over 37 rows (k·7 + 3 mod 37): rows 3 and 10 are named twice.
    let ids: Vec<u32> = (0..65).map(|k| ((k * 7 + 3) % 37) as u32).collect();
    let ids = Tensor::from_indices(ids, [5, 13]).unwrap();
    let weight = randn(&[37, 129], 91);
    for (padding_idx, row) in [(3, 3), (-27, 10)] {
        let run = |t: &[Tensor]| Tensor::embedding_with(&t[1], &t[0], Some(padding_idx));
        let what = format!("embedding padding_idx {padding_idx}");
        check_op(&what, dev, &[weight.clone(), ids.clone()], run, 1e-5, 1e-5);
        let leaf = weight.to_device(dev).unwrap().requires_grad_();
        let out = run(&[leaf.clone(), ids.to_device(dev).unwrap()]).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(&leaf).unwrap().to_f64_vec();
        assert!(
            grad[row * 129..(row + 1) * 129].iter().all(|&g| g == 0.0),
            "{what}: row {row} got a gradient"
        );
        assert_eq!(
            grad[(row + 1) * 129],
            2.0,
            "{what}: the next row was named twice"
        );
    }
}
