//! Embedding with a padding_idx against PyTorch: the forward reads every
//! row, and the padding row's gradient is zero however often the ids name it.

use crate::common::Golden;
use kiln::Tensor;

#[test]
fn embedding_with_padding_idx_matches_pytorch_for_positive_and_negative_indices() {
    let g = Golden::load("embedding_padding_idx");
    let weight = g.tensor("weight").requires_grad_();
    let ids = g.tensor("ids");
    for (suffix, key) in [("", "padding_idx"), ("_neg", "padding_idx_neg")] {
        let padding_idx: isize = g.meta(key).parse().unwrap();
        let out = Tensor::embedding_with(&ids, &weight, Some(padding_idx)).unwrap();
        g.assert_close(&format!("out{suffix}"), &out);
        let grads = out
            .backward_with(&g.tensor(&format!("grad_out{suffix}")))
            .unwrap();
        g.assert_close(&format!("grad_weight{suffix}"), grads.get(&weight).unwrap());
    }
}
