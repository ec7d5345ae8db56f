//! What every optimizer shares: parameter and hyper-parameter checks, and
//! the pieces of loading a saved state.

use std::collections::{HashMap, HashSet};

use super::dispatch::deep_copy;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// The device a profiling scope of an update synchronises: the first
/// parameter's (parameters share one device in kiln's models).
pub(super) fn params_device<'a>(mut params: impl Iterator<Item = &'a Tensor>) -> Device {
    params.next().map_or(Device::Cpu, Tensor::device)
}

/// Checks the parameter list: unique names, each tensor once (it would
/// otherwise be updated twice per step), float tensors.
pub(super) fn check_params(optimizer: &'static str, params: &[(String, Tensor)]) -> Result<()> {
    let mut seen_names = HashSet::new();
    let mut seen_tensors = HashSet::new();
    for (name, tensor) in params {
        if !seen_names.insert(name.as_str()) {
            return Err(Error::invalid(
                optimizer,
                format!("parameter name {name} appears twice"),
            ));
        }
        if !seen_tensors.insert(tensor.id()) {
            return Err(Error::invalid(
                optimizer,
                format!("parameter {name} is a tensor already listed under another name"),
            ));
        }
        if !matches!(tensor.dtype(), DType::F32 | DType::F64) {
            return Err(Error::invalid(
                optimizer,
                format!(
                    "parameter {name} has dtype {}, not a float dtype",
                    tensor.dtype()
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_hyper(optimizer: &'static str, what: &str, value: f64, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            optimizer,
            format!("invalid {what}: {value}"),
        ))
    }
}

/// Names in `tensors` that no parameter's state could have, sorted.
pub(super) fn unexpected_names(
    tensors: &HashMap<String, Tensor>,
    params: impl Iterator<Item = String>,
    suffixes: &[&str],
) -> Vec<String> {
    let known: HashSet<String> = params
        .flat_map(|p| suffixes.iter().map(move |s| format!("{p}.{s}")))
        .collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(*k))
        .cloned()
        .collect();
    unexpected.sort();
    unexpected
}

/// A copy of state tensor `key` converted to `param`'s dtype and device, or
/// a description of what is wrong with it.
pub(super) fn state_copy(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    param: &Tensor,
) -> std::result::Result<Option<Tensor>, String> {
    let Some(src) = tensors.get(key) else {
        return Ok(None);
    };
    if src.shape() != param.shape() {
        return Err(format!(
            "{key} has shape {}, its parameter {}",
            src.shape(),
            param.shape()
        ));
    }
    src.to_dtype(param.dtype())
        .and_then(|t| t.to_device(param.device()))
        .and_then(|t| deep_copy(&t))
        .map(Some)
        .map_err(|e| format!("{key}: {e}"))
}

/// The step count stored under `key` (a one-element tensor of any dtype).
pub(super) fn step_count(
    tensors: &HashMap<String, Tensor>,
    key: &str,
) -> std::result::Result<u32, String> {
    let value = tensors
        .get(key)
        .ok_or_else(|| format!("{key} is missing"))?
        .item()
        .map_err(|e| format!("{key}: {e}"))?;
    if value.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&value) {
        return Err(format!("{key} = {value} is not a valid step count"));
    }
    Ok(value as u32)
}

pub(super) fn state_load_error(optimizer: &'static str, problems: Vec<String>) -> Error {
    Error::invalid(
        optimizer,
        format!(
            "cannot load optimizer state: {}; nothing was loaded",
            problems.join("; ")
        ),
    )
}
