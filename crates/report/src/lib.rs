//! mtkd-report: the views of a run's records. [`html`] writes a run folder's self-contained
//! audit page (`report.html`), [`plot`] its PNG plots (accuracy curves, teacher weights,
//! segmentation overlays, detection boxes, per-class bars), [`bench`](mod@bench) the performance
//! report's markdown (`docs/PERF.md`) from the raw timings. The curves are one model, [`chart`]:
//! each chart is built and placed once from the records, then drawn as SVG on the page and as a
//! PNG. It reads records and writes files; it never trains or runs a model, and builds without
//! libtorch.

pub mod bench;
pub mod chart;
pub mod html;
pub mod plot;
