//! Embedding with a padding_idx: the gradient of every other row against
//! finite differences, the padding row's gradient exactly zero, and the
//! errors for a padding_idx outside the table.

use kiln::{DType, Tensor};
use proptest::prelude::*;

use crate::common::{check, randn};

/// (vocabulary V, embedding dim E, padding row p, ids naming p at least twice).
fn padded_embedding_case() -> impl Strategy<Value = (usize, usize, usize, Vec<u32>)> {
    (2usize..=5, 1usize..=3, 2usize..=6).prop_flat_map(|(vocab, dim, count)| {
        let ids = prop::collection::vec(0..vocab as u32, count);
        (Just(vocab), Just(dim), 0..vocab, ids).prop_map(|(vocab, dim, padding, mut ids)| {
            ids[0] = padding as u32;
            ids[1] = padding as u32;
            (vocab, dim, padding, ids)
        })
    })
}

/// The rows of a [V, E] table with row `padding` taken from the constant
/// `padding_row` [1, E] and the others from the V − 1 rows of `rest`, in
/// order: the padding row then is no input of the check, whose finite
/// differences would see the forward's dependence on it.
fn table_with_constant_row(rest: &Tensor, padding_row: &Tensor, padding: usize) -> Tensor {
    let vocab = rest.dims()[0] + 1;
    let order: Vec<u32> = (0..vocab)
        .map(|row| match row {
            r if r < padding => r as u32,
            r if r == padding => (vocab - 1) as u32,
            r => (r - 1) as u32,
        })
        .collect();
    let stacked = Tensor::cat(&[rest, padding_row], 0).unwrap();
    stacked
        .index_select(0, &Tensor::from_indices(order, [vocab]).unwrap())
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn embedding_with_padding_idx_grads_of_the_other_rows(
        (vocab, dim, padding, ids) in padded_embedding_case(),
        negative in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let count = ids.len();
        let ids = Tensor::from_indices(ids, [count]).unwrap();
        // padding_idx − V names the same row from the end.
        let padding_idx = if negative { padding as isize - vocab as isize } else { padding as isize };
        let padding_row = randn(&[1, dim], seed ^ 1);
        check(
            |t| {
                let table = table_with_constant_row(&t[0], &padding_row, padding);
                Tensor::embedding_with(&ids, &table, Some(padding_idx))
            },
            &[randn(&[vocab - 1, dim], seed)],
        );
    }
}

#[test]
fn padding_row_reads_as_it_is_and_gets_exactly_zero_gradient() {
    let weight = randn(&[5, 3], 1).requires_grad_();
    // Row 3 named three times, row 1 twice.
    let ids = Tensor::from_indices(vec![3, 1, 3, 0, 3, 1], [2, 3]).unwrap();
    let probe = randn(&[2, 3, 3], 2);
    let plain = Tensor::embedding(&ids, &weight).unwrap();
    let plain_grad = plain
        .backward_with(&probe)
        .unwrap()
        .get(&weight)
        .unwrap()
        .clone();
    for padding_idx in [3, -2] {
        let out = Tensor::embedding_with(&ids, &weight, Some(padding_idx)).unwrap();
        assert_eq!(
            out.to_f64_vec(),
            plain.to_f64_vec(),
            "padding_idx {padding_idx}"
        );
        let grad = out
            .backward_with(&probe)
            .unwrap()
            .get(&weight)
            .unwrap()
            .clone();
        let (grad, plain_grad) = (grad.to_f64_vec(), plain_grad.to_f64_vec());
        for (i, (g, p)) in grad.iter().zip(&plain_grad).enumerate() {
            let expected = if i / 3 == 3 { 0.0 } else { *p };
            assert_eq!(*g, expected, "padding_idx {padding_idx}: grad[{i}]");
        }
        assert!(
            plain_grad[9..12].iter().all(|&g| g != 0.0),
            "row 3 was used"
        );
    }
    // None is plain embedding.
    let out = Tensor::embedding_with(&ids, &weight, None).unwrap();
    let grad = out.backward_with(&probe).unwrap();
    assert_eq!(
        grad.get(&weight).unwrap().to_f64_vec(),
        plain_grad.to_f64_vec()
    );
}

#[test]
fn a_16_bit_table_keeps_its_dtype_and_the_padding_row_gets_no_gradient() {
    // The f32 path runs on the widened table; the gradient comes back bf16.
    let weight = randn(&[4, 2], 3)
        .to_dtype(DType::BF16)
        .unwrap()
        .requires_grad_();
    let ids = Tensor::from_indices(vec![1, 0, 1, 3], [4]).unwrap();
    let out = Tensor::embedding_with(&ids, &weight, Some(1)).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let grads = out
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = grads.get(&weight).unwrap();
    assert_eq!(grad.dtype(), DType::BF16);
    assert_eq!(grad.to_f64_vec(), [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
}

#[test]
fn padding_idx_outside_the_table_is_an_error_as_in_pytorch() {
    let weight = randn(&[5, 3], 1);
    let ids = Tensor::from_indices(vec![0, 4], [2]).unwrap();
    for padding_idx in [5, -6, isize::MAX, isize::MIN] {
        let message = Tensor::embedding_with(&ids, &weight, Some(padding_idx))
            .expect_err("out of range")
            .to_string();
        for needle in [
            "embedding",
            "padding_idx must be within num_embeddings",
            &padding_idx.to_string(),
            "[-5, 5)",
        ] {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
    }
    for padding_idx in [4, 0, -1, -5] {
        assert!(Tensor::embedding_with(&ids, &weight, Some(padding_idx)).is_ok());
    }
}
