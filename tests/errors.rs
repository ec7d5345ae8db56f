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
    // A vector takes part as PyTorch's matmul takes it; its length must
    // still match, and a scalar is no operand.
    assert_eq!(t(&[3]).matmul(&t(&[3, 2])).unwrap().dims(), [2]);
    let msg = message(t(&[3]).matmul(&t(&[4, 2])));
    assert!(msg.starts_with("matmul:"), "{msg}");
    let msg = message(t(&[]).matmul(&t(&[3, 2])));
    assert!(
        msg.starts_with("matmul:") && msg.contains("rank >= 2"),
        "{msg}"
    );
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
    assert!(message(x.squeeze(2)).contains("out of range"));
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
    let all = x.sum::<usize>(&[], false).unwrap();
    assert_eq!(all.dims(), [0usize; 0]);
    assert_eq!(all.item().unwrap(), 15.0);
    let kept = x.sum::<usize>(&[], true).unwrap();
    assert_eq!(
        (kept.dims(), kept.to_f64_vec()),
        (&[1usize, 1][..], vec![15.0])
    );
    assert_eq!(x.mean::<usize>(&[], false).unwrap().item().unwrap(), 2.5);
    assert_eq!(x.mean::<usize>(&[], true).unwrap().dims(), [1, 1]);
    // The gradient of Σ over every dim is 1 everywhere.
    let leaf = x.detach().requires_grad_();
    let grads = leaf.sum::<usize>(&[], false).unwrap().backward().unwrap();
    assert_eq!(grads.get(&leaf).unwrap().to_f64_vec(), vec![1.0; 6]);
    for repeated in [&[0usize, 0][..], &[1, 0, 1]] {
        let msg = message(x.sum(repeated, false));
        assert!(msg.starts_with("sum:") && msg.contains("dim"), "{msg}");
        assert!(msg.contains("appears more than once"), "{msg}");
        assert!(message(x.mean(repeated, true)).starts_with("mean:"));
    }
}

#[test]
fn negative_dims_count_from_the_back_as_in_pytorch() {
    let x = Tensor::arange(0.0, 24.0, 1.0, DType::F64, Device::Cpu)
        .unwrap()
        .reshape([2, 3, 4])
        .unwrap();
    let same = |a: kiln::Result<Tensor>, b: kiln::Result<Tensor>| {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.to_f64_vec(), b.to_f64_vec());
    };
    same(x.sum(&[-1], false), x.sum(&[2], false));
    same(x.sum(&[-3, -1], true), x.sum(&[0, 2], true));
    same(x.mean(&[-2], false), x.mean(&[1], false));
    same(x.max(-1, false), x.max(2, false));
    same(x.narrow(-1, 1, 2), x.narrow(2, 1, 2));
    same(x.transpose(-1, 0), x.transpose(2, 0));
    same(x.permute(&[-1, 0, 1]), x.permute(&[2, 0, 1]));
    same(x.flatten(-2, -1), x.flatten(1, 2));
    same(Tensor::cat(&[&x, &x], -1), Tensor::cat(&[&x, &x], 2));
    let ids = Tensor::from_indices(vec![3, 0], [2]).unwrap();
    same(x.index_select(-1, &ids), x.index_select(2, &ids));
    let index = Tensor::from_indices(vec![1; 6], [2, 3, 1]).unwrap();
    same(x.gather(-1, &index), x.gather(2, &index));
    // Inserting: -1 appends and -(rank + 1) prepends, as torch.unsqueeze.
    assert_eq!(x.unsqueeze(-1).unwrap().dims(), [2, 3, 4, 1]);
    assert_eq!(x.unsqueeze(-4).unwrap().dims(), [1, 2, 3, 4]);
    assert_eq!(Tensor::stack(&[&x, &x], -1).unwrap().dims(), [2, 3, 4, 2]);
    assert_eq!(
        x.unsqueeze(-1).unwrap().squeeze(-1).unwrap().dims(),
        [2, 3, 4]
    );

    let msg = message(x.sum(&[-4], false));
    assert!(
        msg.starts_with("sum:") && msg.contains("dim -4 is out of range") && msg.contains("-3..-1"),
        "{msg}"
    );
    let msg = message(x.sum(&[-1, 2], false));
    assert!(
        msg.contains("dim 2 appears more than once in the dims [-1, 2]"),
        "{msg}"
    );
    assert!(message(x.unsqueeze(-5)).starts_with("unsqueeze:"));
    assert!(message(x.permute(&[-1, 2, 0])).contains("not a permutation"));
    assert!(message(x.narrow(-4, 0, 1)).starts_with("narrow:"));
}

#[test]
fn a_tensor_larger_than_the_address_space_is_an_error_not_an_abort() {
    // 2⁴⁶ f32 values are 256 TiB, more than a process can map, so the
    // reservation fails on any machine whatever its overcommit policy.
    let huge = [1usize << 23, 1 << 23];
    let mut rng = kiln::Rng::seed(0);
    for (op, result) in [
        ("zeros", Tensor::zeros(huge, DType::F32, Device::Cpu)),
        ("ones", Tensor::ones(huge, DType::BF16, Device::Cpu)),
        ("full", Tensor::full(2.0, huge, DType::F64, Device::Cpu)),
        (
            "randn",
            Tensor::randn(huge, DType::F32, Device::Cpu, &mut rng),
        ),
        (
            "rand",
            Tensor::rand(0.0, 1.0, huge, DType::F32, Device::Cpu, &mut rng),
        ),
    ] {
        let msg = message(result);
        assert!(
            msg.starts_with(&format!("{op}:")) && msg.contains("host memory"),
            "{msg}"
        );
    }
}
