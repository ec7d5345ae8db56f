//! Images from a folder of PNG and JPEG files (CelebA, LSUN exports, your
//! own photographs), prepared as torchvision's
//! `Compose([Resize(size), CenterCrop(size)])` prepares them:
//!
//! 1. decode and convert to 8-bit RGB (alpha dropped, as PIL's `convert("RGB")`);
//! 2. resize so that the **shorter** side is `size`, the longer one
//!    `⌊size · long / short⌋`, with a bilinear filter widened when shrinking
//!    (PIL's antialiased bilinear, which torchvision uses for PIL images);
//! 3. crop the central `size × size` square, its offset rounded half to even
//!    as Python's `round` does;
//! 4. for one channel, ITU-R 601 luma as PIL's `convert("L")`.
//!
//! The folder's layout is free: every `.png`, `.jpg` and `.jpeg` file below
//! it (any depth, case-insensitive extension, hidden entries skipped) is an
//! image, in sorted path order. A folder carries no labels.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{ImageReader, RgbImage};
use rayon::prelude::*;

use super::idx::ImageSet;
use crate::error::{Error, Result};

const OP: &str = "ImageFolder";

/// Extensions (lower case) read as images.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The image files found under a folder, not yet decoded.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
}

impl ImageFolder {
    /// Lists every image file under `root`. A missing folder, or one with no
    /// image in it, is an error saying what was searched.
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        if !root.is_dir() {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{OP}: {} is not a folder", root.display()),
            )));
        }
        let mut walk = Walk::default();
        walk.visit(root)?;
        if walk.files.is_empty() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} holds no PNG or JPEG image (searched {} folder(s), {} other file(s)); \
                     put .png/.jpg/.jpeg files in it, in any layout of sub-folders",
                    root.display(),
                    walk.folders,
                    walk.others
                ),
            ));
        }
        walk.files.sort();
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files: walk.files,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in sorted order: image i of the loaded set is file i.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Bytes the decoded set takes in memory: one byte per pixel and channel.
    pub fn decoded_bytes(&self, size: usize, channels: usize) -> usize {
        self.files.len() * channels * size * size
    }

    /// Decodes every image (in parallel) into an unlabelled [`ImageSet`] of
    /// `size × size` images with `channels` (1 or 3) channels, calling
    /// `on_decoded` after each. The first file that cannot be read or
    /// decoded ends the load with an error naming it.
    pub fn load(
        &self,
        size: usize,
        channels: usize,
        on_decoded: &(dyn Fn() + Sync),
    ) -> Result<ImageSet> {
        check_geometry(size, channels)?;
        let image_len = channels * size * size;
        let mut pixels = vec![0u8; self.files.len() * image_len];
        pixels
            .par_chunks_mut(image_len)
            .zip(self.files.par_iter())
            .try_for_each(|(dst, path)| {
                let image = read_rgb(path)?;
                write_planes(&resize_and_center_crop(&image, size), channels, dst);
                on_decoded();
                Ok::<(), Error>(())
            })?;
        Ok(ImageSet {
            images: pixels,
            labels: Vec::new(),
            count: self.files.len(),
            channels,
            rows: size,
            cols: size,
        })
    }
}

fn check_geometry(size: usize, channels: usize) -> Result<()> {
    if size == 0 {
        return Err(Error::invalid(OP, "the image size must be at least 1"));
    }
    if channels != 1 && channels != 3 {
        return Err(Error::invalid(
            OP,
            format!("images have 1 (grey) or 3 (RGB) channels, not {channels}"),
        ));
    }
    Ok(())
}

/// The recursive listing behind [`ImageFolder::scan`].
#[derive(Default)]
struct Walk {
    files: Vec<PathBuf>,
    folders: usize,
    others: usize,
    /// Canonical paths of the folders entered, so that a symbolic link
    /// back up the tree is not followed forever.
    entered: HashSet<PathBuf>,
}

impl Walk {
    fn visit(&mut self, dir: &Path) -> Result<()> {
        let canonical = fs::canonicalize(dir).map_err(|e| io_error(dir, e))?;
        if !self.entered.insert(canonical) {
            return Ok(());
        }
        self.folders += 1;
        // Sorted, so that a folder reached by two paths is always listed
        // under the same one.
        let mut paths = fs::read_dir(dir)
            .map_err(|e| io_error(dir, e))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| io_error(dir, e))?;
        paths.sort();
        for path in paths {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                self.visit(&path)?;
            } else if is_image_file(&path) {
                self.files.push(path);
            } else {
                self.others += 1;
            }
        }
        Ok(())
    }
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{OP}: cannot read {}: {e}", path.display()),
    ))
}

/// Reads and decodes one file to 8-bit RGB. The format comes from the
/// bytes, not the extension; the `image` crate's default limits bound what a
/// hostile header can make it allocate.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let decoded = ImageReader::open(path)
        .map_err(|e| io_error(path, e))?
        .with_guessed_format()
        .map_err(|e| io_error(path, e))?
        .decode()
        .map_err(|e| {
            Error::invalid(
                OP,
                format!(
                    "{} cannot be decoded as an image ({e}); remove or replace the file",
                    path.display()
                ),
            )
        })?;
    Ok(decoded.to_rgb8())
}

/// torchvision's `Resize(size)` then `CenterCrop(size)` on an RGB image.
pub fn resize_and_center_crop(image: &RgbImage, size: usize) -> RgbImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    // The shorter side becomes `size`; the other keeps the aspect ratio,
    // truncated as torchvision's `int(size * long / short)`.
    let (new_w, new_h) = if width <= height {
        (size, size * height / width)
    } else {
        (size * width / height, size)
    };
    let resized = if (new_w, new_h) == (width, height) {
        image.clone()
    } else {
        imageops::resize(image, new_w as u32, new_h as u32, FilterType::Triangle)
    };
    let left = round_half_even_half(new_w - size);
    let top = round_half_even_half(new_h - size);
    imageops::crop_imm(&resized, left as u32, top as u32, size as u32, size as u32).to_image()
}

/// `round(excess / 2)` with Python's ties-to-even: CenterCrop's offset.
fn round_half_even_half(excess: usize) -> usize {
    let half = excess / 2;
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Writes an RGB image as `channels` planes (CHW): the three colour planes,
/// or one plane of PIL's integer ITU-R 601 luma.
fn write_planes(image: &RgbImage, channels: usize, dst: &mut [u8]) {
    let plane = (image.width() * image.height()) as usize;
    for (i, pixel) in image.pixels().enumerate() {
        let [r, g, b] = pixel.0;
        if channels == 3 {
            dst[i] = r;
            dst[plane + i] = g;
            dst[2 * plane + i] = b;
        } else {
            // L = R·299/1000 + G·587/1000 + B·114/1000 in 16-bit fixed point.
            let luma = (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16;
            dst[i] = luma as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_offsets_round_half_to_even_like_python() {
        // Python: round(0.5) = 0, round(1.5) = 2, round(2.5) = 2, round(3.5) = 4.
        let offsets: Vec<usize> = (0..8).map(round_half_even_half).collect();
        assert_eq!(offsets, [0, 0, 1, 2, 2, 2, 3, 4]);
    }

    #[test]
    fn resize_keeps_the_aspect_ratio_and_crops_the_centre() {
        // 40 wide, 20 high: resized to 16×8, then 8×8 from x = 4.
        let image = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let out = resize_and_center_crop(&image, 8);
        assert_eq!(out.dimensions(), (8, 8));
        assert_eq!(out.get_pixel(0, 4).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(7, 4).0, [255, 255, 255]);
    }

    #[test]
    fn grey_pixels_keep_their_value_through_the_luma_formula() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb([x as u8 * 200; 3]));
        let mut planes = [0u8; 2];
        write_planes(&image, 1, &mut planes);
        assert_eq!(planes, [0, 200]);
    }
}
