//! Training-set edits that make the teachers of a hard pool (docs/METHOD.md section 12): a class
//! subset (specialists), symmetric label noise, class-pair flips and a label permutation. Every
//! edit is a pure function of its arguments and a seed, so a cached teacher is reproducible.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::ImageSet;
use crate::error::{Error, Result};

/// How a teacher's training set differs from the run's (all optional; applied in field order:
/// class subset, data subset, then the label edits).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelEdits {
    /// Keep only samples whose (true) label is one of these classes.
    pub classes: Option<Vec<usize>>,
    /// Then keep only the first N samples (0 or `None`: all).
    pub subset: Option<usize>,
    /// Swap labels `a` and `b` for every pair.
    pub flip_pairs: Vec<[usize; 2]>,
    /// Map every label through a seeded permutation without fixed points.
    pub permute: bool,
    /// Replace this fraction of labels by a uniformly drawn class (which may equal the true one).
    pub noise: f64,
}

/// What [`apply`] did, for the log and the cache folder's record.
#[derive(Debug, Clone, PartialEq)]
pub struct EditReport {
    pub samples: usize,
    /// Samples whose label differs from the true one after the edits.
    pub changed: usize,
    /// The permutation used (`perm[y]` is the new label of class y), when `permute` is set.
    pub permutation: Option<Vec<usize>>,
}

fn invalid(what: &str, reason: String) -> Error {
    Error::Invalid {
        what: what.into(),
        reason,
    }
}

impl LabelEdits {
    /// Whether the training set is the run's own.
    pub fn is_identity(&self) -> bool {
        self.classes.is_none()
            && self.subset.unwrap_or(0) == 0
            && self.flip_pairs.is_empty()
            && !self.permute
            && self.noise == 0.0
    }

    /// Checks against the number of classes `k`; `Err` names the field.
    pub fn check(&self, k: usize) -> std::result::Result<(), (&'static str, String)> {
        if let Some(c) = &self.classes {
            if c.is_empty() {
                return Err(("classes", "must name at least one class".into()));
            }
            if let Some(bad) = c.iter().find(|&&c| c >= k) {
                return Err(("classes", format!("class {bad} outside 0..{k}")));
            }
        }
        crate::data::check_pairs(&self.flip_pairs, k).map_err(|r| ("flip_pairs", r))?;
        if !(0.0..=1.0).contains(&self.noise) {
            return Err((
                "label_noise",
                format!("must be in [0, 1], got {}", self.noise),
            ));
        }
        if self.permute && k < 2 {
            return Err(("permute_labels", "needs at least two classes".into()));
        }
        Ok(())
    }
}

/// A permutation of `0..k` without fixed points, drawn from `seed` (rejection sampling).
pub fn derangement(k: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0000_5eed_0f1a_be11);
    let mut p: Vec<usize> = (0..k).collect();
    loop {
        p.shuffle(&mut rng);
        if p.iter().enumerate().all(|(i, &v)| i != v) {
            return p;
        }
    }
}

/// The training set of a teacher: `set` with `edits` applied (labels of the returned set are
/// the edited ones). `seed` fixes the noise and the permutation.
pub fn apply(set: &ImageSet, edits: &LabelEdits, seed: u64) -> Result<(ImageSet, EditReport)> {
    let k = set.num_classes;
    edits
        .check(k)
        .map_err(|(f, r)| invalid(&format!("teacher training data: {f}"), r))?;
    let mut keep: Vec<usize> = match &edits.classes {
        Some(c) => (0..set.len())
            .filter(|&i| c.contains(&(set.labels[i] as usize)))
            .collect(),
        None => (0..set.len()).collect(),
    };
    if let Some(n) = edits.subset.filter(|&n| n > 0) {
        // Seeded and stratified over the kept samples' classes.
        let kept_labels: Vec<i64> = keep.iter().map(|&i| set.labels[i]).collect();
        keep = crate::data::stratified_indices(&kept_labels, k, n, seed ^ 0x5u64)
            .into_iter()
            .map(|j| keep[j])
            .collect();
    }
    if keep.is_empty() {
        return Err(invalid(
            "teacher training data",
            "the class subset and data subset leave no sample".into(),
        ));
    }
    let mut out = set.select(&keep);
    let truth = out.labels.clone();
    let mut map: Vec<usize> = (0..k).collect();
    for [a, b] in &edits.flip_pairs {
        map.swap(*a, *b);
    }
    let permutation = edits.permute.then(|| derangement(k, seed));
    if let Some(p) = &permutation {
        map = map.iter().map(|&y| p[y]).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0000_0000_0a01_5e5e);
    for y in out.labels.iter_mut() {
        *y = map[*y as usize] as i64;
        // One draw per sample whatever the rate, so the noisy subset grows with the rate.
        let u: f64 = rng.gen();
        let c = rng.gen_range(0..k) as i64;
        if u < edits.noise {
            *y = c;
        }
    }
    let changed = out
        .labels
        .iter()
        .zip(&truth)
        .filter(|(a, b)| a != b)
        .count();
    Ok((
        out,
        EditReport {
            samples: keep.len(),
            changed,
            permutation,
        },
    ))
}
