//! PNG pictures of training runs with no drawing library: grids of generated
//! images and line charts of losses. Text on the charts is drawn from a tiny
//! built-in 5×7 bitmap font, so the charts are readable without any fonts
//! installed on the machine.

use std::io::Write;
use std::path::Path;

use crate::atomic_file::AtomicFile;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Pixels between (and around) the images of a grid, as torchvision's `make_grid` does.
const GRID_PADDING: usize = 2;

/// The geometry of a grid of `count` images `[channels, height, width]`,
/// `nrow` per row, with [`GRID_PADDING`] black pixels between and around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridLayout {
    pub count: usize,
    pub nrow: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl GridLayout {
    /// Checks the sizes a PNG grid can be drawn from.
    fn validate(&self, op: &'static str) -> Result<()> {
        let GridLayout {
            count,
            nrow,
            channels,
            height,
            width,
        } = *self;
        if channels != 1 && channels != 3 {
            return Err(Error::shape(
                op,
                format!("images must have 1 or 3 channels, got {channels}"),
            ));
        }
        if count == 0 || height == 0 || width == 0 {
            return Err(Error::shape(
                op,
                format!("nothing to draw in {count} images of {height}x{width}"),
            ));
        }
        if nrow == 0 {
            return Err(Error::invalid(
                op,
                "nrow (images per row) must be at least 1",
            ));
        }
        let (w, h) = (self.canvas_width(), self.canvas_height());
        if w > MAX_PNG_SIDE || h > MAX_PNG_SIDE {
            return Err(Error::invalid(
                op,
                format!("a grid of {w}x{h} pixels exceeds PNG's largest side of {MAX_PNG_SIDE}"),
            ));
        }
        Ok(())
    }

    /// Rows of images: the bands the grid is written in.
    pub fn bands(&self) -> usize {
        self.count.div_ceil(self.nrow)
    }

    pub fn canvas_width(&self) -> usize {
        self.nrow.min(self.count) * (self.width + GRID_PADDING) + GRID_PADDING
    }

    pub fn canvas_height(&self) -> usize {
        self.bands() * (self.height + GRID_PADDING) + GRID_PADDING
    }

    /// The most bytes the PNG can take: its RGB rows uncompressed (one
    /// filter byte each), deflate's stored-block overhead and the chunks.
    pub fn png_bytes_bound(&self) -> u64 {
        let raw = self.canvas_height() as u64 * (1 + 3 * self.canvas_width() as u64);
        raw + raw / 16_000 * 5 + 4096
    }
}

/// PNG stores each side in 31 bits.
const MAX_PNG_SIDE: usize = (1 << 31) - 1;

/// Writes an RGB PNG grid of `images` `[N, C, H, W]` (C = 1 for greyscale or 3 for RGB),
/// `nrow` images per row with 2 black pixels between and around them. Values are
/// mapped linearly from `[lo, hi]` to 0..255 and clamped. The file is written to a
/// temporary name and renamed, so a reader never sees half a picture.
pub fn save_grid_png(path: &Path, images: &Tensor, nrow: usize, lo: f32, hi: f32) -> Result<()> {
    let &[count, channels, height, width] = images.dims() else {
        return Err(Error::shape(
            "save_grid_png",
            format!(
                "images must have shape [N, C, H, W], got {}",
                images.shape()
            ),
        ));
    };
    let layout = GridLayout {
        count,
        nrow,
        channels,
        height,
        width,
    };
    stream_grid_png(path, layout, lo, hi, |first, len| {
        images.narrow(0, first, len)
    })
}

/// Writes the PNG grid of `layout` band by band: `band_images(first, len)`
/// returns images `first..first + len` as `[len, C, H, W]` when their row of
/// the grid is due, so a grid of any length needs the memory of one row.
/// Values map from `[lo, hi]` to 0..255 as in [`save_grid_png`]; the file
/// appears at `path` only once complete.
pub fn stream_grid_png<E: From<Error>>(
    path: &Path,
    layout: GridLayout,
    lo: f32,
    hi: f32,
    mut band_images: impl FnMut(usize, usize) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(), E> {
    const OP: &str = "save_grid_png";
    layout.validate(OP)?;
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return Err(Error::invalid(
            OP,
            format!("value range [{lo}, {hi}] must be finite with lo < hi"),
        )
        .into());
    }
    let io_error = |what: &str, e: &dyn std::fmt::Display| png_error(OP, path, what, e);
    create_parent_folder(OP, path)?;
    let mut file = AtomicFile::create(path).map_err(|e| io_error("write", &e))?;
    let (canvas_width, canvas_height) = (layout.canvas_width(), layout.canvas_height());
    let mut encoder = png::Encoder::new(&mut file, canvas_width as u32, canvas_height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| io_error("encode", &e))?;
    let mut stream = writer.stream_writer().map_err(|e| io_error("encode", &e))?;
    // The top border, then each band: a row of images and the border below it.
    stream
        .write_all(&Canvas::new(canvas_width, GRID_PADDING, BLACK).rgb)
        .map_err(|e| io_error("write", &e))?;
    let GridLayout {
        nrow,
        channels,
        height,
        width,
        ..
    } = layout;
    let to_byte = |v: f32| ((v - lo) / (hi - lo) * 255.0).round().clamp(0.0, 255.0) as u8;
    let plane = height * width;
    for band in 0..layout.bands() {
        let first = band * nrow;
        let len = nrow.min(layout.count - first);
        let images = band_images(first, len)?;
        if images.dims() != [len, channels, height, width] {
            return Err(E::from(Error::shape(
                OP,
                format!(
                    "images {first}..{} must have shape [{len}, {channels}, {height}, {width}], got {}",
                    first + len,
                    images.shape()
                ),
            )));
        }
        let values = images.to_dtype(DType::F32)?.to_vec::<f32>()?;
        let mut canvas = Canvas::new(canvas_width, height + GRID_PADDING, BLACK);
        for (n, image) in values.chunks_exact(channels * plane).enumerate() {
            let left = GRID_PADDING + n * (width + GRID_PADDING);
            for y in 0..height {
                for x in 0..width {
                    let at = y * width + x;
                    let rgb = if channels == 1 {
                        [to_byte(image[at]); 3]
                    } else {
                        [
                            to_byte(image[at]),
                            to_byte(image[plane + at]),
                            to_byte(image[2 * plane + at]),
                        ]
                    };
                    canvas.set(left + x, y, rgb);
                }
            }
        }
        stream
            .write_all(&canvas.rgb)
            .map_err(|e| io_error("write", &e))?;
    }
    stream.finish().map_err(|e| io_error("encode", &e))?;
    writer.finish().map_err(|e| io_error("encode", &e))?;
    file.commit().map_err(|e| io_error("write", &e))?;
    Ok(())
}

/// "`op`: cannot `what` `path`: `e`", as an I/O error.
fn png_error(op: &str, path: &Path, what: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!(
        "{op}: cannot {what} {}: {e}",
        path.display()
    )))
}

/// Creates the folder a picture is written into, if it is missing.
fn create_parent_folder(op: &str, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| png_error(op, path, "create the folder of", &e))?;
    }
    Ok(())
}

/// The chart's size in pixels.
const CHART_WIDTH: usize = 800;
const CHART_HEIGHT: usize = 500;
/// Each font pixel is drawn as a `TEXT_SCALE × TEXT_SCALE` square.
const TEXT_SCALE: usize = 2;
const TITLE_SCALE: usize = 3;
/// A few clearly distinct colours (those of matplotlib's default cycle), one per series.
const SERIES_COLOURS: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Writes a line chart (800×500 PNG) of one or more named series of `(step, value)` points:
/// a title, linear x and y axes with 4–6 numbered ticks each and light grid lines, and a
/// legend naming each series in its colour. Non-finite points are skipped (they break the
/// line). The file is written to a temporary name and renamed.
pub fn save_line_chart_png(
    path: &Path,
    title: &str,
    series: &[(&str, &[(f64, f64)])],
) -> Result<()> {
    const OP: &str = "save_line_chart_png";
    let finite_points = || {
        series
            .iter()
            .flat_map(|(_, points)| points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    if finite_points().next().is_none() {
        return Err(Error::invalid(
            OP,
            format!(
                "no finite points to plot in {} series for chart {title:?}",
                series.len()
            ),
        ));
    }
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in finite_points() {
        (x_min, x_max) = (x_min.min(x), x_max.max(x));
        (y_min, y_max) = (y_min.min(y), y_max.max(y));
    }
    let x_axis = Axis::covering(x_min, x_max);
    let y_axis = Axis::covering(y_min, y_max);
    let (x_labels, y_labels) = (x_axis.labels(), y_axis.labels());

    // The plot area leaves room for the title above, tick labels left and below
    // (the last x label is centred on the right edge, so half of it sticks out).
    let widest = |labels: &[String]| {
        labels
            .iter()
            .map(|l| text_width(l, TEXT_SCALE))
            .max()
            .unwrap_or(0)
    };
    let plot = Rect {
        left: 16 + widest(&y_labels) + 10,
        top: 56,
        right: CHART_WIDTH - (widest(&x_labels) / 2 + 12).max(30),
        bottom: CHART_HEIGHT - 64,
    };
    let to_pixel = |x: f64, y: f64| -> (i64, i64) {
        let px = plot.left as f64 + x_axis.fraction(x) * (plot.right - plot.left) as f64;
        let py = plot.bottom as f64 - y_axis.fraction(y) * (plot.bottom - plot.top) as f64;
        (px.round() as i64, py.round() as i64)
    };

    let mut canvas = Canvas::new(CHART_WIDTH, CHART_HEIGHT, WHITE);

    // Title, shrunk if it would not fit at full size.
    let title_scale = if text_width(title, TITLE_SCALE) + 20 <= CHART_WIDTH {
        TITLE_SCALE
    } else {
        TEXT_SCALE
    };
    let title_left = CHART_WIDTH.saturating_sub(text_width(title, title_scale)) / 2;
    canvas.draw_text(title_left, 16, title, title_scale, BLACK);

    // Grid lines and numbered ticks.
    for (value, label) in y_axis.ticks().zip(&y_labels) {
        let (_, py) = to_pixel(x_axis.lo, value);
        let py = py as usize;
        canvas.fill_rect(plot.left, py, plot.right - plot.left, 1, GRID_GREY);
        canvas.fill_rect(plot.left - 6, py, 6, 1, BLACK);
        let label_left = plot.left - 10 - text_width(label, TEXT_SCALE);
        canvas.draw_text(label_left, py.saturating_sub(7), label, TEXT_SCALE, BLACK);
    }
    for (value, label) in x_axis.ticks().zip(&x_labels) {
        let (px, _) = to_pixel(value, y_axis.lo);
        let px = px as usize;
        canvas.fill_rect(px, plot.top, 1, plot.bottom - plot.top, GRID_GREY);
        canvas.fill_rect(px, plot.bottom, 1, 6, BLACK);
        let label_left = px.saturating_sub(text_width(label, TEXT_SCALE) / 2);
        canvas.draw_text(label_left, plot.bottom + 12, label, TEXT_SCALE, BLACK);
    }
    let x_title_left = (plot.left + plot.right - text_width("step", TEXT_SCALE)) / 2;
    canvas.draw_text(x_title_left, plot.bottom + 36, "step", TEXT_SCALE, BLACK);

    // Axes: the left and bottom edges of the plot area.
    canvas.fill_rect(plot.left, plot.top, 1, plot.bottom - plot.top + 1, BLACK);
    canvas.fill_rect(plot.left, plot.bottom, plot.right - plot.left + 1, 1, BLACK);

    // The series, each a 2-pixel-wide polyline broken at non-finite points.
    for (i, (_, points)) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let mut previous: Option<(i64, i64)> = None;
        for &(x, y) in points.iter() {
            if !(x.is_finite() && y.is_finite()) {
                previous = None;
                continue;
            }
            let here = to_pixel(x, y);
            match previous {
                Some(from) => canvas.draw_line(from, here, colour),
                None => canvas.fill_square(here, 3, colour),
            }
            previous = Some(here);
        }
    }

    // The legend, a boxed list in the corner of the plot area that hides the fewest
    // points (top-right first, where falling loss curves leave room).
    let row_height = 22;
    let swatch = 24;
    let widest_name = series
        .iter()
        .map(|(n, _)| text_width(n, TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let legend_width = 10 + swatch + 8 + widest_name + 10;
    let legend_height = 8 + row_height * series.len();
    let right = plot.right.saturating_sub(legend_width + 10);
    let bottom = plot.bottom.saturating_sub(legend_height + 10);
    let (left, top) = (plot.left + 10, plot.top + 10);
    let hidden_points = |&(legend_left, legend_top): &(usize, usize)| {
        finite_points()
            .map(|&(x, y)| to_pixel(x, y))
            .filter(|&(px, py)| {
                (legend_left as i64..(legend_left + legend_width) as i64).contains(&px)
                    && (legend_top as i64..(legend_top + legend_height) as i64).contains(&py)
            })
            .count()
    };
    let (legend_left, legend_top) = [(right, top), (right, bottom), (left, top), (left, bottom)]
        .into_iter()
        .min_by_key(hidden_points)
        .expect("four candidate corners");
    canvas.fill_rect(legend_left, legend_top, legend_width, legend_height, WHITE);
    canvas.stroke_rect(legend_left, legend_top, legend_width, legend_height, BLACK);
    for (i, (name, _)) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let row_top = legend_top + 8 + i * row_height;
        canvas.fill_rect(legend_left + 10, row_top + 6, swatch, 3, colour);
        canvas.draw_text(
            legend_left + 10 + swatch + 8,
            row_top,
            name,
            TEXT_SCALE,
            BLACK,
        );
    }

    canvas.write_png(OP, path)
}

/// A linear axis from `lo` to `hi` with a tick every `step`; `lo` and `hi` are multiples
/// of `step`, so the first and last ticks sit on the ends.
#[derive(Clone, Copy, Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    /// The axis with 4–6 ticks at "nice" values (1, 2, 2.5 or 5 times a power of ten)
    /// that covers `[min, max]`. A single value gets a small range around it.
    fn covering(min: f64, max: f64) -> Axis {
        let (min, max) = if max - min > f64::EPSILON * max.abs().max(min.abs()).max(1e-300) {
            (min, max)
        } else {
            let half_width = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            (min - half_width, max + half_width)
        };
        let magnitude = (max - min).log10().floor() as i32;
        let mut best: Option<(usize, Axis)> = None;
        for exponent in (magnitude - 2..=magnitude + 1).rev() {
            for mantissa in [5.0, 2.5, 2.0, 1.0] {
                let step = mantissa * 10f64.powi(exponent);
                // The small tolerances keep 0.3/0.1 = 2.9999… from adding a tick.
                let lo = (min / step + 1e-9).floor() * step;
                let hi = (max / step - 1e-9).ceil() * step;
                let count = ((hi - lo) / step).round() as usize + 1;
                let distance = count.abs_diff(5);
                if best.is_none_or(|(d, _)| distance < d) {
                    best = Some((distance, Axis { lo, hi, step }));
                }
            }
        }
        best.expect("the candidate loop always runs").1
    }

    /// The tick values from `lo` to `hi`.
    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        let count = ((self.hi - self.lo) / self.step).round() as usize + 1;
        (0..count).map(move |i| self.lo + i as f64 * self.step)
    }

    /// Where `value` lies along the axis, 0 at `lo` and 1 at `hi`.
    fn fraction(&self, value: f64) -> f64 {
        (value - self.lo) / (self.hi - self.lo)
    }

    /// The tick labels, all with the same number of decimals: just enough to tell the
    /// ticks apart. Very large or very small numbers use scientific notation (`2.5e-5`).
    fn labels(&self) -> Vec<String> {
        // Multiples of the step, with the float noise of `lo + i·step` rounded away.
        let values: Vec<f64> = self
            .ticks()
            .map(|v| (v / self.step).round() * self.step)
            .collect();
        let largest = self.lo.abs().max(self.hi.abs());
        let scientific = largest >= 1e6 || self.step < 1e-4;
        let format = |value: f64, decimals: usize| match (value == 0.0, scientific) {
            (true, _) => format!("{:.decimals$}", 0.0),
            (false, true) => format!("{value:.decimals$e}"),
            (false, false) => format!("{value:.decimals$}"),
        };
        let exact_enough = |decimals: usize| {
            values.iter().all(|&v| {
                let shown: f64 = format(v, decimals).parse().unwrap_or(f64::NAN);
                (shown - v).abs() <= self.step * 1e-3
            })
        };
        let decimals = (0..=8).find(|&d| exact_enough(d)).unwrap_or(8);
        values.iter().map(|&v| format(v, decimals)).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Rect {
    left: usize,
    top: usize,
    right: usize,
    bottom: usize,
}

type Rgb = [u8; 3];
const BLACK: Rgb = [0, 0, 0];
const WHITE: Rgb = [255, 255, 255];
const GRID_GREY: Rgb = [225, 225, 225];

/// An RGB image in memory, row-major, 3 bytes per pixel; drawing outside it is ignored.
struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            rgb: background.repeat(width * height),
        }
    }

    fn set(&mut self, x: usize, y: usize, colour: Rgb) {
        if x < self.width && y < self.height {
            let at = 3 * (y * self.width + x);
            self.rgb[at..at + 3].copy_from_slice(&colour);
        }
    }

    fn fill_rect(&mut self, left: usize, top: usize, width: usize, height: usize, colour: Rgb) {
        for y in top..top + height {
            for x in left..left + width {
                self.set(x, y, colour);
            }
        }
    }

    fn stroke_rect(&mut self, left: usize, top: usize, width: usize, height: usize, colour: Rgb) {
        self.fill_rect(left, top, width, 1, colour);
        self.fill_rect(left, top + height - 1, width, 1, colour);
        self.fill_rect(left, top, 1, height, colour);
        self.fill_rect(left + width - 1, top, 1, height, colour);
    }

    /// A `size × size` square whose top-left corner is at `(x, y)` (may lie off the canvas).
    fn fill_square(&mut self, (x, y): (i64, i64), size: i64, colour: Rgb) {
        for dy in 0..size {
            for dx in 0..size {
                let (px, py) = (x + dx, y + dy);
                if px >= 0 && py >= 0 {
                    self.set(px as usize, py as usize, colour);
                }
            }
        }
    }

    /// A 2-pixel-wide straight line (Bresenham's algorithm, stamping 2×2 squares).
    fn draw_line(&mut self, from: (i64, i64), to: (i64, i64), colour: Rgb) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (step_x, step_y) = ((to.0 - x).signum(), (to.1 - y).signum());
        let mut error = dx + dy;
        loop {
            self.fill_square((x, y), 2, colour);
            if (x, y) == to {
                break;
            }
            let doubled = 2 * error;
            if doubled >= dy {
                error += dy;
                x += step_x;
            }
            if doubled <= dx {
                error += dx;
                y += step_y;
            }
        }
    }

    /// Draws `text` in the 5×7 font with its top-left corner at `(left, top)`.
    fn draw_text(&mut self, left: usize, top: usize, text: &str, scale: usize, colour: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let glyph_left = left + i * GLYPH_ADVANCE * scale;
            let glyph_top = top + glyph_drop(c) * scale;
            for (row, pixels) in glyph(c).iter().enumerate() {
                for (column, pixel) in pixels.bytes().enumerate() {
                    if pixel == b'#' {
                        let (x, y) = (glyph_left + column * scale, glyph_top + row * scale);
                        self.fill_rect(x, y, scale, scale, colour);
                    }
                }
            }
        }
    }

    /// Encodes the canvas as an 8-bit RGB PNG at `path`, via a temporary file and a rename.
    fn write_png(&self, op: &'static str, path: &Path) -> Result<()> {
        let io_error = |what: &str, e: &dyn std::fmt::Display| png_error(op, path, what, e);
        create_parent_folder(op, path)?;
        let mut encoded = Vec::new();
        let encoding = (|| -> std::result::Result<(), png::EncodingError> {
            let mut encoder =
                png::Encoder::new(&mut encoded, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header()?;
            writer.write_image_data(&self.rgb)?;
            writer.finish()
        })();
        encoding.map_err(|e| io_error("encode", &e))?;
        crate::atomic_file::write_file_atomically(path, &encoded).map_err(|e| io_error("write", &e))
    }
}

const GLYPH_WIDTH: usize = 5;
/// Glyph width plus one column of space.
const GLYPH_ADVANCE: usize = GLYPH_WIDTH + 1;

/// The pixel width of `text` drawn at `scale` (without the space after the last glyph).
fn text_width(text: &str, scale: usize) -> usize {
    let count = text.chars().count();
    (count * GLYPH_ADVANCE).saturating_sub(1) * scale
}

/// How many rows below the cell's top a glyph is drawn: the letters with descenders
/// (g, j, p, q, y) sit lower so that their tails hang under the baseline, as in print.
fn glyph_drop(c: char) -> usize {
    match c {
        'g' | 'p' | 'q' | 'y' => 2,
        'j' => 1,
        _ => 0,
    }
}

/// The 5×7 bitmap of `c`, or of '?' when the font has no glyph for it.
fn glyph(c: char) -> &'static [&'static str; 7] {
    let find = |wanted: char| FONT.iter().find(|(glyph_char, _)| *glyph_char == wanted);
    let (_, rows) = find(c)
        .or_else(|| find('?'))
        .expect("the font has a '?' glyph");
    rows
}

/// A 5×7 bitmap font, one string per pixel row, top first, '#' for ink.
/// Capitals and digits fill all seven rows; lower-case letters are five rows high
/// (rows 2–6), except that g, j, p, q and y start higher and are lowered by
/// [`glyph_drop`] so that their tails hang below the baseline.
#[rustfmt::skip]
const FONT: &[(char, [&str; 7])] = &[
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    ('A', [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('B', ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."]),
    ('C', [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]),
    ('D', ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."]),
    ('E', ["#####", "#....", "#....", "####.", "#....", "#....", "#####"]),
    ('F', ["#####", "#....", "#....", "####.", "#....", "#....", "#...."]),
    ('G', [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"]),
    ('H', ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('I', [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('J', ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"]),
    ('L', ["#....", "#....", "#....", "#....", "#....", "#....", "#####"]),
    ('M', ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"]),
    ('N', ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"]),
    ('O', [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('P', ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."]),
    ('Q', [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"]),
    ('S', [".####", "#....", "#....", ".###.", "....#", "....#", "####."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."]),
    ('X', ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"]),
    ('Y', ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."]),
    ('Z', ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', [".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', ["####.", "#...#", "#...#", "#...#", "####.", "#....", "#...."]),
    ('q', [".####", "#...#", "#...#", "#...#", ".####", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', [".....", ".....", ".###.", "#....", ".###.", "....#", "####."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', ["#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"]),
    (' ', [".....", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."]),
    (',', [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."]),
    ('-', [".....", ".....", ".....", ".###.", ".....", ".....", "....."]),
    ('+', [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."]),
    ('_', [".....", ".....", ".....", ".....", ".....", ".....", "#####"]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
    ('[', [".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."]),
    (']', [".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."]),
    ('=', [".....", ".....", "#####", ".....", "#####", ".....", "....."]),
    ('?', [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."]),
    ('%', ["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn tick_values(min: f64, max: f64) -> Vec<f64> {
        Axis::covering(min, max).ticks().collect()
    }

    #[test]
    fn axis_ticks_are_nice_numbers_covering_the_data() {
        for (min, max) in [
            (0.0, 1.0),
            (0.0, 3000.0),
            (1.37, 2.91),
            (-0.3, 0.7),
            (5.0, 5.0),
            (0.0, 0.0),
            (1e-6, 3e-6),
        ] {
            let ticks = tick_values(min, max);
            assert!((4..=6).contains(&ticks.len()), "{min}..{max}: {ticks:?}");
            assert!(
                ticks[0] <= min && *ticks.last().unwrap() >= max,
                "{min}..{max}: {ticks:?}"
            );
        }
        assert_eq!(tick_values(0.0, 1.0), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn axis_labels_have_just_enough_decimals() {
        let labels = |min, max| Axis::covering(min, max).labels();
        assert_eq!(labels(0.0, 1.0), ["0.00", "0.25", "0.50", "0.75", "1.00"]);
        assert_eq!(labels(0.0, 3000.0), ["0", "1000", "2000", "3000"]);
        assert_eq!(labels(-0.3, 0.7), ["-0.5", "0.0", "0.5", "1.0"]);
        assert_eq!(
            labels(1e-6, 3e-6),
            ["1.0e-6", "1.5e-6", "2.0e-6", "2.5e-6", "3.0e-6"]
        );
        assert_eq!(labels(0.0, 4e6), ["0", "1e6", "2e6", "3e6", "4e6"]);
    }

    #[test]
    fn font_glyphs_are_five_by_seven_and_cover_tick_labels() {
        for (c, rows) in FONT {
            assert!(
                rows.iter()
                    .all(|r| r.len() == GLYPH_WIDTH && r.bytes().all(|b| b == b'#' || b == b'.')),
                "glyph {c:?} is not 5x7 of '#' and '.'"
            );
            assert_eq!(
                FONT.iter().filter(|(d, _)| d == c).count(),
                1,
                "glyph {c:?} is defined twice"
            );
        }
        for c in "0123456789.-e".chars().chain('a'..='z').chain('A'..='Z') {
            assert!(FONT.iter().any(|(d, _)| *d == c), "no glyph for {c:?}");
        }
    }
}
