//! The tape as a picture (`kiln::autograd::graph`, `kiln graph`) and the
//! backward trace (`kiln::autograd::trace`).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::autograd::{GraphBuilder, NodeKind, graph, graph_with_names, module_scope, trace};
use kiln::models::gpt::{Gpt, GptConfig};
use kiln::nn::{Init, Linear, Module};
use kiln::{DType, Device, Rng, Tensor};

/// A fresh, empty scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-graph-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn entries(&self) -> Vec<String> {
        fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn f64_tensor(values: &[f64]) -> Tensor {
    Tensor::from_vec(values.to_vec(), [values.len()]).unwrap()
}

#[test]
fn the_graph_of_a_small_expression_is_exactly_its_ops_leaves_and_gradient_edges() {
    let x = f64_tensor(&[1.0, -2.0]);
    let w = f64_tensor(&[0.5, 0.25]).requires_grad_();
    let b = f64_tensor(&[0.1]).requires_grad_();
    // L = Σ tanh(x·w + b), the affine part inside a module scope.
    let pre_activation = {
        let _scope = module_scope("layer");
        x.mul(&w).unwrap().add(&b).unwrap()
    };
    let loss = pre_activation.tanh().unwrap().sum_all().unwrap();

    let dot = GraphBuilder::new()
        .names(&[("w".to_string(), w.clone())])
        .constants(true)
        .build(&loss)
        .to_dot();
    let op = r##"shape=box, style="rounded,filled", fillcolor="#dbe8f6""##;
    let leaf = r##"shape=ellipse, style=filled, fillcolor="#d4efd4""##;
    let constant = "shape=ellipse, style=dashed, color=gray50";
    let expected = format!(
        r#"digraph kiln {{
  // arrows point the way gradients flow: from an op's output to its inputs
  node [fontname="Helvetica", fontsize=10];
  edge [arrowsize=0.6];
  n0 [label="sum\n[] f64 cpu", {op}];
  n1 [label="tanh\n[2] f64 cpu", {op}];
  subgraph cluster_0 {{
    label="layer"; style="rounded,dashed"; color=gray40; fontname="Helvetica";
    n2 [label="add\n[2] f64 cpu", {op}];
    n3 [label="mul\n[2] f64 cpu", {op}];
    n4 [label="w\n[2] f64 cpu", {leaf}];
    n5 [label="leaf\n[1] f64 cpu", {leaf}];
    n6 [label="constant\n[2] f64 cpu", {constant}];
  }}
  n0 -> n1;
  n1 -> n2;
  n2 -> n3;
  n2 -> n5;
  n3 -> n6 [style=dashed, color=gray50];
  n3 -> n4;
}}
"#
    );
    assert_eq!(dot, expected, "got:\n{dot}");

    // Without the builder's options: no constant, no names.
    let plain = graph(&loss);
    assert_eq!(plain.nodes().len(), 6);
    assert_eq!(plain.edges().len(), 5);
    assert!(!plain.to_dot().contains("constant") && !plain.to_dot().contains("\"w\\n"));
}

#[test]
fn leaves_are_labelled_with_their_parameter_names() {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let linear = Linear::new(4, 3, true, &mut init).unwrap();
    let x = Tensor::ones([2, 4], DType::F32, Device::Cpu).unwrap();
    let loss = linear.forward(&x).unwrap().sum_all().unwrap();

    let dot = graph_with_names(&loss, &linear.named_parameters()).to_dot();
    assert!(dot.contains(r#"label="weight\n[3, 4] f32 cpu""#), "{dot}");
    assert!(dot.contains(r#"label="bias\n[3] f32 cpu""#), "{dot}");
    let unnamed = graph(&loss).to_dot();
    assert!(!unnamed.contains("weight") && unnamed.contains(r#"label="leaf\n[3, 4]"#));
}

#[test]
fn depth_one_draws_each_gpt_block_as_one_box() {
    let config = GptConfig {
        vocab_size: 11,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 4,
        dropout: 0.0,
    };
    let mut rng = Rng::seed(1);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let gpt = Gpt::new(&config, 7, &mut init).unwrap();
    let ids = Tensor::from_indices(vec![1, 2, 3, 4, 5, 6, 7, 8], [2, 4]).unwrap();
    let targets = Tensor::from_indices(vec![2, 3, 4, 5, 6, 7, 8, 9], [2, 4]).unwrap();
    let loss = gpt.loss(&ids, &targets).unwrap();

    let full = graph_with_names(&loss, &gpt.named_parameters());
    let in_block = |graph: &kiln::autograd::Graph, block: &str| {
        graph
            .nodes()
            .iter()
            .filter(|n| n.scope.first().map(String::as_str) == Some(block))
            .count()
    };
    assert!(in_block(&full, "h.0") > 5 && in_block(&full, "h.1") > 5);
    assert!(
        full.to_dot().contains("h.1.attn.c_attn.weight"),
        "block parameters keep their names"
    );

    let collapsed = full.collapsed(1);
    let groups: Vec<(&str, usize, usize)> = collapsed
        .nodes()
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::Group {
                prefix,
                ops,
                leaves,
            } => Some((prefix.as_str(), *ops, *leaves)),
            _ => None,
        })
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    // The gradient reaches block 1 first.
    assert_eq!((groups[0].0, groups[1].0), ("h.1", "h.0"));
    assert_eq!(groups[0].1, groups[1].1, "both blocks run the same ops");
    assert_eq!(groups[0].1 + groups[0].2, in_block(&full, "h.1"));
    assert!(collapsed.nodes().len() < full.nodes().len());
    assert!(collapsed.nodes().iter().all(|n| n.scope.is_empty()));
    // The box of block 1 passes the gradient to the box of block 0.
    let index = |prefix: &str| {
        collapsed
            .nodes()
            .iter()
            .position(|n| matches!(&n.kind, NodeKind::Group { prefix: p, .. } if p == prefix))
            .unwrap()
    };
    let (h1, h0) = (index("h.1"), index("h.0"));
    assert!(collapsed.edges().iter().any(|e| e.from == h1 && e.to == h0));
    assert!(collapsed.to_dot().contains(r#"label="h.0\n"#));
}

/// The built `kiln` binary, run in `dir` with PATH set to `path`.
fn kiln(args: &[&str], path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("PATH", path)
        .output()
        .expect("the kiln binary runs")
}

#[test]
fn kiln_graph_writes_dot_and_without_graphviz_fails_clearly_writing_nothing() {
    let out = Scratch::new("out");
    let empty_path = Scratch::new("empty-path");
    for picture in ["vae.svg", "vae.png"] {
        let target = out.path(picture);
        let run = kiln(
            &["graph", "vae", "--out", target.to_str().unwrap()],
            &empty_path.0,
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: Graphviz's `dot` was not found on PATH")
                && stderr.contains("apt install graphviz")
                && stderr.contains("--out FILE.dot"),
            "{stderr}"
        );
        assert!(out.entries().is_empty(), "wrote {:?}", out.entries());
    }

    let target = out.path("vae.dot");
    let run = kiln(
        &["graph", "vae", "--out", target.to_str().unwrap()],
        &empty_path.0,
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let dot = fs::read_to_string(&target).unwrap();
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("fc1.weight") && dot.contains("bce_with_logits"));
    assert_eq!(
        out.entries(),
        ["vae.dot"],
        "only the file, no temporary left"
    );

    let target = out.path("gpt.dot");
    let target = target.to_str().unwrap();
    let args = [
        "graph",
        "gpt",
        "--n-layer",
        "2",
        "--depth",
        "1",
        "--out",
        target,
    ];
    let run = kiln(&args, &empty_path.0);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let dot = fs::read_to_string(target).unwrap();
    assert!(dot.contains(r#"label="h.0\n"#) && dot.contains(r#"label="h.1\n"#));
    assert!(
        !dot.contains("h.0.attn.c_attn.weight"),
        "block 0 is collapsed"
    );

    let run = kiln(
        &[
            "graph",
            "vae",
            "--out",
            out.path("vae.pdf").to_str().unwrap(),
        ],
        &empty_path.0,
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.code() == Some(1) && stderr.contains(".dot, .svg or .png"));
}

#[test]
fn the_trace_follows_backwards_reverse_topological_order() {
    let x = f64_tensor(&[0.5, -1.0, 2.0]).requires_grad_();
    let w = f64_tensor(&[1.5, -0.5, 0.25, 1.0, 2.0, -1.0]).requires_grad_();
    // h is shared by three uses, and both halves of p are used.
    let h = x.tanh().unwrap();
    let p = w.mul_scalar(2.0).unwrap();
    let first = p.narrow(0, 0, 3).unwrap();
    let second = p.narrow(0, 3, 3).unwrap();
    let loss = h
        .mul(&h)
        .unwrap()
        .add(&h.exp().unwrap().mul(&first).unwrap())
        .unwrap()
        .add(&second)
        .unwrap()
        .sum_all()
        .unwrap();
    let graph = graph(&loss);

    let tracing = trace();
    let grads = loss.backward().unwrap();
    let trace = tracing.finish();

    let rules: Vec<&str> = trace.records.iter().map(|r| r.op).collect();
    assert_eq!(rules, graph.op_names());
    assert_eq!(rules.iter().filter(|&&r| r == "narrow").count(), 2);
    // Each record's dL/d(output) has its op's output shape.
    let op_shapes: Vec<_> = graph
        .nodes()
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::Op { tensor, .. } => Some(tensor.shape.clone()),
            _ => None,
        })
        .collect();
    let grad_shapes: Vec<_> = trace
        .records
        .iter()
        .map(|r| r.grad_output.shape.clone())
        .collect();
    assert_eq!(grad_shapes, op_shapes);
    // dL/dL = 1; sum_all hands 1 to each of the 3 elements: norm √3.
    let sum = &trace.records[0];
    assert_eq!(sum.grad_output.norm, 1.0);
    let spread = sum.grad_inputs[0].as_ref().unwrap();
    assert!((spread.norm - 3f64.sqrt()).abs() < 1e-12);
    // The last rule gives w its whole gradient: 2 everywhere but where the
    // first half of p multiplies exp(h).
    let dw = grads.get(&w).unwrap().to_f64_vec();
    let last = trace.records.last().unwrap();
    assert_eq!(last.op, "mul_scalar");
    let norm = dw.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!((last.grad_inputs[0].as_ref().unwrap().norm - norm).abs() < 1e-12);
    // The table names every rule.
    let table = trace.to_string();
    for rule in ["sum", "tanh", "exp", "narrow", "mul_scalar"] {
        assert!(table.contains(rule), "{table}");
    }

    // With no guard alive nothing is recorded.
    let again = x.tanh().unwrap().sum_all().unwrap();
    let quiet = trace_len_after(|| {
        again.backward().unwrap();
    });
    assert_eq!(quiet, 0);
}

/// The records a trace opened after `f` gets (none: the trace is closed while it runs).
fn trace_len_after(f: impl FnOnce()) -> usize {
    f();
    trace().finish().records.len()
}
