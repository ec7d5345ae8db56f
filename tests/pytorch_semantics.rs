//! Behaviours where an easy implementation would differ silently from
//! PyTorch, each pinned to what PyTorch 2.15 gives (quoted beside it). They
//! run on the CPU and, when there is one (a GPU, or `KILN_CUDA=emulate`), on
//! the CUDA device, so both backends keep PyTorch's meaning.

use kiln::{Device, Result, Tensor};

const NAN: f64 = f64::NAN;
const INF: f64 = f64::INFINITY;

/// The CPU, and the first CUDA device when there is one.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if kiln::cuda::device_count() > 0 {
        devices.push(Device::cuda(0).unwrap());
    }
    devices
}

fn f32_on(values: &[f64], shape: &[usize], device: Device) -> Tensor {
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(values, shape)
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Equal element by element, NaN matching NaN.
fn assert_values(what: &str, actual: Result<Tensor>, expected: &[f64]) {
    let actual = actual
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .to_f64_vec();
    assert_eq!(actual.len(), expected.len(), "{what}: {actual:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            a == e || (a.is_nan() && e.is_nan()) || (a - e).abs() <= 1e-6 * e.abs().max(1.0),
            "{what}: got {actual:?}, PyTorch gives {expected:?}"
        );
    }
}

#[test]
fn relu_keeps_nan() {
    // F.relu(tensor([nan, -1, 2, inf, -inf, 0])) = [nan, 0, 2, inf, 0, 0]
    for device in devices() {
        let x = f32_on(&[NAN, -1.0, 2.0, INF, -INF, 0.0], &[6], device);
        assert_values(
            &format!("relu on {device:?}"),
            x.relu(),
            &[NAN, 0.0, 2.0, INF, 0.0, 0.0],
        );
    }
}

#[test]
fn clamp_keeps_nan_and_gives_max_when_min_exceeds_max() {
    // x.clamp(-1.5, 1.5) = [nan, -1, 1.5, 1.5, -1.5, 0]
    // x.clamp(1, -1)     = [nan, -1, -1, -1, -1, -1]  (min(max(x, 1), -1))
    for device in devices() {
        let x = f32_on(&[NAN, -1.0, 2.0, INF, -INF, 0.0], &[6], device);
        assert_values(
            &format!("clamp on {device:?}"),
            x.clamp(-1.5, 1.5),
            &[NAN, -1.0, 1.5, 1.5, -1.5, 0.0],
        );
        assert_values(
            &format!("clamp with min > max on {device:?}"),
            x.clamp(1.0, -1.0),
            &[NAN, -1.0, -1.0, -1.0, -1.0, -1.0],
        );
    }
    let message = Tensor::scalar(1.0f64)
        .clamp(NAN, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("clamp:") && message.contains("NaN"),
        "{message}"
    );
}

#[test]
fn clamp_with_min_above_max_passes_no_gradient() {
    // PyTorch's clamp backward passes dy where min ≤ x ≤ max: nowhere here.
    let x = Tensor::from_vec(vec![-2.0f64, 0.0, 2.0], [3])
        .unwrap()
        .requires_grad_();
    let grads = x
        .clamp(1.0, -1.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grads.get(&x).unwrap().to_f64_vec(), [0.0; 3]);
}

#[test]
fn squeeze_of_a_dim_that_is_not_1_leaves_the_tensor_unchanged() {
    // torch.zeros(2, 3).squeeze(0).shape == (2, 3)
    let x = Tensor::from_vec(vec![1.0f32; 6], [2, 3]).unwrap();
    assert_eq!(x.squeeze(0).unwrap().dims(), [2, 3]);
    assert_eq!(x.squeeze(-1).unwrap().dims(), [2, 3]);
    assert_eq!(x.unsqueeze(1).unwrap().squeeze(1).unwrap().dims(), [2, 3]);
}

#[test]
fn linear_takes_one_vector() {
    // F.linear(tensor([1., 2., 3.]), arange(6.).reshape(2, 3)) = [8, 26];
    // with bias [0.5, -1]: [8.5, 25]; dL/dx of the sum = column sums of W.
    for device in devices() {
        let x = f32_on(&[1.0, 2.0, 3.0], &[3], device).requires_grad_();
        let w = f32_on(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[2, 3], device);
        let b = f32_on(&[0.5, -1.0], &[2], device);
        assert_values("linear [in]", x.linear(&w, None), &[8.0, 26.0]);
        let y = x.linear(&w, Some(&b)).unwrap();
        assert_eq!(y.dims(), [2]);
        assert_values("linear [in] with bias", Ok(y.clone()), &[8.5, 25.0]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_values(
            "dL/dx",
            Ok(grads.get(&x).unwrap().clone()),
            &[3.0, 5.0, 7.0],
        );
    }
}

#[test]
fn a_scalar_takes_dim_0_or_minus_1_in_reductions_and_softmax() {
    // torch.tensor(2.).sum(0) = 2, .mean(-1) = 2, .max(0) = (2, 0),
    // torch.softmax(torch.tensor(2.), 0) = 1, log_softmax = 0; dim 1 is an
    // IndexError in PyTorch and an error in kiln.
    for device in devices() {
        let x = f32_on(&[2.0], &[], device);
        for (what, out) in [
            ("sum", x.sum(&[0], false)),
            ("sum keepdim", x.sum(&[-1], true)),
            ("mean", x.mean(&[-1], false)),
            ("max", x.max(0, true)),
            ("softmax", x.softmax(0)),
            ("log_softmax", x.log_softmax(-1)),
        ] {
            let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.dims(), [0usize; 0], "{what} stays 0-d");
            let expected = match what {
                "softmax" => 1.0,
                "log_softmax" => 0.0,
                _ => 2.0,
            };
            assert_eq!(out.item().unwrap(), expected, "{what} on {device:?}");
        }
        let (_, index) = x.max_with_indices(-1, false).unwrap();
        assert_eq!(index.to_indices().unwrap(), [0]);
        for message in [
            x.sum(&[1], false).unwrap_err().to_string(),
            x.max(-2, false).unwrap_err().to_string(),
            x.softmax(1).unwrap_err().to_string(),
        ] {
            assert!(
                message.contains("0-d tensor takes dim 0 or -1"),
                "{message}"
            );
        }
        assert!(x.sum(&[0, -1], false).is_err(), "dim 0 listed twice");
    }
}

#[test]
fn dropout_with_p_1_is_x_times_0() {
    // F.dropout(x, 1.0) = x·0 = [nan, -0, 0, nan, nan, 0]
    for device in devices() {
        let x = f32_on(&[NAN, -1.0, 2.0, INF, -INF, 0.0], &[6], device);
        assert_values(
            &format!("dropout p=1 on {device:?}"),
            x.dropout(1.0, 3),
            &[NAN, 0.0, 0.0, NAN, NAN, 0.0],
        );
    }
}

#[test]
fn max_propagates_nan_and_picks_the_first_of_ties() {
    // tensor([1, nan, 3]).max(0).values = nan; tensor([1, 3, 3]).max(0).indices = 1
    for device in devices() {
        let x = f32_on(&[1.0, NAN, 3.0], &[3], device);
        assert_values("max with NaN", x.max(0, false), &[NAN]);
        let ties = f32_on(&[1.0, 3.0, 3.0], &[3], device);
        let (_, index) = ties.max_with_indices(0, false).unwrap();
        assert_eq!(index.to_indices().unwrap(), [1]);
    }
}

#[test]
fn floats_become_u32_by_truncation_and_out_of_range_values_are_refused() {
    // tensor([0.9, 2.7, -0.5]).to(torch.uint32) = [0, 2, 0]; PyTorch wraps
    // -1.5 to 4294967295 and gives unspecified values for NaN or 5e9: kiln
    // refuses those, naming the value.
    for device in devices() {
        let ok = f32_on(&[0.9, 2.7, -0.5], &[3], device);
        let converted = ok.to_dtype(kiln::DType::U32).unwrap();
        assert_eq!(converted.to_indices().unwrap(), [0, 2, 0]);
        for bad in [-1.5, NAN, 5e9, INF] {
            let x = f32_on(&[1.0, bad], &[2], device);
            let message = x.to_dtype(kiln::DType::U32).unwrap_err().to_string();
            assert!(
                message.starts_with("to_dtype:") && message.contains("flat index 1"),
                "{message}"
            );
        }
    }
}

#[test]
fn a_mean_over_nothing_is_an_error_that_says_pytorch_gives_nan() {
    // torch.zeros(0).mean(0) = nan, silently; kiln refuses and says so.
    let message = Tensor::from_vec(Vec::<f32>::new(), [0])
        .unwrap()
        .mean(&[0], false)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("mean:") && message.contains("PyTorch returns NaN"),
        "{message}"
    );
}
