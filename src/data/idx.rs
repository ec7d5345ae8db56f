//! The IDX format of MNIST and Fashion-MNIST: a 4-byte magic number
//! (`0x00 0x00 <type> <rank>`), `rank` big-endian u32 dimensions, then the
//! values in row-major order. Only unsigned bytes (type `0x08`) are read, which
//! is what every image and label file of both datasets holds. Files may be
//! gzipped, as they are distributed; gzip is recognised by its magic bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::atomic_file::read_regular_file;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The two leading bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The IDX type code for unsigned bytes.
const IDX_TYPE_U8: u8 = 0x08;
/// What every "file is missing" error tells the user to do.
const FETCH_HINT: &str = "run scripts/fetch-data.sh to download the datasets into data/";

/// An n-dimensional array of unsigned bytes read from an IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (e.g. `[60000, 28, 28]` for images).
    pub dims: Vec<usize>,
    /// The values in row-major order; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Reads an unsigned-byte IDX file, raw or gzipped.
///
/// Errors name the file and say what is wrong with it: missing (with the hint
/// to run `scripts/fetch-data.sh`), not gzip-decodable, bad magic number, a
/// value type other than unsigned bytes, or fewer/more bytes than its header declares.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let cannot_read = |e: std::io::Error| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            format!("; {FETCH_HINT}")
        } else {
            String::new()
        };
        std::io::Error::new(
            e.kind(),
            format!("read_idx: cannot read {}: {e}{hint}", path.display()),
        )
    };
    let raw = read_regular_file(path).map_err(cannot_read)?;
    let bytes = if raw.starts_with(&GZIP_MAGIC) {
        inflate(path, &raw)?
    } else {
        raw
    };
    parse_idx(path, bytes)
}

/// Decompresses a gzipped IDX file no further than its header declares, plus
/// one byte to detect trailing data: a small stream that inflates to far
/// more than its header accounts for is refused without being inflated whole.
fn inflate(path: &Path, gz: &[u8]) -> Result<Vec<u8>> {
    let mut decoder = flate2::read::GzDecoder::new(gz);
    let mut bytes = Vec::new();
    let mut read_up_to = |bytes: &mut Vec<u8>, count: usize| {
        (&mut decoder)
            .take(count as u64)
            .read_to_end(bytes)
            .map_err(|e| idx_error(path, format!("is not a valid gzip stream ({e})")))
    };
    read_up_to(&mut bytes, 4)?;
    if let [0, 0, _, rank] = bytes[..] {
        read_up_to(&mut bytes, 4 * rank as usize)?;
    }
    let (_, header_len, data_len) = parse_header(path, &bytes)?;
    let wanted = header_len.saturating_add(data_len).saturating_add(1);
    let missing = wanted.saturating_sub(bytes.len());
    read_up_to(&mut bytes, missing)?;
    Ok(bytes)
}

/// Parses the bytes of an (already decompressed) IDX file; `path` is only used in errors.
fn parse_idx(path: &Path, mut bytes: Vec<u8>) -> Result<IdxArray> {
    let (dims, header_len, expected) = parse_header(path, &bytes)?;
    let found = bytes.len() - header_len;
    if found < expected {
        return Err(idx_error(
            path,
            format!("is truncated: dimensions {dims:?} need {expected} data bytes, found {found}"),
        ));
    }
    if found > expected {
        // A gzipped file is inflated only one byte past its data: more may follow.
        return Err(idx_error(
            path,
            format!(
                "has trailing bytes: dimensions {dims:?} need {expected} data bytes, more follow"
            ),
        ));
    }
    // The values are the file's bytes after the header: moved, not copied.
    bytes.drain(..header_len);
    Ok(IdxArray { dims, data: bytes })
}

/// The dimensions, header length and data length that the header at the
/// start of `bytes` declares, or an error saying what is wrong with it.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize, usize)> {
    if bytes.len() < 4 {
        return Err(idx_error(
            path,
            format!(
                "is truncated: {} bytes, shorter than the 4-byte magic number",
                bytes.len()
            ),
        ));
    }
    let (zeros, value_type, rank) = ([bytes[0], bytes[1]], bytes[2], bytes[3] as usize);
    if zeros != [0, 0] {
        return Err(idx_error(
            path,
            format!(
                "has a bad magic number {:02x} {:02x} {:02x} {:02x} (an IDX file starts with 00 00 <type> <rank>)",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if value_type != IDX_TYPE_U8 {
        return Err(idx_error(
            path,
            format!(
                "has value type 0x{value_type:02x}; only unsigned bytes (0x{IDX_TYPE_U8:02x}) are supported"
            ),
        ));
    }
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(idx_error(
            path,
            format!(
                "is truncated: {} bytes, but its header declares {rank} dimensions ({header_len} header bytes)",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            idx_error(
                path,
                format!("declares dimensions {dims:?} too large to hold"),
            )
        })?;
    Ok((dims, header_len, expected))
}

/// An error about the file at `path`, which cannot be used as it is.
fn idx_error(path: &Path, msg: String) -> Error {
    Error::invalid(
        "read_idx",
        format!(
            "{} {msg}; replace it with a good copy ({FETCH_HINT})",
            path.display()
        ),
    )
}

/// Which half of an (Fashion-)MNIST dataset to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The 60,000 training images (`train-*` files).
    Train,
    /// The 10,000 test images (`t10k-*` files).
    Test,
}

impl Split {
    fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Images of one size, as bytes: the greyscale IDX sets with their class
/// labels, or a decoded image folder (`super::folder`, unlabelled).
#[derive(Clone, Debug)]
pub struct ImageSet {
    /// `count · channels · rows · cols` pixels, 0 (background) to 255,
    /// image after image, each as its channel planes.
    pub images: Vec<u8>,
    /// One class label per image (IDX sets), or none at all (a folder).
    pub labels: Vec<u8>,
    /// The number of images.
    pub count: usize,
    /// Channels per image: 1 (grey, the IDX sets) or 3 (RGB).
    pub channels: usize,
    /// The height of every image in pixels (28 for both datasets).
    pub rows: usize,
    /// The width of every image in pixels (28 for both datasets).
    pub cols: usize,
}

/// Loads one split from a directory holding the four IDX files under their
/// usual names (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or with `.gz`).
/// This reads MNIST and Fashion-MNIST alike.
///
/// A missing directory or file gives an error that says to run `scripts/fetch-data.sh`.
pub fn load_split(dir: &Path, split: Split) -> Result<ImageSet> {
    if !dir.is_dir() {
        return Err(missing(format!(
            "load_split: directory {} does not exist; {FETCH_HINT}",
            dir.display()
        )));
    }
    let prefix = split.file_prefix();
    let images = read_idx(&find_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?)?;
    let labels = read_idx(&find_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?)?;
    let [count, rows, cols] = images.dims[..] else {
        return Err(Error::shape(
            "load_split",
            format!(
                "{prefix} images in {} have dimensions {:?}, expected [count, rows, cols]",
                dir.display(),
                images.dims
            ),
        ));
    };
    if labels.dims != [count] {
        return Err(Error::shape(
            "load_split",
            format!(
                "{prefix} labels in {} have dimensions {:?}, expected [{count}] to match the {count} images",
                dir.display(),
                labels.dims
            ),
        ));
    }
    Ok(ImageSet {
        images: images.data,
        labels: labels.data,
        count,
        channels: 1,
        rows,
        cols,
    })
}

/// The path of `stem` or `stem.gz` inside `dir`, whichever exists (raw first).
fn find_idx_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let raw = dir.join(stem);
    let gzipped = dir.join(format!("{stem}.gz"));
    [raw, gzipped]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            missing(format!(
                "load_split: {} has neither {stem} nor {stem}.gz; {FETCH_HINT}",
                dir.display()
            ))
        })
}

fn missing(msg: String) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::NotFound, msg))
}

impl ImageSet {
    /// A batch of images as an f32 tensor `[indices.len(), channels, size, size]`.
    ///
    /// Pixels are mapped linearly from 0..255 to `[lo, hi]` (e.g. `[-1, 1]` for a
    /// tanh generator, `[0, 1]` for a VAE), and each image is centred inside a
    /// `size × size` frame whose border is background (pixel 0, i.e. `lo`):
    /// this is how 28×28 digits become the 32×32 inputs a DCGAN expects.
    pub fn batch(&self, indices: &[usize], size: usize, lo: f32, hi: f32) -> Result<Tensor> {
        const OP: &str = "ImageSet::batch";
        let image_len = self.channels * self.rows * self.cols;
        if self.images.len() != self.count * image_len {
            return Err(Error::shape(
                OP,
                format!(
                    "the set holds {} pixels, but {} images of {}x{}x{} need {}",
                    self.images.len(),
                    self.count,
                    self.channels,
                    self.rows,
                    self.cols,
                    self.count * image_len
                ),
            ));
        }
        if indices.is_empty() {
            return Err(Error::invalid(
                OP,
                "no indices given: a batch needs at least one image",
            ));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.count) {
            return Err(Error::invalid(
                OP,
                format!(
                    "index {bad} is out of range for a set of {} images",
                    self.count
                ),
            ));
        }
        if size < self.rows || size < self.cols {
            return Err(Error::invalid(
                OP,
                format!(
                    "size {size} is smaller than the {}x{} images (images are padded, never cropped)",
                    self.rows, self.cols
                ),
            ));
        }
        if !(lo.is_finite() && hi.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("range [{lo}, {hi}] must be finite"),
            ));
        }
        let (rows, cols) = (self.rows, self.cols);
        let (top, left) = ((size - rows) / 2, (size - cols) / 2);
        let scale = (hi - lo) / 255.0;
        let mut out = vec![lo; indices.len() * self.channels * size * size];
        // Frame k is channel k % C of image indices[k / C].
        let channels = self.channels;
        out.par_chunks_mut(size * size)
            .enumerate()
            .for_each(|(k, frame)| {
                let (index, channel) = (indices[k / channels], k % channels);
                let start = index * image_len + channel * rows * cols;
                let plane = &self.images[start..start + rows * cols];
                for (r, pixels) in plane.chunks_exact(cols).enumerate() {
                    let start = (top + r) * size + left;
                    for (dst, &p) in frame[start..start + cols].iter_mut().zip(pixels) {
                        *dst = lo + scale * p as f32;
                    }
                }
            });
        Tensor::from_vec(out, [indices.len(), self.channels, size, size])
    }
}
