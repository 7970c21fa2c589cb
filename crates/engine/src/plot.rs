//! PNG plots of a run: loss curves, accuracy curves and (with teachers) the mean teacher weights
//! per epoch. Text uses the embedded DejaVu Sans font, so no system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::record::EpochRecord;

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
    crate::fsio::write_atomic(path, &png)
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
    line_chart(
        &dir.join("accuracy.png"),
        "Top-1 accuracy",
        "top-1 (%)",
        &[
            Series {
                name: "train",
                points: pts(&|r| r.train_top1),
            },
            Series {
                name: "test",
                points: pts(&|r| r.test_top1),
            },
        ],
    )?;
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
