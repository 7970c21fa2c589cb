//! The run's line charts as data, drawn twice: [`crate::html`] writes a chart as inline SVG on
//! the audit page, [`crate::plot`] as a PNG under `plots/`. The builders ([`accuracy`],
//! [`losses`], [`epoch_time`], [`teacher_weights`]) make each chart once from the epoch records,
//! and `LineChart::layout` places it once (ranges, ticks, the band of labels above the plot,
//! the lines' pixels), so the page and the PNG show the same axes, series, markers and notes.
//!
//! Geometry is in the page's units (CSS pixels: a chart is [`WIDTH`] wide); the PNG scales it.

use std::fmt;

use mtkd_records::metric::{metric_kind, metric_label};
use mtkd_records::record::EpochRecord;

/// A colour, shown as `#rrggbb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl fmt::Display for Rgb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// Tableau 10: one colour per teacher (pool order), the same on every chart and table.
pub const PALETTE: [Rgb; 10] = [
    Rgb(0x1f, 0x77, 0xb4),
    Rgb(0xff, 0x7f, 0x0e),
    Rgb(0x2c, 0xa0, 0x2c),
    Rgb(0xd6, 0x27, 0x28),
    Rgb(0x94, 0x67, 0xbd),
    Rgb(0x8c, 0x56, 0x4b),
    Rgb(0xe3, 0x77, 0xc2),
    Rgb(0x7f, 0x7f, 0x7f),
    Rgb(0xbc, 0xbd, 0x22),
    Rgb(0x17, 0xbe, 0xcf),
];

/// The colour of teacher `i` (pool order).
pub fn teacher_colour(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
}

/// The main curve of a chart (the test metric, the total loss, the whole epoch).
const INK: Rgb = Rgb(0x11, 0x18, 0x27);
const TEAL: Rgb = Rgb(0x0f, 0x76, 0x6e);
const AMBER: Rgb = Rgb(0xb4, 0x53, 0x09);
const VIOLET: Rgb = Rgb(0x7c, 0x3a, 0xed);
const ROSE: Rgb = Rgb(0xbe, 0x12, 0x3c);
/// Dash patterns, in page pixels: dash, gap[, dash, gap].
const DOTTED: &[u8] = &[2, 3];
const DASHED: &[u8] = &[5, 4];

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub colour: Rgb,
    /// Dash pattern (dash, gap, ... in page pixels), `None` = solid.
    pub dash: Option<&'static [u8]>,
    /// (x, y); a non-finite y breaks the line.
    pub points: Vec<(f64, f64)>,
}

/// A dashed vertical line at `x` with a label (e.g. a pruning event).
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A ringed data point with a label.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub x: f64,
    pub y: f64,
    pub text: String,
}

/// How the y range is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YAxis {
    Fixed(f64, f64),
    /// From the data, widened to whole ticks; `zero`: include 0.
    Auto {
        zero: bool,
    },
}

/// A line chart over epochs. Marker and note labels go in a band above the plot (a row each
/// where they would overlap), joined to their epoch by a line, so no label covers the data; the
/// legend goes under the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub y: YAxis,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
    pub notes: Vec<Note>,
}

// ---------------------------------------------------------------------------------------------
// The run's charts
// ---------------------------------------------------------------------------------------------

fn series(name: &str, colour: Rgb, dash: Option<&'static [u8]>, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_owned(),
        colour,
        dash,
        points,
    }
}

fn per_epoch(history: &[EpochRecord], f: impl Fn(&EpochRecord) -> f64) -> Vec<(f64, f64)> {
    history.iter().map(|r| (r.epoch as f64, f(r))).collect()
}

fn over_epochs(title: &str, y_label: &str, y: YAxis, series: Vec<Series>) -> LineChart {
    LineChart {
        title: title.to_owned(),
        x_label: "epoch".to_owned(),
        y_label: y_label.to_owned(),
        y,
        series,
        markers: Vec::new(),
        notes: Vec::new(),
    }
}

/// The test metric per epoch (`primary`: the run's primary metric key, e.g. `top1`), the task's
/// other test curves (dotted) and the training score (dashed), in percent.
pub fn accuracy(history: &[EpochRecord], primary: &str) -> LineChart {
    let metric = metric_label(primary);
    let kind = metric_kind(primary);
    let mut lines = vec![series(
        &format!("test {metric}"),
        INK,
        None,
        per_epoch(history, |r| r.test.value),
    )];
    let curve_colours = [Rgb(0x25, 0x63, 0xeb), Rgb(0x93, 0x33, 0xea)];
    for (k, colour) in kind.curves.iter().zip(curve_colours) {
        lines.push(series(
            &format!("test {}", metric_label(k)),
            colour,
            Some(DOTTED),
            per_epoch(history, |r| r.test.get(k)),
        ));
    }
    lines.push(series(
        kind.train_label,
        Rgb(0x6b, 0x72, 0x80),
        Some(DASHED),
        per_epoch(history, |r| r.train_metric),
    ));
    over_epochs(
        kind.chart_title,
        &format!("{metric} (%)"),
        YAxis::Auto { zero: false },
        lines,
    )
}

/// A curve per epoch: name, colour, dash, value.
type Curve = (
    &'static str,
    Rgb,
    Option<&'static [u8]>,
    fn(&EpochRecord) -> f64,
);

fn curves(history: &[EpochRecord], title: &str, y_label: &str, curves: &[Curve]) -> LineChart {
    let lines = curves
        .iter()
        .map(|&(name, colour, dash, value)| series(name, colour, dash, per_epoch(history, value)))
        .collect();
    over_epochs(title, y_label, YAxis::Auto { zero: true }, lines)
}

/// The training loss per epoch (epoch means), its parts, and the test split's task loss.
pub fn losses(history: &[EpochRecord]) -> LineChart {
    curves(
        history,
        "Losses",
        "loss (epoch mean)",
        &[
            ("total", INK, None, |r| r.train_loss),
            ("test (task loss)", ROSE, Some(&[3, 2]), |r| r.test_loss),
            ("cross-entropy", TEAL, Some(&[6, 3]), |r| r.train_ce),
            ("KD", AMBER, Some(DOTTED), |r| r.train_kd),
            ("feature", VIOLET, Some(&[8, 3, 2, 3]), |r| r.train_feature),
        ],
    )
}

/// Wall seconds per epoch, and those spent on the teachers' outputs.
pub fn epoch_time(history: &[EpochRecord]) -> LineChart {
    curves(
        history,
        "Time per epoch",
        "seconds",
        &[
            ("whole epoch", INK, None, |r| r.seconds),
            ("teachers' outputs", AMBER, Some(DASHED), |r| {
                r.teacher_seconds
            }),
        ],
    )
}

/// Which per-teacher weights a chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    Logit,
    Feature,
}

impl Weights {
    fn title(self) -> &'static str {
        match self {
            Weights::Logit => "Logit weights",
            Weights::Feature => "Feature weights",
        }
    }

    /// The epoch's mean weight per teacher (pool order).
    pub fn of(self, r: &EpochRecord) -> &[f64] {
        match self {
            Weights::Logit => &r.teacher_weights,
            Weights::Feature => &r.teacher_feature_weights,
        }
    }
}

/// The mean weight per teacher and epoch (`teachers` in pool order, each drawn while it is in the
/// pool), from 0 to at least 1, with a marker where teachers left the pool. `ones_epoch`: the run
/// gives every teacher weight 1 in epoch 1, and why (e.g. "all-ones warm-up"): a note there says
/// so.
pub fn teacher_weights(
    history: &[EpochRecord],
    teachers: &[String],
    which: Weights,
    ones_epoch: Option<&str>,
) -> LineChart {
    let lines: Vec<Series> = teachers
        .iter()
        .enumerate()
        .map(|(i, name)| Series {
            name: name.clone(),
            colour: teacher_colour(i),
            dash: None,
            points: history
                .iter()
                .filter(|r| r.active_teachers.as_ref().is_none_or(|a| a.contains(name)))
                .map(|r| {
                    (
                        r.epoch as f64,
                        which.of(r).get(i).copied().unwrap_or(f64::NAN),
                    )
                })
                .collect(),
        })
        .collect();
    let max = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max);
    let hi = if max > 1.0 { nice_ceil(max) } else { 1.0 };
    let mut chart = over_epochs(which.title(), "mean weight", YAxis::Fixed(0.0, hi), lines);
    if let (Some(what), Some(r)) = (ones_epoch, history.iter().find(|r| r.epoch == 1)) {
        let y = which
            .of(r)
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        chart.notes.push(Note {
            x: 1.0,
            y,
            text: format!("epoch 1: {what}, weights sum to M = {}", teachers.len()),
        });
    }
    chart.markers = history
        .iter()
        .filter(|r| !r.pruned.is_empty())
        .map(|r| Marker {
            x: r.epoch as f64,
            label: format!("pruned: {}", r.pruned.join(", ")),
        })
        .collect();
    chart
}

/// The epochs whose mean logit weights are no mixture (do not sum to 1: the parity agent's
/// all-ones epoch, EBKD's M - 1), in words, for a chart that has no page around it to say so.
pub fn not_a_mixture(history: &[EpochRecord]) -> Option<String> {
    let off: Vec<(usize, f64)> = history
        .iter()
        .map(|r| (r.epoch, r.teacher_weights.iter().sum::<f64>()))
        .filter(|&(_, sum)| (sum - 1.0).abs() > 0.01)
        .collect();
    let first = off.first()?;
    if off.len() == history.len() && off.iter().all(|&(_, s)| (s - first.1).abs() <= 0.01) {
        return Some(format!("not a mixture: weights sum to {:.2}", first.1));
    }
    const SHOWN: usize = 3;
    let mut words: Vec<String> = off
        .iter()
        .take(SHOWN)
        .map(|(e, s)| format!("epoch {e}: sum {s:.2}"))
        .collect();
    if off.len() > SHOWN {
        words.push(format!("{} more epochs", off.len() - SHOWN));
    }
    Some(format!("not a mixture: {}", words.join(", ")))
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

/// A chart's width in page pixels.
pub const WIDTH: f64 = 520.0;
/// The height of the plot area.
const PLOT_H: f64 = 218.0;
/// The height of one row of labels in the band above the plot.
const BAND_ROW: f64 = 14.0;

/// The plot area inside a picture of `w` x `h` with margins, and the data ranges it maps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    pub w: f64,
    pub h: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
    pub x0: f64,
    pub x1: f64,
    pub y0: f64,
    pub y1: f64,
}

impl Frame {
    pub fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)
    }

    pub fn py(&self, y: f64) -> f64 {
        self.h
            - self.bottom
            - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)
    }

    /// Ticks every `step` over the x range (pixel position, text).
    pub fn x_ticks(&self, step: f64) -> Vec<Tick> {
        placed_ticks(self.x0, self.x1, step, |x| self.px(x))
    }

    /// Ticks every `step` over the y range.
    pub fn y_ticks(&self, step: f64) -> Vec<Tick> {
        placed_ticks(self.y0, self.y1, step, |y| self.py(y))
    }
}

fn placed_ticks(lo: f64, hi: f64, step: f64, at: impl Fn(f64) -> f64) -> Vec<Tick> {
    ticks(lo, hi, step)
        .into_iter()
        .map(|v| Tick {
            at: at(v),
            text: tick_label(v, step),
        })
        .collect()
}

/// An axis tick: its pixel position along the axis and its text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tick {
    pub at: f64,
    pub text: String,
}

/// One series placed: its unbroken runs of points and the dots drawn at its points (pixels).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    pub runs: Vec<Vec<(f64, f64)>>,
    pub dots: Vec<(f64, f64)>,
}

/// A label in the band above the plot: text, start and baseline, and the leader (x, from y,
/// to y) down to its point (a note) or to the top of the plot (a marker), if there is room.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BandLabel {
    pub text: String,
    /// A note's label (bold, darker); a marker's is plain.
    pub bold: bool,
    pub x: f64,
    pub baseline: f64,
    pub leader: Option<(f64, f64, f64)>,
}

/// A chart placed in page pixels: what both renderers draw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub frame: Frame,
    pub x_ticks: Vec<Tick>,
    pub y_ticks: Vec<Tick>,
    /// One per series, in order.
    pub lines: Vec<Line>,
    /// The x pixel of each marker.
    pub markers: Vec<f64>,
    /// The centre of each note's ring.
    pub rings: Vec<(f64, f64)>,
    pub labels: Vec<BandLabel>,
}

/// Dots on the points of a series with at most this many points.
const MAX_DOTTED: usize = 40;

impl LineChart {
    /// Some series has a finite value.
    pub fn has_data(&self) -> bool {
        self.series
            .iter()
            .any(|s| s.points.iter().any(|p| p.1.is_finite()))
    }

    /// The chart placed in page pixels; `None` when no series has a finite value.
    pub(crate) fn layout(&self) -> Option<Layout> {
        if !self.has_data() {
            return None;
        }
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let xs: Vec<f64> = points().map(|p| p.0).collect();
        let ys: Vec<f64> = points().map(|p| p.1).collect();
        let (x0, x1, x_step) = epoch_range(&xs);
        let (y0, y1, y_step) = match self.y {
            YAxis::Fixed(lo, hi) => (lo, hi, nice_step((hi - lo) / 4.0)),
            YAxis::Auto { zero } => auto_range(&ys, zero, 4.0),
        };
        let mut f = Frame {
            w: WIDTH,
            h: 0.0,
            left: 52.0,
            right: 14.0,
            top: 0.0,
            bottom: 38.0,
            x0,
            x1,
            y0,
            y1,
        };
        // The band's rows depend on x only; the plot goes under them.
        let band = self.band(&f);
        let rows = band.iter().map(|l| l.row + 1).max().unwrap_or(0);
        f.top = BAND_ROW + BAND_ROW * rows as f64;
        f.h = f.top + PLOT_H + f.bottom;
        let labels = band.into_iter().map(|l| l.place(&f)).collect();
        let clamp_x = |x: f64| f.px(x.clamp(f.x0, f.x1));
        let at = |(x, y): (f64, f64)| (f.px(x), f.py(y.clamp(f.y0, f.y1)));
        let lines = self
            .series
            .iter()
            .map(|se| {
                let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
                let mut pen_down = false;
                for &(x, y) in &se.points {
                    if !(x.is_finite() && y.is_finite()) {
                        pen_down = false;
                        continue;
                    }
                    if !pen_down {
                        runs.push(Vec::new());
                        pen_down = true;
                    }
                    if let Some(run) = runs.last_mut() {
                        run.push(at((x, y)));
                    }
                }
                let dots = if se.points.len() <= MAX_DOTTED {
                    runs.iter().flatten().copied().collect()
                } else {
                    Vec::new()
                };
                Line { runs, dots }
            })
            .collect();
        let markers = self
            .markers
            .iter()
            .filter(|m| m.x.is_finite())
            .map(|m| clamp_x(m.x))
            .collect();
        let rings = self
            .notes
            .iter()
            .filter(|n| n.x.is_finite() && n.y.is_finite())
            .map(|n| (clamp_x(n.x), f.py(n.y.clamp(f.y0, f.y1))))
            .collect();
        Some(Layout {
            x_ticks: f.x_ticks(x_step),
            y_ticks: f.y_ticks(y_step),
            frame: f,
            lines,
            markers,
            rings,
            labels,
        })
    }

    /// The notes' and markers' labels, each in the first row of the band where it overlaps no
    /// other.
    fn band(&self, f: &Frame) -> Vec<Unplaced> {
        let mut wanted: Vec<(String, bool, f64, Option<f64>)> = Vec::new();
        for n in &self.notes {
            if n.x.is_finite() && n.y.is_finite() {
                wanted.push((n.text.clone(), true, f.px(n.x.clamp(f.x0, f.x1)), Some(n.y)));
            }
        }
        for m in &self.markers {
            if m.x.is_finite() {
                wanted.push((m.label.clone(), false, f.px(m.x.clamp(f.x0, f.x1)), None));
            }
        }
        let mut rows: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut out = Vec::new();
        for (text, bold, px, y) in wanted {
            let width = text.chars().count() as f64 * if bold { 6.4 } else { 6.0 };
            let x_start = if px + 4.0 + width <= f.w - 4.0 {
                px + 4.0
            } else {
                (px - 4.0 - width).max(2.0)
            };
            let span = (x_start - 8.0, x_start + width + 8.0);
            let row = rows
                .iter()
                .position(|r| r.iter().all(|&(a, b)| span.1 <= a || b <= span.0))
                .unwrap_or(rows.len());
            if row == rows.len() {
                rows.push(Vec::new());
            }
            rows[row].push(span);
            out.push(Unplaced {
                text,
                bold,
                row,
                x_start,
                anchor_px: px,
                point_y: y.map(|y| y.clamp(f.y0, f.y1)),
            });
        }
        out
    }
}

/// A band label before the plot's top is known.
struct Unplaced {
    text: String,
    bold: bool,
    row: usize,
    x_start: f64,
    anchor_px: f64,
    /// The noted value (`None` for a marker).
    point_y: Option<f64>,
}

impl Unplaced {
    fn place(self, f: &Frame) -> BandLabel {
        let baseline = BAND_ROW + BAND_ROW * self.row as f64;
        let end = match self.point_y {
            Some(y) => f.py(y) - 7.0,
            None => f.top,
        };
        BandLabel {
            text: self.text,
            bold: self.bold,
            x: self.x_start,
            baseline,
            leader: (end > baseline + 3.0).then_some((self.anchor_px, baseline + 3.0, end)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ranges and ticks
// ---------------------------------------------------------------------------------------------

/// A "nice" step (1, 2, 2.5 or 5 times a power of ten) near `raw`.
pub(crate) fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * p
}

/// `v` rounded up to a multiple of a nice step (for a y range).
pub(crate) fn nice_ceil(v: f64) -> f64 {
    let step = nice_step(v / 4.0);
    (v / step - 1e-9).ceil() * step
}

pub(crate) fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if step.is_nan() || step <= 0.0 || !lo.is_finite() || !hi.is_finite() {
        return out;
    }
    let mut v = (lo / step - 1e-9).ceil() * step;
    while v <= hi + step * 1e-9 && out.len() < 60 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A tick value with as many decimals as the step needs.
pub(crate) fn tick_label(v: f64, step: f64) -> String {
    let mut d = 0;
    while d < 6 {
        let scaled = step * 10f64.powi(d as i32);
        if (scaled - scaled.round()).abs() < 1e-6 {
            break;
        }
        d += 1;
    }
    format!("{v:.d$}")
}

/// Data range -> (lo, hi, step) widened to whole ticks.
pub(crate) fn auto_range(values: &[f64], zero: bool, n_ticks: f64) -> (f64, f64, f64) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = match (
        finite.iter().copied().reduce(f64::min),
        finite.iter().copied().reduce(f64::max),
    ) {
        (Some(a), Some(b)) => (a, b),
        _ => (0.0, 1.0),
    };
    if zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo < 1e-12 {
        let pad = if hi.abs() > 1e-12 {
            hi.abs() * 0.1
        } else {
            1.0
        };
        lo -= pad;
        hi += pad;
        if zero && finite.iter().all(|v| *v >= 0.0) {
            lo = lo.max(0.0);
        }
    }
    let step = nice_step((hi - lo) / n_ticks);
    (
        (lo / step + 1e-9).floor() * step,
        (hi / step - 1e-9).ceil() * step,
        step,
    )
}

/// The x frame of an epoch axis: integer ticks, a little room at both ends.
fn epoch_range(xs: &[f64]) -> (f64, f64, f64) {
    let finite = || xs.iter().copied().filter(|v| v.is_finite());
    let lo = finite().reduce(f64::min).unwrap_or(1.0);
    let hi = finite().reduce(f64::max).unwrap_or(1.0);
    let span = hi - lo;
    let step = nice_step(span / 8.0).ceil().max(1.0);
    if span < 1e-9 {
        (lo - 0.5, hi + 0.5, step)
    } else {
        (lo - span * 0.03, hi + span * 0.03, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::html::tests::record;

    fn names(c: &LineChart) -> Vec<&str> {
        c.series.iter().map(|s| s.name.as_str()).collect()
    }

    fn teachers() -> Vec<String> {
        ["tops", "shoes-bags", "weak"].map(String::from).to_vec()
    }

    #[test]
    fn builders_make_the_pages_charts() {
        let h: Vec<EpochRecord> = (1..=3).map(|e| record(e, vec![0.5, 0.3, 0.2])).collect();
        let acc = accuracy(&h, "top1");
        assert_eq!(acc.title, "Top-1 accuracy");
        assert_eq!(acc.y_label, "top-1 (%)");
        assert_eq!(names(&acc), ["test top-1", "train top-1"]);
        assert_eq!(acc.series[0].points[2], (3.0, 73.0));
        assert_eq!(acc.series[1].dash, Some(DASHED));
        assert_eq!(
            names(&losses(&h)),
            [
                "total",
                "test (task loss)",
                "cross-entropy",
                "KD",
                "feature"
            ]
        );
        assert_eq!(names(&epoch_time(&h)), ["whole epoch", "teachers' outputs"]);

        let mut h = h;
        h[0].teacher_weights = vec![1.0; 3];
        h[1].pruned = vec!["weak".into()];
        h[2].active_teachers = Some(vec!["tops".into(), "shoes-bags".into()]);
        let w = teacher_weights(&h, &teachers(), Weights::Logit, Some("all-ones warm-up"));
        assert_eq!(names(&w), ["tops", "shoes-bags", "weak"]);
        assert_eq!(w.series[1].colour, teacher_colour(1));
        assert_eq!(
            w.series[2].points.len(),
            2,
            "weak is drawn while in the pool"
        );
        assert_eq!(w.y, YAxis::Fixed(0.0, 1.0));
        assert_eq!(
            w.notes[0].text,
            "epoch 1: all-ones warm-up, weights sum to M = 3"
        );
        assert_eq!((w.notes[0].x, w.notes[0].y), (1.0, 1.0));
        assert_eq!(
            w.markers,
            [Marker {
                x: 2.0,
                label: "pruned: weak".into()
            }]
        );
        let f = teacher_weights(&h, &teachers(), Weights::Feature, None);
        assert_eq!(f.title, "Feature weights");
        assert!(
            f.notes.is_empty() && !f.has_data(),
            "no feature weights recorded"
        );
    }

    #[test]
    fn layout_breaks_lines_at_nan_and_takes_one_epoch() {
        let mut h: Vec<EpochRecord> = (1..=4).map(|e| record(e, Vec::new())).collect();
        h[1].test.value = f64::NAN;
        let l = accuracy(&h, "top1").layout().unwrap();
        let runs: Vec<usize> = l.lines[0].runs.iter().map(Vec::len).collect();
        assert_eq!(runs, [1, 2], "epoch 2 breaks the test line");
        assert_eq!(l.lines[0].dots.len(), 3);
        assert_eq!(l.lines[1].runs.len(), 1);
        let f = &l.frame;
        assert!(l
            .y_ticks
            .iter()
            .all(|t| (f.top..=f.h - f.bottom).contains(&t.at)));

        let one = accuracy(&h[..1], "top1").layout().unwrap();
        assert!(one.frame.x0 < 1.0 && 1.0 < one.frame.x1);
        assert_eq!(
            one.lines[0].runs,
            [vec![(one.frame.px(1.0), one.frame.py(71.0))]]
        );
        assert!(one.x_ticks.iter().any(|t| t.text == "1"));

        h.iter_mut().for_each(|r| {
            r.test.value = f64::NAN;
            r.train_metric = f64::NAN;
        });
        let none = accuracy(&h, "top1");
        assert!(!none.has_data() && none.layout().is_none());
    }

    #[test]
    fn band_labels_take_rows_above_the_plot() {
        let chart = LineChart {
            markers: vec![
                Marker {
                    x: 2.0,
                    label: "pruned: a".into(),
                },
                Marker {
                    x: 2.0,
                    label: "pruned: b".into(),
                },
            ],
            notes: vec![Note {
                x: 1.0,
                y: 0.5,
                text: "a note".into(),
            }],
            ..over_epochs(
                "t",
                "y",
                YAxis::Fixed(0.0, 1.0),
                vec![series("s", INK, None, vec![(1.0, 0.5), (3.0, 0.2)])],
            )
        };
        let l = chart.layout().unwrap();
        let baselines: Vec<f64> = l.labels.iter().map(|b| b.baseline).collect();
        assert_eq!(
            baselines,
            [14.0, 14.0, 28.0],
            "the second marker label needs a row"
        );
        assert_eq!(l.frame.top, 42.0);
        assert_eq!(l.rings.len(), 1);
        assert_eq!(l.markers.len(), 2);
        let (_, from, to) = l.labels[0].leader.unwrap();
        assert!(
            from < to && to < l.frame.py(0.5),
            "the note's leader ends above its point"
        );
    }

    #[test]
    fn not_a_mixture_names_the_epochs() {
        let mut h: Vec<EpochRecord> = (1..=6).map(|e| record(e, vec![0.5, 0.5])).collect();
        assert_eq!(not_a_mixture(&h), None);
        h[0].teacher_weights = vec![1.0, 1.0];
        assert_eq!(
            not_a_mixture(&h).unwrap(),
            "not a mixture: epoch 1: sum 2.00"
        );
        h.iter_mut()
            .for_each(|r| r.teacher_weights = vec![1.0, 1.0]);
        assert_eq!(
            not_a_mixture(&h).unwrap(),
            "not a mixture: weights sum to 2.00"
        );
        h[5].teacher_weights = vec![0.5, 0.5];
        assert_eq!(
            not_a_mixture(&h).unwrap(),
            "not a mixture: epoch 1: sum 2.00, epoch 2: sum 2.00, epoch 3: sum 2.00, 2 more epochs"
        );
    }

    #[test]
    fn colours_print_as_css() {
        assert_eq!(teacher_colour(0).to_string(), "#1f77b4");
        assert_eq!(teacher_colour(10), teacher_colour(0));
        assert_eq!(Rgb(0, 10, 255).to_string(), "#000aff");
    }
}
