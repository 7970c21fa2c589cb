//! The run's audit page: [`write_report`] reads a finished run folder (`metrics.jsonl`,
//! `summary.json`, `config.toml`, `audit.json` when present, and the sibling runs of the same
//! comparison) and writes one self-contained `report.html`: inline CSS and inline SVG charts, no
//! script, no external URL. [`render`] is the pure part (inputs in memory, HTML out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use mtkd_records::record::{Audit, AuditSample, AuditTeacher, EpochRecord, Summary};

use crate::chart::{
    self, auto_range, nice_ceil, nice_step, teacher_colour, BandLabel, Frame, Line, LineChart, Rgb,
    Series, Tick, Weights,
};

/// Another run of the same comparison (a folder next to the run that holds a `summary.json`).
#[derive(Debug, Clone)]
pub struct SiblingRun {
    /// The folder name (e.g. `equal-aver-seed0`).
    pub dir_name: String,
    pub summary: Summary,
}

/// Everything the page is made from, already parsed.
#[derive(Debug, Clone)]
pub struct ReportInputs {
    /// The run folder's name (it identifies the run among `runs`).
    pub dir_name: String,
    /// `metrics.jsonl`, one record per epoch.
    pub metrics: Vec<EpochRecord>,
    pub summary: Summary,
    /// `config.toml` as text (`None`: the file is absent).
    pub config_text: Option<String>,
    /// `audit.json` (`None`: absent).
    pub audit: Option<Audit>,
    /// Every run in the run folder's parent that has a `summary.json`, this run included.
    pub runs: Vec<SiblingRun>,
}

impl ReportInputs {
    /// The teachers in pool order, as the page and the plots name them: the summary's names,
    /// then (for weights of more teachers than it names) the audit's, else `teacher i`.
    pub fn teacher_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .summary
            .teachers
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let width = self
            .metrics
            .iter()
            .map(|r| r.teacher_weights.len().max(r.teacher_feature_weights.len()))
            .max()
            .unwrap_or(0);
        for i in names.len()..width {
            let audit_name = self.audit.as_ref().and_then(|a| a.teachers.get(i)).cloned();
            names.push(audit_name.unwrap_or_else(|| format!("teacher {i}")));
        }
        names
    }
}

/// Read `run_dir` and write `run_dir/report.html`; returns its path.
pub fn write_report(run_dir: &Path) -> Result<PathBuf> {
    let inputs = load(run_dir)?;
    let html = render(&inputs);
    let path = run_dir.join("report.html");
    mtkd_records::fsio::write_atomic(&path, html.as_bytes())?;
    tracing::info!(path = %path.display(), "report written");
    Ok(path)
}

/// Read the files of a finished run folder (and its siblings' summaries).
pub fn load(run_dir: &Path) -> Result<ReportInputs> {
    let metrics = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let summary_path = run_dir.join("summary.json");
    let summary: Summary = read_json(&summary_path)?;
    let config_text = read_optional(&run_dir.join("config.toml"))?;
    let audit_path = run_dir.join("audit.json");
    let audit = match read_optional(&audit_path)? {
        Some(text) => Some(
            serde_json::from_str::<Audit>(&text)
                .with_context(|| format!("parsing {}", audit_path.display()))?,
        ),
        None => None,
    };
    let canonical = std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    let dir_name = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| summary.run.clone());
    let runs = read_siblings(&canonical, &dir_name, &summary);
    Ok(ReportInputs {
        dir_name,
        metrics,
        summary,
        config_text,
        audit,
        runs,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_metrics(path: &Path) -> Result<Vec<EpochRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: EpochRecord = serde_json::from_str(line)
            .with_context(|| format!("parsing {} line {}", path.display(), i + 1))?;
        out.push(r);
    }
    Ok(out)
}

/// The runs in `run_dir`'s parent that have a `summary.json` (sorted by folder name); the current
/// run uses `own`. Unreadable ones are skipped with a warning.
fn read_siblings(run_dir: &Path, dir_name: &str, own: &Summary) -> Vec<SiblingRun> {
    let Some(parent) = run_dir.parent() else {
        return Vec::new();
    };
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot list the sibling runs");
            return Vec::new();
        }
    };
    let mut runs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let summary_path = path.join("summary.json");
        if !path.is_dir() || !summary_path.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == dir_name {
            runs.push(SiblingRun {
                dir_name: name,
                summary: own.clone(),
            });
            continue;
        }
        match read_json::<Summary>(&summary_path) {
            Ok(summary) => runs.push(SiblingRun {
                dir_name: name,
                summary,
            }),
            Err(e) => tracing::warn!(path = %summary_path.display(), error = %format!("{e:#}"),
                "skipping an unreadable sibling run"),
        }
    }
    runs.sort_by(|a, b| a.dir_name.cmp(&b.dir_name));
    runs
}

// ---------------------------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------------------------

/// The page as HTML (pure: no file access).
pub fn render(inputs: &ReportInputs) -> String {
    let page = Page::new(inputs);
    let mut body = String::new();
    body.push_str(&page.header_section());
    if page.has_teachers {
        if page.has_weights {
            body.push_str(&page.weights_section());
            body.push_str(&page.class_section());
        } else {
            body.push_str(&page.accuracy_section());
        }
        body.push_str(&page.audit_section());
    } else {
        body.push_str(&page.accuracy_section());
    }
    body.push_str(&page.curves_section());
    body.push_str(&page.stats_section());
    if page.has_teachers {
        body.push_str(&page.pruning_section());
    }
    body.push_str(&page.comparison_section());
    body.push_str(&page.config_section());
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>mtkd report: {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n",
        escape(&inputs.dir_name)
    )
}

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2430;font-size:14px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 20px 18px;margin:16px 0}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;margin:0 0 4px}h3{font-size:14px;margin:16px 0 4px}
p{margin:4px 0 8px}p.how{color:#52606d;margin:2px 0 12px}.muted{color:#8a94a0}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{padding:4px 8px;border:1px solid #e1e4e8;text-align:left;vertical-align:middle}
th{background:#f2f4f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.w{text-align:center;min-width:62px;font-variant-numeric:tabular-nums}
td.src{font-size:12px;color:#52606d;word-break:break-all}
.kpis{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
.kpi{border:1px solid #dde1e6;border-radius:6px;padding:5px 12px;background:#fafbfc}
.kpi span{display:block;color:#6b7785;font-size:11px;text-transform:uppercase;letter-spacing:.03em}.kpi b{font-size:16px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,520px),1fr));gap:18px 24px}
.wide{max-width:860px}.narrow{max-width:520px}
figure{margin:0;max-width:560px}figure>svg{max-width:100%;height:auto;display:block}
figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12px;margin:4px 0 0 8px}
.legend>span{white-space:nowrap;display:inline-flex;align-items:center}.legend svg{display:inline-block;width:24px;height:10px;margin-right:5px;flex:none}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:12px}
.card td.cls{white-space:nowrap}
.card{border:1px solid #dde1e6;border-radius:6px;padding:10px}
.card-top{display:flex;gap:12px;align-items:center;margin-bottom:6px}
.card img{image-rendering:pixelated;image-rendering:crisp-edges;width:84px;height:84px;border:1px solid #c9ced4;flex:none;background:#000}
.card table{width:100%;font-size:12px}.card th,.card td{padding:3px 5px}
img.audit-overlays{max-width:100%;border:1px solid #c9ced4;margin-bottom:12px}
.ok{color:#1a7f37}.bad{color:#cf222e}
.bar{display:inline-block;width:46px;height:8px;background:#e6e9ed;border-radius:2px;vertical-align:middle;margin-right:5px;overflow:hidden}
.bar>span{display:block;height:100%}
tr.current td{background:#fff5cc;font-weight:600}
.scroll{overflow-x:auto}
.note{background:#f6f8fa;border-left:3px solid #9aa5b1;padding:6px 10px;margin:8px 0;font-size:13px}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:600px}
details summary{cursor:pointer;font-weight:600}
";

struct Page<'a> {
    inp: &'a ReportInputs,
    cfg: toml::Table,
    classes: Vec<String>,
    teachers: Vec<String>,
    /// The run has a teacher pool.
    has_teachers: bool,
    /// Some epoch recorded teacher weights.
    has_weights: bool,
    /// Leading epochs in which every teacher has weight 1 (parity agent, AVER control).
    ones_epochs: usize,
    /// The run has a feature term (`distill.feature_weight` is not 0, or the config is not
    /// there to say): without one the strategy's feature weights do nothing and are not shown.
    feature_term: bool,
}

impl<'a> Page<'a> {
    fn new(inp: &'a ReportInputs) -> Page<'a> {
        let cfg = inp
            .config_text
            .as_deref()
            .map(|t| match toml::from_str::<toml::Table>(t) {
                Ok(table) => table,
                Err(e) => {
                    tracing::warn!(error = %e, "config.toml does not parse; the report ignores it");
                    toml::Table::new()
                }
            })
            .unwrap_or_default();
        let classes = class_names(&cfg, inp);
        let teachers = inp.teacher_names();
        let has_weights = inp.metrics.iter().any(|r| !r.teacher_weights.is_empty());
        let has_teachers = !teachers.is_empty();
        let strategy = inp.summary.strategy.as_str();
        let ones_epochs = if strategy.starts_with("mtkd-rl-parity") {
            1
        } else if strategy == "equal" {
            cfg_path(&cfg, &["distill", "equal_ones_epochs"])
                .and_then(|v| v.as_integer())
                .map_or(0, |n| n.max(0) as usize)
        } else {
            0
        };
        // `feature_weight` defaults to 0 in a `[distill]` table; without one (or without the
        // config) the page cannot tell, and shows what the records hold.
        let feature_term = match cfg_path(&cfg, &["distill"]) {
            Some(_) => cfg_path(&cfg, &["distill", "feature_weight"])
                .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                .is_some_and(|w| w != 0.0),
            None => true,
        };
        Page {
            inp,
            cfg,
            classes,
            teachers,
            has_teachers,
            has_weights,
            ones_epochs,
            feature_term,
        }
    }

    fn class_name(&self, i: usize) -> String {
        self.classes
            .get(i)
            .cloned()
            .unwrap_or_else(|| i.to_string())
    }

    fn teacher_index(&self, name: &str) -> Option<usize> {
        self.teachers.iter().position(|t| t == name)
    }

    fn agent_mode(&self) -> Option<String> {
        let strategy = cfg_path(&self.cfg, &["distill", "strategy"]).and_then(|v| v.as_str());
        let mode = cfg_path(&self.cfg, &["distill", "agent", "mode"]).and_then(|v| v.as_str());
        match (strategy, mode) {
            (Some("mtkd-rl") | None, Some(m)) => Some(m.to_owned()),
            (Some("mtkd-rl"), None) => Some("parity".to_owned()),
            _ => None,
        }
    }

    fn is_parity(&self) -> bool {
        self.inp.summary.strategy.starts_with("mtkd-rl-parity")
    }

    fn is_ebkd(&self) -> bool {
        self.inp.summary.strategy == "ebkd"
    }

    /// The epoch after which a teacher left the pool, if it did.
    fn pruned_after(&self, name: &str) -> Option<usize> {
        self.inp
            .metrics
            .iter()
            .find(|r| r.pruned.iter().any(|p| p == name))
            .map(|r| r.epoch)
    }

    // --- 1. header --------------------------------------------------------------------------

    /// The number of data-parallel ranks that trained the run (`None`: one process).
    fn ranks(&self) -> Option<usize> {
        self.inp
            .metrics
            .last()
            .and_then(|r| r.data_parallel.as_ref())
            .map(|d| d.ranks)
    }

    /// How people read the run's primary metric (`top-1`, `mIoU`, `AP`).
    fn metric(&self) -> &str {
        mtkd_records::metric::metric_label(&self.inp.summary.metric)
    }

    fn header_section(&self) -> String {
        let s = &self.inp.summary;
        let final_label = format!("final test {}", self.metric());
        let best_label = format!("best test {}", self.metric());
        let strategy = match self.agent_mode() {
            Some(m) => format!("{} (agent mode: {})", s.strategy, m),
            None => s.strategy.clone(),
        };
        let labels = match &s.labelled {
            Some(c) if c.labelled != c.distinct_labelled => format!(
                "{} of {} ({} distinct, repeated)",
                c.labelled, c.samples, c.distinct_labelled
            ),
            Some(c) => format!("{} of {}", c.labelled, c.samples),
            None => "all".to_owned(),
        };
        let kpis = [
            ("strategy", strategy),
            (
                "student",
                format!("{} ({} parameters)", s.student, s.student_parameters),
            ),
            ("seed", s.seed.to_string()),
            ("training samples with labels", labels),
            (final_label.as_str(), pct(s.final_value)),
            (
                best_label.as_str(),
                format!("{} (epoch {})", pct(s.best_value), s.best_epoch),
            ),
            ("epochs", s.epochs.to_string()),
            (
                "device",
                match self.ranks() {
                    Some(n) => format!("{} × {n} ranks", s.device),
                    None => s.device.clone(),
                },
            ),
            ("wall time", duration(s.wall_seconds)),
            (
                "peak memory",
                s.peak_rss_mb
                    .map_or("n/a".into(), |m| format!("{} MB", fixed(m, 0))),
            ),
        ];
        let mut out = format!(
            "<h1>Run {}</h1>\n<p class=\"how\">A finished distillation run: the student's final and \
             best test {m}, what it cost, and the teachers it learned from. The {m} is a \
             percentage, on the test split.</p>\n<div class=\"kpis\">",
            escape(&self.inp.dir_name),
            m = escape(self.metric()),
        );
        for (label, value) in kpis {
            out.push_str(&format!(
                "<div class=\"kpi\"><span>{}</span><b>{}</b></div>",
                escape(label),
                escape(&value)
            ));
        }
        out.push_str("</div>\n");
        if let Some(n) = self.ranks() {
            out.push_str(&format!(
                "<p class=\"note\">Trained data-parallel on {n} ranks (README, \"Several \
                 processes\"): the losses, accuracies and mean weights per epoch are the ranks' \
                 together; the weights per class, <code>weights.csv</code> and the samples where \
                 the teachers disagree most come from rank 0's part of every batch (1/{n} of the \
                 data).</p>\n"
            ));
        }
        if self.has_teachers {
            out.push_str(&self.teachers_block());
        } else {
            out.push_str(&format!(
                "<p class=\"note\">This run distils from no teacher (strategy {}): it learns from \
                 the labels only, so the page has no teacher weights.</p>\n",
                escape(&s.strategy)
            ));
        }
        section("run", "", &out)
    }

    fn teachers_block(&self) -> String {
        let last = self.inp.metrics.last();
        let has_fw =
            self.feature_term && last.is_some_and(|r| !r.teacher_feature_weights.is_empty());
        let mut t = String::from(
            "<h3>Teachers</h3>\n<p class=\"how\">Each teacher's accuracy on the test set, and the \
             mean weight the strategy gave its logits (and features) over the last epoch's \
             training samples.</p>\n<div class=\"scroll\"><table>\n<tr><th>teacher</th><th>source</th>\
             <th>test {}</th><th>logit weight, last epoch</th>",
        )
        .replace("{}", self.metric());
        if has_fw {
            t.push_str("<th>feature weight, last epoch</th>");
        }
        t.push_str("<th>pool</th></tr>\n");
        for (i, name) in self.teachers.iter().enumerate() {
            let ts = self.inp.summary.teachers.get(i);
            let lw = last.and_then(|r| r.teacher_weights.get(i)).copied();
            let fw = last.and_then(|r| r.teacher_feature_weights.get(i)).copied();
            let status = match self.pruned_after(name) {
                Some(e) => format!("left after epoch {e}"),
                None => "stayed".to_owned(),
            };
            t.push_str(&format!(
                "<tr><td>{}</td><td class=\"src\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
                swatch_name(name, i),
                escape(ts.map_or("", |t| t.source.as_str())),
                ts.and_then(|t| t.test_value).map_or("n/a".into(), pct),
                lw.map_or("n/a".into(), |v| fixed(v, 3)),
            ));
            if has_fw {
                t.push_str(&format!(
                    "<td class=\"num\">{}</td>",
                    fw.map_or("n/a".into(), |v| fixed(v, 3))
                ));
            }
            t.push_str(&format!("<td>{}</td></tr>\n", escape(&status)));
        }
        t.push_str("</table></div>\n");
        if self.has_weights {
            t.push_str(&self.trust_block());
        }
        t
    }

    /// Teacher accuracy against the weight it got in the last epoch.
    fn trust_block(&self) -> String {
        let Some(last) = self.inp.metrics.last() else {
            return String::new();
        };
        let mut dots = Vec::new();
        for (i, name) in self.teachers.iter().enumerate() {
            let acc = self.inp.summary.teachers.get(i).and_then(|t| t.test_value);
            let w = last.teacher_weights.get(i).copied();
            if let (Some(x), Some(y)) = (acc, w) {
                if x.is_finite() && y.is_finite() {
                    dots.push(Dot {
                        x,
                        y,
                        label: match self.pruned_after(name) {
                            Some(e) => format!("{name} (pruned after epoch {e})"),
                            None => name.clone(),
                        },
                        colour: teacher_colour(i),
                    });
                }
            }
        }
        let mut out = String::from(
            "<h3>Trust vs accuracy</h3>\n<p class=\"how\">One point per teacher: right = more \
             accurate on the whole test set, up = more logit weight in the last epoch. A strategy \
             that trusts the accurate teachers puts the points on a rising line; specialists can \
             earn weight on their own classes despite a low overall accuracy (see the per-class \
             table).</p>\n",
        );
        if dots.is_empty() {
            out.push_str(
                "<p class=\"muted\">No teacher has both a test accuracy and a weight.</p>\n",
            );
            return out;
        }
        out.push_str(&format!(
            "<div class=\"narrow\">{}</div>\n",
            scatter(
                &format!("teacher test {} (%)", self.metric()),
                "mean logit weight, last epoch",
                &dots
            )
        ));
        out.push_str(&trust_note(&dots));
        out
    }

    // --- 2. weights per epoch ---------------------------------------------------------------

    fn weights_section(&self) -> String {
        let m = self.teachers.len();
        let mut out = String::from(
            "<p class=\"how\">The mean weight each teacher got per epoch (over the epoch's \
             training samples). A weight near 0 means the student ignored that teacher; a dashed \
             vertical line marks a teacher leaving the pool at the end of that epoch.</p>\n",
        );
        let mut notes = String::new();
        if self.ones_epochs > 0 {
            let who = if self.is_parity() {
                "The parity agent (the published computation) gives every teacher weight 1 in \
                 epoch 1, a sum over teachers"
            } else {
                "This AVER control gives every teacher weight 1 in its first epochs"
            };
            notes.push_str(&format!(
                "<p class=\"note\">{who}: the weights sum to M = {m}, so the KD term is M times \
                 the scale of the later epochs (labelled on the chart).</p>\n"
            ));
        }
        if self.is_ebkd() {
            notes.push_str(&format!(
                "<p class=\"note\">EBKD's weights sum to M &minus; 1 = {} per sample, not to 1: \
                 its KD term is M &minus; 1 times AVER's scale.</p>\n",
                m.saturating_sub(1).max(1)
            ));
        }
        out.push_str(&notes);
        out.push_str("<div class=\"charts\">\n");
        out.push_str(&self.weight_chart(Weights::Logit));
        if self.feature_term
            && self
                .inp
                .metrics
                .iter()
                .any(|r| !r.teacher_feature_weights.is_empty())
        {
            out.push_str(&self.weight_chart(Weights::Feature));
        }
        out.push_str("</div>\n");
        section("weights", "Teacher weights per epoch", &out)
    }

    fn weight_chart(&self, which: Weights) -> String {
        let ones = (self.ones_epochs > 0).then_some(if self.is_parity() {
            "all-ones warm-up"
        } else {
            "all-ones (control)"
        });
        line_chart(&chart::teacher_weights(
            &self.inp.metrics,
            &self.teachers,
            which,
            ones,
        ))
    }

    // --- 3. weights per class ---------------------------------------------------------------

    fn class_section(&self) -> String {
        let last_with = |pick: fn(&EpochRecord) -> &Vec<Vec<f64>>| {
            self.inp.metrics.iter().rev().find(|r| !pick(r).is_empty())
        };
        let acc = &self.inp.summary.final_report.per_class;
        let mut out = String::from(
            "<p class=\"how\">Rows are the true classes of the training samples, columns the \
             teachers: each cell is the teacher's mean weight on the samples of that class in the \
             last epoch (colour on a fixed 0 to 1 scale, darker = more trust). When the strategy \
             weights each pixel or detector location (the agent's meta mode on segmentation and \
             detection, fixed per-class tables on segmentation), the logit weights are read per \
             pixel or per assigned box by its own class; the feature weights stay per image. The \
             last column is the student's final test accuracy on the class.</p>\n",
        );
        match last_with(|r| &r.class_weights) {
            Some(r) => {
                out.push_str(&format!("<h3>Logit weights (epoch {})</h3>\n", r.epoch));
                out.push_str(&self.class_table(&r.class_weights, acc, r.active_teachers.as_ref()));
            }
            None => {
                out.push_str(
                    "<p class=\"muted\">This run's metrics hold no per-class weights (an older \
                     format); the student's accuracy per class:</p>\n",
                );
                out.push_str(&self.class_table(&[], acc, None));
            }
        }
        let feature_rows = last_with(|r| &r.class_feature_weights).filter(|_| self.feature_term);
        if let Some(r) = feature_rows {
            out.push_str(&format!("<h3>Feature weights (epoch {})</h3>\n", r.epoch));
            out.push_str(&self.class_table(
                &r.class_feature_weights,
                acc,
                r.active_teachers.as_ref(),
            ));
        }
        if !self.feature_term && last_with(|r| &r.class_feature_weights).is_some() {
            out.push_str(
                "<p class=\"muted\">This run has no feature term (distill.feature_weight = 0), so \
                 the strategy's feature weights change nothing and are not shown.</p>\n",
            );
        }
        if let Some(r) = last_with(|r| &r.class_credit) {
            out.push_str(&format!(
                "<h3>Where the agent's credit points (epoch {})</h3>\n<p class=\"how\">Of the \
                 pixels of each class the agent learnt from, the share where each teacher earned \
                 the highest credit (the per-pixel optimum of the agent's objective weights that \
                 teacher almost alone). Next to the logit weights above: where the two agree the \
                 agent gives each teacher what its credit ranks first, and a split weight is a \
                 split credit (docs/METHOD.md section 10.7).</p>\n",
                r.epoch
            ));
            out.push_str(&self.class_table(&r.class_credit, acc, r.active_teachers.as_ref()));
        }
        if last_with(|r| &r.class_weights).is_some() || feature_rows.is_some() {
            out.push_str(&colour_bar());
        }
        section("classes", "Weights per class (last epoch)", &out)
    }

    /// Rows = classes, columns = teachers (+ the student's accuracy per class).
    /// A teacher not in `active` (the epoch's pool) shows "pruned" instead of its 0.
    fn class_table(&self, rows: &[Vec<f64>], acc: &[f64], active: Option<&Vec<String>>) -> String {
        let k = self.classes.len().max(rows.len()).max(acc.len());
        let cols = if rows.is_empty() {
            0
        } else {
            self.teachers.len()
        };
        let mut t =
            String::from("<div class=\"scroll\"><table class=\"classes\">\n<tr><th>class</th>");
        for (i, name) in self.teachers.iter().enumerate().take(cols) {
            t.push_str(&format!("<th>{}</th>", swatch_name(name, i)));
        }
        t.push_str(&format!("<th>student {} (%)</th></tr>\n", self.metric()));
        for c in 0..k {
            t.push_str(&format!("<tr><th>{}</th>", escape(&self.class_name(c))));
            for (j, name) in self.teachers.iter().enumerate().take(cols) {
                if active.is_some_and(|a| !a.contains(name)) {
                    t.push_str("<td class=\"w muted\">pruned</td>");
                    continue;
                }
                let v = rows
                    .get(c)
                    .and_then(|r| r.get(j))
                    .copied()
                    .unwrap_or(f64::NAN);
                t.push_str(&weight_cell(v));
            }
            t.push_str(&format!(
                "<td class=\"num\">{}</td></tr>\n",
                acc.get(c).map_or("n/a".into(), |&a| fixed(a, 1))
            ));
        }
        t.push_str("</table></div>\n");
        t
    }

    /// The per-class accuracy alone (a run without teacher weights).
    fn accuracy_section(&self) -> String {
        let mut out =
            String::from("<p class=\"how\">The student's final test accuracy on each class.</p>\n");
        out.push_str(&self.class_table(&[], &self.inp.summary.final_report.per_class, None));
        section("classes", "Student accuracy per class", &out)
    }

    // --- 4. audit ---------------------------------------------------------------------------

    fn audit_section(&self) -> String {
        let title = "Where the teachers disagree most";
        let Some(a) = &self.inp.audit else {
            return section(
                "audit",
                title,
                "<p>This run has no audit.json, so there are no sample cards (runs of older \
                 versions, or runs without teachers, do not write one).</p>\n",
            );
        };
        let mut out = format!(
            "<p class=\"how\">The training samples of epoch {} on which the teachers disagreed \
             most ({}), most disagreed-on first. Per teacher: the class it predicts (green = \
             right, red = wrong), its probability of the true class, and the logit and feature \
             weight the strategy gave it on this sample. A good weighting puts the weight on the \
             teachers that are right.</p>\n",
            a.epoch,
            escape(&a.measure)
        );
        if a.samples.is_empty() {
            out.push_str("<p class=\"muted\">audit.json holds no samples.</p>\n");
            return section("audit", title, &out);
        }
        if let Some(png) = a
            .overlays_png_base64
            .as_ref()
            .filter(|p| !p.is_empty() && is_base64(p))
        {
            out.push_str(&format!(
                "<p class=\"how\">The first {} samples below, one per row: the true masks or \
                 boxes, then what the student and each teacher predict on the un-augmented \
                 image at the end of training.</p>\n<img class=\"audit-overlays\" \
                 alt=\"truth, student and teachers on the most disagreed-on training images\" \
                 src=\"data:image/png;base64,{}\">\n",
                a.samples.len().min(6),
                escape(png)
            ));
        }
        out.push_str("<div class=\"cards\">\n");
        for s in &a.samples {
            out.push_str(&self.audit_card(a, s));
        }
        out.push_str("</div>\n");
        section("audit", title, &out)
    }

    fn audit_class(&self, a: &Audit, i: usize) -> String {
        a.class_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| self.class_name(i))
    }

    fn audit_card(&self, a: &Audit, s: &AuditSample) -> String {
        let img = if is_base64(&s.image_png_base64) && !s.image_png_base64.is_empty() {
            format!(
                "<img alt=\"training sample {}\" src=\"data:image/png;base64,{}\">",
                s.index,
                escape(&s.image_png_base64)
            )
        } else {
            "<div class=\"muted\">no image</div>".to_owned()
        };
        let mut c = format!(
            "<div class=\"card\"><div class=\"card-top\">{img}<div>true class: <b>{}</b><br>\
             disagreement: <b>{}</b><br><span class=\"muted\">training sample #{}</span></div></div>\n\
             <table><tr><th>teacher</th><th>predicts</th><th>p(true)</th><th>logit weight</th>{}</tr>\n",
            escape(&self.audit_class(a, s.label)),
            fixed(s.disagreement, 3),
            s.index,
            if self.feature_term {
                "<th>feature weight</th>"
            } else {
                ""
            }
        );
        for (i, t) in s.teachers.iter().enumerate() {
            let name = a
                .teachers
                .get(i)
                .or_else(|| self.teachers.get(i))
                .cloned()
                .unwrap_or_else(|| format!("teacher {i}"));
            let colour_index = self.teacher_index(&name).unwrap_or(i);
            c.push_str(&format!(
                "<tr><td>{}</td>",
                swatch_name(&name, colour_index)
            ));
            match t {
                Some(t) => c.push_str(&self.audit_teacher_cells(a, s, t, colour_index)),
                None => c.push_str(&format!(
                    "<td colspan=\"{}\" class=\"muted\">pruned</td>",
                    if self.feature_term { 4 } else { 3 }
                )),
            }
            c.push_str("</tr>\n");
        }
        c.push_str("</table></div>\n");
        c
    }

    fn audit_teacher_cells(
        &self,
        a: &Audit,
        s: &AuditSample,
        t: &AuditTeacher,
        ci: usize,
    ) -> String {
        let verdict = if t.predicted == s.label { "ok" } else { "bad" };
        let w = if t.logit_weight.is_finite() {
            t.logit_weight.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let feature = if self.feature_term {
            format!("<td class=\"num\">{}</td>", fixed(t.feature_weight, 2))
        } else {
            String::new()
        };
        format!(
            "<td class=\"cls {verdict}\">{}</td><td class=\"num\">{}</td><td class=\"num\">\
             <span class=\"bar\"><span style=\"width:{:.0}%;background:{}\"></span></span>{}</td>\
             {feature}",
            escape(&self.audit_class(a, t.predicted)),
            fixed(t.prob_true, 2),
            w * 100.0,
            teacher_colour(ci),
            fixed(t.logit_weight, 2),
        )
    }

    // --- 5. training curves -----------------------------------------------------------------

    fn curves_section(&self) -> String {
        let m = &self.inp.metrics;
        let out = format!(
            "<p class=\"how\">Test and training accuracy per epoch, the training loss and its \
             parts (cross-entropy with the labels, KD towards the weighted teachers, feature \
             matching; each as an epoch mean, the total includes the loss weights), and the time \
             each epoch took.</p>\n<div class=\"charts\">\n{}{}{}</div>\n",
            line_chart(&chart::accuracy(m, &self.inp.summary.metric)),
            line_chart(&chart::losses(m)),
            line_chart(&chart::epoch_time(m))
        );
        section("curves", "Training curves", &out)
    }

    // --- 6. strategy statistics -------------------------------------------------------------

    fn stats_section(&self) -> String {
        let title = "Strategy / agent statistics";
        let keys: BTreeSet<&str> = self
            .inp
            .metrics
            .iter()
            .flat_map(|r| r.strategy_metrics.keys().map(String::as_str))
            .collect();
        if keys.is_empty() {
            return section(
                "stats",
                title,
                "<p>This strategy records no statistics.</p>\n",
            );
        }
        let mut t = String::from(
            "<p class=\"how\">The weighting strategy's own diagnostics per epoch (epoch means; 4 \
             significant digits): e.g. the agent's loss and updates, reward statistics, the \
             entropy and maximum of the weights.</p>\n<div class=\"scroll\"><table>\n<tr><th>epoch</th>",
        );
        for k in &keys {
            t.push_str(&format!("<th>{}</th>", escape(k).replace('_', "_<wbr>")));
        }
        t.push_str("</tr>\n");
        for r in &self.inp.metrics {
            t.push_str(&format!("<tr><td class=\"num\">{}</td>", r.epoch));
            for k in &keys {
                let v = r.strategy_metrics.get(*k).copied();
                t.push_str(&format!(
                    "<td class=\"num\">{}</td>",
                    v.map_or("".into(), sig4)
                ));
            }
            t.push_str("</tr>\n");
        }
        t.push_str("</table></div>\n");
        section("stats", title, &t)
    }

    // --- 7. pruning -------------------------------------------------------------------------

    fn pruning_section(&self) -> String {
        let mut out = String::from(
            "<p class=\"how\">Teachers that left the pool (their weight stayed low; from then on \
             their forward pass is not paid).</p>\n",
        );
        let events: Vec<(usize, &String)> = self
            .inp
            .metrics
            .iter()
            .flat_map(|r| r.pruned.iter().map(move |n| (r.epoch, n)))
            .collect();
        if events.is_empty() {
            out.push_str("<p>No teacher left the pool.</p>\n");
        } else {
            out.push_str("<ul>\n");
            for (e, n) in events {
                out.push_str(&format!(
                    "<li>after epoch {e}: <b>{}</b> left the pool</li>\n",
                    escape(n)
                ));
            }
            out.push_str("</ul>\n");
        }
        if let Some(active) = self
            .inp
            .metrics
            .last()
            .and_then(|r| r.active_teachers.as_ref())
        {
            out.push_str(&format!(
                "<p>Pool in the last epoch: {}.</p>\n",
                escape(&active.join(", "))
            ));
        }
        section("pruning", "Pruning events", &out)
    }

    // --- 8. comparison ----------------------------------------------------------------------

    fn comparison_section(&self) -> String {
        let runs = &self.inp.runs;
        if !runs.iter().any(|r| r.dir_name != self.inp.dir_name) {
            return String::new();
        }
        let current = strip_seed(&self.inp.dir_name);
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for r in runs {
            let g = groups.entry(strip_seed(&r.dir_name)).or_default();
            g.strategies.insert(r.summary.strategy.clone());
            g.finals.push(r.summary.final_value);
            g.bests.push(r.summary.best_value);
        }
        if !groups.contains_key(&current) {
            let g = groups.entry(current.clone()).or_default();
            g.strategies.insert(self.inp.summary.strategy.clone());
            g.finals.push(self.inp.summary.final_value);
            g.bests.push(self.inp.summary.best_value);
        }
        let mut rows: Vec<(String, Group)> = groups.into_iter().collect();
        rows.sort_by(|a, b| {
            let (ma, mb) = (mean(&a.1.finals), mean(&b.1.finals));
            mb.partial_cmp(&ma)
                .unwrap_or_else(|| ma.is_nan().cmp(&mb.is_nan()))
                .then_with(|| a.0.cmp(&b.0))
        });
        let mut t = String::from(
            "<p class=\"how\">The other runs in this run's folder, grouped by folder name without \
             the seed: mean &plusmn; sample standard deviation over seeds of the final and the \
             best test {m} (%), best first. The highlighted row is this run's group.</p>\n\
             <div class=\"scroll\"><table>\n<tr><th>runs</th><th>strategy</th><th>seeds</th>\
             <th>final {m} (%)</th><th>best {m} (%)</th></tr>\n",
        )
        .replace("{m}", self.metric());
        for (name, g) in &rows {
            let this = *name == current;
            t.push_str(&format!(
                "<tr{}><td>{}{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td></tr>\n",
                if this { " class=\"current\"" } else { "" },
                escape(name),
                if this { " (this run)" } else { "" },
                escape(&g.strategies.iter().cloned().collect::<Vec<_>>().join(", ")),
                g.finals.len(),
                mean_std(&g.finals),
                mean_std(&g.bests)
            ));
        }
        t.push_str("</table></div>\n");
        section("comparison", "Comparison with the other runs", &t)
    }

    // --- 9. config --------------------------------------------------------------------------

    fn config_section(&self) -> String {
        let body = match &self.inp.config_text {
            Some(text) => format!(
                "<p class=\"how\">The configuration the run was started with (click to open).</p>\n\
                 <details><summary>config.toml</summary><pre>{}</pre></details>\n",
                escape(text)
            ),
            None => "<p>This run folder has no config.toml.</p>\n".to_owned(),
        };
        section("config", "Configuration", &body)
    }
}

#[derive(Default)]
struct Group {
    strategies: BTreeSet<String>,
    finals: Vec<f64>,
    bests: Vec<f64>,
}

fn cfg_path<'t>(cfg: &'t toml::Table, path: &[&str]) -> Option<&'t toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut v = cfg.get(*first)?;
    for key in rest {
        v = v.as_table()?.get(*key)?;
    }
    Some(v)
}

/// Class names: `data.class_names`, else the audit's, else numbers; as many as the run has classes.
fn class_names(cfg: &toml::Table, inp: &ReportInputs) -> Vec<String> {
    let mut names: Vec<String> = cfg_path(cfg, &["data", "class_names"])
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        if let Some(a) = &inp.audit {
            names = a.class_names.clone();
        }
    }
    let k = inp
        .metrics
        .iter()
        .map(|r| r.class_weights.len().max(r.class_feature_weights.len()))
        .chain([inp.summary.final_report.per_class.len(), names.len()])
        .max()
        .unwrap_or(0);
    for i in names.len()..k {
        names.push(i.to_string());
    }
    names
}

fn section(id: &str, title: &str, body: &str) -> String {
    let h = if title.is_empty() {
        String::new()
    } else {
        format!("<h2>{}</h2>\n", escape(title))
    };
    format!("<section id=\"{id}\">\n{h}{body}</section>\n")
}

fn swatch_name(name: &str, i: usize) -> String {
    format!(
        "<span class=\"swatch\" style=\"background:{}\"></span>{}",
        teacher_colour(i),
        escape(name)
    )
}

/// The "trust vs accuracy" sentence: the most accurate teacher against the most trusted one.
fn trust_note(dots: &[Dot]) -> String {
    let by = |f: fn(&Dot) -> f64| {
        dots.iter()
            .max_by(|a, b| f(a).partial_cmp(&f(b)).unwrap_or(std::cmp::Ordering::Equal))
    };
    let (Some(acc), Some(w)) = (by(|d| d.x), by(|d| d.y)) else {
        return String::new();
    };
    let verdict = if acc.label == w.label {
        "the most accurate teacher also got the most weight"
    } else {
        "the most accurate teacher is not the most trusted one"
    };
    format!(
        "<p class=\"note\">Most accurate: <b>{}</b> ({}, weight {}). Most weight: <b>{}</b> \
         (weight {}, {}): {verdict}.</p>\n",
        escape(&acc.label),
        pct(acc.x),
        fixed(acc.y, 3),
        escape(&w.label),
        fixed(w.y, 3),
        pct(w.x)
    )
}

/// A table cell with the value and a background from the fixed 0 → 1 scale.
fn weight_cell(v: f64) -> String {
    let (bg, fg) = scale_colour(v);
    format!(
        "<td class=\"w\" style=\"background:{bg};color:{fg}\">{}</td>",
        fixed(v, 2)
    )
}

/// White → dark blue over 0..1 (clamped); text white on the dark half. Grey for n/a.
fn scale_colour(v: f64) -> (String, &'static str) {
    if !v.is_finite() {
        return ("#eeeeee".to_owned(), "#666666");
    }
    let t = v.clamp(0.0, 1.0);
    let mix = |lo: f64| (255.0 + (lo - 255.0) * t).round().clamp(0.0, 255.0) as u8;
    let bg = format!("#{:02x}{:02x}{:02x}", mix(8.0), mix(48.0), mix(107.0));
    (bg, if t > 0.5 { "#ffffff" } else { "#111111" })
}

/// The legend of the cell colours: a bar from 0 to 1 with ticks.
fn colour_bar() -> String {
    let (w, x0, bar_w) = (300.0, 10.0, 280.0);
    let mut s = format!(
        "<div class=\"legend-scale\"><svg width=\"{w}\" height=\"42\" viewBox=\"0 0 {w} 42\" \
         role=\"img\" aria-label=\"colour scale 0 to 1\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let n = 56;
    for i in 0..n {
        let t = (i as f64 + 0.5) / n as f64;
        let (bg, _) = scale_colour(t);
        s.push_str(&format!(
            "<rect x=\"{:.2}\" y=\"4\" width=\"{:.2}\" height=\"14\" fill=\"{bg}\"/>",
            x0 + bar_w * i as f64 / n as f64,
            bar_w / n as f64 + 0.3
        ));
    }
    s.push_str(&format!(
        "<rect x=\"{x0}\" y=\"4\" width=\"{bar_w}\" height=\"14\" fill=\"none\" stroke=\"#888\"/>"
    ));
    for (v, label) in [
        (0.0, "0"),
        (0.25, "0.25"),
        (0.5, "0.5"),
        (0.75, "0.75"),
        (1.0, "1"),
    ] {
        let x = x0 + bar_w * v;
        s.push_str(&format!(
            "<line x1=\"{x}\" y1=\"18\" x2=\"{x}\" y2=\"23\" stroke=\"#555\"/>\
             <text x=\"{x}\" y=\"35\" text-anchor=\"middle\" fill=\"#333\">{label}</text>"
        ));
    }
    s.push_str("</svg> <span class=\"muted\">weight (fixed scale; values above 1 get the darkest colour)</span></div>\n");
    s
}

// ---------------------------------------------------------------------------------------------
// Text and numbers
// ---------------------------------------------------------------------------------------------

/// Escape text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn is_base64(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

fn fixed(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_owned()
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2} %")
    } else {
        "n/a".to_owned()
    }
}

/// Four significant digits (integers as integers, very large or small values in e-notation).
fn sig4(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    let a = v.abs();
    if v == 0.0 {
        return "0".to_owned();
    }
    if v.fract() == 0.0 && a < 1e7 {
        return format!("{v:.0}");
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.3e}");
    }
    let magnitude = a.log10().floor() as i32;
    let decimals = (3 - magnitude).max(0) as usize;
    format!("{v:.decimals$}")
}

fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "n/a".to_owned();
    }
    let t = seconds.round() as u64;
    let (h, m, s) = (t / 3600, (t % 3600) / 60, t % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else if m > 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{seconds:.1} s")
    }
}

fn strip_seed(name: &str) -> String {
    if let Some(pos) = name.rfind("-seed") {
        let digits = &name[pos + 5..];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return name[..pos].to_owned();
        }
    }
    name.to_owned()
}

fn mean(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        f64::NAN
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

/// `mean ± sample std` (just the mean for one value).
fn mean_std(v: &[f64]) -> String {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let m = mean(&f);
    if f.len() < 2 {
        return fixed(m, 2);
    }
    let var = f.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (f.len() - 1) as f64;
    format!("{} &plusmn; {}", fixed(m, 2), fixed(var.sqrt(), 2))
}

// ---------------------------------------------------------------------------------------------
// SVG charts
// ---------------------------------------------------------------------------------------------

fn svg_open(w: f64, h: f64, label: &str) -> String {
    format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{}\" \
         font-family=\"system-ui,sans-serif\" font-size=\"11\" fill=\"#333\">\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>",
        escape(label)
    )
}

/// Grid, axes, tick labels and axis titles.
fn axes(f: &Frame, xt: &[Tick], yt: &[Tick], x_label: &str, y_label: &str) -> String {
    let (l, r, t, b) = (f.left, f.w - f.right, f.top, f.h - f.bottom);
    let mut s = String::new();
    for Tick { at: py, text } in yt {
        s.push_str(&format!(
            "<line x1=\"{l:.1}\" y1=\"{py:.1}\" x2=\"{r:.1}\" y2=\"{py:.1}\" stroke=\"#eceef1\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{text}</text>",
            l - 6.0,
            py + 3.5,
        ));
    }
    for Tick { at: px, text } in xt {
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{b:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#555\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{text}</text>",
            b + 4.0,
            b + 16.0,
        ));
    }
    s.push_str(&format!(
        "<path d=\"M{l:.1},{t:.1} V{b:.1} H{r:.1}\" fill=\"none\" stroke=\"#555\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate(13,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (l + r) / 2.0,
        f.h - 5.0,
        escape(x_label),
        (t + b) / 2.0,
        escape(y_label)
    ));
    s
}

/// ` stroke-dasharray="..."` for a dashed series, nothing for a solid one.
fn dash_attr(dash: Option<&[u8]>) -> String {
    dash.map_or(String::new(), |d| {
        let d: Vec<String> = d.iter().map(u8::to_string).collect();
        format!(" stroke-dasharray=\"{}\"", d.join(" "))
    })
}

fn legend(series: &[Series]) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for se in series {
        s.push_str(&format!(
            "<span><svg width=\"24\" height=\"10\"><line x1=\"1\" y1=\"5\" x2=\"23\" y2=\"5\" \
             stroke=\"{}\" stroke-width=\"2.5\"{}/></svg>{}</span>",
            se.colour,
            dash_attr(se.dash),
            escape(&se.name)
        ));
    }
    s.push_str("</div>");
    s
}

/// A [`LineChart`] as a figure: caption, inline SVG (placed by [`LineChart::layout`], as the PNG
/// is) and the legend under it (HTML).
fn line_chart(c: &LineChart) -> String {
    let Some(l) = c.layout() else {
        return format!(
            "<figure><figcaption>{}</figcaption><p class=\"muted\">no data</p></figure>\n",
            escape(&c.title)
        );
    };
    let f = &l.frame;
    let mut s = svg_open(f.w, f.h, &c.title);
    s.push_str(&axes(f, &l.x_ticks, &l.y_ticks, &c.x_label, &c.y_label));
    let (t, b) = (f.top, f.h - f.bottom);
    for px in &l.markers {
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{t:.1}\" x2=\"{px:.1}\" y2=\"{b:.1}\" stroke=\"#6b7280\" \
             stroke-width=\"1.2\" stroke-dasharray=\"5 4\"/>"
        ));
    }
    for (se, line) in c.series.iter().zip(&l.lines) {
        s.push_str(&series_svg(se, line));
    }
    for (px, py) in &l.rings {
        s.push_str(&format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"6\" fill=\"none\" stroke=\"#111\" \
             stroke-width=\"1.3\"/>"
        ));
    }
    for label in &l.labels {
        s.push_str(&band_label_svg(label));
    }
    s.push_str("</svg>");
    format!(
        "<figure><figcaption>{}</figcaption>{s}{}</figure>\n",
        escape(&c.title),
        legend(&c.series)
    )
}

fn band_label_svg(l: &BandLabel) -> String {
    let leader = l.leader.map_or(String::new(), |(x, from, to)| {
        format!(
            "<line x1=\"{x:.1}\" y1=\"{from:.1}\" x2=\"{x:.1}\" y2=\"{to:.1}\" stroke=\"#9aa1ab\" \
             stroke-width=\"1\"/>"
        )
    });
    format!(
        "{leader}<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"start\"{} fill=\"{}\">{}</text>",
        l.x,
        l.baseline,
        if l.bold { " font-weight=\"600\"" } else { "" },
        if l.bold { "#111111" } else { "#4b5563" },
        escape(&l.text)
    )
}

fn series_svg(se: &Series, line: &Line) -> String {
    let mut d = String::new();
    for run in &line.runs {
        for (i, (px, py)) in run.iter().enumerate() {
            d.push_str(&format!(
                "{}{px:.1},{py:.1} ",
                if i == 0 { "M" } else { "L" }
            ));
        }
    }
    let dots: String = line
        .dots
        .iter()
        .map(|(px, py)| {
            format!(
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"2.8\" fill=\"{}\"/>",
                se.colour
            )
        })
        .collect();
    format!(
        "<g><title>{}</title><path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" \
         stroke-linejoin=\"round\"{}/>{dots}</g>",
        escape(&se.name),
        d.trim_end(),
        se.colour,
        dash_attr(se.dash)
    )
}

struct Dot {
    x: f64,
    y: f64,
    label: String,
    colour: Rgb,
}

/// A scatter plot with a text label at each point (moved down while it would overlap another).
fn scatter(x_label: &str, y_label: &str, dots: &[Dot]) -> String {
    let xs: Vec<f64> = dots.iter().map(|d| d.x).collect();
    let (mut xl, mut xh) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let pad = ((xh - xl) * 0.15).max(2.5);
    xl = (xl - pad).max(0.0);
    xh = (xh + pad).min(100.0).max(xl + 1.0);
    let (x0, x1, x_step) = auto_range(&[xl, xh], false, 5.0);
    let ymax = dots.iter().map(|d| d.y).fold(1.0_f64, f64::max);
    let y1 = if ymax > 1.0 { nice_ceil(ymax) } else { 1.0 };
    let y_step = nice_step(y1 / 4.0);
    let f = Frame {
        w: 480.0,
        h: 300.0,
        left: 52.0,
        right: 16.0,
        top: 16.0,
        bottom: 38.0,
        x0,
        x1,
        y0: 0.0,
        y1,
    };
    let mut s = svg_open(f.w, f.h, "trust vs accuracy");
    s.push_str(&axes(
        &f,
        &f.x_ticks(x_step),
        &f.y_ticks(y_step),
        x_label,
        y_label,
    ));
    let centres: Vec<(f64, f64)> = dots.iter().map(|d| (f.px(d.x), f.py(d.y))).collect();
    // Boxes (x, y, w, h) nothing may overlap: the dots, then each label placed.
    let mut placed: Vec<(f64, f64, f64, f64)> = centres
        .iter()
        .map(|&(x, y)| (x - 6.0, y - 6.0, 12.0, 12.0))
        .collect();
    for (d, &(px, py)) in dots.iter().zip(&centres) {
        s.push_str(&format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"{}\" stroke=\"#fff\" stroke-width=\"1\"/>",
            d.colour
        ));
        let (x_start, ty, width) = place_label(&f, px, py, &d.label, &placed);
        placed.push((x_start, ty - 10.0, width, 12.0));
        s.push_str(&format!(
            "<text x=\"{x_start:.1}\" y=\"{ty:.1}\" fill=\"#1d2430\">{}</text>",
            escape(&d.label)
        ));
    }
    s.push_str("</svg>");
    format!("<figure>{s}</figure>")
}

/// Where a point's label goes: right of the point, else left, else a row lower or higher,
/// avoiding `placed` boxes and staying inside the plot. Returns (x start, baseline, width).
fn place_label(
    f: &Frame,
    px: f64,
    py: f64,
    label: &str,
    placed: &[(f64, f64, f64, f64)],
) -> (f64, f64, f64) {
    let width = 6.3 * label.chars().count() as f64;
    let (top, bottom) = (f.top + 10.0, f.h - f.bottom - 2.0);
    let fits = |x: f64, ty: f64| {
        x >= 2.0
            && x + width <= f.w - 2.0
            && ty >= top
            && ty <= bottom
            && !placed.iter().any(|&(a, b, w, h)| {
                x < a + w && a < x + width && ty - 10.0 < b + h && b < ty + 2.0
            })
    };
    let sides = [px + 8.0, px - 8.0 - width];
    for k in 0..10 {
        let shift = 13.0 * ((k + 1) / 2) as f64 * if k % 2 == 0 { 1.0 } else { -1.0 };
        for &x in &sides {
            if fits(x, py + 4.0 + shift) {
                return (x, py + 4.0 + shift, width);
            }
        }
    }
    let x = if sides[0] + width <= f.w - 2.0 {
        sides[0]
    } else {
        sides[1].max(2.0)
    };
    (x, (py + 4.0).clamp(top, bottom), width)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chart::{tick_label, ticks};
    use mtkd_records::record::TeacherSummary;

    pub(crate) fn record(epoch: usize, weights: Vec<f64>) -> EpochRecord {
        EpochRecord {
            epoch,
            lr: 0.05,
            train_loss: 2.0 / epoch as f64,
            train_ce: 1.0 / epoch as f64,
            train_kd: 0.5,
            train_feature: 0.1,
            train_metric: 60.0 + epoch as f64,
            test_loss: 0.8,
            test: mtkd_records::record::MetricReport {
                primary: "top1".into(),
                value: 70.0 + epoch as f64,
                scalars: [
                    ("top1".to_owned(), 70.0 + epoch as f64),
                    ("top5".to_owned(), 99.0),
                ]
                .into_iter()
                .collect(),
                per_class: Vec::new(),
            },
            teacher_weights: weights,
            strategy_metrics: BTreeMap::new(),
            skipped_batches: 0,
            seconds: 10.0,
            teacher_seconds: 4.0,
            data_parallel: None,
            teacher_feature_weights: Vec::new(),
            class_weights: Vec::new(),
            class_feature_weights: Vec::new(),
            class_credit: Vec::new(),
            pruned: Vec::new(),
            cached_batches: None,
            active_teachers: None,
        }
    }

    fn summary(strategy: &str, teachers: &[&str]) -> Summary {
        Summary {
            run: "runs/x".into(),
            strategy: strategy.into(),
            student: "cnn-small".into(),
            student_parameters: 56554,
            seed: 0,
            metric: "top1".into(),
            final_value: 72.0,
            best_value: 72.5,
            best_epoch: 1,
            final_report: mtkd_records::record::MetricReport {
                primary: "top1".into(),
                value: 80.0,
                scalars: Default::default(),
                per_class: (0..10).map(|c| 50.0 + c as f64).collect(),
            },
            best_report: mtkd_records::record::MetricReport {
                primary: "top1".into(),
                value: 80.0,
                scalars: Default::default(),
                per_class: Vec::new(),
            },
            labelled: None,
            epochs: 2,
            wall_seconds: 125.0,
            teachers: teachers
                .iter()
                .enumerate()
                .map(|(i, n)| TeacherSummary {
                    name: (*n).into(),
                    source: format!("mtkd resnet14 (t{i})"),
                    test_value: Some(40.0 + 5.0 * i as f64),
                })
                .collect(),
            mtkd_version: "0.1.0".into(),
            device: "Cpu".into(),
            peak_rss_mb: Some(600.0),
            init: None,
        }
    }

    const CONFIG: &str = "[data]\nclass_names = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \
        \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]\n\
        [distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n[distill.agent]\nmode = \"meta\"\n";

    /// Three teachers, two epochs, per-class weights, a pruning event after epoch 1.
    pub(crate) fn inputs() -> ReportInputs {
        let mut e1 = record(1, vec![0.5, 0.3, 0.2]);
        e1.pruned = vec!["weak".into()];
        e1.strategy_metrics.insert("agent_loss".into(), 0.123456);
        e1.strategy_metrics.insert("agent_updates".into(), 157.0);
        let mut e2 = record(2, vec![0.6, 0.4, 0.0]);
        e2.active_teachers = Some(vec!["tops".into(), "shoes-bags".into()]);
        e2.strategy_metrics.insert("agent_loss".into(), f64::NAN);
        e2.class_weights = (0..10)
            .map(|c| {
                if c == 4 {
                    vec![0.75, 0.25, 0.0]
                } else {
                    vec![0.1, 0.9, 0.0]
                }
            })
            .collect();
        e2.teacher_feature_weights = vec![0.3, 0.7, 0.0];
        ReportInputs {
            dir_name: "mtkd-rl-meta-seed1".into(),
            metrics: vec![e1, e2],
            summary: summary("mtkd-rl-meta", &["tops", "shoes-bags", "weak"]),
            config_text: Some(CONFIG.into()),
            audit: None,
            runs: Vec::new(),
        }
    }

    /// The `<tr>` of the class table whose header cell is `class`.
    fn row<'h>(html: &'h str, class: &str) -> &'h str {
        let start = html
            .find(&format!("<tr><th>{class}</th>"))
            .unwrap_or_else(|| panic!("no row for {class}"));
        let end = start + html[start..].find("</tr>").unwrap();
        &html[start..end]
    }

    #[test]
    fn report_class_names_and_values_in_their_rows() {
        let html = render(&inputs());
        for name in ["T-shirt/top", "Trouser", "Ankle boot"] {
            assert!(html.contains(&format!("<th>{name}</th>")), "{name} missing");
        }
        let coat = row(&html, "Coat");
        assert!(coat.contains(">0.75<"), "{coat}");
        assert!(coat.contains(">0.25<"), "{coat}");
        assert!(
            coat.contains(">54.0<"),
            "student accuracy of class 4: {coat}"
        );
        assert!(
            coat.contains(">pruned<"),
            "weak left the pool after epoch 1: {coat}"
        );
        assert!(!row(&html, "Dress").contains("0.75"));
        // Fixed colour scale: 0.9 is dark with white text, 0.1 light with dark text.
        assert!(row(&html, "Dress").contains("color:#ffffff\">0.90<"));
        assert!(row(&html, "Dress").contains("color:#111111\">0.10<"));
    }

    #[test]
    fn report_has_legends_colour_bar_and_mode() {
        let html = render(&inputs());
        assert!(html.contains("class=\"legend\""));
        let legend_start = html.find("class=\"legend\"").unwrap();
        let legend =
            &html[legend_start..legend_start + html[legend_start..].find("</div>").unwrap()];
        for t in ["tops", "shoes-bags", "weak"] {
            assert!(legend.contains(t), "{t} not in the legend: {legend}");
        }
        assert!(html.contains("aria-label=\"colour scale 0 to 1\""));
        for v in ["0.25", "0.5", "0.75"] {
            assert!(html.contains(&format!(">{v}</text>")));
        }
        assert!(html.contains("mtkd-rl-meta (agent mode: meta)"));
        assert!(html.contains("Feature weights"));
        assert!(html.contains("agent_<wbr>loss"));
        assert!(html.contains(">0.1235<"), "4 significant digits");
        assert!(html.contains(">157<"));
        assert!(html.contains(">n/a<"), "NaN shown as n/a");
        assert!(!html.contains("NaN"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn report_shows_where_the_credit_points_when_the_run_records_it() {
        let mut inp = inputs();
        assert!(!render(&inp).contains("Where the agent's credit points"));
        inp.metrics[1].class_credit = vec![vec![0.125, 0.75, 0.125]; 10];
        inp.metrics[1].class_credit[3] = vec![f64::NAN; 3];
        let html = render(&inp);
        let at = html
            .find("<h3>Where the agent's credit points (epoch 2)</h3>")
            .expect("the credit table");
        let table = &html[at..at + html[at..].find("</table>").unwrap()];
        assert!(
            table.contains(">0.75<") && table.contains(">0.12<"),
            "{table}"
        );
        assert!(table.contains(">n/a<"), "a class without pixels: {table}");
    }

    #[test]
    fn report_hides_feature_weights_of_a_run_without_a_feature_term() {
        let mut inp = inputs();
        inp.metrics[1].class_feature_weights = vec![vec![0.2, 0.8, 0.0]; 10];
        let with = render(&inp);
        assert!(with.contains("<h3>Feature weights"));
        assert!(with.contains("feature weight, last epoch"));
        assert!(!with.contains("no feature term"));
        inp.config_text = Some(CONFIG.replace("feature_weight = 1.0", "feature_weight = 0.0"));
        let without = render(&inp);
        // A [distill] table without the key: its default, 0.
        inp.config_text = Some(CONFIG.replace("feature_weight = 1.0\n", ""));
        assert!(!render(&inp).contains("<h3>Feature weights"));
        assert!(!without.contains("<h3>Feature weights"));
        assert!(!without.contains("feature weight, last epoch"));
        assert!(without.contains("no feature term (distill.feature_weight = 0)"));
        assert!(
            without.contains("<h3>Logit weights"),
            "the logit weights stay"
        );
    }

    #[test]
    fn report_shows_pruning_events() {
        let html = render(&inputs());
        assert!(html.contains("pruned: weak"), "chart marker");
        assert!(html.contains("after epoch 1: <b>weak</b> left the pool"));
        assert!(html.contains("left after epoch 1"));
        let mut no_prune = inputs();
        no_prune.metrics[0].pruned.clear();
        assert!(render(&no_prune).contains("No teacher left the pool."));
    }

    #[test]
    fn report_says_a_run_was_data_parallel() {
        let mut inp = inputs();
        assert!(!render(&inp).contains("data-parallel"));
        for r in &mut inp.metrics {
            r.data_parallel = Some(mtkd_records::record::DataParallel {
                ranks: 2,
                allreduce_seconds: 0.5,
            });
        }
        let html = render(&inp);
        assert!(html.contains("Trained data-parallel on 2 ranks"), "note");
        assert!(html.contains("× 2 ranks"), "device card");
    }

    #[test]
    fn report_escapes_teacher_names() {
        let mut inp = inputs();
        inp.summary.teachers[0].name = "<b>a&b</b>\"'".into();
        let html = render(&inp);
        assert!(html.contains("&lt;b&gt;a&amp;b&lt;/b&gt;&quot;&#39;"));
        assert!(!html.contains("<b>a&b</b>"));
    }

    #[test]
    fn report_without_teachers_has_no_weight_sections() {
        let mut inp = inputs();
        inp.summary = summary("no-kd", &[]);
        for r in &mut inp.metrics {
            r.teacher_weights.clear();
            r.class_weights.clear();
            r.teacher_feature_weights.clear();
            r.pruned.clear();
            r.active_teachers = None;
        }
        inp.metrics.truncate(1);
        let html = render(&inp);
        assert!(html.contains("distils from no teacher"));
        assert!(!html.contains("Teacher weights per epoch"));
        assert!(!html.contains("Weights per class"));
        assert!(!html.contains("Where the teachers disagree"));
        assert!(
            html.contains("<tr><th>Coat</th>"),
            "per-class accuracy stays"
        );
        assert!(html.contains("Training curves"));
    }

    #[test]
    fn report_audit_cards_and_parity_label() {
        let mut inp = inputs();
        inp.summary.strategy = "mtkd-rl-parity".into();
        inp.metrics[0].teacher_weights = vec![1.0, 1.0, 1.0];
        let t = |p, w| {
            Some(AuditTeacher {
                predicted: p,
                prob_true: 0.5,
                logit_weight: w,
                feature_weight: 0.2,
            })
        };
        inp.audit = Some(Audit {
            teachers: vec!["tops".into(), "shoes-bags".into(), "weak".into()],
            class_names: Vec::new(),
            epoch: 2,
            measure: "mean pairwise total variation".into(),
            samples: vec![AuditSample {
                index: 17,
                label: 4,
                image_png_base64: "iVBORw0KGgo=".into(),
                disagreement: 0.8765,
                teachers: vec![t(4, 0.7), t(6, 0.3), None],
            }],
            overlays_png_base64: None,
        });
        let html = render(&inp);
        assert!(!html.contains("class=\"audit-overlays\""));
        assert!(html.contains("epoch 1: all-ones warm-up, weights sum to M = 3"));
        assert!(html.contains("src=\"data:image/png;base64,iVBORw0KGgo=\""));
        assert!(html.contains("true class: <b>Coat</b>"));
        assert!(html.contains("<td class=\"cls bad\">Shirt</td>"));
        assert!(html.contains("<td colspan=\"4\" class=\"muted\">pruned</td>"));
        assert!(html.contains("width:70%"));
        assert!(html.contains("<th>feature weight</th>") && html.contains(">0.20</td>"));
        // Without a feature term the cards have no feature-weight column.
        let mut plain = inp.clone();
        plain.config_text = Some(CONFIG.replace("feature_weight = 1.0", "feature_weight = 0.0"));
        let page = render(&plain);
        assert!(page.contains("true class: <b>Coat</b>"));
        assert!(!page.contains("<th>feature weight</th>") && !page.contains(">0.20</td>"));
        assert!(page.contains("<td colspan=\"3\" class=\"muted\">pruned</td>"));
        // A dense run's picture of the samples (truth, student, teachers) comes first.
        if let Some(a) = &mut inp.audit {
            a.overlays_png_base64 = Some("iVBORw0KGgoAAA=".into());
        }
        let html = render(&inp);
        assert!(html.contains(
            "class=\"audit-overlays\" alt=\"truth, student and teachers on the most \
             disagreed-on training images\" src=\"data:image/png;base64,iVBORw0KGgoAAA=\""
        ));
        inp.audit = None;
        assert!(render(&inp).contains("This run has no audit.json"));
    }

    #[test]
    fn report_comparison_groups_seeds() {
        let mut inp = inputs();
        let run = |dir: &str, strategy: &str, v: f64| {
            let mut s = summary(strategy, &[]);
            s.final_value = v;
            s.best_value = v + 1.0;
            SiblingRun {
                dir_name: dir.into(),
                summary: s,
            }
        };
        inp.runs = vec![
            run("equal-aver-seed0", "equal", 70.0),
            run("equal-aver-seed1", "equal", 72.0),
            run("mtkd-rl-meta-seed1", "mtkd-rl-meta", 75.0),
            run("no-kd-seed0", "no-kd", 68.0),
        ];
        let html = render(&inp);
        assert!(html.contains("Comparison with the other runs"));
        assert!(
            html.contains("71.00 &plusmn; 1.41"),
            "mean ± sample std of 70, 72"
        );
        assert!(html.contains("<tr class=\"current\"><td>mtkd-rl-meta (this run)</td>"));
        let single = render(&inputs());
        assert!(!single.contains("Comparison with the other runs"));
    }

    #[test]
    fn report_helpers() {
        assert_eq!(strip_seed("equal-aver-seed12"), "equal-aver");
        assert_eq!(strip_seed("meta-cur-t1"), "meta-cur-t1");
        assert_eq!(sig4(0.000123456), "1.235e-4");
        assert_eq!(sig4(12.34567), "12.35");
        assert_eq!(sig4(f64::INFINITY), "n/a");
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(ticks(0.0, 1.0, 0.25).len(), 5);
        assert_eq!(scale_colour(0.0).0, "#ffffff");
        assert_eq!(scale_colour(2.0).0, "#08306b");
        assert_eq!(escape("a<'&'>\""), "a&lt;&#39;&amp;&#39;&gt;&quot;");
    }

    /// Renders a real run folder: `MTKD_REPORT_RUN=runs/x cargo test ... report -- --ignored`.
    #[test]
    #[ignore]
    fn report_write_real_run() {
        let dir = std::env::var("MTKD_REPORT_RUN").expect("set MTKD_REPORT_RUN to a run folder");
        let mut dir = PathBuf::from(dir);
        if dir.is_relative() && !dir.exists() {
            // `cargo test` runs in the crate folder: read the path from the workspace root.
            dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(dir);
        }
        let path = write_report(&dir).unwrap();
        assert!(path.is_file());
    }
}
