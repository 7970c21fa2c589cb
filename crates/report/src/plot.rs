//! PNG plots of a run: loss curves, accuracy curves and (with teachers) the mean teacher weights
//! per epoch. Text uses the embedded DejaVu Sans font, so no system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use mtkd_records::record::EpochRecord;

static FONT: Once = Once::new();

fn ensure_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// One named series of `(epoch, value)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Draw line series into a PNG with a title and axis labels.
pub fn line_chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    ensure_font();
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    if ys.is_empty() {
        return Ok(());
    }
    let x_max = xs.fold(1.0f64, f64::max);
    let (mut y_min, mut y_max) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if (y_max - y_min).abs() < 1e-9 {
        y_min -= 0.5;
        y_max += 0.5;
    }
    let pad = (y_max - y_min) * 0.05;
    // Drawn in memory, encoded and written atomically like every output.
    let (w, h) = (800u32, 500u32);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max.max(1.0), (y_min - pad)..(y_max + pad))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    write_png(path, w, h, pixels)
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

/// `loss.png`, `accuracy.png` and, with teachers, `teacher_weights.png` in `dir`.
pub fn plot_run(dir: &Path, history: &[EpochRecord], teacher_names: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let pts = |f: &dyn Fn(&EpochRecord) -> f64| {
        history
            .iter()
            .map(|r| (r.epoch as f64, f(r)))
            .collect::<Vec<_>>()
    };
    line_chart(
        &dir.join("loss.png"),
        "Loss",
        "loss",
        &[
            Series {
                name: "train (total)",
                points: pts(&|r| r.train_loss),
            },
            Series {
                name: "train CE",
                points: pts(&|r| r.train_ce),
            },
            Series {
                name: "test CE",
                points: pts(&|r| r.test_loss),
            },
        ],
    )?;
    if let Some(first) = history.first() {
        let kind = first.test.kind();
        let label = mtkd_records::metric::metric_label(kind.primary);
        let names: Vec<String> = kind
            .curves
            .iter()
            .map(|k| format!("test {}", mtkd_records::metric::metric_label(k)))
            .collect();
        let mut series = vec![Series {
            name: kind.train_label,
            points: pts(&|r| r.train_metric),
        }];
        for (k, name) in kind.curves.iter().zip(&names) {
            series.push(Series {
                name,
                points: pts(&|r| r.test.get(k)),
            });
        }
        let test = format!("test {label}");
        series.push(Series {
            name: &test,
            points: pts(&|r| r.test.value),
        });
        line_chart(
            &dir.join("accuracy.png"),
            kind.chart_title,
            "percent",
            &series,
        )?;
    }
    if !teacher_names.is_empty()
        && history
            .iter()
            .all(|r| r.teacher_weights.len() == teacher_names.len())
    {
        let series: Vec<Series> = teacher_names
            .iter()
            .enumerate()
            .map(|(m, n)| Series {
                name: n,
                points: pts(&|r| r.teacher_weights[m]),
            })
            .collect();
        // Epochs whose weights are not a mixture (the parity agent's all-ones epoch, EBKD's
        // M - 1) are named in the title, so the curve is not read as trust.
        let off: Vec<String> = history
            .iter()
            .filter(|r| (r.teacher_weights.iter().sum::<f64>() - 1.0).abs() > 0.01)
            .map(|r| {
                format!(
                    "epoch {}: sum {:.2}",
                    r.epoch,
                    r.teacher_weights.iter().sum::<f64>()
                )
            })
            .collect();
        let title = if off.is_empty() {
            "Mean logit weight per teacher".to_owned()
        } else {
            format!(
                "Mean logit weight per teacher (not a mixture: {})",
                off.join(", ")
            )
        };
        line_chart(&dir.join("teacher_weights.png"), &title, "weight", &series)?;
    }
    Ok(())
}

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
    let (h, w) = hw;
    let scale = (192 / h.max(w)).max(1);
    let (ph, pw) = (h * scale, w * scale);
    let (gap, head) = (8usize, 28usize);
    let cols = titles.len() + 1;
    let legend_rows = class_names.len().div_ceil(6);
    // Room for six legend entries per row however few columns there are.
    let width = (cols * (pw + gap) + gap).max(6 * 120);
    let height = head + rows.len() * (ph + gap) + gap + 22 * legend_rows + 8;
    let mut px = vec![255u8; width * height * 3];
    let put = |px: &mut Vec<u8>, x: usize, y: usize, c: [u8; 3]| {
        let i = (y * width + x) * 3;
        px[i..i + 3].copy_from_slice(&c);
    };
    for (r, row) in rows.iter().enumerate() {
        let grey = |y: usize, x: usize| -> [u8; 3] {
            if row.channels == 3 {
                [0, 1, 2].map(|c| row.image[(c * h + y) * w + x])
            } else {
                let v = row.image[y * w + x];
                [v, v, v]
            }
        };
        let top = head + r * (ph + gap);
        for col in 0..cols {
            let left = gap + col * (pw + gap);
            for y in 0..ph {
                for x in 0..pw {
                    let (sy, sx) = (y / scale, x / scale);
                    let g = grey(sy, sx);
                    let c = if col == 0 {
                        g
                    } else {
                        let cls = row.maps[col - 1][sy * w + sx];
                        let k = class_colour(cls);
                        if cls == 0 {
                            g.map(|v| v / 3)
                        } else {
                            [0, 1, 2].map(|i| ((u16::from(k[i]) * 3 + u16::from(g[i])) / 4) as u8)
                        }
                    };
                    put(&mut px, left + x, top + y, c);
                }
            }
        }
    }
    // Legend swatches.
    let legend_top = head + rows.len() * (ph + gap) + gap;
    let cell = width / 6;
    for (i, _) in class_names.iter().enumerate() {
        let (lx, ly) = (8 + (i % 6) * cell, legend_top + 22 * (i / 6) + 4);
        for y in 0..14 {
            for x in 0..14 {
                put(&mut px, lx + x, ly + y, class_colour(i as i64));
            }
        }
    }
    {
        let root =
            BitMapBackend::with_buffer(&mut px, (width as u32, height as u32)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
        let style = ("sans-serif", 16).into_font().color(&BLACK);
        let names: Vec<String> = std::iter::once("image".to_owned())
            .chain(titles.iter().cloned())
            .collect();
        for (col, t) in names.iter().enumerate() {
            root.draw_text(t, &style, ((gap + col * (pw + gap)) as i32, 6))
                .map_err(|x| e(&x))?;
        }
        let small = ("sans-serif", 14).into_font().color(&BLACK);
        for (i, n) in class_names.iter().enumerate() {
            let (lx, ly) = (8 + (i % 6) * cell, legend_top + 22 * (i / 6) + 3);
            root.draw_text(&format!("{i} {n}"), &small, ((lx + 18) as i32, ly as i32))
                .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    write_png(path, width as u32, height as u32, px)
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
        let e = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
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
#[derive(Debug, Clone, Copy)]
pub struct DrawBox {
    pub class: usize,
    pub bbox: [f32; 4],
    pub score: Option<f32>,
}

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
    let scale = (256 / h.max(w)).max(1);
    let (ph, pw) = (h * scale, w * scale);
    let (gap, head) = (8usize, 28usize);
    let cols = titles.len();
    let legend_rows = class_names.len().div_ceil(6);
    let width = (cols * (pw + gap) + gap).max(6 * 120);
    let height = head + rows.len() * (ph + gap) + gap + 22 * legend_rows + 8;
    let mut px = vec![255u8; width * height * 3];
    for (r, row) in rows.iter().enumerate() {
        let top = head + r * (ph + gap);
        for col in 0..cols {
            let left = gap + col * (pw + gap);
            for y in 0..ph {
                for x in 0..pw {
                    let (sy, sx) = (y / scale, x / scale);
                    let g = if row.channels == 3 {
                        [0, 1, 2].map(|c| row.image[(c * h + sy) * w + sx])
                    } else {
                        let v = row.image[sy * w + sx];
                        [v, v, v]
                    };
                    let i = ((top + y) * width + left + x) * 3;
                    px[i..i + 3].copy_from_slice(&g.map(|v| (u16::from(v) * 3 / 4) as u8));
                }
            }
        }
    }
    {
        let root =
            BitMapBackend::with_buffer(&mut px, (width as u32, height as u32)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
        let style = ("sans-serif", 16).into_font().color(&BLACK);
        for (col, t) in titles.iter().enumerate() {
            root.draw_text(t, &style, ((gap + col * (pw + gap)) as i32, 6))
                .map_err(|x| e(&x))?;
        }
        let tiny = ("sans-serif", 11).into_font().color(&WHITE);
        for (r, row) in rows.iter().enumerate() {
            let top = (head + r * (ph + gap)) as f32;
            for (col, boxes) in row.boxes.iter().enumerate().take(cols) {
                let left = (gap + col * (pw + gap)) as f32;
                let s = scale as f32;
                let clip = |v: f32, lo: f32, n: usize| {
                    (lo + v * s).clamp(lo, lo + (n * scale) as f32 - 1.0) as i32
                };
                for b in boxes {
                    let k = class_colour(b.class as i64 + 1);
                    let colour = RGBColor(k[0], k[1], k[2]);
                    let (x1, y1) = (clip(b.bbox[0], left, w), clip(b.bbox[1], top, h));
                    let (x2, y2) = (clip(b.bbox[2], left, w), clip(b.bbox[3], top, h));
                    root.draw(&Rectangle::new(
                        [(x1, y1), (x2, y2)],
                        colour.stroke_width(2),
                    ))
                    .map_err(|x| e(&x))?;
                    if let Some(sc) = b.score {
                        root.draw_text(&format!("{sc:.2}"), &tiny, (x1 + 2, y1 + 1))
                            .map_err(|x| e(&x))?;
                    }
                }
            }
        }
        let legend_top = head + rows.len() * (ph + gap) + gap;
        let cell = width / 6;
        let small = ("sans-serif", 14).into_font().color(&BLACK);
        for (i, n) in class_names.iter().enumerate() {
            let (lx, ly) = (8 + (i % 6) * cell, legend_top + 22 * (i / 6) + 4);
            let k = class_colour(i as i64 + 1);
            root.draw(&Rectangle::new(
                [(lx as i32, ly as i32), (lx as i32 + 14, ly as i32 + 14)],
                RGBColor(k[0], k[1], k[2]).filled(),
            ))
            .map_err(|x| e(&x))?;
            root.draw_text(
                &format!("{i} {n}"),
                &small,
                ((lx + 18) as i32, ly as i32 - 1),
            )
            .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    write_png(path, width as u32, height as u32, px)
}
