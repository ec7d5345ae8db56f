//! A PyTorch state dict (written by `safetensors.torch.save_file`, with the
//! int64 `bn.num_batches_tracked`) loads into kiln's model of the same
//! structure, and the model then computes PyTorch's output.

use std::path::PathBuf;

use crate::common::Golden;
use kiln::nn::{BatchNorm2d, Conv2d, Init, Linear, Module, TensorRole, visit_child};
use kiln::ops::conv::Conv2dParams;
use kiln::{DType, Device, Rng, Tensor};

/// PyTorch's `Small` from gen.py: fc(flatten(leaky_relu(bn(conv(x)), 0.2))).
struct Small {
    conv: Conv2d,
    bn: BatchNorm2d,
    fc: Linear,
}

impl Small {
    fn new(init: &mut Init) -> Small {
        let same = Conv2dParams {
            padding: [1, 1].into(),
            ..Conv2dParams::default()
        };
        Small {
            conv: Conv2d::new(1, 4, [3, 3], same, true, init).unwrap(),
            bn: BatchNorm2d::new(4, init).unwrap(),
            fc: Linear::new(4 * 5 * 5, 3, true, init).unwrap(),
        }
    }
}

impl Module for Small {
    fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
        let h = self.bn.forward(&self.conv.forward(x)?)?.leaky_relu(0.2)?;
        self.fc.forward(&h.flatten(1, 3)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "conv", &self.conv, visitor);
        visit_child(prefix, "bn", &self.bn, visitor);
        visit_child(prefix, "fc", &self.fc, visitor);
    }

    fn set_training(&self, training: bool) {
        self.bn.set_training(training);
    }
}

#[test]
fn pytorch_state_dict_loads_and_reproduces_eval_output() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/data/state_dict_small.safetensors");
    let checkpoint = kiln::checkpoint::load(&path).unwrap();
    let mut rng = Rng::seed(7);
    let model = Small::new(&mut Init::new(&mut rng, Device::Cpu, DType::F32));

    let mut ours: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    let mut theirs: Vec<String> = checkpoint.tensors.keys().cloned().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "state dict names differ from PyTorch's");

    model.load_state_dict(&checkpoint.tensors).unwrap();
    // Two training steps in PyTorch: the int64 counter arrives as u32.
    assert_eq!(
        model.bn.num_batches_tracked.as_ref().unwrap().dtype(),
        DType::U32
    );
    assert_eq!(
        model
            .bn
            .num_batches_tracked
            .as_ref()
            .unwrap()
            .item()
            .unwrap(),
        2.0
    );

    model.eval();
    let io = Golden::load("state_dict_small_io");
    let out = kiln::no_grad_scope(|| model.forward(&io.tensor("x"))).unwrap();
    io.assert_close("out", &out);
}
