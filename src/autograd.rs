//! The tape. Every op whose inputs require grad records a [`Node`]: the
//! inputs and a [`Backward`] rule mapping dL/d(output) to dL/d(each input).
//! [`Tensor::backward`] walks those nodes from the loss in reverse topological
//! order — iteratively, so a 48-layer GPT cannot overflow the stack — sums
//! the gradients of tensors used more than once, and returns them in a
//! [`GradStore`]. With [`crate::profile`] on, each rule's call is timed as
//! "{op} backward".
//!
//! As in PyTorch (`retain_graph=False`), the walk releases each node once
//! its rule has run: the rule and the inputs it saved are dropped, so an
//! activation's memory is freed as soon as the last rule that needs it is
//! done, and the peak of a backward pass is the forward's activations, not
//! their sum with every gradient. A second backward through a released node
//! is an error; [`Tensor::backward_retaining_graph`] keeps the graph.
//!
//! [`graph()`] draws the tape (Graphviz DOT, with [`module_scope`]s as
//! boxes) and [`trace()`] records what each rule of a backward pass did.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::profile;
use crate::tensor::{Tensor, TensorId};

pub mod graph;
pub mod trace;

pub use graph::{
    Edge, Graph, GraphBuilder, GraphNode, NodeKind, ScopeGuard, TensorInfo, graph,
    graph_with_names, module_scope,
};
pub use trace::{GradSummary, Trace, TraceGuard, TraceRecord, trace};

/// One op's derivative rule. Each op family defines its own structs, with
/// the math in a one-line comment beside `backward`.
pub trait Backward: Send + Sync {
    /// The op's name, shown in `Debug` output as `grad_fn` and in profiles
    /// as "{name} backward".
    fn name(&self) -> &'static str;

    /// Given the op's `inputs` (as recorded) and dL/d(output), returns
    /// dL/d(input) for each input, `None` where an input needs no gradient
    /// (indices, constants).
    fn backward(&self, inputs: &[Tensor], grad_output: &Tensor) -> Result<Vec<Option<Tensor>>>;

    /// For an op whose output is a slice of its one input (`narrow`), so
    /// that dL/dx is dL/dy placed at that slice and zero elsewhere: the
    /// slice's (dim, start). The walk then adds dL/dy straight into that
    /// slice of the input's running gradient sum when it has one, instead
    /// of building the zero-padded tensor and adding it whole (GPT's q/k/v
    /// split of one [B, T, 3E] projection: three padded [B, T, 3E] tensors
    /// and two full sums per layer, before). `backward` must still give the
    /// full gradient: it is used when there is no running sum yet.
    fn slice_of_input(&self) -> Option<(usize, usize)> {
        None
    }

    /// Whether `backward` reads its inputs' values. A rule that needs only
    /// their shapes, dtypes and devices (to_dtype, add, sub, reshape) says
    /// false: its node then keeps handles without the values, so an input's
    /// memory is freed as soon as nothing else needs it (an f32 activation
    /// cast to bf16 for a matmul lives no longer than the cast).
    fn reads_input_values(&self) -> bool {
        true
    }
}

/// The graph edge stored in an op's output.
/// Shared between a tensor and the value-less handles of it that nodes
/// keep (see [`Backward::reads_input_values`]).
pub(crate) struct Node {
    name: &'static str,
    /// The [`module_scope`] open when the op ran (None outside any).
    scope: Option<Arc<graph::ScopePath>>,
    /// The rule and its recorded inputs; None once a backward pass has
    /// released them.
    edges: Mutex<Option<NodeEdges>>,
}

#[derive(Clone)]
pub(crate) struct NodeEdges {
    pub backward: Arc<dyn Backward>,
    pub inputs: Vec<Tensor>,
}

/// What a backward pass keeps of the graph it walks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retain {
    /// Each node is released once its rule has run.
    Nothing,
    /// Every node stays (another pass may walk it).
    Graph,
}

impl Node {
    pub(crate) fn new(backward: Arc<dyn Backward>, inputs: Vec<Tensor>) -> Node {
        Node {
            name: backward.name(),
            scope: graph::current_scope(),
            edges: Mutex::new(Some(NodeEdges { backward, inputs })),
        }
    }

    /// The op's name (its rule's), kept after release for `grad_fn`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn scope(&self) -> Option<&graph::ScopePath> {
        self.scope.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<NodeEdges>> {
        self.edges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` on each recorded input; on none once released.
    pub(crate) fn for_each_input(&self, f: impl FnMut(&Tensor)) {
        if let Some(edges) = self.lock().as_ref() {
            edges.inputs.iter().for_each(f);
        }
    }

    /// The rule and inputs, leaving the node released.
    fn take_edges(&self) -> Option<NodeEdges> {
        self.lock().take()
    }

    /// A copy of the rule and inputs, keeping them.
    fn cloned_edges(&self) -> Option<NodeEdges> {
        self.lock().clone()
    }

    /// The recorded inputs of a node nothing else holds (for dropping a
    /// graph iteratively); none once released.
    pub(crate) fn into_inputs(self) -> Vec<Tensor> {
        self.edges
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .map_or_else(Vec::new, |edges| edges.inputs)
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record the graph on this thread right now.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// While alive, ops on this thread record nothing (evaluation, optimizer
/// updates, the backward pass itself). Restores the previous mode on drop.
#[must_use = "grad recording resumes as soon as the guard is dropped"]
pub struct NoGradGuard {
    previous: bool,
}

/// Turns gradient recording off until the returned guard is dropped.
///
/// ```
/// let _guard = kiln::no_grad();
/// // ops here build no graph
/// ```
pub fn no_grad() -> NoGradGuard {
    let previous = GRAD_ENABLED.with(|g| g.replace(false));
    NoGradGuard { previous }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Gradients of the loss with respect to the leaves that require grad
/// (parameters and inputs marked with `requires_grad_()`), keyed by tensor id.
#[derive(Default, Debug)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.grads.get(&tensor.id())
    }

    pub fn get_by_id(&self, id: TensorId) -> Option<&Tensor> {
        self.grads.get(&id)
    }

    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) {
        self.grads.insert(tensor.id(), grad);
    }

    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.grads.remove(&tensor.id())
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TensorId, &Tensor)> {
        self.grads.iter()
    }

    /// Every gradient, replaceable in place (loss scaling does).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&TensorId, &mut Tensor)> {
        self.grads.iter_mut()
    }
}

impl Tensor {
    /// Reverse-mode autodiff from this scalar: dL/dL = 1. Releases the
    /// graph as it goes (see the module docs).
    pub fn backward(&self) -> Result<GradStore> {
        let seed = self.scalar_seed()?;
        self.backward_with(&seed)
    }

    /// dL/dL = 1 for a scalar loss.
    fn scalar_seed(&self) -> Result<Tensor> {
        if self.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward() needs a scalar loss, got shape {}; reduce it (sum/mean) or use backward_with()",
                self.shape()
            )));
        }
        Tensor::ones(self.shape().clone(), self.dtype(), self.device())
    }

    /// [`Tensor::backward`] that keeps the graph, so another backward pass
    /// may go through it again (PyTorch's `retain_graph=True`): every saved
    /// activation stays in memory until the graph is dropped.
    pub fn backward_retaining_graph(&self) -> Result<GradStore> {
        let seed = self.scalar_seed()?;
        self.walk_backward(&seed, Retain::Graph)
    }

    /// Reverse-mode autodiff with an explicit dL/d(self) (same shape as
    /// self). Releases the graph as it goes (see the module docs).
    pub fn backward_with(&self, grad: &Tensor) -> Result<GradStore> {
        self.walk_backward(grad, Retain::Nothing)
    }

    fn walk_backward(&self, grad: &Tensor, retain: Retain) -> Result<GradStore> {
        if !self.requires_grad() {
            return Err(Error::Autograd(
                "this tensor does not require grad: no input of the computation was marked with requires_grad_()".into(),
            ));
        }
        if grad.shape() != self.shape() {
            return Err(Error::Autograd(format!(
                "gradient of shape {} given for a tensor of shape {}",
                grad.shape(),
                self.shape()
            )));
        }
        let _no_grad = no_grad();
        // Each rule computes in the dtypes its forward chose.
        let _autocast_off = crate::autocast::suspend();
        let tracing = trace::is_active();
        let mut order = topological_order(self);
        // Gradients flowing into tensors not yet processed.
        let mut pending: HashMap<TensorId, Tensor> = HashMap::new();
        pending.insert(self.id(), grad.clone());
        let mut store = GradStore::default();
        // Popped in reverse topological order; each tensor's handle (and,
        // released, its node's) is dropped as soon as it is processed.
        while let Some(tensor) = order.pop() {
            let Some(grad_out) = pending.remove(&tensor.id()) else {
                continue;
            };
            let Some(node) = tensor.node() else {
                store.insert(&tensor, grad_out);
                continue;
            };
            let edges = match retain {
                Retain::Nothing => node.take_edges(),
                Retain::Graph => node.cloned_edges(),
            };
            let Some(NodeEdges { backward, inputs }) = edges else {
                return Err(Error::Autograd(format!(
                    "backward through the graph a second time: the {} node was released by an \
                     earlier backward pass; use backward_retaining_graph() on the first pass to \
                     keep it, or recompute the forward",
                    node.name()
                )));
            };
            if let Some((dim, start)) = backward.slice_of_input()
                && let Some(sum) = pending.get(&inputs[0].id())
            {
                let _profile = profile::backward(node.name(), grad_out.device());
                // In place when nothing else holds the running sum.
                if sum.try_add_slice_in_place(&grad_out, dim, start) {
                    if tracing {
                        trace::record_slice_accumulation(node, &grad_out, &inputs[0]);
                    }
                    continue;
                }
            }
            let input_grads = {
                let _profile = profile::backward(node.name(), grad_out.device());
                backward.backward(&inputs, &grad_out)?
            };
            debug_assert_eq!(input_grads.len(), inputs.len(), "{}", node.name());
            if tracing {
                trace::record(node, &grad_out, &inputs, &input_grads);
            }
            for (input, grad) in inputs.iter().zip(input_grads) {
                let Some(grad) = grad else { continue };
                if !input.requires_grad() {
                    continue;
                }
                if grad.shape() != input.shape() {
                    return Err(Error::Autograd(format!(
                        "rule {} returned a gradient of shape {} for an input of shape {}",
                        node.name(),
                        grad.shape(),
                        input.shape()
                    )));
                }
                // A tensor used more than once gets the sum of its gradients.
                let total = match pending.remove(&input.id()) {
                    Some(previous) => {
                        let _profile = profile::op("gradient accumulation", grad.device());
                        // In place when nothing else holds the running sum.
                        if previous.try_add_in_place(&grad) {
                            previous
                        } else {
                            previous.add(&grad)?
                        }
                    }
                    None => grad,
                };
                pending.insert(input.id(), total);
            }
        }
        Ok(store)
    }
}

/// Tensors reachable from `root` through nodes that require grad, ordered so
/// that every tensor comes after all of its inputs. Iterative DFS with an
/// explicit stack: (tensor, whether its inputs were already pushed).
pub(crate) fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited: HashSet<TensorId> = HashSet::new();
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((tensor, inputs_done)) = stack.pop() {
        if inputs_done {
            order.push(tensor);
            continue;
        }
        if !visited.insert(tensor.id()) {
            continue;
        }
        stack.push((tensor.clone(), true));
        if let Some(node) = tensor.node() {
            node.for_each_input(|input| {
                if input.requires_grad() && !visited.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            });
        }
    }
    order
}

/// Runs `f` with gradient recording off.
pub fn no_grad_scope<R>(f: impl FnOnce() -> R) -> R {
    let _guard = no_grad();
    f()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{DType, Device, Tensor};

    #[test]
    fn a_node_whose_rule_reads_no_values_does_not_keep_its_inputs_values() {
        let x = Tensor::ones([4], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_();
        let doubled = || x.mul_scalar(2.0).unwrap();
        // to_dtype's rule reads only dtypes: y's values go with its last handle.
        let y = doubled();
        let y_values = Arc::downgrade(&y.shared_storage());
        let cast = y.to_dtype(DType::BF16).unwrap();
        drop(y);
        assert!(y_values.upgrade().is_none(), "to_dtype kept y's values");
        // mul's rule reads both operands: they stay.
        let y = doubled();
        let y_values = Arc::downgrade(&y.shared_storage());
        let square = y.mul(&y).unwrap();
        drop(y);
        assert!(
            y_values.upgrade().is_some(),
            "mul let go of values it needs"
        );
        // Gradients still flow through the value-less handles.
        let loss = cast.add(&square).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        // d/dx (2x + 4x²) = 2 + 8x = 10 at x = 1
        assert_eq!(grads.get(&x).unwrap().to_f64_vec(), vec![10.0; 4]);
    }

    /// A saved activation is freed during backward once the last rule that
    /// reads it has run, though the loss (and so the graph's root) is still
    /// held; backward_retaining_graph keeps it, and a second pass works.
    #[test]
    fn backward_frees_saved_activations_unless_the_graph_is_retained() {
        let x = Tensor::ones([4], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_();
        let build = || {
            let y = x.mul_scalar(3.0).unwrap();
            let y_values = Arc::downgrade(&y.shared_storage());
            // mul saves y (its rule reads both operands).
            let loss = y.mul(&y).unwrap().sum_all().unwrap();
            (loss, y_values)
        };
        let (loss, y_values) = build();
        assert!(y_values.upgrade().is_some());
        let grads = loss.backward().unwrap();
        // d/dx (3x)² = 18x
        assert_eq!(grads.get(&x).unwrap().to_f64_vec(), vec![18.0; 4]);
        assert!(
            y_values.upgrade().is_none(),
            "backward kept a saved activation alive"
        );
        let err = loss.backward().unwrap_err().to_string();
        assert!(
            err.contains("second time") && err.contains("backward_retaining_graph"),
            "{err}"
        );

        let (loss, y_values) = build();
        let first = loss.backward_retaining_graph().unwrap();
        assert!(y_values.upgrade().is_some(), "the retained graph lost y");
        let second = loss.backward().unwrap();
        assert_eq!(
            first.get(&x).unwrap().to_f64_vec(),
            second.get(&x).unwrap().to_f64_vec()
        );
        assert!(y_values.upgrade().is_none());
    }
}
