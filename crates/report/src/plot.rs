//! PNG plots of a run: the curves of [`crate::chart`] (loss, accuracy and, with teachers, the
//! mean teacher weights per epoch: the charts the audit page draws as SVG, from the same model
//! and layout), segmentation overlays, detection boxes and per-class bars. Text uses the
//! embedded DejaVu Sans font, so no system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use mtkd_records::picture::Picture;
use mtkd_records::record::EpochRecord;

use crate::chart::{self, LineChart, Rgb, Weights};

static FONT: Once = Once::new();

fn ensure_font() {
    FONT.call_once(|| {
        for (style, font, name) in [
            (FontStyle::Normal, dejavu::sans::regular(), "regular"),
            (FontStyle::Bold, dejavu::sans::bold(), "bold"),
        ] {
            if plotters::style::register_font("sans-serif", style, font).is_err() {
                tracing::warn!(
                    font = name,
                    "cannot load the embedded font; plots may lack text"
                );
            }
        }
    });
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Map a plotters error to the file being drawn.
fn drawing(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |x| anyhow!("plotting {}: {x}", path.display())
}

// ---------------------------------------------------------------------------------------------
// Line charts
// ---------------------------------------------------------------------------------------------

/// Image pixels per page pixel of [`chart::Layout`] (a chart [`chart::WIDTH`] wide on the page
/// is 832 pixels wide as a PNG).
const SCALE: f64 = 1.6;
/// Charts are drawn this many times larger, then reduced: smooth lines and edges.
const SUPERSAMPLE: u32 = 2;
/// Drawn pixels per page pixel.
const DRAW_SCALE: f64 = SCALE * SUPERSAMPLE as f64;
/// The band of the title above the chart, and a row of the legend under it (page pixels).
const TITLE_H: f64 = 28.0;
const LEGEND_ROW: f64 = 18.0;
/// plotters sizes DejaVu Sans by its ascent + descent, 1.164 em; CSS sizes fonts by the em.
const EM: f64 = 2384.0 / 2048.0;

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c.0, c.1, c.2)
}

/// Draws in page pixels on a supersampled image, `dy` page pixels down.
struct Pen<'p, 'a> {
    area: &'p Area<'a>,
    k: f64,
    dy: f64,
    path: &'p Path,
}

impl Pen<'_, '_> {
    fn at(&self, (x, y): (f64, f64)) -> (i32, i32) {
        (
            (x * self.k).round() as i32,
            ((y + self.dy) * self.k).round() as i32,
        )
    }

    fn width(&self, w: f64) -> u32 {
        (w * self.k).round().max(1.0) as u32
    }

    fn line(
        &self,
        points: &[(f64, f64)],
        colour: Rgb,
        width: f64,
        dash: Option<&[u8]>,
    ) -> Result<()> {
        let pieces = match dash {
            Some(pattern) => dashed(points, pattern),
            None => vec![points.to_vec()],
        };
        let style = rgb(colour).stroke_width(self.width(width));
        for piece in pieces.iter().filter(|p| p.len() > 1) {
            let pts: Vec<(i32, i32)> = piece.iter().map(|&p| self.at(p)).collect();
            self.area
                .draw(&PathElement::new(pts, style))
                .map_err(|x| drawing(self.path)(&x))?;
        }
        Ok(())
    }

    fn circle(&self, centre: (f64, f64), r: f64, colour: Rgb, stroke: Option<f64>) -> Result<()> {
        let style = match stroke {
            Some(w) => rgb(colour).stroke_width(self.width(w)),
            None => rgb(colour).filled(),
        };
        self.area
            .draw(&Circle::new(self.at(centre), self.width(r), style))
            .map_err(|x| drawing(self.path)(&x))
    }

    fn font(&self, size: f64, bold: bool) -> FontDesc<'static> {
        font(size * self.k, bold)
    }

    /// Text whose baseline is at `y`, starting, centred or ending at `x` (`h`).
    fn text(
        &self,
        text: &str,
        (x, y): (f64, f64),
        font: &FontDesc,
        colour: Rgb,
        h: HPos,
    ) -> Result<()> {
        let style = font.color(&rgb(colour)).pos(Pos::new(h, VPos::Top));
        // plotters puts the baseline half the font size under a top-anchored position.
        let (px, py) = self.at((x, y));
        let pos = (px, py - (font.get_size() / 2.0).round() as i32);
        self.area
            .draw_text(text, &style, pos)
            .map_err(|x| drawing(self.path)(&x))
    }

    /// Text read upwards, centred on `y`, with its baseline at `x`.
    fn text_up(&self, text: &str, (x, y): (f64, f64), font: &FontDesc, colour: Rgb) -> Result<()> {
        let style = font
            .transform(FontTransform::Rotate270)
            .color(&rgb(colour))
            .pos(Pos::new(HPos::Center, VPos::Top));
        let (px, py) = self.at((x, y));
        let pos = (px - (font.get_size() / 2.0).round() as i32, py);
        self.area
            .draw_text(text, &style, pos)
            .map_err(|x| drawing(self.path)(&x))
    }
}

/// A polyline cut into its dashes: `pattern` is dash, gap, ... lengths (page pixels) repeated
/// along the whole line, as SVG's `stroke-dasharray` is.
fn dashed(points: &[(f64, f64)], pattern: &[u8]) -> Vec<Vec<(f64, f64)>> {
    let mut pat: Vec<f64> = pattern.iter().map(|&v| f64::from(v)).collect();
    if pat.len() % 2 == 1 {
        pat.extend_from_within(..);
    }
    if points.is_empty() || pattern.iter().all(|&v| v == 0) {
        return vec![points.to_vec()];
    }
    let mut out = Vec::new();
    let (mut i, mut left) = (0, pat[0]);
    let mut piece = vec![points[0]];
    for seg in points.windows(2) {
        let ((ax, ay), (bx, by)) = (seg[0], seg[1]);
        let len = (bx - ax).hypot(by - ay);
        let mut t = 0.0;
        while len - t > left {
            t += left;
            let p = (ax + (bx - ax) * t / len, ay + (by - ay) * t / len);
            if i % 2 == 0 {
                piece.push(p);
                out.push(std::mem::take(&mut piece));
            } else {
                piece = vec![p];
            }
            i = (i + 1) % pat.len();
            left = pat[i];
        }
        left -= len - t;
        if i % 2 == 0 {
            piece.push((bx, by));
        }
    }
    if i % 2 == 0 && piece.len() > 1 {
        out.push(piece);
    }
    out
}

/// DejaVu Sans at `size` pixels (CSS: the em), bold or not.
fn font(size: f64, bold: bool) -> FontDesc<'static> {
    let style = if bold {
        FontStyle::Bold
    } else {
        FontStyle::Normal
    };
    FontDesc::new(FontFamily::SansSerif, size * EM, style)
}

/// The width of `text` in DejaVu Sans at `size` page pixels (measured at the drawing's size).
fn text_width(text: &str, size: f64, bold: bool) -> f64 {
    font(size * DRAW_SCALE, bold)
        .box_size(text)
        .map_or(text.chars().count() as f64 * size * 0.6, |(w, _)| {
            f64::from(w) / DRAW_SCALE
        })
}

const TEXT: Rgb = Rgb(0x33, 0x33, 0x33);
const AXIS: Rgb = Rgb(0x55, 0x55, 0x55);

/// Where a legend entry's text starts after its swatch, and the margin and gap around entries
/// (page pixels).
const SWATCH: f64 = 29.0;
const LEGEND_MARGIN: f64 = 8.0;
const LEGEND_GAP: f64 = 16.0;

/// The legend under a PNG chart `width` wide: each series' entry (left, row), flowing left to
/// right as on the page, and the number of rows.
fn legend(chart: &LineChart, width: f64) -> (Vec<(f64, usize)>, usize) {
    let mut entries = Vec::new();
    let (mut x, mut row) = (LEGEND_MARGIN, 0usize);
    for se in &chart.series {
        let w = SWATCH + text_width(&se.name, 12.0, false);
        if x > LEGEND_MARGIN && x + w > width - LEGEND_MARGIN {
            (x, row) = (LEGEND_MARGIN, row + 1);
        }
        entries.push((x, row));
        x += w + LEGEND_GAP;
    }
    (entries, row + 1)
}

/// Draw `chart` into a PNG at `path`: the title above, the chart as the page places it
/// (`LineChart::layout`), the legend under the plot, where it covers no data. A chart without
/// a finite value writes nothing.
pub fn line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    ensure_font();
    let Some(l) = chart.layout() else {
        tracing::debug!(path = %path.display(), chart = %chart.title, "no data: plot not written");
        return Ok(());
    };
    let f = &l.frame;
    let (entries, rows) = legend(chart, f.w);
    let legend_h = LEGEND_ROW * rows as f64 + 6.0;
    let title_size = {
        let w = text_width(&chart.title, 14.0, true);
        14.0 * ((f.w - 16.0) / w).min(1.0)
    };
    let (w, h) = (
        (f.w * SCALE).round() as u32,
        ((TITLE_H + f.h + legend_h) * SCALE).round() as u32,
    );
    let (big_w, big_h) = (w * SUPERSAMPLE, h * SUPERSAMPLE);
    let mut pixels = vec![255u8; (big_w * big_h * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut pixels, (big_w, big_h)).into_drawing_area();
        let top = Pen {
            area: &area,
            k: DRAW_SCALE,
            dy: 0.0,
            path,
        };
        top.text(
            &chart.title,
            (f.w / 2.0, 20.0),
            &top.font(title_size, true),
            Rgb(0x1d, 0x24, 0x30),
            HPos::Center,
        )?;
        let pen = Pen { dy: TITLE_H, ..top };
        let (left, right, t, b) = (f.left, f.w - f.right, f.top, f.h - f.bottom);
        let small = pen.font(11.0, false);
        for tick in &l.y_ticks {
            pen.line(
                &[(left, tick.at), (right, tick.at)],
                Rgb(0xec, 0xee, 0xf1),
                1.0,
                None,
            )?;
            pen.text(
                &tick.text,
                (left - 6.0, tick.at + 3.5),
                &small,
                TEXT,
                HPos::Right,
            )?;
        }
        for tick in &l.x_ticks {
            pen.line(&[(tick.at, b), (tick.at, b + 4.0)], AXIS, 1.0, None)?;
            pen.text(&tick.text, (tick.at, b + 16.0), &small, TEXT, HPos::Center)?;
        }
        pen.line(&[(left, t), (left, b), (right, b)], AXIS, 1.0, None)?;
        pen.text(
            &chart.x_label,
            ((left + right) / 2.0, f.h - 5.0),
            &small,
            TEXT,
            HPos::Center,
        )?;
        pen.text_up(&chart.y_label, (13.0, (t + b) / 2.0), &small, TEXT)?;
        for &px in &l.markers {
            pen.line(
                &[(px, t), (px, b)],
                Rgb(0x6b, 0x72, 0x80),
                1.2,
                Some(&[5, 4]),
            )?;
        }
        for (se, line) in chart.series.iter().zip(&l.lines) {
            for run in &line.runs {
                pen.line(run, se.colour, 2.0, se.dash)?;
            }
            for &dot in &line.dots {
                pen.circle(dot, 2.8, se.colour, None)?;
            }
        }
        for &ring in &l.rings {
            pen.circle(ring, 6.0, Rgb(0x11, 0x11, 0x11), Some(1.3))?;
        }
        for label in &l.labels {
            if let Some((x, from, to)) = label.leader {
                pen.line(&[(x, from), (x, to)], Rgb(0x9a, 0xa1, 0xab), 1.0, None)?;
            }
            let (font, colour) = if label.bold {
                (pen.font(11.0, true), Rgb(0x11, 0x11, 0x11))
            } else {
                (small.clone(), Rgb(0x4b, 0x55, 0x63))
            };
            pen.text(
                &label.text,
                (label.x, label.baseline),
                &font,
                colour,
                HPos::Left,
            )?;
        }
        let legend = Pen {
            dy: TITLE_H + f.h,
            ..pen
        };
        let entry_font = legend.font(12.0, false);
        for (se, &(x, row)) in chart.series.iter().zip(&entries) {
            let y = LEGEND_ROW * row as f64;
            legend.line(
                &[(x + 1.0, y + 9.0), (x + 23.0, y + 9.0)],
                se.colour,
                2.5,
                se.dash,
            )?;
            legend.text(
                &se.name,
                (x + SWATCH, y + 13.0),
                &entry_font,
                Rgb(0x1d, 0x24, 0x30),
                HPos::Left,
            )?;
        }
        area.present().map_err(|x| drawing(path)(&x))?;
    }
    let big = image::RgbImage::from_raw(big_w, big_h, pixels)
        .ok_or_else(|| anyhow!("plotting {}: wrong pixel buffer size", path.display()))?;
    let small = image::imageops::resize(&big, w, h, image::imageops::FilterType::Triangle);
    write_png(path, w, h, small.into_raw())
}

/// Encode RGB pixels as PNG and write them atomically.
pub fn write_png(path: &Path, w: u32, h: u32, rgb: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| anyhow!("plotting {}: wrong pixel buffer size", path.display()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|x| anyhow!("encoding {}: {x}", path.display()))?;
    mtkd_records::fsio::write_atomic(path, &png)
}

/// The curves of a run in `dir`, drawn from [`crate::chart`]'s builders as the audit page draws
/// them: `loss.png` (the training losses and the test loss), `accuracy.png` (the test metric, its companion curves
/// and the training score) and, with teachers, `teacher_weights.png` (the mean logit weight per
/// teacher; epochs whose weights are no mixture are named in the title).
pub fn plot_run(dir: &Path, history: &[EpochRecord], teacher_names: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    line_chart(&dir.join("loss.png"), &chart::losses(history))?;
    if let Some(first) = history.first() {
        line_chart(
            &dir.join("accuracy.png"),
            &chart::accuracy(history, &first.test.primary),
        )?;
    }
    if !teacher_names.is_empty() {
        let mut weights = chart::teacher_weights(history, teacher_names, Weights::Logit, None);
        if let Some(caveat) = chart::not_a_mixture(history) {
            weights.title = format!("{} ({caveat})", weights.title);
        }
        line_chart(&dir.join("teacher_weights.png"), &weights)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Per-class bars and image grids
// ---------------------------------------------------------------------------------------------

/// Colour of class `c` in overlays: background black, then distinct colours; unlabelled (a
/// negative value) grey.
fn class_colour(c: i64) -> [u8; 3] {
    const COLOURS: [[u8; 3]; 12] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [170, 110, 40],
    ];
    match c {
        0 => [0, 0, 0],
        c if c > 0 => COLOURS[(c as usize - 1) % COLOURS.len()],
        _ => [128, 128, 128],
    }
}

/// Pixel `(y, x)` of an image `[C, H, W]` (u8; C = 3 is RGB, else grey) of width `w`, height `h`.
fn image_pixel(
    image: &[u8],
    channels: usize,
    (h, w): (usize, usize),
    y: usize,
    x: usize,
) -> [u8; 3] {
    if channels == 3 {
        [0, 1, 2].map(|c| image[(c * h + y) * w + x])
    } else {
        let v = image[y * w + x];
        [v, v, v]
    }
}

/// The layout of an image grid ([`segmentation_overlays`], [`detection_overlays`]): one row per
/// sample, one panel per column (an `h` x `w` image scaled by a whole factor up to about `side`
/// pixels), the column titles above, a legend of the classes (six per row) below.
struct Grid {
    scale: usize,
    /// A panel's height and width in pixels.
    ph: usize,
    pw: usize,
    rows: usize,
    cols: usize,
    width: usize,
    height: usize,
}

impl Grid {
    const GAP: usize = 8;
    const HEAD: usize = 28;
    const LEGEND_ROW: usize = 22;
    const LEGEND_PER_ROW: usize = 6;

    fn new(hw: (usize, usize), side: usize, rows: usize, cols: usize, classes: usize) -> Grid {
        let (h, w) = hw;
        let scale = (side / h.max(w).max(1)).max(1);
        let (ph, pw) = (h * scale, w * scale);
        // Room for six legend entries per row however few columns there are.
        let width = (cols * (pw + Self::GAP) + Self::GAP).max(Self::LEGEND_PER_ROW * 120);
        let height = Self::HEAD
            + rows * (ph + Self::GAP)
            + Self::GAP
            + Self::LEGEND_ROW * classes.div_ceil(Self::LEGEND_PER_ROW)
            + 8;
        Grid {
            scale,
            ph,
            pw,
            rows,
            cols,
            width,
            height,
        }
    }

    /// The top-left pixel of the panel of row `r`, column `col`.
    fn origin(&self, r: usize, col: usize) -> (usize, usize) {
        (
            Self::GAP + col * (self.pw + Self::GAP),
            Self::HEAD + r * (self.ph + Self::GAP),
        )
    }

    /// A white image with every panel painted: `colour(row, col, y, x)` of source pixel (y, x).
    fn paint(&self, colour: impl Fn(usize, usize, usize, usize) -> [u8; 3]) -> Vec<u8> {
        let mut px = vec![255u8; self.width * self.height * 3];
        for r in 0..self.rows {
            for col in 0..self.cols {
                let (left, top) = self.origin(r, col);
                for y in 0..self.ph {
                    for x in 0..self.pw {
                        let c = colour(r, col, y / self.scale, x / self.scale);
                        let i = ((top + y) * self.width + left + x) * 3;
                        px[i..i + 3].copy_from_slice(&c);
                    }
                }
            }
        }
        px
    }

    fn area<'a>(&self, px: &'a mut [u8]) -> Area<'a> {
        BitMapBackend::with_buffer(px, (self.width as u32, self.height as u32)).into_drawing_area()
    }

    /// The column titles, and the legend: `i name` beside a swatch of `swatch(i)` per class.
    fn label(
        &self,
        area: &Area,
        path: &Path,
        titles: &[String],
        class_names: &[String],
        swatch: impl Fn(usize) -> [u8; 3],
    ) -> Result<()> {
        let e = drawing(path);
        let style = ("sans-serif", 16).into_font().color(&BLACK);
        for (col, t) in titles.iter().enumerate() {
            let (left, _) = self.origin(0, col);
            area.draw_text(t, &style, (left as i32, 6))
                .map_err(|x| e(&x))?;
        }
        let legend_top = Self::HEAD + self.rows * (self.ph + Self::GAP) + Self::GAP;
        let cell = self.width / Self::LEGEND_PER_ROW;
        let small = ("sans-serif", 14).into_font().color(&BLACK);
        for (i, n) in class_names.iter().enumerate() {
            let lx = (8 + (i % Self::LEGEND_PER_ROW) * cell) as i32;
            let ly = (legend_top + Self::LEGEND_ROW * (i / Self::LEGEND_PER_ROW) + 4) as i32;
            let k = swatch(i);
            area.draw(&Rectangle::new(
                [(lx, ly), (lx + 13, ly + 13)],
                RGBColor(k[0], k[1], k[2]).filled(),
            ))
            .map_err(|x| e(&x))?;
            area.draw_text(&format!("{i} {n}"), &small, (lx + 18, ly - 1))
                .map_err(|x| e(&x))?;
        }
        Ok(())
    }
}

/// One row of [`segmentation_overlays`]: the image `[C, H, W]` (u8, C = 1 or 3) and the class
/// maps `[H, W]` to show beside it (ground truth first; a negative value is not labelled).
pub struct OverlayRow {
    pub image: Vec<u8>,
    pub channels: usize,
    pub maps: Vec<Vec<i64>>,
}

/// `overlays.png`: per row the image, then each class map (truth, student, teachers) drawn as
/// colours over the dimmed image; `titles` name the columns after "image"; a legend of the
/// classes below.
pub fn segmentation_overlays(
    path: &Path,
    hw: (usize, usize),
    titles: &[String],
    class_names: &[String],
    rows: &[OverlayRow],
) -> Result<()> {
    ensure_font();
    let grid = Grid::new(hw, 192, rows.len(), titles.len() + 1, class_names.len());
    let w = hw.1;
    let mut px = grid.paint(|r, col, y, x| {
        let row = &rows[r];
        let g = image_pixel(&row.image, row.channels, hw, y, x);
        if col == 0 {
            return g;
        }
        let cls = row.maps[col - 1][y * w + x];
        let k = class_colour(cls);
        if cls == 0 {
            g.map(|v| v / 3)
        } else {
            [0, 1, 2].map(|i| ((u16::from(k[i]) * 3 + u16::from(g[i])) / 4) as u8)
        }
    });
    {
        let area = grid.area(&mut px);
        let names: Vec<String> = std::iter::once("image".to_owned())
            .chain(titles.iter().cloned())
            .collect();
        grid.label(&area, path, &names, class_names, |i| class_colour(i as i64))?;
        area.present().map_err(|x| drawing(path)(&x))?;
    }
    write_png(path, grid.width as u32, grid.height as u32, px)
}

/// A bar per class (`class_iou.png`, `class_ap.png`): `values` in percent, NaN drawn as no
/// bar; with `background` the first class is segmentation's background (drawn grey).
pub fn class_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    names: &[String],
    values: &[f64],
    background: bool,
) -> Result<()> {
    ensure_font();
    let n = values.len();
    if n == 0 {
        return Ok(());
    }
    let (w, h) = (900u32, 500u32);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        let e = drawing(path);
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0.0..100.0)
            .map_err(|x| e(&x))?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) if *i < n => {
                names.get(*i).cloned().unwrap_or_else(|| i.to_string())
            }
            SegmentValue::CenterOf(_) | SegmentValue::Exact(_) => String::new(),
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y_label)
            .x_labels(n)
            .x_label_formatter(&label)
            .x_label_style(("sans-serif", 12))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| {
                        let c = class_colour(i as i64 + i64::from(!background));
                        let colour = if i == 0 && background {
                            RGBColor(90, 90, 90)
                        } else {
                            RGBColor(c[0], c[1], c[2])
                        };
                        Rectangle::new(
                            [
                                (SegmentValue::Exact(i), 0.0),
                                (SegmentValue::Exact(i + 1), v),
                            ],
                            colour.filled(),
                        )
                    }),
            )
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    write_png(path, w, h, pixels)
}

/// One box of [`detection_overlays`]: class, `[x1, y1, x2, y2]` in pixels, score (`None` for
/// ground truth).
pub use mtkd_records::picture::DrawBox;

/// One row of [`detection_overlays`]: the image `[C, H, W]` (u8) and the boxes of every
/// column (ground truth first).
pub struct BoxRow {
    pub image: Vec<u8>,
    pub channels: usize,
    pub boxes: Vec<Vec<DrawBox>>,
}

/// `boxes.png`: per row one panel per column (truth, student, teachers): the image with its
/// boxes outlined in their class's colour (scores beside predicted boxes); a legend of the
/// classes below.
pub fn detection_overlays(
    path: &Path,
    hw: (usize, usize),
    titles: &[String],
    class_names: &[String],
    rows: &[BoxRow],
) -> Result<()> {
    ensure_font();
    let (h, w) = hw;
    let grid = Grid::new(hw, 256, rows.len(), titles.len(), class_names.len());
    let mut px = grid.paint(|r, _, y, x| {
        let row = &rows[r];
        image_pixel(&row.image, row.channels, hw, y, x).map(|v| (u16::from(v) * 3 / 4) as u8)
    });
    {
        let area = grid.area(&mut px);
        let e = drawing(path);
        let tiny = ("sans-serif", 11).into_font().color(&WHITE);
        let s = grid.scale as f32;
        for (r, row) in rows.iter().enumerate() {
            for (col, boxes) in row.boxes.iter().enumerate().take(grid.cols) {
                let (left, top) = grid.origin(r, col);
                let (left, top) = (left as f32, top as f32);
                let clip = |v: f32, lo: f32, n: usize| {
                    (lo + v * s).clamp(lo, lo + (n * grid.scale) as f32 - 1.0) as i32
                };
                for b in boxes {
                    let k = class_colour(b.class as i64 + 1);
                    let (x1, y1) = (clip(b.bbox[0], left, w), clip(b.bbox[1], top, h));
                    let (x2, y2) = (clip(b.bbox[2], left, w), clip(b.bbox[3], top, h));
                    area.draw(&Rectangle::new(
                        [(x1, y1), (x2, y2)],
                        RGBColor(k[0], k[1], k[2]).stroke_width(2),
                    ))
                    .map_err(|x| e(&x))?;
                    if let Some(sc) = b.score {
                        area.draw_text(&format!("{sc:.2}"), &tiny, (x1 + 2, y1 + 1))
                            .map_err(|x| e(&x))?;
                    }
                }
            }
        }
        grid.label(&area, path, titles, class_names, |i| {
            class_colour(i as i64 + 1)
        })?;
        area.present().map_err(|x| e(&x))?;
    }
    write_png(path, grid.width as u32, grid.height as u32, px)
}

/// Draw a task's [`Picture`] of a batch into the folder `dir`: `overlays.png` for masks,
/// `boxes.png` for boxes. `images` are the batch's images `[C, H, W]` (u8) of `hw` pixels,
/// `titles` name the picture's columns (truth, student, teachers).
pub fn draw_picture(
    dir: &Path,
    (hw, channels): ((usize, usize), usize),
    images: &[Vec<u8>],
    titles: &[String],
    class_names: &[String],
    picture: &Picture,
) -> Result<()> {
    match picture {
        Picture::Masks(columns) => {
            let rows: Vec<OverlayRow> = images
                .iter()
                .enumerate()
                .map(|(i, image)| OverlayRow {
                    image: image.clone(),
                    channels,
                    maps: columns.iter().map(|c| c[i].clone()).collect(),
                })
                .collect();
            segmentation_overlays(&dir.join("overlays.png"), hw, titles, class_names, &rows)
        }
        Picture::Boxes(columns) => {
            let rows: Vec<BoxRow> = images
                .iter()
                .enumerate()
                .map(|(i, image)| BoxRow {
                    image: image.clone(),
                    channels,
                    boxes: columns.iter().map(|c| c[i].clone()).collect(),
                })
                .collect();
            detection_overlays(&dir.join("boxes.png"), hw, titles, class_names, &rows)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::html::tests::{inputs, record};

    /// An empty scratch folder for a test's files.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mtkd-report-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn near(a: image::Rgb<u8>, b: Rgb) -> bool {
        let d = |x: u8, y: u8| (i32::from(x) - i32::from(y)).abs();
        d(a[0], b.0) + d(a[1], b.1) + d(a[2], b.2) < 60
    }

    /// The page and the PNGs draw the same charts: the page shows every series of each builder's
    /// chart, and each PNG is that chart as the page places it, with the legend under the plot.
    #[test]
    fn the_page_and_the_pngs_draw_the_same_charts() {
        let inp = inputs();
        let page = crate::html::render(&inp);
        let dir = scratch("same");
        let teachers = inp.teacher_names();
        plot_run(&dir, &inp.metrics, &teachers).unwrap();
        let h = &inp.metrics;
        for (file, chart) in [
            ("accuracy.png", chart::accuracy(h, &h[0].test.primary)),
            ("loss.png", chart::losses(h)),
            (
                "teacher_weights.png",
                chart::teacher_weights(h, &teachers, Weights::Logit, None),
            ),
        ] {
            assert!(page.contains(&format!("<figcaption>{}</figcaption>", chart.title)));
            for s in &chart.series {
                let drawn = format!("<g><title>{}</title>", crate::html::escape(&s.name));
                assert!(page.contains(&drawn), "{file}: {} not on the page", s.name);
            }
            let png = image::open(dir.join(file)).unwrap().to_rgb8();
            let l = chart.layout().unwrap();
            let (entries, rows) = legend(&chart, l.frame.w);
            assert_eq!(png.width(), (chart::WIDTH * SCALE).round() as u32, "{file}");
            let plot_bottom = (TITLE_H + l.frame.h) * SCALE;
            assert_eq!(
                png.height(),
                (plot_bottom + (LEGEND_ROW * rows as f64 + 6.0) * SCALE).round() as u32
            );
            // Each legend swatch, in its series' colour, lies under the plot.
            for (s, (x, row)) in chart.series.iter().zip(entries) {
                let y = plot_bottom + (LEGEND_ROW * row as f64 + 9.0) * SCALE;
                // A dashed swatch has gaps: some pixel along it has the series' colour.
                let along: Vec<image::Rgb<u8>> = (0..24)
                    .map(|dx| *png.get_pixel(((x + dx as f64) * SCALE) as u32, y.round() as u32))
                    .collect();
                assert!(
                    along.iter().any(|&px| near(px, s.colour)),
                    "{file}: {} swatch is {along:?}",
                    s.name
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chart_with_nan_or_one_epoch_still_draws() {
        let dir = scratch("nan");
        let mut one = record(1, vec![0.5, 0.5]);
        one.test.value = f64::NAN;
        one.train_kd = f64::NAN;
        let names = ["a".to_owned(), "b".to_owned()];
        plot_run(&dir, &[one.clone()], &names).unwrap();
        for f in ["loss.png", "accuracy.png", "teacher_weights.png"] {
            assert!(image::open(dir.join(f)).is_ok(), "{f}");
        }
        // No finite value: nothing drawn, no error.
        let empty = scratch("empty");
        one.teacher_weights = vec![f64::NAN; 2];
        one.train_metric = f64::NAN;
        plot_run(&empty, &[one], &names).unwrap();
        assert!(!empty.join("accuracy.png").exists());
        assert!(!empty.join("teacher_weights.png").exists());
        assert!(empty.join("loss.png").exists());
        plot_run(&empty, &[], &names).unwrap();
        for d in [dir, empty] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_long_legend_wraps_under_the_plot() {
        let names: Vec<String> = (0..8)
            .map(|i| format!("teacher-with-a-long-name-{i}"))
            .collect();
        let h: Vec<EpochRecord> = (1..=3).map(|e| record(e, vec![0.125; 8])).collect();
        let chart = chart::teacher_weights(&h, &names, Weights::Logit, None);
        let (entries, rows) = legend(&chart, chart::WIDTH);
        assert!(rows >= 3, "{rows} rows");
        assert!(entries.iter().all(|&(x, _)| x + 29.0 < chart::WIDTH));
        let dir = scratch("legend");
        line_chart(&dir.join("w.png"), &chart).unwrap();
        assert!(dir.join("w.png").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dashes_follow_the_pattern_along_the_line() {
        let pieces = dashed(&[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)], &[5, 4]);
        let starts: Vec<(f64, f64)> = pieces.iter().map(|p| p[0]).collect();
        assert_eq!(starts, [(0.0, 0.0), (9.0, 0.0), (10.0, 8.0)]);
        // The dash from 9 turns the corner: 1 along x, then 4 along y.
        assert_eq!(pieces[1], [(9.0, 0.0), (10.0, 0.0), (10.0, 4.0)]);
        assert_eq!(
            dashed(&[(0.0, 0.0), (3.0, 0.0)], &[]),
            [vec![(0.0, 0.0), (3.0, 0.0)]]
        );
    }

    /// Both image grids share one layout: panels, titles above, legend below.
    #[test]
    fn overlay_grids_have_their_panels_and_legend() {
        let dir = scratch("grids");
        let (h, w) = (8, 12);
        let image: Vec<u8> = (0..h * w).map(|i| (i * 2) as u8).collect();
        let classes = ["background".to_owned(), "cell".to_owned()];
        let map: Vec<i64> = (0..h * w).map(|i| i64::from(i % w >= 6)).collect();
        let row = OverlayRow {
            image: image.clone(),
            channels: 1,
            maps: vec![map.clone(), map],
        };
        let titles = ["truth".to_owned(), "student".to_owned()];
        let seg = dir.join("overlays.png");
        segmentation_overlays(&seg, (h, w), &titles, &classes, &[row]).unwrap();
        let grid = Grid::new((h, w), 192, 1, 3, 2);
        let png = image::open(&seg).unwrap().to_rgb8();
        assert_eq!(
            (png.width() as usize, png.height() as usize),
            (grid.width, grid.height)
        );
        // Column 1, right half: class 1's colour over the image.
        let (left, top) = grid.origin(0, 1);
        let p = png.get_pixel((left + grid.pw - 2) as u32, (top + 2) as u32);
        assert!(p[0] > 150 && p[2] < 100, "{p:?}");

        let boxes = BoxRow {
            image,
            channels: 1,
            boxes: vec![
                vec![DrawBox {
                    class: 0,
                    bbox: [1.0, 1.0, 6.0, 6.0],
                    score: None,
                }],
                vec![DrawBox {
                    class: 0,
                    bbox: [2.0, 2.0, 7.0, 7.0],
                    score: Some(0.9),
                }],
            ],
        };
        let det = dir.join("boxes.png");
        detection_overlays(&det, (h, w), &titles, &classes[1..], &[boxes]).unwrap();
        let grid = Grid::new((h, w), 256, 1, 2, 1);
        let png = image::open(&det).unwrap().to_rgb8();
        assert_eq!(
            (png.width() as usize, png.height() as usize),
            (grid.width, grid.height)
        );
        let (left, top) = grid.origin(0, 0);
        let edge = png.get_pixel((left + grid.scale) as u32, (top + 3 * grid.scale) as u32);
        assert_eq!(edge.0, class_colour(1), "the truth box's left edge");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
