//! The data layer: IDX files (raw and gzipped), image batches, image
//! folders (PNG and JPEG of any size, resized and centre-cropped), the
//! character vocabulary, random text windows, and the PNG writers. The last tests check the
//! real datasets when `scripts/fetch-data.sh` has fetched them into `data/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln::data::folder::ImageFolder;
use kiln::data::idx::{IdxArray, ImageSet, Split, load_split, read_idx};
use kiln::data::image::{save_grid_png, save_line_chart_png};
use kiln::data::text::{Vocab, load_text, random_batch};
use kiln::{Rng, Tensor};

/// A fresh, empty directory for one test, removed again when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kiln-data-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bytes of an unsigned-byte IDX file.
fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn error_text<T>(result: kiln::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn read_idx_round_trips_raw_and_gzipped_files() {
    let dir = TempDir::new("idx-round-trip");
    let data: Vec<u8> = (0..24).map(|i| (i * 11) as u8).collect();
    let bytes = idx_bytes(&[2, 3, 4], &data);
    std::fs::write(dir.path("raw-idx3-ubyte"), &bytes).unwrap();
    std::fs::write(dir.path("zipped-idx3-ubyte.gz"), gzip(&bytes)).unwrap();
    let expected = IdxArray {
        dims: vec![2, 3, 4],
        data,
    };
    assert_eq!(read_idx(&dir.path("raw-idx3-ubyte")).unwrap(), expected);
    assert_eq!(
        read_idx(&dir.path("zipped-idx3-ubyte.gz")).unwrap(),
        expected
    );
}

#[test]
fn read_idx_reports_a_truncated_file_by_name() {
    let dir = TempDir::new("idx-truncated");
    let bytes = idx_bytes(&[10, 28, 28], &[7; 100]);
    std::fs::write(dir.path("short-idx3-ubyte"), &bytes).unwrap();
    std::fs::write(dir.path("short-idx3-ubyte.gz"), gzip(&bytes)).unwrap();
    std::fs::write(dir.path("header-only"), &bytes[..9]).unwrap();
    for name in ["short-idx3-ubyte", "short-idx3-ubyte.gz", "header-only"] {
        let message = error_text(read_idx(&dir.path(name)));
        assert!(
            message.contains("truncated") && message.contains(name),
            "{message}"
        );
    }
}

#[test]
fn read_idx_rejects_a_bad_magic_number_and_non_byte_values() {
    let dir = TempDir::new("idx-magic");
    std::fs::write(dir.path("not-idx"), b"PK\x03\x04 a zip, not IDX").unwrap();
    let message = error_text(read_idx(&dir.path("not-idx")));
    assert!(
        message.contains("bad magic") && message.contains("not-idx"),
        "{message}"
    );

    let mut floats = idx_bytes(&[1], &[0, 0, 0, 0]);
    floats[2] = 0x0d;
    std::fs::write(dir.path("floats"), &floats).unwrap();
    let message = error_text(read_idx(&dir.path("floats")));
    assert!(message.contains("0x0d"), "{message}");
}

#[test]
fn missing_files_and_directories_point_to_the_fetch_script() {
    let dir = TempDir::new("idx-missing");
    let message = error_text(read_idx(&dir.path("absent-idx3-ubyte")));
    assert!(
        message.contains("absent-idx3-ubyte") && message.contains("scripts/fetch-data.sh"),
        "{message}"
    );
    let message = error_text(load_split(&dir.path("no-such-dir"), Split::Train));
    assert!(
        message.contains("no-such-dir") && message.contains("scripts/fetch-data.sh"),
        "{message}"
    );
    let message = error_text(load_split(&dir.0, Split::Test));
    assert!(
        message.contains("t10k-images-idx3-ubyte") && message.contains("scripts/fetch-data.sh"),
        "{message}"
    );
    let message = error_text(load_text(&dir.path("shakespeare.txt")));
    assert!(
        message.contains("shakespeare.txt") && message.contains("scripts/fetch-data.sh"),
        "{message}"
    );
}

/// Writes a tiny MNIST-like split: `count` 2×3 images whose pixels encode (image, position).
fn write_split(dir: &Path, prefix: &str, count: u8, zipped: bool) {
    let pixels: Vec<u8> = (0..count)
        .flat_map(|n| (0..6).map(move |p| n * 10 + p))
        .collect();
    let labels: Vec<u8> = (0..count).map(|n| n % 10).collect();
    let files = [
        (
            format!("{prefix}-images-idx3-ubyte"),
            idx_bytes(&[count as u32, 2, 3], &pixels),
        ),
        (
            format!("{prefix}-labels-idx1-ubyte"),
            idx_bytes(&[count as u32], &labels),
        ),
    ];
    for (name, bytes) in files {
        if zipped {
            std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn load_split_reads_train_and_test_from_raw_or_gzipped_files() {
    let dir = TempDir::new("load-split");
    write_split(&dir.0, "train", 5, false);
    write_split(&dir.0, "t10k", 3, true);
    let train = load_split(&dir.0, Split::Train).unwrap();
    assert_eq!((train.count, train.rows, train.cols), (5, 2, 3));
    assert_eq!(train.labels, [0, 1, 2, 3, 4]);
    assert_eq!(&train.images[6..12], &[10, 11, 12, 13, 14, 15]);
    let test = load_split(&dir.0, Split::Test).unwrap();
    assert_eq!((test.count, test.images.len()), (3, 18));
}

#[test]
fn load_split_rejects_labels_that_do_not_match_the_images() {
    let dir = TempDir::new("load-split-mismatch");
    write_split(&dir.0, "train", 5, false);
    std::fs::write(
        dir.path("train-labels-idx1-ubyte"),
        idx_bytes(&[4], &[0; 4]),
    )
    .unwrap();
    let message = error_text(load_split(&dir.0, Split::Train));
    assert!(
        message.contains("[4]") && message.contains("[5]"),
        "{message}"
    );
}

fn two_by_two_set() -> ImageSet {
    ImageSet {
        images: vec![0, 255, 51, 102, 255, 255, 255, 255],
        labels: vec![3, 7],
        count: 2,
        channels: 1,
        rows: 2,
        cols: 2,
    }
}

#[test]
fn batch_scales_pixels_to_the_range_and_centres_them_in_a_padded_frame() {
    let set = two_by_two_set();
    let batch = set.batch(&[0, 1, 0], 4, -1.0, 1.0).unwrap();
    assert_eq!(batch.dims(), [3, 1, 4, 4]);
    let v = batch.to_vec::<f32>().unwrap();
    let expected_first: [f32; 16] = [
        -1.0, -1.0, -1.0, -1.0, //
        -1.0, -1.0, 1.0, -1.0, //
        -1.0, -0.6, -0.2, -1.0, //
        -1.0, -1.0, -1.0, -1.0,
    ];
    for (got, want) in v[..16].iter().zip(expected_first) {
        assert!((got - want).abs() < 1e-6, "{:?}", &v[..16]);
    }
    assert_eq!(&v[32..48], &v[..16], "the same index gives the same image");
    assert_eq!(v[16 + 5], 1.0);

    let unpadded = set.batch(&[1], 2, 0.0, 1.0).unwrap();
    assert_eq!(unpadded.to_vec::<f32>().unwrap(), [1.0; 4]);
}

#[test]
fn batch_rejects_bad_indices_and_sizes() {
    let set = two_by_two_set();
    assert!(error_text(set.batch(&[2], 4, 0.0, 1.0)).contains("index 2"));
    assert!(error_text(set.batch(&[0], 1, 0.0, 1.0)).contains("size 1"));
    assert!(error_text(set.batch(&[], 4, 0.0, 1.0)).contains("no indices"));
}

/// An RGB picture: black left half, white right half, `width × height`.
fn half_black_half_white(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, _| {
        if x < width / 2 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    })
}

/// A folder of five pictures in three formats and sizes, two levels deep,
/// with files that are not images around them:
/// - `a.png`        80×40 half black / half white;
/// - `b/red.jpg`    30×50 pure red (JPEG);
/// - `b/c/grey.png` 16×16 grey level 100 (a one-channel PNG);
/// - `b/c/rgba.PNG` 20×20 green, alpha 0 (alpha is dropped, as PIL does);
/// - `d/blue.jpeg`  64×24 pure blue.
fn write_picture_folder(root: &Path) {
    std::fs::create_dir_all(root.join("b/c")).unwrap();
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    half_black_half_white(80, 40)
        .save(root.join("a.png"))
        .unwrap();
    image::RgbImage::from_pixel(30, 50, image::Rgb([255, 0, 0]))
        .save(root.join("b/red.jpg"))
        .unwrap();
    image::GrayImage::from_pixel(16, 16, image::Luma([100]))
        .save(root.join("b/c/grey.png"))
        .unwrap();
    image::RgbaImage::from_pixel(20, 20, image::Rgba([0, 255, 0, 0]))
        .save_with_format(root.join("b/c/rgba.PNG"), image::ImageFormat::Png)
        .unwrap();
    image::RgbImage::from_pixel(64, 24, image::Rgb([0, 0, 255]))
        .save_with_format(root.join("d/blue.jpeg"), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(root.join("labels.csv"), "a,1\n").unwrap();
    std::fs::write(root.join(".hidden/x.png"), "skipped: hidden").unwrap();
}

#[test]
fn image_folder_finds_every_png_and_jpeg_at_any_depth_in_sorted_order() {
    let dir = TempDir::new("folder-scan");
    write_picture_folder(&dir.0);
    let folder = ImageFolder::scan(&dir.0).unwrap();
    let names: Vec<String> = folder
        .files()
        .iter()
        .map(|p| p.strip_prefix(&dir.0).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "a.png",
            "b/c/grey.png",
            "b/c/rgba.PNG",
            "b/red.jpg",
            "d/blue.jpeg"
        ]
    );
    assert_eq!(folder.decoded_bytes(8, 3), 5 * 3 * 8 * 8);
}

#[test]
fn image_folder_resizes_the_short_side_and_crops_the_centre_as_torchvision() {
    let dir = TempDir::new("folder-load");
    write_picture_folder(&dir.0);
    let folder = ImageFolder::scan(&dir.0).unwrap();
    let decoded = std::sync::atomic::AtomicUsize::new(0);
    let on_decoded = || {
        decoded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let set = folder.load(8, 3, &on_decoded).unwrap();
    assert_eq!(decoded.into_inner(), 5);
    assert_eq!((set.count, set.channels, set.rows, set.cols), (5, 3, 8, 8));
    assert!(set.labels.is_empty());
    let plane = |image: usize, channel: usize| -> &[u8] {
        let start = (image * 3 + channel) * 64;
        &set.images[start..start + 64]
    };
    // a.png, 80×40 → 16×8 → the central 8×8 from x = 4: black on the left,
    // white on the right, the edge (blurred by the antialiasing filter)
    // symmetric about the middle. A crop from x = 0 would be all black.
    // (tests/golden/image_folder.rs compares with torchvision itself.)
    for row in plane(0, 0).chunks(8) {
        assert_eq!((row[0], row[2], row[5], row[7]), (0, 0, 255, 255));
        assert_eq!(row[3] as u32 + row[4] as u32, 255, "{row:?}");
    }
    // Solid colours survive resizing exactly (PNG) or nearly (JPEG).
    assert!(plane(1, 0).iter().all(|&v| v == 100));
    assert_eq!(plane(1, 0), plane(1, 2));
    assert!(plane(2, 1).iter().all(|&v| v == 255));
    assert!(plane(2, 0).iter().all(|&v| v == 0));
    assert!(plane(3, 0).iter().all(|&v| v >= 250));
    assert!(plane(3, 1).iter().all(|&v| v <= 5));
    assert!(plane(4, 2).iter().all(|&v| v >= 250));

    // One channel: PIL's integer ITU-R 601 luma (red → 76, grey stays 100).
    let grey = folder.load(8, 1, &|| {}).unwrap();
    assert_eq!(grey.channels, 1);
    assert!(grey.images[64..128].iter().all(|&v| v == 100));
    assert!(
        grey.images[192..256]
            .iter()
            .all(|&v| (74..=78).contains(&v))
    );

    // Batches are [N, C, S, S] in the asked range.
    let batch = set.batch(&[0, 4], 8, -1.0, 1.0).unwrap();
    assert_eq!(batch.dims(), [2, 3, 8, 8]);
    let values = batch.to_f64_vec();
    assert_eq!(values[0], -1.0);
    assert_eq!(values[7], 1.0);
}

#[test]
fn image_folder_errors_name_the_corrupt_file_the_empty_folder_and_bad_sizes() {
    let dir = TempDir::new("folder-errors");
    let missing = error_text(ImageFolder::scan(&dir.path("nowhere")));
    assert!(
        missing.contains("nowhere") && missing.contains("is not a folder"),
        "{missing}"
    );

    std::fs::create_dir_all(dir.path("empty/deeper")).unwrap();
    std::fs::write(dir.path("empty/deeper/notes.txt"), "no pictures").unwrap();
    let empty = error_text(ImageFolder::scan(&dir.path("empty")));
    assert!(
        empty.contains("holds no PNG or JPEG image")
            && empty.contains("2 folder(s), 1 other file(s)"),
        "{empty}"
    );

    let pictures = dir.path("pictures");
    write_picture_folder(&pictures);
    let folder = ImageFolder::scan(&pictures).unwrap();
    for bad in [0, 2] {
        let (size, channels) = if bad == 0 { (0, 3) } else { (8, bad) };
        let text = error_text(folder.load(size, channels, &|| {}));
        assert!(text.contains("ImageFolder"), "{text}");
    }

    // A truncated JPEG, then a text file named .png: each error names its file.
    let jpeg = std::fs::read(pictures.join("b/red.jpg")).unwrap();
    let broken: [(&str, &[u8]); 2] = [
        ("b/red.jpg", &jpeg[..jpeg.len() / 3]),
        ("d/not-an-image.png", b"hello"),
    ];
    for (name, bytes) in broken {
        std::fs::write(pictures.join(name), bytes).unwrap();
        let folder = ImageFolder::scan(&pictures).unwrap();
        let text = error_text(folder.load(8, 3, &|| {}));
        assert!(
            text.contains(name) && text.contains("cannot be decoded"),
            "{name}: {text}"
        );
        std::fs::remove_file(pictures.join(name)).unwrap();
    }
    assert_eq!(ImageFolder::scan(&pictures).unwrap().len(), 4);
}

#[test]
fn vocab_encodes_and_decodes_round_trip() {
    let text = "To be, or not to be: that is the question.\n";
    let vocab = Vocab::from_text(text);
    assert_eq!(vocab.len(), 18);
    let ids = vocab.encode(text).unwrap();
    assert_eq!(vocab.decode(&ids), text);
    assert_eq!(
        vocab.encode("\n").unwrap(),
        [0],
        "ids follow character order"
    );

    let restored = Vocab::from_string_repr(&vocab.to_string_repr()).unwrap();
    assert_eq!(restored, vocab);
    assert!(
        Vocab::from_string_repr("ba").is_err(),
        "unsorted characters are refused"
    );
    assert_eq!(vocab.decode(&[999]), "\u{FFFD}");
}

#[test]
fn vocab_encode_names_unknown_characters() {
    let vocab = Vocab::from_text("abc");
    let message = error_text(vocab.encode("abzcyz"));
    assert!(
        message.contains("\"yz\"") && message.contains("\"abc\""),
        "{message}"
    );
}

#[test]
fn load_text_splits_ninety_ten_in_order() {
    let dir = TempDir::new("load-text");
    let text: String = (0..100).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    std::fs::write(dir.path("corpus.txt"), &text).unwrap();
    let data = load_text(&dir.path("corpus.txt")).unwrap();
    assert_eq!(
        (data.train.len(), data.val.len(), data.vocab.len()),
        (90, 10, 26)
    );
    assert_eq!(data.vocab.decode(&data.val), &text[90..]);
}

#[test]
fn random_batch_gives_windows_with_targets_shifted_by_one() {
    let tokens: Vec<u32> = (0..50).collect();
    let mut rng = Rng::seed(7);
    let (x, y) = random_batch(&tokens, 6, 8, &mut rng).unwrap();
    assert_eq!((x.dims(), y.dims()), ([6, 8].as_slice(), [6, 8].as_slice()));
    let (x, y) = (x.to_indices().unwrap(), y.to_indices().unwrap());
    for (xs, ys) in x.chunks(8).zip(y.chunks(8)) {
        for t in 0..8 {
            assert_eq!(ys[t], xs[t] + 1, "y is x shifted by one");
        }
        for t in 1..8 {
            assert_eq!(xs[t], xs[t - 1] + 1, "a window is contiguous text");
        }
    }
    let starts: std::collections::HashSet<u32> = x.chunks(8).map(|w| w[0]).collect();
    assert!(starts.len() > 1, "windows start at random offsets");

    let exact_fit = random_batch(&tokens[..9], 2, 8, &mut rng).unwrap();
    assert_eq!(exact_fit.0.to_indices().unwrap()[0], 0);
    assert!(error_text(random_batch(&tokens[..8], 2, 8, &mut rng)).contains("too few"));
}

/// Decodes a PNG into (width, height, colour type, pixels).
fn decode_png(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    (info.width, info.height, info.color_type, pixels)
}

#[test]
fn save_grid_png_writes_a_padded_grid_of_the_expected_size() {
    let dir = TempDir::new("grid-png");
    // Five 3×4 greyscale images, image n filled with n/4 in [0, 1].
    let values: Vec<f32> = (0..5)
        .flat_map(|n| std::iter::repeat_n(n as f32 / 4.0, 12))
        .collect();
    let images = Tensor::from_vec(values, [5, 1, 3, 4]).unwrap();
    let path = dir.path("nested/grid.png");
    save_grid_png(&path, &images, 3, 0.0, 1.0).unwrap();
    let (width, height, colour, pixels) = decode_png(&path);
    // 3 columns of 4 pixels and 2 rows of 3 pixels, with 2 pixels around each.
    assert_eq!(
        (width, height, colour),
        (3 * 6 + 2, 2 * 5 + 2, png::ColorType::Rgb)
    );
    let pixel = |x: usize, y: usize| &pixels[3 * (y * width as usize + x)..][..3];
    assert_eq!(pixel(0, 0), [0, 0, 0], "padding is black");
    assert_eq!(pixel(2 + 6, 2), [64, 64, 64], "image 1 is 1/4 grey");
    assert_eq!(
        pixel(2 + 6, 2 + 5),
        [255, 255, 255],
        "image 4 (second row) is white"
    );
    assert!(
        !dir.path("nested/grid.png.tmp").exists(),
        "the temporary file is renamed"
    );

    let rgb = Tensor::from_vec(vec![2.0f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]).unwrap();
    save_grid_png(&path, &rgb, 8, -1.0, 1.0).unwrap();
    assert_eq!(
        decode_png(&path).0,
        2 * 4 + 2,
        "a short last row is not padded to nrow"
    );
    assert!(
        save_grid_png(
            &path,
            &Tensor::from_vec(vec![0f32; 8], [2, 2, 2]).unwrap(),
            2,
            0.0,
            1.0
        )
        .is_err()
    );
}

#[test]
fn save_line_chart_png_writes_an_800_by_500_chart_with_each_series_colour() {
    let dir = TempDir::new("chart-png");
    let falling: Vec<(f64, f64)> = (0..200)
        .map(|s| (s as f64, 2.5 * (-(s as f64) / 60.0).exp() + 0.3))
        .collect();
    let rising: Vec<(f64, f64)> = (0..200)
        .map(|s| (s as f64, 0.2 + s as f64 / 250.0))
        .collect();
    let path = dir.path("loss.png");
    save_line_chart_png(
        &path,
        "GAN loss",
        &[("generator", &falling), ("discriminator", &rising)],
    )
    .unwrap();
    let (width, height, colour, pixels) = decode_png(&path);
    assert_eq!((width, height, colour), (800, 500, png::ColorType::Rgb));
    let has_colour = |rgb: [u8; 3]| pixels.chunks_exact(3).any(|p| p == rgb);
    assert!(
        has_colour([31, 119, 180]) && has_colour([255, 127, 14]),
        "both series are drawn"
    );

    let empty: Vec<(f64, f64)> = vec![(0.0, f64::NAN)];
    assert!(
        error_text(save_line_chart_png(&path, "nothing", &[("loss", &empty)]))
            .contains("no finite points")
    );
}

fn fetched(path: &str) -> Option<PathBuf> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if full.exists() {
        Some(full)
    } else {
        println!("skipped: {path} is absent (run scripts/fetch-data.sh to fetch it)");
        None
    }
}

#[test]
fn fetched_fashion_mnist_has_60000_train_and_10000_test_images() {
    let Some(dir) = fetched("data/fashion-mnist") else {
        return;
    };
    let train = load_split(&dir, Split::Train).unwrap();
    let test = load_split(&dir, Split::Test).unwrap();
    assert_eq!((train.count, train.rows, train.cols), (60000, 28, 28));
    assert_eq!(test.count, 10000);
    assert!(train.labels.iter().chain(&test.labels).all(|&l| l < 10));
}

#[test]
fn fetched_shakespeare_has_84_characters() {
    let Some(path) = fetched("data/shakespeare.txt") else {
        return;
    };
    let data = load_text(&path).unwrap();
    assert_eq!(data.vocab.len(), 84);
    assert_eq!(data.train.len() + data.val.len(), 5_057_198);
    assert_eq!(data.val.len(), 5_057_198 - 5_057_198 * 9 / 10);
}

#[cfg(unix)]
#[test]
fn image_folder_follows_a_link_to_a_folder_once_and_a_loop_never() {
    let dir = TempDir::new("folder-links");
    write_picture_folder(&dir.path("pictures"));
    // A link back up the tree, and a second way into one folder.
    std::os::unix::fs::symlink(dir.path("pictures"), dir.path("pictures/b/up")).unwrap();
    std::os::unix::fs::symlink(dir.path("pictures/d"), dir.path("pictures/d-again")).unwrap();
    let folder = ImageFolder::scan(&dir.path("pictures")).unwrap();
    assert_eq!(folder.len(), 5, "{:?}", folder.files());
    // The first path in sorted order wins: d/, not d-again/.
    assert!(
        folder.files()[4].ends_with("d/blue.jpeg"),
        "{:?}",
        folder.files()
    );
}
