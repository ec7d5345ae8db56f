//! The tape as a picture: [`graph()`] collects the nodes reachable from a
//! tensor and [`Graph::to_dot`] writes them as Graphviz DOT.
//!
//! Edges point the way gradients flow during `backward()`: from an op's
//! output to each of its inputs. Ops recorded inside a [`module_scope`]
//! ("h.0", "encoder") are drawn inside a box of that name, and
//! [`Graph::collapsed`] merges deep scopes into one node each, so that a
//! many-layer model fits on a screen.
//!
//! ```
//! use kiln::Tensor;
//! use kiln::autograd::{GraphBuilder, module_scope};
//!
//! let w = Tensor::from_vec(vec![0.5f64, -1.0], [2])?.requires_grad_();
//! let x = Tensor::from_vec(vec![1.0f64, 2.0], [2])?;
//! let y = {
//!     let _scope = module_scope("layer");
//!     x.mul(&w)?.tanh()?
//! };
//! let loss = y.sum_all()?;
//! let graph = GraphBuilder::new()
//!     .names(&[("layer.weight".to_string(), w.clone())])
//!     .build(&loss);
//! // sum, tanh, mul, then the leaf w: the order backward() visits them.
//! assert_eq!(graph.op_names(), ["sum", "tanh", "mul"]);
//! assert!(graph.to_dot().contains("layer.weight"));
//! // At depth 1 the ops inside "layer" become one box.
//! assert!(graph.collapsed(1).to_dot().contains("layer\\n2 ops, 1 leaf"));
//! # Ok::<(), kiln::Error>(())
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::marker::PhantomData;
use std::sync::Arc;

use super::topological_order;
use crate::tensor::{DType, Device, Shape, Tensor, TensorId};

// ----- module scopes ----------------------------------------------------

/// The names of the [`module_scope`]s open when a node was recorded,
/// outermost first, stored joined so that a node pays one `Arc` clone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ScopePath {
    /// The names joined with '.': "h.0", "generator", "encoder".
    joined: String,
    /// Where each name ends in `joined`: a name may itself hold a '.'
    /// ("h.0" is one scope, the block).
    ends: Vec<usize>,
}

impl ScopePath {
    /// The names joined with '.'.
    pub(crate) fn joined(&self) -> &str {
        &self.joined
    }

    /// The scope names, outermost first.
    fn components(&self) -> Vec<String> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let name = self.joined[start..end].to_string();
                start = end + 1;
                name
            })
            .collect()
    }
}

thread_local! {
    static CURRENT_SCOPE: RefCell<Option<Arc<ScopePath>>> = const { RefCell::new(None) };
}

/// The scope path a node recorded now belongs to; None outside any scope.
pub(crate) fn current_scope() -> Option<Arc<ScopePath>> {
    CURRENT_SCOPE.with(|scope| scope.borrow().clone())
}

/// Keeps a [`module_scope`] open; closing it restores the enclosing scope.
#[must_use = "the scope closes as soon as the guard is dropped"]
pub struct ScopeGuard {
    previous: Option<Arc<ScopePath>>,
    // The scope belongs to this thread's stack.
    _not_send: PhantomData<*const ()>,
}

/// Names the module whose forward runs until the guard is dropped: every op
/// recorded meanwhile on this thread carries the path of open scopes
/// ("h.0", or "h.0.attn" inside a nested scope), which [`Graph`] uses to
/// box and collapse a model's repeated blocks. Use the module's state-dict
/// prefix as its name so that scopes and parameter names agree.
///
/// ```
/// let _block = kiln::autograd::module_scope("h.0");
/// // ops here belong to "h.0"
/// ```
pub fn module_scope(name: &str) -> ScopeGuard {
    CURRENT_SCOPE.with(|scope| {
        let mut current = scope.borrow_mut();
        let previous = current.clone();
        let path = match &previous {
            None => ScopePath {
                joined: name.to_string(),
                ends: vec![name.len()],
            },
            Some(outer) => {
                let joined = format!("{}.{name}", outer.joined);
                let mut ends = outer.ends.clone();
                ends.push(joined.len());
                ScopePath { joined, ends }
            }
        };
        *current = Some(Arc::new(path));
        ScopeGuard {
            previous,
            _not_send: PhantomData,
        }
    })
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT_SCOPE.with(|scope| *scope.borrow_mut() = previous);
    }
}

// ----- the graph --------------------------------------------------------

/// The metadata of a tensor in the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub id: TensorId,
    pub shape: Shape,
    pub dtype: DType,
    pub device: Device,
    pub requires_grad: bool,
}

impl TensorInfo {
    fn of(tensor: &Tensor) -> TensorInfo {
        TensorInfo {
            id: tensor.id(),
            shape: tensor.shape().clone(),
            dtype: tensor.dtype(),
            device: tensor.device(),
            requires_grad: tensor.requires_grad(),
        }
    }
}

/// What a node of the picture stands for.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// An op's output; `name` is its backward rule's ([`crate::Backward::name`]).
    Op {
        name: &'static str,
        tensor: TensorInfo,
    },
    /// A tensor without a node: a leaf that requires grad (a parameter,
    /// named when the builder was given its name) or a constant input
    /// (`tensor.requires_grad` false; only with [`GraphBuilder::constants`]).
    Leaf {
        name: Option<String>,
        tensor: TensorInfo,
    },
    /// The ops (and the leaves only they use) of one scope, merged by
    /// [`Graph::collapsed`].
    Group {
        prefix: String,
        ops: usize,
        leaves: usize,
    },
}

/// One node of a [`Graph`].
#[derive(Clone, Debug, PartialEq)]
pub struct GraphNode {
    pub kind: NodeKind,
    /// The module scopes it sits in, outermost first (empty outside any).
    /// A leaf sits in the scopes shared by every op that uses it; a group
    /// in the scopes around its prefix.
    pub scope: Vec<String>,
}

/// An arrow from `from` to `to` (indices into [`Graph::nodes`]): the way
/// dL/d(output) flows, from an op's output to one of its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    /// False for an edge into a constant, which gets no gradient (drawn dashed).
    pub carries_gradient: bool,
}

/// The graph reachable from a tensor: see [`graph()`] and [`GraphBuilder`].
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    nodes: Vec<GraphNode>,
    edges: Vec<Edge>,
}

/// Builds a [`Graph`]; `GraphBuilder::new().build(&loss)` is [`graph()`].
#[derive(Clone, Debug, Default)]
pub struct GraphBuilder {
    names: HashMap<TensorId, String>,
    constants: bool,
}

/// The graph reachable from `root` through nodes that require grad, its
/// leaves unnamed and without constants. Take it before `backward()`,
/// which releases the nodes (or after `backward_retaining_graph()`).
pub fn graph(root: &Tensor) -> Graph {
    GraphBuilder::new().build(root)
}

/// [`graph()`] with leaves labelled by the names in `named`
/// (`model.named_parameters()`), matched by tensor id.
pub fn graph_with_names(root: &Tensor, named: &[(String, Tensor)]) -> Graph {
    GraphBuilder::new().names(named).build(root)
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Labels the leaves found in `named` (state-dict names) with their names.
    pub fn names(mut self, named: &[(String, Tensor)]) -> Self {
        for (name, tensor) in named {
            self.names.insert(tensor.id(), name.clone());
        }
        self
    }

    /// Also draws the inputs that need no gradient (data, targets, noise,
    /// indices), with dashed edges.
    pub fn constants(mut self, include: bool) -> Self {
        self.constants = include;
        self
    }

    /// The graph of `root`. Nodes come in the order `backward()` visits
    /// them: `root` first, each tensor after every op that uses it
    /// (reverse topological order); constants follow, in the order the ops
    /// use them. Edges come op by op, input by input.
    pub fn build(&self, root: &Tensor) -> Graph {
        let mut order = topological_order(root);
        order.reverse();
        let mut index: HashMap<TensorId, usize> = HashMap::new();
        let mut nodes: Vec<GraphNode> = Vec::with_capacity(order.len());
        for tensor in &order {
            index.insert(tensor.id(), nodes.len());
            nodes.push(self.node_of(tensor));
        }
        let mut edges = Vec::new();
        for (from, tensor) in order.iter().enumerate() {
            let Some(node) = tensor.node() else { continue };
            node.for_each_input(|input| {
                let to = match index.get(&input.id()) {
                    Some(&to) => to,
                    None if self.constants => {
                        index.insert(input.id(), nodes.len());
                        nodes.push(self.node_of(input));
                        nodes.len() - 1
                    }
                    None => return,
                };
                edges.push(Edge {
                    from,
                    to,
                    carries_gradient: input.requires_grad(),
                });
            });
        }
        place_leaves_in_their_users_scope(&mut nodes, &edges);
        Graph { nodes, edges }
    }

    fn node_of(&self, tensor: &Tensor) -> GraphNode {
        let tensor_info = TensorInfo::of(tensor);
        match tensor.node() {
            Some(node) => GraphNode {
                kind: NodeKind::Op {
                    name: node.name(),
                    tensor: tensor_info,
                },
                scope: node.scope().map_or_else(Vec::new, ScopePath::components),
            },
            None => GraphNode {
                kind: NodeKind::Leaf {
                    name: self.names.get(&tensor.id()).cloned(),
                    tensor: tensor_info,
                },
                scope: Vec::new(),
            },
        }
    }
}

/// Gives each leaf the longest scope prefix shared by all the ops that use
/// it, so a block's parameters are drawn (and collapsed) with the block.
fn place_leaves_in_their_users_scope(nodes: &mut [GraphNode], edges: &[Edge]) {
    let mut shared: HashMap<usize, Vec<String>> = HashMap::new();
    for edge in edges {
        if !matches!(nodes[edge.to].kind, NodeKind::Leaf { .. }) {
            continue;
        }
        let user_scope = &nodes[edge.from].scope;
        shared
            .entry(edge.to)
            .and_modify(|scope| {
                let common = scope
                    .iter()
                    .zip(user_scope)
                    .take_while(|(a, b)| a == b)
                    .count();
                scope.truncate(common);
            })
            .or_insert_with(|| user_scope.clone());
    }
    for (leaf, scope) in shared {
        nodes[leaf].scope = scope;
    }
}

impl Graph {
    /// The nodes, in the order described at [`GraphBuilder::build`].
    pub fn nodes(&self) -> &[GraphNode] {
        &self.nodes
    }

    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    /// The rule names of the op nodes, in order: for a graph built from a
    /// loss, the order in which `backward()` runs the rules.
    pub fn op_names(&self) -> Vec<&'static str> {
        self.nodes
            .iter()
            .filter_map(|node| match node.kind {
                NodeKind::Op { name, .. } => Some(name),
                _ => None,
            })
            .collect()
    }

    /// The graph with every node whose scope path has `depth` or more
    /// components merged into one group per `depth`-component prefix
    /// (labelled with the prefix and its op count), edges between groups
    /// kept once. Depth 1 draws each top-level module (a GPT's `h.0`,
    /// `h.1`, ...) as one box; ops outside any scope stay as they are.
    /// Depth 0 merges nothing.
    pub fn collapsed(&self, depth: usize) -> Graph {
        if depth == 0 {
            return self.clone();
        }
        let mut nodes: Vec<GraphNode> = Vec::new();
        let mut group_of_prefix: HashMap<String, usize> = HashMap::new();
        let mut new_index = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            if node.scope.len() < depth {
                new_index.push(nodes.len());
                nodes.push(node.clone());
                continue;
            }
            let prefix = node.scope[..depth].join(".");
            let group = *group_of_prefix.entry(prefix.clone()).or_insert_with(|| {
                nodes.push(GraphNode {
                    kind: NodeKind::Group {
                        prefix,
                        ops: 0,
                        leaves: 0,
                    },
                    scope: node.scope[..depth - 1].to_vec(),
                });
                nodes.len() - 1
            });
            if let NodeKind::Group { ops, leaves, .. } = &mut nodes[group].kind {
                match &node.kind {
                    NodeKind::Op { .. } => *ops += 1,
                    NodeKind::Leaf { .. } => *leaves += 1,
                    NodeKind::Group {
                        ops: inner_ops,
                        leaves: inner_leaves,
                        ..
                    } => {
                        *ops += inner_ops;
                        *leaves += inner_leaves;
                    }
                }
            }
            new_index.push(group);
        }
        let mut seen = HashSet::new();
        let edges = self
            .edges
            .iter()
            .map(|edge| Edge {
                from: new_index[edge.from],
                to: new_index[edge.to],
                carries_gradient: edge.carries_gradient,
            })
            .filter(|edge| edge.from != edge.to && seen.insert(*edge))
            .collect();
        Graph { nodes, edges }
    }

    /// Graphviz DOT text: ops as boxes, leaves that require grad as
    /// filled ellipses, constants as dashed ellipses, collapsed groups as
    /// 3-D boxes, and each module scope as a labelled cluster. Node `nK`
    /// is `nodes()[K]`; the text depends only on the graph, so it can be
    /// compared exactly.
    pub fn to_dot(&self) -> String {
        let mut dot = String::new();
        dot.push_str("digraph kiln {\n");
        dot.push_str(
            "  // arrows point the way gradients flow: from an op's output to its inputs\n",
        );
        dot.push_str("  node [fontname=\"Helvetica\", fontsize=10];\n");
        dot.push_str("  edge [arrowsize=0.6];\n");
        let mut clusters = ScopeTree::default();
        for (index, node) in self.nodes.iter().enumerate() {
            clusters.insert(&node.scope, index);
        }
        let mut next_cluster = 0;
        self.write_scope(&mut dot, &clusters, "", 1, &mut next_cluster);
        for edge in &self.edges {
            let style = if edge.carries_gradient {
                ""
            } else {
                " [style=dashed, color=gray50]"
            };
            let _ = writeln!(dot, "  n{} -> n{}{style};", edge.from, edge.to);
        }
        dot.push_str("}\n");
        dot
    }

    /// Writes the nodes of one scope, then each inner scope as a cluster.
    fn write_scope(
        &self,
        dot: &mut String,
        scope: &ScopeTree,
        label: &str,
        level: usize,
        next_cluster: &mut usize,
    ) {
        let indent = "  ".repeat(level);
        for &index in &scope.nodes {
            let _ = writeln!(
                dot,
                "{indent}n{index} [{}];",
                node_attributes(&self.nodes[index])
            );
        }
        for (name, inner) in &scope.children {
            let inner_label = if label.is_empty() {
                name.clone()
            } else {
                format!("{label}.{name}")
            };
            let _ = writeln!(dot, "{indent}subgraph cluster_{} {{", *next_cluster);
            *next_cluster += 1;
            let _ = writeln!(
                dot,
                "{indent}  label=\"{}\"; style=\"rounded,dashed\"; color=gray40; fontname=\"Helvetica\";",
                escape(&inner_label)
            );
            self.write_scope(dot, inner, &inner_label, level + 1, next_cluster);
            let _ = writeln!(dot, "{indent}}}");
        }
    }
}

/// Nodes grouped by scope, children in the order they first appear.
#[derive(Default)]
struct ScopeTree {
    nodes: Vec<usize>,
    children: Vec<(String, ScopeTree)>,
}

impl ScopeTree {
    fn insert(&mut self, scope: &[String], node: usize) {
        let Some((first, rest)) = scope.split_first() else {
            self.nodes.push(node);
            return;
        };
        let position = match self.children.iter().position(|(name, _)| name == first) {
            Some(position) => position,
            None => {
                self.children.push((first.clone(), ScopeTree::default()));
                self.children.len() - 1
            }
        };
        self.children[position].1.insert(rest, node);
    }
}

fn node_attributes(node: &GraphNode) -> String {
    let describe =
        |tensor: &TensorInfo| format!("{} {} {}", tensor.shape, tensor.dtype, tensor.device);
    match &node.kind {
        NodeKind::Op { name, tensor } => format!(
            "label=\"{}\\n{}\", shape=box, style=\"rounded,filled\", fillcolor=\"#dbe8f6\"",
            escape(name),
            describe(tensor)
        ),
        NodeKind::Leaf { name, tensor } if tensor.requires_grad => format!(
            "label=\"{}\\n{}\", shape=ellipse, style=filled, fillcolor=\"#d4efd4\"",
            escape(name.as_deref().unwrap_or("leaf")),
            describe(tensor)
        ),
        NodeKind::Leaf { name, tensor } => format!(
            "label=\"{}\\n{}\", shape=ellipse, style=dashed, color=gray50",
            escape(name.as_deref().unwrap_or("constant")),
            describe(tensor)
        ),
        NodeKind::Group {
            prefix,
            ops,
            leaves,
        } => {
            let mut count = plural(*ops, "op");
            if *leaves > 0 {
                count.push_str(", ");
                count.push_str(&plural(*leaves, "leaf"));
            }
            format!(
                "label=\"{}\\n{count}\", shape=box3d, style=filled, fillcolor=\"#f6e4c8\"",
                escape(prefix)
            )
        }
    }
}

fn plural(count: usize, noun: &str) -> String {
    match (count, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "leaf") => format!("{count} leaves"),
        _ => format!("{count} {noun}s"),
    }
}

/// A DOT double-quoted string's content.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_keep_dotted_names_whole_and_close_in_order() {
        assert!(current_scope().is_none());
        let block = module_scope("h.0");
        {
            let _attention = module_scope("attn");
            let path = current_scope().unwrap();
            assert_eq!(path.joined(), "h.0.attn");
            assert_eq!(path.components(), ["h.0", "attn"]);
        }
        assert_eq!(current_scope().unwrap().components(), ["h.0"]);
        drop(block);
        assert!(current_scope().is_none());
    }

    #[test]
    fn collapsing_merges_only_scopes_at_least_depth_deep() {
        let x = Tensor::ones([2], DType::F64, Device::Cpu)
            .unwrap()
            .requires_grad_();
        let y = {
            let _block = module_scope("block");
            let h = x.exp().unwrap();
            let _inner = module_scope("inner");
            h.tanh().unwrap()
        };
        let full = graph(&y.sum_all().unwrap());
        let kinds = |graph: &Graph| -> Vec<String> {
            graph
                .nodes()
                .iter()
                .map(|node| match &node.kind {
                    NodeKind::Op { name, .. } => name.to_string(),
                    NodeKind::Leaf { .. } => "leaf".into(),
                    NodeKind::Group {
                        prefix,
                        ops,
                        leaves,
                    } => format!("{prefix}:{ops}+{leaves}"),
                })
                .collect()
        };
        assert_eq!(kinds(&full), ["sum", "tanh", "exp", "leaf"]);
        assert_eq!(
            kinds(&full.collapsed(2)),
            ["sum", "block.inner:1+0", "exp", "leaf"]
        );
        assert_eq!(kinds(&full.collapsed(1)), ["sum", "block:2+1"]);
        // Collapsing a collapsed graph adds the groups up.
        assert_eq!(kinds(&full.collapsed(2).collapsed(1)), ["sum", "block:2+1"]);
        assert_eq!(full.collapsed(0), full);
    }
}
