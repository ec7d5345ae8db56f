//! A run directory: the checkpoint pair, the metrics log, and the atomic
//! writes that keep them consistent when a run is killed at any moment.
//!
//! The checkpoint is two files. `checkpoint.safetensors` holds the tensors
//! (models and optimizer state) and, in its metadata, the complete run state
//! as JSON, so it describes itself. `checkpoint.json` is the same run state
//! for people and scripts to read. Both are replaced atomically (temporary
//! file in the same directory, fsync, rename), the weights first: until the
//! new weights are complete, the previous pair stays untouched, and a JSON
//! file never refers to weights that are not fully on disk. When the two
//! disagree (a run killed between the two renames) the weights' own copy of
//! the state wins.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{Precision, Tensor};

/// File names inside a run directory.
pub const WEIGHTS_FILE: &str = "checkpoint.safetensors";
pub const STATE_FILE: &str = "checkpoint.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const LOSS_CHART_FILE: &str = "loss.png";
pub const SAMPLES_FILE: &str = "samples.png";

/// The safetensors metadata key that holds the run state JSON.
const STATE_METADATA_KEY: &str = "kiln.run_state";

/// The models a run state may name.
const KNOWN_MODELS: [&str; 4] = ["gan", "vae", "gpt", "classifier"];

/// What to do about a run state that cannot be used.
pub(crate) const DAMAGED_STATE: &str = "the run state is damaged or was edited: use an earlier copy of the run's checkpoint, or train again";

/// Version of the run-state layout, bumped on incompatible changes.
pub const STATE_FORMAT: u32 = 1;

/// Everything needed to rebuild a model and continue its training exactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RunState {
    pub format: u32,
    /// "gan", "vae" or "gpt".
    pub model: String,
    /// The model's architecture (per kind: see `cli::train`).
    pub config: serde_json::Value,
    pub training: TrainingConfig,
    /// Optimisation steps completed.
    pub step: usize,
    /// Epochs completed (passes over the training examples).
    pub epoch: usize,
    pub seed: u64,
    /// The GPT's vocabulary (`Vocab::to_string_repr`); absent for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<String>,
    /// The weights file this state belongs to, relative to the JSON file.
    pub weights: String,
}

/// The optimisation settings a resumed run must keep to continue exactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainingConfig {
    pub batch_size: usize,
    pub lr: f64,
    /// Training examples used (all of them, or the first --limit).
    pub examples: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The step count the run was asked for (when saved).
    pub total_steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// The --steps cap, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_decay_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// "f32", "bf16" or "f16" (absent in checkpoints from before mixed precision: f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Whether the bf16 forward copies of the weights are rounded
    /// stochastically (absent: to nearest even).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stochastic_rounding: Option<bool>,
    /// Image models: the dataset ("fashion-mnist", "mnist" or "folder";
    /// absent in runs from before it could change: "fashion-mnist").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// `--dataset folder`: the image folder, as it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_folder: Option<String>,
    /// GPT: AdamW's beta2 (absent in runs from before it was recorded: 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// GPT: the weight initialisation the run started from ("pytorch" or
    /// "gpt2"; absent in runs from before it was recorded: "gpt2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
}

impl TrainingConfig {
    /// The precision the run trains in.
    pub fn precision(&self) -> Result<Precision> {
        match &self.precision {
            None => Ok(Precision::F32),
            Some(name) => Ok(Precision::parse(name)?),
        }
    }
}

/// A checkpoint read back: its state and its tensors (on the CPU).
pub struct LoadedCheckpoint {
    pub state: RunState,
    pub tensors: HashMap<String, Tensor>,
    /// The weights file it came from (for messages).
    pub weights_path: PathBuf,
}

impl LoadedCheckpoint {
    /// The precision the checkpoint was trained in, which its forward passes use.
    pub fn precision(&self) -> Result<Precision> {
        self.state
            .training
            .precision()
            .with_context(|| format!("{}", self.weights_path.display()))
    }

    /// Fails unless the checkpoint holds a `expected` model, saying what it holds.
    pub fn expect_model(&self, expected: &str) -> Result<()> {
        if !KNOWN_MODELS.contains(&self.state.model.as_str()) {
            bail!(
                "{} holds a model named {:?}, which kiln does not know (it trains {}); {DAMAGED_STATE}",
                self.weights_path.display(),
                self.state.model,
                KNOWN_MODELS.join(", ")
            );
        }
        if self.state.model != expected {
            bail!(
                "{} is a {} checkpoint, not a {expected} one; use `{}` with it",
                self.weights_path.display(),
                self.state.model,
                self.state.model
            );
        }
        Ok(())
    }

    /// The tensors named "`prefix`.x", renamed "x" (one model or optimizer).
    pub fn group(&self, prefix: &str) -> HashMap<String, Tensor> {
        let prefix = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(name, tensor)| {
                name.strip_prefix(&prefix)
                    .map(|rest| (rest.to_string(), tensor.clone()))
            })
            .collect()
    }
}

/// `tensors` with every name prefixed by "`prefix`.".
pub fn prefixed(prefix: &str, tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|(name, tensor)| (format!("{prefix}.{name}"), tensor))
        .collect()
}

/// Replaces `path` with `bytes` atomically (see `kiln::atomic_file::write_file_atomically`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic_file::write_file_atomically(path, bytes).map_err(|e| {
        anyhow!(
            "cannot write {} ({e}); the previous file, if any, is unchanged",
            path.display()
        )
    })
}

/// Removes the temporary files of writes that a killed run left behind
/// in `dir` (".checkpoint.safetensors.tmp-…" and the like); best effort.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = [WEIGHTS_FILE, STATE_FILE, METRICS_FILE]
            .iter()
            .any(|file| name.starts_with(&format!(".{file}.tmp-")));
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Does `dir` hold a checkpoint (either file of the pair)?
pub fn has_checkpoint(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).exists() || dir.join(STATE_FILE).exists()
}

/// Saves the checkpoint pair into `dir`: weights (with the state embedded)
/// first, then the JSON, each atomically.
pub fn save_checkpoint(dir: &Path, state: &RunState, tensors: &[(String, Tensor)]) -> Result<()> {
    let json = serde_json::to_string_pretty(state).context("encoding the run state")?;
    let metadata = BTreeMap::from([(STATE_METADATA_KEY.to_string(), json.clone())]);
    crate::checkpoint::save(dir.join(WEIGHTS_FILE), tensors, &metadata)?;
    write_atomically(&dir.join(STATE_FILE), format!("{json}\n").as_bytes())
}

/// Whether [`load_checkpoint`] accepts NaN and ±Inf in a checkpoint's
/// tensors (`kiln --allow-non-finite`); a process-wide choice of the
/// command line.
static ALLOW_NON_FINITE: AtomicBool = AtomicBool::new(false);

/// Sets what [`load_checkpoint`] does with non-finite tensors.
pub fn allow_non_finite_weights(allow: bool) {
    ALLOW_NON_FINITE.store(allow, Ordering::Relaxed);
}

/// The weights file named by `path`: a run directory, its checkpoint.json,
/// or a safetensors file.
fn weights_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let weights = path.join(WEIGHTS_FILE);
        if !weights.exists() {
            bail!(
                "no checkpoint in {} ({WEIGHTS_FILE} is missing); train first with `kiln train`",
                path.display()
            );
        }
        return Ok(weights);
    }
    if !path.exists() {
        bail!(
            "checkpoint {} does not exist; pass a run directory (e.g. runs/gan) or its {WEIGHTS_FILE}",
            path.display()
        );
    }
    if path.extension().is_some_and(|e| e == "json") {
        let text = crate::atomic_file::read_regular_file(path).with_context(|| {
            format!(
                "cannot read {}; pass a run directory or its {STATE_FILE}",
                path.display()
            )
        })?;
        let state: RunState = serde_json::from_slice(&text).map_err(|e| {
            anyhow!(
                "{} is not a kiln checkpoint description ({e}); pass the run directory or its \
                 {WEIGHTS_FILE} instead, which holds the same run state",
                path.display()
            )
        })?;
        let directory = path.parent().unwrap_or(Path::new("."));
        let weights = directory.join(&state.weights);
        if !weights.is_file() {
            bail!(
                "{} names the weights file {:?}, but {} is missing or not a regular file; \
                 restore the run's {WEIGHTS_FILE} beside it, or pass the weights file itself",
                path.display(),
                state.weights,
                weights.display()
            );
        }
        return Ok(weights);
    }
    Ok(path.to_path_buf())
}

/// Reads a checkpoint written by `save_checkpoint` (tensors on the CPU).
pub fn load_checkpoint(path: &Path) -> Result<LoadedCheckpoint> {
    let weights_path = weights_path(path)?;
    let checkpoint = crate::checkpoint::load(&weights_path)?;
    if !ALLOW_NON_FINITE.load(Ordering::Relaxed) {
        crate::checkpoint::check_finite(&weights_path, &checkpoint.tensors)?;
    }
    let json = checkpoint.metadata.get(STATE_METADATA_KEY).ok_or_else(|| {
        anyhow!(
            "{} is a safetensors file but not a kiln training checkpoint (no {STATE_METADATA_KEY} metadata)",
            weights_path.display()
        )
    })?;
    let state: RunState = serde_json::from_str(json).map_err(|e| {
        anyhow!(
            "{}: the embedded run state cannot be read ({e}); {DAMAGED_STATE}",
            weights_path.display()
        )
    })?;
    if state.format != STATE_FORMAT {
        bail!(
            "{} has checkpoint format {}, this kiln reads format {STATE_FORMAT}",
            weights_path.display(),
            state.format
        );
    }
    let loaded = LoadedCheckpoint {
        state,
        tensors: checkpoint.tensors,
        weights_path,
    };
    super::specs::check_config(&loaded)?;
    Ok(loaded)
}

/// The per-step training log, `metrics.csv`: a header, then one row per
/// step, appended (and flushed) as training goes.
pub struct MetricsLog {
    path: PathBuf,
    file: fs::File,
    columns: Vec<String>,
    /// Every row so far (for the loss chart).
    rows: Vec<Vec<f64>>,
}

impl MetricsLog {
    /// Starts the log of a fresh run (replacing any old file), or, when
    /// `resumed_at` is Some(step), keeps the rows up to that step and drops
    /// later ones (they are about to be trained again) and any partial line.
    pub fn open(path: &Path, columns: &[&str], resumed_at: Option<usize>) -> Result<Self> {
        let header = columns.join(",");
        let mut rows = Vec::new();
        if let Some(step) = resumed_at
            && let Ok(text) = fs::read_to_string(path)
        {
            let mut lines = text.lines();
            if lines.next() == Some(header.as_str()) {
                for line in lines {
                    let Some(row) = parse_row(line, columns.len()) else {
                        break;
                    };
                    if row[0] > step as f64 {
                        break;
                    }
                    rows.push(row);
                }
            }
        }
        let mut text = format!("{header}\n");
        for row in &rows {
            text.push_str(&format_row(row));
        }
        write_atomically(path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for appending", path.display()))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        })
    }

    /// Appends one row (the first value is the step).
    pub fn append(&mut self, row: Vec<f64>) -> Result<()> {
        debug_assert_eq!(row.len(), self.columns.len());
        self.file
            .write_all(format_row(&row).as_bytes())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.rows.push(row);
        Ok(())
    }

    /// (step, value) pairs of a column, for charts.
    pub fn series(&self, column: &str) -> Vec<(f64, f64)> {
        let Some(index) = self.columns.iter().position(|c| c == column) else {
            return Vec::new();
        };
        self.rows.iter().map(|r| (r[0], r[index])).collect()
    }
}

/// Step and epoch as integers, the rest in Rust's shortest round-trip form.
fn format_row(row: &[f64]) -> String {
    let mut line = String::new();
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if i < 2 {
            line.push_str(&format!("{}", *value as u64));
        } else {
            line.push_str(&format!("{value}"));
        }
    }
    line.push('\n');
    line
}

/// A complete row of `width` numbers, or None (e.g. a line cut by a crash).
fn parse_row(line: &str, width: usize) -> Option<Vec<f64>> {
    let row: Vec<f64> = line
        .split(',')
        .map(|v| v.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    (row.len() == width).then_some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-run-dir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resumed_metrics_keep_rows_up_to_the_checkpoint_and_drop_a_cut_line() {
        let dir = scratch_dir("metrics");
        let path = dir.join(METRICS_FILE);
        let columns = ["step", "epoch", "loss"];
        let mut log = MetricsLog::open(&path, &columns, None).unwrap();
        for step in 1..=5 {
            log.append(vec![step as f64, 0.0, 1.0 / step as f64])
                .unwrap();
        }
        drop(log);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("6,0,0.1"); // a row cut short by a crash
        fs::write(&path, text).unwrap();

        let log = MetricsLog::open(&path, &columns, Some(3)).unwrap();
        assert_eq!(log.series("loss").len(), 3);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "step,epoch,loss\n1,0,1\n2,0,0.5\n3,0,0.3333333333333333\n"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = scratch_dir("atomic");
        let path = dir.join("state.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn checkpoint_round_trips_state_and_tensors_and_names_the_wrong_model() {
        let dir = scratch_dir("checkpoint");
        let state = RunState {
            format: STATE_FORMAT,
            model: "vae".into(),
            config: serde_json::json!({"latent": 2}),
            training: TrainingConfig {
                batch_size: 4,
                lr: 1e-3,
                examples: 10,
                limit: Some(10),
                total_steps: 3,
                epochs: Some(1),
                max_steps: None,
                warmup: None,
                lr_decay_steps: None,
                grad_clip: None,
                weight_decay: None,
                precision: Some("bf16".into()),
                stochastic_rounding: Some(true),
                beta2: None,
                init: None,
                dataset: Some("folder".into()),
                image_folder: Some("pictures/faces".into()),
            },
            step: 3,
            epoch: 1,
            seed: 7,
            vocab: None,
            weights: WEIGHTS_FILE.into(),
        };
        let weight = Tensor::from_vec(vec![1.0f32, 2.0], [2]).unwrap();
        save_checkpoint(&dir, &state, &[("model.w".into(), weight)]).unwrap();
        for path in [dir.clone(), dir.join(STATE_FILE), dir.join(WEIGHTS_FILE)] {
            let loaded = load_checkpoint(&path).unwrap();
            assert_eq!(loaded.state, state);
            let group = loaded.group("model");
            assert_eq!(group["w"].to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        }
        let loaded = load_checkpoint(&dir).unwrap();
        let message = loaded.expect_model("gan").unwrap_err().to_string();
        assert!(
            message.contains("is a vae checkpoint, not a gan one"),
            "{message}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
