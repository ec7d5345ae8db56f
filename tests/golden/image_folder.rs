//! The image-folder loader against torchvision: `Resize(12)` then
//! `CenterCrop(12)` on PIL images of four shapes (shrinking and growing,
//! wide and tall), in RGB and through PIL's grey conversion. The pictures
//! are written as PNG files (lossless) and read back by `ImageFolder`.

use kiln::data::folder::ImageFolder;

use crate::common::Golden;

/// Largest difference from PIL, in 8-bit levels: PIL resamples in fixed
/// point and rounds the horizontal pass to 8 bits before the vertical one.
const LEVELS: f64 = 1.0;

#[test]
fn image_folder_resize_and_centre_crop_match_torchvision() {
    let golden = Golden::load("image_folder_transforms");
    let size = golden.meta_f64("size") as usize;
    let count = golden.meta_f64("count") as usize;
    let dir = std::env::temp_dir().join(format!("kiln-golden-folder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..count {
        let input = golden.tensor(&format!("input{i}"));
        let [height, width, _] = input.dims()[..] else {
            panic!("input{i} is not [H, W, 3]")
        };
        let bytes: Vec<u8> = input.to_f64_vec().iter().map(|&v| v as u8).collect();
        let picture = image::RgbImage::from_raw(width as u32, height as u32, bytes).unwrap();
        picture.save(dir.join(format!("{i}.png"))).unwrap();
    }
    let folder = ImageFolder::scan(&dir).unwrap();
    for (channels, name) in [(3, "rgb"), (1, "grey")] {
        let set = folder.load(size, channels, &|| {}).unwrap();
        let image_len = channels * size * size;
        for i in 0..count {
            let expected = golden.tensor(&format!("{name}{i}")).to_f64_vec();
            let actual = &set.images[i * image_len..(i + 1) * image_len];
            let worst = expected
                .iter()
                .zip(actual)
                .map(|(&e, &a)| (e - a as f64).abs())
                .fold(0.0, f64::max);
            let differing = expected
                .iter()
                .zip(actual)
                .filter(|&(&e, &a)| e != a as f64)
                .count();
            println!("{name}{i}: {differing} of {image_len} values differ, by at most {worst}");
            assert!(
                worst <= LEVELS,
                "{name}{i}: a value differs from torchvision by {worst} levels"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
