//! `kiln sample gan|vae`: images from a trained image model.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use super::args::{ImageModelKind, SampleArgs};
use super::run_dir::load_checkpoint;
use super::seeds::{Stream, stream_rng};
use super::specs::{load_generator, load_vae};
use super::train::vae_images;
use crate::data::image::save_grid_png;
use crate::nn::Module;
use crate::{DType, Tensor, no_grad};

/// Writes `--n` samples as a PNG grid (and, with --raw, as a tensor).
pub fn run(args: &SampleArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let device = super::device(args.device)?;
    let checkpoint = load_checkpoint(&args.checkpoint)?;
    let mut rng = stream_rng(args.seed, Stream::Sampling, 0);
    let autocast = super::checkpoint_autocast(&checkpoint)?;
    // Images [n, C, H, W] and the range their values live in.
    let (images, lo, hi) = match args.model {
        ImageModelKind::Gan => {
            let generator = load_generator(&checkpoint, device)?;
            let z = Tensor::randn([args.n, generator.nz(), 1, 1], DType::F32, device, &mut rng)?;
            let _no_grad = no_grad();
            (generator.forward(&z)?, -1.0, 1.0)
        }
        ImageModelKind::Vae => {
            let (vae, spec) = load_vae(&checkpoint, device)?;
            let latents =
                Tensor::randn([args.n, vae.config().latent], DType::F32, device, &mut rng)?;
            (vae_images(&vae, &spec, &latents)?, 0.0, 1.0)
        }
    };
    drop(autocast);
    let images = images.to_dtype(DType::F32)?;
    let columns = (args.n as f64).sqrt().ceil() as usize;
    save_grid_png(&args.out, &images, columns, lo, hi)?;
    println!("wrote {} samples to {}", args.n, args.out.display());
    if let Some(raw) = &args.raw {
        let metadata = BTreeMap::from([
            ("model".to_string(), checkpoint.state.model.clone()),
            ("range".to_string(), format!("[{lo}, {hi}]")),
        ]);
        crate::checkpoint::save(raw, &[("samples".to_string(), images)], &metadata)?;
        println!("wrote the tensor `samples` to {}", raw.display());
    }
    Ok(())
}
