//! Wrong input is an error that names the op and the offending shapes or
//! dtypes — never a panic.

use kiln::{DType, Device, Tensor};

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()
}

fn message(result: kiln::Result<Tensor>) -> String {
    result.expect_err("expected an error").to_string()
}

#[test]
fn non_broadcastable_shapes_are_named() {
    let msg = message(t(&[2, 3]).add(&t(&[4, 3])));
    assert!(
        msg.starts_with("add:") && msg.contains("[2, 3]") && msg.contains("[4, 3]"),
        "{msg}"
    );
}

#[test]
fn matmul_inner_dim_mismatch_is_named() {
    let msg = message(t(&[2, 3]).matmul(&t(&[4, 5])));
    assert!(
        msg.starts_with("matmul:") && msg.contains("[2, 3]") && msg.contains("[4, 5]"),
        "{msg}"
    );
    let msg = message(t(&[3]).matmul(&t(&[3, 2])));
    assert!(msg.contains("rank >= 2"), "{msg}");
}

#[test]
fn mixed_dtypes_are_named() {
    let a = t(&[2]);
    let b = Tensor::zeros([2], DType::F64, Device::Cpu).unwrap();
    let msg = message(a.mul(&b));
    assert!(
        msg.starts_with("mul:") && msg.contains("f32") && msg.contains("f64"),
        "{msg}"
    );
}

#[test]
fn index_tensors_are_not_arithmetic() {
    let ids = Tensor::from_indices(vec![1, 2], [2]).unwrap();
    let msg = message(ids.exp());
    assert!(msg.contains("u32"), "{msg}");
}

#[test]
fn bad_reshape_and_slices_are_errors() {
    let x = t(&[2, 3]);
    assert!(message(x.reshape([4])).contains("6 elements"));
    assert!(message(x.narrow(1, 2, 2)).contains("exceeds dim 1"));
    assert!(message(x.permute(&[0, 0])).contains("not a permutation"));
    assert!(message(x.sum(&[2], false)).contains("out of range"));
    assert!(message(Tensor::cat(&[&x, &t(&[2, 4])], 0)).contains("does not match"));
    assert!(message(x.broadcast_to([3, 3])).contains("cannot"));
    assert!(message(x.squeeze(0)).contains("is not 1"));
}

#[test]
fn construction_errors() {
    let msg = Tensor::from_vec(vec![1.0f32; 5], [2, 3])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("5 values") && msg.contains("[2, 3]"), "{msg}");
    assert!(Tensor::arange(0.0, 5.0, -1.0, DType::F32, Device::Cpu).is_err());
    // Index tensors do no arithmetic: the error names the dtype.
    let indices = Tensor::zeros([2], DType::U32, Device::Cpu).unwrap();
    let msg = indices.exp().unwrap_err().to_string();
    assert!(msg.contains("u32") && msg.contains("f32"), "{msg}");
    assert!(t(&[2]).item().is_err());
    assert!(t(&[2]).to_vec::<f64>().is_err());
}

#[test]
fn moving_to_a_missing_cuda_backend_is_an_error() {
    if kiln::cuda::device_count() > 0 {
        eprintln!("skipped: a CUDA device (or the emulator) is present, so the move succeeds here");
        return;
    }
    let msg = t(&[2]).to_device(Device::Cuda(0)).unwrap_err().to_string();
    assert!(msg.contains("cuda:0"), "{msg}");
}

#[test]
fn reductions_read_their_dims_as_pytorch_does() {
    // torch.arange(6.).reshape(2, 3): sum(dim=[]) is tensor(15.),
    // sum(dim=[], keepdim=True) tensor([[15.]]), mean(dim=[]) tensor(2.5),
    // and sum(dim=[0, 0]) "dim 0 appears multiple times in the list of dims".
    let x = Tensor::arange(0.0, 6.0, 1.0, DType::F64, Device::Cpu)
        .unwrap()
        .reshape([2, 3])
        .unwrap();
    let all = x.sum(&[], false).unwrap();
    assert_eq!(all.dims(), [0usize; 0]);
    assert_eq!(all.item().unwrap(), 15.0);
    let kept = x.sum(&[], true).unwrap();
    assert_eq!(
        (kept.dims(), kept.to_f64_vec()),
        (&[1usize, 1][..], vec![15.0])
    );
    assert_eq!(x.mean(&[], false).unwrap().item().unwrap(), 2.5);
    assert_eq!(x.mean(&[], true).unwrap().dims(), [1, 1]);
    // The gradient of Σ over every dim is 1 everywhere.
    let leaf = x.detach().requires_grad_();
    let grads = leaf.sum(&[], false).unwrap().backward().unwrap();
    assert_eq!(grads.get(&leaf).unwrap().to_f64_vec(), vec![1.0; 6]);
    for repeated in [&[0usize, 0][..], &[1, 0, 1]] {
        let msg = message(x.sum(repeated, false));
        assert!(msg.starts_with("sum:") && msg.contains("dim"), "{msg}");
        assert!(msg.contains("appears more than once"), "{msg}");
        assert!(message(x.mean(repeated, true)).starts_with("mean:"));
    }
}
