//! The tape itself: reuse of a tensor, detach, no_grad, deep graphs.

use kiln::{DType, Device, Tensor, no_grad};

fn vec_tensor(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

#[test]
fn gradient_of_a_tensor_used_twice_is_summed() {
    // y = x·x + x  →  dy/dx = 2x + 1
    let x = vec_tensor(&[1.0, -2.0, 3.0], &[3]).requires_grad_();
    let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    assert_eq!(
        grads.get(&x).unwrap().to_vec::<f64>().unwrap(),
        vec![3.0, -3.0, 7.0]
    );
}

#[test]
fn detach_and_no_grad_cut_the_graph() {
    let x = vec_tensor(&[2.0], &[1]).requires_grad_();
    let through = x.mul(&x.detach()).unwrap().sum_all().unwrap();
    // d(x · stop(x))/dx = stop(x) = 2
    assert_eq!(
        through.backward().unwrap().get(&x).unwrap().item().unwrap(),
        2.0
    );

    let guard = no_grad();
    let untracked = x.mul(&x).unwrap();
    drop(guard);
    assert!(!untracked.requires_grad());
    assert!(untracked.sum_all().unwrap().backward().is_err());
}

#[test]
fn only_tensors_that_need_grad_are_tracked() {
    let a = vec_tensor(&[1.0, 2.0], &[2]);
    let b = vec_tensor(&[3.0, 4.0], &[2]);
    let c = a.mul(&b).unwrap();
    assert!(!c.requires_grad());
    assert!(c.is_leaf());
}

#[test]
fn backward_needs_a_scalar() {
    let x = vec_tensor(&[1.0, 2.0], &[2]).requires_grad_();
    let err = x
        .mul_scalar(2.0)
        .unwrap()
        .backward()
        .unwrap_err()
        .to_string();
    assert!(err.contains("scalar"), "{err}");
}

#[test]
fn a_very_deep_graph_does_not_overflow_the_stack() {
    // 20 000 chained ops: a recursive walk would exhaust the test thread's stack.
    let x = Tensor::ones([4], DType::F64, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let mut y = x.clone();
    for _ in 0..20_000 {
        y = y.mul_scalar(1.0).unwrap().add_scalar(0.0).unwrap();
    }
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        grads.get(&x).unwrap().to_vec::<f64>().unwrap(),
        vec![1.0; 4]
    );
}

/// Gradient accumulation adds in place only into a sum nothing else holds:
/// `a + b` hands the same gradient tensor to both inputs, so adding a's
/// other gradient into it in place would also change b's.
#[test]
fn accumulating_a_shared_gradient_leaves_the_other_inputs_gradient_alone() {
    let a = vec_tensor(&[1.0, 2.0, 3.0], &[3]).requires_grad_();
    let b = vec_tensor(&[4.0, 5.0, 6.0], &[3]).requires_grad_();
    let loss = a
        .add(&b)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&a.mul_scalar(2.0).unwrap().sum_all().unwrap())
        .unwrap()
        .add(&a.mul(&a).unwrap().sum_all().unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    // dL/da = 1 + 2 + 2a, dL/db = 1
    assert_eq!(
        grads.get(&a).unwrap().to_vec::<f64>().unwrap(),
        vec![5.0, 7.0, 9.0]
    );
    assert_eq!(
        grads.get(&b).unwrap().to_vec::<f64>().unwrap(),
        vec![1.0, 1.0, 1.0]
    );
}

/// The q/k/v pattern: several `narrow`s of one tensor (overlapping, along a
/// middle dim, and beside a direct use of it) whose gradients the walk adds
/// into slices of one running sum. Checked element by element against the
/// gradient written out by hand.
#[test]
fn gradients_of_several_slices_of_one_tensor_add_into_their_slices() {
    // x [2, 5, 3]: x[:, 0:2, :]·2 + x[:, 1:4, :]·3 + x[:, 4:5, :]·5, plus Σ x·x.
    let values: Vec<f64> = (0..30).map(|i| i as f64 * 0.5 - 3.0).collect();
    let x = vec_tensor(&values, &[2, 5, 3]).requires_grad_();
    let part = |start: usize, len: usize, weight: f64| {
        x.narrow(1, start, len)
            .unwrap()
            .mul_scalar(weight)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let loss = part(0, 2, 2.0)
        .add(&part(1, 3, 3.0))
        .unwrap()
        .add(&part(4, 1, 5.0))
        .unwrap()
        .add(&x.mul(&x).unwrap().sum_all().unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let expected: Vec<f64> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let row = i / 3 % 5;
            let slices = [(0..2, 2.0), (1..4, 3.0), (4..5, 5.0)];
            let from_slices: f64 = slices
                .iter()
                .filter(|(rows, _)| rows.contains(&row))
                .map(|(_, w)| w)
                .sum();
            from_slices + 2.0 * v
        })
        .collect();
    assert_eq!(grads.get(&x).unwrap().to_vec::<f64>().unwrap(), expected);

    // Only slices, the first along the last dim: the running sum starts
    // as the first slice's zero-padded gradient.
    let y = vec_tensor(&values, &[2, 5, 3]).requires_grad_();
    let loss = y
        .narrow(2, 0, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(
            &y.narrow(2, 1, 2)
                .unwrap()
                .mul_scalar(4.0)
                .unwrap()
                .sum_all()
                .unwrap(),
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    let expected: Vec<f64> = (0..30)
        .map(|i| if i % 3 == 0 { 1.0 } else { 4.0 })
        .collect();
    assert_eq!(grads.get(&y).unwrap().to_vec::<f64>().unwrap(), expected);
}
