//! `kiln sample gan|vae`: images from a trained image model, as a PNG grid
//! (and, with --raw, a safetensors tensor), streamed to disk.
//!
//! However large --n is, memory holds one row of the grid: the images are
//! drawn in batches, in order, written as each row of the grid completes,
//! and appended to the raw tensor as they come. Before drawing anything the
//! command works out the most bytes the files can take and refuses an --n
//! whose output cannot fit on the disk that would hold it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::args::{ImageModelKind, SampleArgs};
use super::budget::human_bytes;
use super::progress::Progress;
use super::run_dir::load_checkpoint;
use super::seeds::{Stream, stream_rng};
use super::specs::{VaeSpec, load_generator, load_vae};
use super::train::vae_images;
use crate::atomic_file::{AtomicFile, available_bytes};
use crate::data::image::{GridLayout, stream_grid_png};
use crate::models::dcgan::Generator;
use crate::models::vae::Vae;
use crate::nn::Module;
use crate::{DType, Device, Rng, Tensor, no_grad};

/// Images drawn per forward pass.
const BATCH: usize = 256;

/// The model images are drawn from.
enum Sampler {
    Gan(Generator),
    Vae(Vae, VaeSpec),
}

impl Sampler {
    /// [C, H, W] of one image.
    fn image_shape(&self) -> [usize; 3] {
        match self {
            Sampler::Gan(generator) => {
                let size = generator.image_size();
                [generator.channels(), size, size]
            }
            Sampler::Vae(_, spec) => [spec.channels, spec.image_size, spec.image_size],
        }
    }

    /// The range the values live in: tanh for the GAN, probabilities for the VAE.
    fn range(&self) -> (f32, f32) {
        match self {
            Sampler::Gan(_) => (-1.0, 1.0),
            Sampler::Vae(..) => (0.0, 1.0),
        }
    }

    /// The next `len` images [len, C, H, W] in f32, their noise the next
    /// values of `rng` (so the images do not depend on the batch size).
    fn draw(&self, len: usize, rng: &mut Rng, device: Device) -> Result<Tensor> {
        let _no_grad = no_grad();
        let images = match self {
            Sampler::Gan(generator) => {
                let z = Tensor::randn([len, generator.nz(), 1, 1], DType::F32, device, rng)?;
                generator.forward(&z)?
            }
            Sampler::Vae(vae, spec) => {
                let latents = Tensor::randn([len, vae.config().latent], DType::F32, device, rng)?;
                vae_images(vae, spec, &latents)?
            }
        };
        Ok(images.to_dtype(DType::F32)?.to_device(Device::Cpu)?)
    }
}

/// Writes `--n` samples as a PNG grid (and, with --raw, as a tensor).
pub fn run(args: &SampleArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let device = super::device(args.device)?;
    let checkpoint = load_checkpoint(&args.checkpoint)?;
    let mut rng = stream_rng(args.seed, Stream::Sampling, 0);
    let _autocast = super::checkpoint_autocast(&checkpoint)?;
    let sampler = match args.model {
        ImageModelKind::Gan => Sampler::Gan(load_generator(&checkpoint, device)?),
        ImageModelKind::Vae => {
            let (vae, spec) = load_vae(&checkpoint, device)?;
            Sampler::Vae(vae, spec)
        }
    };
    let [channels, height, width] = sampler.image_shape();
    let (lo, hi) = sampler.range();
    let layout = GridLayout {
        count: args.n,
        nrow: (args.n as f64).sqrt().ceil() as usize,
        channels,
        height,
        width,
    };
    let png_bytes = layout.png_bytes_bound();
    let metadata = BTreeMap::from([
        ("model".to_string(), checkpoint.state.model.clone()),
        ("range".to_string(), format!("[{lo}, {hi}]")),
    ]);
    let raw_header = raw_header(args.n, [channels, height, width], &metadata)?;
    let raw_bytes = raw_header.len() as u64 + raw_data_bytes(args.n, [channels, height, width]);
    let mut outputs = vec![(args.out.as_path(), png_bytes)];
    if let Some(raw) = &args.raw {
        outputs.push((raw.as_path(), raw_bytes));
    }
    check_space(args.n, &outputs)?;
    println!(
        "drawing {} samples into a {}x{} grid ({} PNG at most{})",
        args.n,
        layout.canvas_width(),
        layout.canvas_height(),
        human_bytes(png_bytes),
        args.raw
            .as_ref()
            .map(|_| format!(", {} raw tensor", human_bytes(raw_bytes)))
            .unwrap_or_default()
    );

    let mut raw = match &args.raw {
        Some(path) => {
            let mut file = AtomicFile::create(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.write_all(&raw_header)?;
            Some(file)
        }
        None => None,
    };
    let progress = Progress::new(args.n, 0);
    stream_grid_png(&args.out, layout, lo, hi, |first, len| {
        let mut batches = Vec::new();
        for start in (first..first + len).step_by(BATCH) {
            let images = sampler.draw(BATCH.min(first + len - start), &mut rng, device)?;
            if let Some(file) = &mut raw {
                let values = images.to_vec::<f32>()?;
                file.write_all(bytemuck::cast_slice(&values))?;
            }
            progress.advance(images.dims()[0]);
            batches.push(images);
        }
        Ok::<_, anyhow::Error>(Tensor::cat(&batches.iter().collect::<Vec<_>>(), 0)?)
    })?;
    progress.finish();
    println!("wrote {} samples to {}", args.n, args.out.display());
    if let (Some(file), Some(path)) = (raw, &args.raw) {
        file.commit()
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote the tensor `samples` to {}", path.display());
    }
    Ok(())
}

/// Bytes of the raw samples themselves: f32 values.
fn raw_data_bytes(n: usize, [c, h, w]: [usize; 3]) -> u64 {
    n as u64 * (c * h * w) as u64 * 4
}

/// The start of a safetensors file holding one f32 tensor `samples`
/// [n, C, H, W] and `metadata`: the header's length (8 bytes, little
/// endian) and the header, padded with spaces to a multiple of 8 bytes as
/// the format recommends. The values follow it.
fn raw_header(n: usize, shape: [usize; 3], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let header = serde_json::json!({
        "__metadata__": metadata,
        "samples": {
            "dtype": "F32",
            "shape": [n, shape[0], shape[1], shape[2]],
            "data_offsets": [0, raw_data_bytes(n, shape)],
        },
    });
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    Ok(bytes)
}

/// Refuses outputs that cannot fit: the bytes each file may take, summed
/// per file system, against what is free there.
fn check_space(n: usize, outputs: &[(&Path, u64)]) -> Result<()> {
    let mut per_disk: Vec<(Option<u64>, u64, u64, Vec<&Path>)> = Vec::new();
    for &(path, bytes) in outputs {
        let Some(free) = available_bytes(path) else {
            continue;
        };
        let disk = file_system_id(path);
        match per_disk.iter_mut().find(|d| d.0.is_some() && d.0 == disk) {
            Some(entry) => {
                entry.2 += bytes;
                entry.3.push(path);
            }
            None => per_disk.push((disk, free, bytes, vec![path])),
        }
    }
    for (_, free, needed, paths) in per_disk {
        if needed > free {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "--n {n} needs up to {} for {}, but only {} is free there; lower --n, or write to a disk with more room",
                human_bytes(needed),
                names.join(" and "),
                human_bytes(free)
            );
        }
    }
    Ok(())
}

/// The file system of `path`'s nearest existing folder (where a new file
/// would land), to add up outputs that share one.
fn file_system_id(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        path.ancestors()
            .skip(1)
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .find_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.dev())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}
