//! A record of what `backward()` did, rule by rule, for teaching and for
//! debugging vanishing or exploding gradients.
//!
//! While the guard of [`trace()`] is alive, every backward pass on this
//! thread appends one [`TraceRecord`] per node it runs, in the order it
//! runs them (reverse topological order, from the loss down): the rule's
//! name, the shape and L2 norm of dL/d(output), and the shape and norm of
//! the dL/d(input) it returned for each input (`None` for an input that
//! gets no gradient). [`TraceGuard::finish`] ends the trace and returns
//! it; a [`Trace`] prints as a table.
//!
//! For y = tanh(x·w + b), L = Σy, with x = [[1, 2], [3, 4]], w = [0.5, −0.25]ᵀ
//! and b = [0.1]:
//!
//! ```
//! use kiln::Tensor;
//!
//! let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], [2, 2])?;
//! let w = Tensor::from_vec(vec![0.5f64, -0.25], [2, 1])?.requires_grad_();
//! let b = Tensor::from_vec(vec![0.1f64], [1])?.requires_grad_();
//! let loss = x.matmul(&w)?.add(&b)?.tanh()?.sum_all()?;
//!
//! let tracing = kiln::autograd::trace();
//! let grads = loss.backward()?;
//! let trace = tracing.finish();
//! println!("{trace}");
//!
//! // The rules run from the loss down.
//! let rules: Vec<&str> = trace.records.iter().map(|r| r.op).collect();
//! assert_eq!(rules, ["sum", "tanh", "add", "matmul"]);
//! // sum: dL/dy = 1 for every y, so its norm is √2.
//! let sum = &trace.records[0];
//! assert!((sum.grad_inputs[0].as_ref().unwrap().norm - 2f64.sqrt()).abs() < 1e-12);
//! // matmul: x is a constant, so only w gets a gradient.
//! let matmul = &trace.records[3];
//! assert!(matmul.grad_inputs[0].is_none());
//! assert_eq!(matmul.grad_inputs[1].as_ref().unwrap().shape.dims(), &[2, 1]);
//! assert_eq!(grads.get(&w).unwrap().dims(), &[2, 1]);
//! # Ok::<(), kiln::Error>(())
//! ```

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use super::Node;
use crate::tensor::{Shape, Tensor};

thread_local! {
    /// The records of the trace open on this thread; None when none is.
    static RECORDS: RefCell<Option<Vec<TraceRecord>>> = const { RefCell::new(None) };
}

/// The shape and L2 norm of one gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct GradSummary {
    pub shape: Shape,
    /// √(Σ g²), computed in f64.
    pub norm: f64,
}

impl GradSummary {
    fn of(gradient: &Tensor) -> GradSummary {
        let norm = gradient
            .to_f64_vec()
            .iter()
            .map(|g| g * g)
            .sum::<f64>()
            .sqrt();
        GradSummary {
            shape: gradient.shape().clone(),
            norm,
        }
    }
}

/// One rule's call during a backward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRecord {
    /// The rule's (and so the op's) name.
    pub op: &'static str,
    /// The module scope the op ran in ("h.0"), if any.
    pub scope: Option<String>,
    /// dL/d(output), the gradient the rule received.
    pub grad_output: GradSummary,
    /// dL/d(input) for each input in order; None where the input needs no
    /// gradient (a constant, indices) or the rule gives none.
    pub grad_inputs: Vec<Option<GradSummary>>,
    /// True when the rule's output was a slice of its input (`narrow`) and
    /// dL/d(output) went straight into that slice of the input's running
    /// gradient sum; `grad_inputs[0]` then describes the zero-padded
    /// gradient that was never built (the norms are the same).
    pub accumulated_in_place: bool,
}

/// The records of a finished trace, in the order the rules ran.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Trace {
    pub records: Vec<TraceRecord>,
}

/// Keeps a trace open; see [`trace()`].
#[must_use = "tracing stops as soon as the guard is dropped"]
pub struct TraceGuard {
    /// The trace this one interrupted, restored when it ends.
    previous: Option<Vec<TraceRecord>>,
    finished: bool,
    // The records live in this thread's state.
    _not_send: PhantomData<*const ()>,
}

/// Starts recording every backward pass on this thread until the returned
/// guard is finished or dropped (see the [module docs](self)). A trace
/// opened inside another pauses it.
pub fn trace() -> TraceGuard {
    let previous = RECORDS.with(|records| records.borrow_mut().replace(Vec::new()));
    TraceGuard {
        previous,
        finished: false,
        _not_send: PhantomData,
    }
}

impl TraceGuard {
    /// The records so far; the trace goes on.
    pub fn records(&self) -> Vec<TraceRecord> {
        RECORDS.with(|records| records.borrow().clone().unwrap_or_default())
    }

    /// Ends the trace and returns what it recorded.
    pub fn finish(mut self) -> Trace {
        self.finished = true;
        let previous = self.previous.take();
        let records =
            RECORDS.with(|records| std::mem::replace(&mut *records.borrow_mut(), previous));
        Trace {
            records: records.unwrap_or_default(),
        }
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if !self.finished {
            let previous = self.previous.take();
            RECORDS.with(|records| *records.borrow_mut() = previous);
        }
    }
}

/// Whether a trace is open on this thread (checked once per backward pass).
pub(crate) fn is_active() -> bool {
    RECORDS.with(|records| records.borrow().is_some())
}

fn push(record: TraceRecord) {
    RECORDS.with(|records| {
        if let Some(records) = records.borrow_mut().as_mut() {
            records.push(record);
        }
    });
}

fn scope_of(node: &Node) -> Option<String> {
    node.scope().map(|scope| scope.joined().to_string())
}

/// Records a rule that ran: its gradients in and out.
pub(crate) fn record(
    node: &Node,
    grad_output: &Tensor,
    inputs: &[Tensor],
    grad_inputs: &[Option<Tensor>],
) {
    let grad_inputs = inputs
        .iter()
        .zip(grad_inputs)
        .map(|(input, gradient)| {
            // The walk drops a gradient for an input that needs none.
            gradient
                .as_ref()
                .filter(|_| input.requires_grad())
                .map(GradSummary::of)
        })
        .collect();
    push(TraceRecord {
        op: node.name(),
        scope: scope_of(node),
        grad_output: GradSummary::of(grad_output),
        grad_inputs,
        accumulated_in_place: false,
    });
}

/// Records a slice rule whose gradient was added in place into its
/// input's running sum: dL/d(input) is dL/d(output) padded with zeros.
pub(crate) fn record_slice_accumulation(node: &Node, grad_output: &Tensor, input: &Tensor) {
    let grad_output = GradSummary::of(grad_output);
    let padded = GradSummary {
        shape: input.shape().clone(),
        norm: grad_output.norm,
    };
    push(TraceRecord {
        op: node.name(),
        scope: scope_of(node),
        grad_output,
        grad_inputs: vec![Some(padded)],
        accumulated_in_place: true,
    });
}

impl fmt::Display for GradSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let norm = self.norm;
        if norm == 0.0 || (1e-3..1e5).contains(&norm) {
            write!(f, "{} ‖{norm:.4}‖", self.shape)
        } else {
            write!(f, "{} ‖{norm:.3e}‖", self.shape)
        }
    }
}

/// A table: one row per rule, in the order they ran; "—" for an input
/// that got no gradient, "(in place)" for a slice added into its input's sum.
impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_scope = self.records.iter().any(|r| r.scope.is_some());
        let mut rows: Vec<Vec<String>> = vec![{
            let mut header = vec!["step".to_string(), "rule".to_string()];
            if with_scope {
                header.push("scope".into());
            }
            header.push("dL/d(output) ‖norm‖".into());
            header.push("dL/d(inputs) ‖norm‖".into());
            header
        }];
        for (step, record) in self.records.iter().enumerate() {
            let mut row = vec![(step + 1).to_string(), record.op.to_string()];
            if with_scope {
                row.push(record.scope.clone().unwrap_or_default());
            }
            row.push(record.grad_output.to_string());
            let mut inputs: Vec<String> = record
                .grad_inputs
                .iter()
                .map(|g| {
                    g.as_ref()
                        .map_or_else(|| "—".to_string(), |g| g.to_string())
                })
                .collect();
            if record.accumulated_in_place {
                inputs.push("(in place)".into());
            }
            row.push(inputs.join(", "));
            rows.push(row);
        }
        let columns = rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                if c == 0 {
                    line.push_str(&format!("{cell:>width$}", width = widths[c]));
                } else if c + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}", width = widths[c]));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device};

    fn backward_of_exp() {
        let x = Tensor::ones([3], DType::F64, Device::Cpu)
            .unwrap()
            .requires_grad_();
        x.exp().unwrap().sum_all().unwrap().backward().unwrap();
    }

    #[test]
    fn an_inner_trace_pauses_the_outer_one_and_dropping_ends_it() {
        assert!(!is_active());
        let outer = trace();
        backward_of_exp();
        let inner = trace();
        backward_of_exp();
        backward_of_exp();
        assert_eq!(inner.finish().records.len(), 4);
        assert_eq!(outer.records().len(), 2, "the outer trace was paused");
        drop(outer);
        assert!(!is_active());
    }
}
