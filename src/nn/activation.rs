//! Activations and `Flatten` as modules (no parameters), for `Sequential`.

use crate::error::Result;
use crate::nn::{Module, TensorRole};
use crate::ops::activation::GeluApproximation;
use crate::tensor::Tensor;

/// Declares a parameter-free module whose forward is `$body` on `$x`.
macro_rules! stateless_module {
    ($(#[$doc:meta])* $name:ident $(($field:ty))?, |$self_:ident, $x:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name $((pub $field))?;

        impl Module for $name {
            fn forward(&$self_, $x: &Tensor) -> Result<Tensor> {
                $body
            }

            fn visit(&self, _prefix: &str, _visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {}
        }
    };
}

stateless_module!(
    /// max(x, 0).
    Relu,
    |self, x| x.relu()
);
stateless_module!(
    /// x for x > 0, slope · x otherwise (`LeakyRelu(0.2)` in a DCGAN).
    LeakyRelu(f64),
    |self, x| x.leaky_relu(self.0)
);
stateless_module!(
    /// tanh(x).
    Tanh,
    |self, x| x.tanh()
);
stateless_module!(
    /// 1 / (1 + e⁻ˣ).
    Sigmoid,
    |self, x| x.sigmoid()
);
stateless_module!(
    /// GELU, exact or with the tanh approximation (GPT-2 uses the latter).
    Gelu(GeluApproximation),
    |self, x| x.gelu(self.0)
);
stateless_module!(
    /// Merges every dim after the first (the batch): [N, ...] → [N, rest], as `nn.Flatten()`.
    Flatten,
    |self, x| {
        if x.rank() <= 1 {
            return Ok(x.clone());
        }
        x.flatten(1, x.rank() - 1)
    }
);
