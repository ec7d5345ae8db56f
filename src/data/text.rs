//! Character-level text data for the char-GPT: a vocabulary of the distinct
//! characters of a corpus, the corpus as token ids split 90/10 into training
//! and validation, and random `(x, y)` windows where `y` is `x` shifted by one.

use std::path::Path;

use rand::RngExt;

use crate::atomic_file::read_regular_file;
use crate::error::{Error, Result};
use crate::tensor::{Rng, Tensor};

/// The sorted distinct characters of a corpus; a character's id is its rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    chars: Vec<char>,
}

impl Vocab {
    /// The vocabulary of every distinct character in `text`.
    pub fn from_text(text: &str) -> Vocab {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab { chars }
    }

    /// The number of distinct characters (the model's `vocab_size`).
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// True for the vocabulary of an empty text.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The id of each character of `s`; an error names the characters that are not in
    /// the vocabulary and lists those that are.
    pub fn encode(&self, s: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(s.len());
        let mut unknown = Vec::new();
        for c in s.chars() {
            match self.chars.binary_search(&c) {
                Ok(id) => ids.push(id as u32),
                Err(_) => unknown.push(c),
            }
        }
        if unknown.is_empty() {
            return Ok(ids);
        }
        unknown.sort_unstable();
        unknown.dedup();
        let unknown: String = unknown.into_iter().collect();
        Err(Error::invalid(
            "Vocab::encode",
            format!(
                "characters {unknown:?} are not in the vocabulary; the {} known characters are {:?}",
                self.len(),
                self.to_string_repr()
            ),
        ))
    }

    /// The text of `ids`; an id outside the vocabulary becomes U+FFFD (�), so
    /// that a sampled sequence can always be shown.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(id as usize)
                    .copied()
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }

    /// The characters in id order, as one string (stored in checkpoint metadata).
    pub fn to_string_repr(&self) -> String {
        self.chars.iter().collect()
    }

    /// The inverse of [`Vocab::to_string_repr`]; the characters must be sorted and distinct,
    /// or the ids would not mean what the checkpoint's model learned.
    pub fn from_string_repr(s: &str) -> Result<Vocab> {
        let chars: Vec<char> = s.chars().collect();
        if let Some(pair) = chars.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(Error::invalid(
                "Vocab::from_string_repr",
                format!(
                    "characters must be sorted and distinct, but {:?} comes before {:?} in {s:?}",
                    pair[0], pair[1]
                ),
            ));
        }
        Ok(Vocab { chars })
    }
}

/// A corpus as token ids, split in order: the first 90% to train on, the last 10% to validate.
#[derive(Clone, Debug)]
pub struct TextData {
    pub vocab: Vocab,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// Reads a UTF-8 text file, builds its vocabulary and splits it 90/10 (train/val) in order.
/// A missing file gives an error that says to run `scripts/fetch-data.sh`.
pub fn load_text(path: &Path) -> Result<TextData> {
    let cannot_read = |e: std::io::Error| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            "; run scripts/fetch-data.sh to download the datasets into data/"
        } else {
            ""
        };
        std::io::Error::new(
            e.kind(),
            format!("load_text: cannot read {}: {e}{hint}", path.display()),
        )
    };
    let bytes = read_regular_file(path).map_err(cannot_read)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            "load_text",
            format!("{} is not UTF-8 text ({e})", path.display()),
        )
    })?;
    if text.is_empty() {
        return Err(Error::invalid(
            "load_text",
            format!("{} is empty", path.display()),
        ));
    }
    let vocab = Vocab::from_text(&text);
    let mut train = vocab.encode(&text)?;
    let val = train.split_off(train.len() * 9 / 10);
    Ok(TextData { vocab, train, val })
}

/// A batch of training windows: `x` and `y` are u32 tensors `[batch, block]` where
/// `y[b, t] = x[b, t + 1]` continues the text, so the model learns to predict each
/// next character. Each window starts at an offset drawn uniformly from `rng`.
pub fn random_batch(
    tokens: &[u32],
    batch: usize,
    block: usize,
    rng: &mut Rng,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "random_batch";
    if batch == 0 || block == 0 {
        return Err(Error::invalid(
            OP,
            format!("batch ({batch}) and block ({block}) must both be at least 1"),
        ));
    }
    if tokens.len() <= block {
        return Err(Error::invalid(
            OP,
            format!(
                "{} tokens are too few for windows of {block} (+1 for the shifted target)",
                tokens.len()
            ),
        ));
    }
    let last_start = tokens.len() - block - 1;
    let mut x = Vec::with_capacity(batch * block);
    let mut y = Vec::with_capacity(batch * block);
    for _ in 0..batch {
        let start = rng.inner().random_range(0..=last_start);
        x.extend_from_slice(&tokens[start..start + block]);
        y.extend_from_slice(&tokens[start + 1..start + block + 1]);
    }
    Ok((
        Tensor::from_indices(x, [batch, block])?,
        Tensor::from_indices(y, [batch, block])?,
    ))
}
