//! COCO-style box AP, computed as `pycocotools.cocoeval.COCOeval` (iouType `bbox`, default
//! parameters) computes it and checked against it on the fixtures of
//! `scripts/golden_detection.py`: IoU thresholds 0.50:0.05:0.95, 101 recall points, at most
//! 1, 10 and 100 detections per image, object sizes all / small (< 32^2) / medium / large
//! (> 96^2), greedy matching by score per image and category, precision made monotone and
//! sampled at the recall points, averaged over the categories with ground truth.
//!
//! Not built: crowd annotations (mtkd's reader has none; see [`super::coco`]). Object size is
//! the annotation's `area` (pycocotools does the same), the box's area for detections.

/// A ground-truth box: image, category index, `[x, y, w, h]`, area.
#[derive(Debug, Clone, PartialEq)]
pub struct GtBox {
    pub image: u64,
    pub category: usize,
    pub bbox: [f64; 4],
    pub area: f64,
}

/// A detection: image, category index, `[x, y, w, h]`, score.
#[derive(Debug, Clone, PartialEq)]
pub struct DetBox {
    pub image: u64,
    pub category: usize,
    pub bbox: [f64; 4],
    pub score: f64,
}

/// COCOeval's twelve numbers (fractions in `[0, 1]`, `-1` where no ground truth exists) and the
/// AP@[.5:.95] of every category.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoStats {
    /// AP, AP50, AP75, AP small, medium, large, AR@1, AR@10, AR@100, AR small, medium, large.
    pub stats: [f64; 12],
    /// Per category index: AP@[.5:.95] over all sizes at 100 detections (`-1` without ground
    /// truth).
    pub per_category: Vec<f64>,
}

/// numpy's `linspace(start, stop, num)` (endpoint exact), which sets COCOeval's thresholds.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

const AREAS: [[f64; 2]; 4] = [
    [0.0, 1e10],
    [0.0, 32.0 * 32.0],
    [32.0 * 32.0, 96.0 * 96.0],
    [96.0 * 96.0, 1e10],
];
const MAX_DETS: [usize; 3] = [1, 10, 100];

fn iou(d: &[f64; 4], g: &[f64; 4]) -> f64 {
    let w = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    inter / (d[2] * d[3] + g[2] * g[3] - inter)
}

/// One (image, category, area range) evaluation: per threshold, matched flags and ignore
/// flags of the (score-sorted, truncated) detections, their scores, and the count of
/// non-ignored ground truth.
struct ImgEval {
    matched: Vec<Vec<bool>>,
    ignored: Vec<Vec<bool>>,
    scores: Vec<f64>,
    npig: usize,
}

fn evaluate_img(gts: &[&GtBox], dts: &[&DetBox], area: [f64; 2], thrs: &[f64]) -> Option<ImgEval> {
    if gts.is_empty() && dts.is_empty() {
        return None;
    }
    let max_det = MAX_DETS[MAX_DETS.len() - 1];
    // Ground truth: non-ignored first (a stable sort).
    let mut g: Vec<(&GtBox, bool)> = gts
        .iter()
        .map(|g| (*g, g.area < area[0] || g.area > area[1]))
        .collect();
    g.sort_by_key(|(_, ig)| *ig);
    // Detections by decreasing score (stable), at most max_det.
    let mut d: Vec<&DetBox> = dts.to_vec();
    d.sort_by(|a, b| b.score.total_cmp(&a.score));
    d.truncate(max_det);
    let t_n = thrs.len();
    let mut gtm = vec![vec![false; g.len()]; t_n];
    let mut dtm = vec![vec![false; d.len()]; t_n];
    let mut dt_ig = vec![vec![false; d.len()]; t_n];
    let ious: Vec<Vec<f64>> = d
        .iter()
        .map(|dd| g.iter().map(|(gg, _)| iou(&dd.bbox, &gg.bbox)).collect())
        .collect();
    for (ti, &t) in thrs.iter().enumerate() {
        for (di, _) in d.iter().enumerate() {
            let mut best = t.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for (gi, (_, g_ig)) in g.iter().enumerate() {
                if gtm[ti][gi] {
                    continue;
                }
                // Stop at the ignored ground truth once a regular one is matched.
                if let Some(mm) = m {
                    if !g[mm].1 && *g_ig {
                        break;
                    }
                }
                if ious[di][gi] < best {
                    continue;
                }
                best = ious[di][gi];
                m = Some(gi);
            }
            if let Some(mm) = m {
                dt_ig[ti][di] = g[mm].1;
                dtm[ti][di] = true;
                gtm[ti][mm] = true;
            }
        }
    }
    // Unmatched detections outside the area range are ignored.
    for (di, dd) in d.iter().enumerate() {
        let a = dd.bbox[2] * dd.bbox[3];
        let out = a < area[0] || a > area[1];
        for ti in 0..t_n {
            if !dtm[ti][di] && out {
                dt_ig[ti][di] = true;
            }
        }
    }
    Some(ImgEval {
        matched: dtm,
        ignored: dt_ig,
        scores: d.iter().map(|x| x.score).collect(),
        npig: g.iter().filter(|(_, ig)| !ig).count(),
    })
}

/// Evaluate `dets` against `gts` over `num_categories` categories and the images `images`
/// (images without any box count: their detections are false positives).
pub fn evaluate(gts: &[GtBox], dets: &[DetBox], num_categories: usize) -> CocoStats {
    use std::collections::BTreeMap;
    let thrs = linspace(0.5, 0.95, 10);
    let rec_thrs = linspace(0.0, 1.0, 101);
    let mut by_key_g: BTreeMap<(usize, u64), Vec<&GtBox>> = BTreeMap::new();
    let mut by_key_d: BTreeMap<(usize, u64), Vec<&DetBox>> = BTreeMap::new();
    for g in gts {
        by_key_g.entry((g.category, g.image)).or_default().push(g);
    }
    for d in dets {
        by_key_d.entry((d.category, d.image)).or_default().push(d);
    }
    let (t_n, r_n, k_n, a_n, m_n) = (thrs.len(), rec_thrs.len(), num_categories, 4, 3);
    // precision[t][r][k][a][m], recall[t][k][a][m]; -1 = undefined.
    let idx_p = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * r_n + r) * k_n + k) * a_n + a) * m_n + m
    };
    let idx_r = |t: usize, k: usize, a: usize, m: usize| ((t * k_n + k) * a_n + a) * m_n + m;
    let mut precision = vec![-1.0; t_n * r_n * k_n * a_n * m_n];
    let mut recall = vec![-1.0; t_n * k_n * a_n * m_n];
    for k in 0..k_n {
        let images: std::collections::BTreeSet<u64> = by_key_g
            .keys()
            .chain(by_key_d.keys())
            .filter(|(c, _)| *c == k)
            .map(|(_, i)| *i)
            .collect();
        for (a, area) in AREAS.iter().enumerate() {
            let evals: Vec<ImgEval> = images
                .iter()
                .filter_map(|&i| {
                    let g = by_key_g.get(&(k, i)).map(Vec::as_slice).unwrap_or(&[]);
                    let d = by_key_d.get(&(k, i)).map(Vec::as_slice).unwrap_or(&[]);
                    evaluate_img(g, d, *area, &thrs)
                })
                .collect();
            if evals.is_empty() {
                continue;
            }
            let npig: usize = evals.iter().map(|e| e.npig).sum();
            if npig == 0 {
                continue;
            }
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // (score, image order, position) of every kept detection, sorted by score
                // (a stable sort over the concatenation, as numpy's mergesort).
                let mut all: Vec<(f64, usize, usize)> = Vec::new();
                for (e_i, e) in evals.iter().enumerate() {
                    for (p, &s) in e.scores.iter().take(max_det).enumerate() {
                        all.push((s, e_i, p));
                    }
                }
                all.sort_by(|x, y| y.0.total_cmp(&x.0));
                for t in 0..t_n {
                    let mut tp = 0.0f64;
                    let mut fp = 0.0f64;
                    let mut rc = Vec::with_capacity(all.len());
                    let mut pr = Vec::with_capacity(all.len());
                    for &(_, e_i, p) in &all {
                        let e = &evals[e_i];
                        if e.ignored[t][p] {
                            // Counted in neither; numpy keeps the cumulative value.
                        } else if e.matched[t][p] {
                            tp += 1.0;
                        } else {
                            fp += 1.0;
                        }
                        rc.push(tp / npig as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    recall[idx_r(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..pr.len()).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (ri, &r) in rec_thrs.iter().enumerate() {
                        // searchsorted(rc, r, side = "left")
                        let pi = rc.partition_point(|&x| x < r);
                        precision[idx_p(t, ri, k, a, m)] = if pi < pr.len() { pr[pi] } else { 0.0 };
                    }
                }
            }
        }
    }
    let mean = |v: Vec<f64>| {
        let ok: Vec<f64> = v.into_iter().filter(|&x| x > -1.0).collect();
        if ok.is_empty() {
            -1.0
        } else {
            ok.iter().sum::<f64>() / ok.len() as f64
        }
    };
    let ap = |t_sel: Option<usize>, a: usize, m: usize| {
        let mut v = Vec::new();
        for t in 0..t_n {
            if t_sel.is_some_and(|s| s != t) {
                continue;
            }
            for r in 0..r_n {
                for k in 0..k_n {
                    v.push(precision[idx_p(t, r, k, a, m)]);
                }
            }
        }
        mean(v)
    };
    let ar = |a: usize, m: usize| {
        let mut v = Vec::new();
        for t in 0..t_n {
            for k in 0..k_n {
                v.push(recall[idx_r(t, k, a, m)]);
            }
        }
        mean(v)
    };
    let t50 = thrs.iter().position(|&t| t == 0.5);
    let t75 = thrs.iter().position(|&t| t == 0.75);
    let stats = [
        ap(None, 0, 2),
        ap(t50, 0, 2),
        ap(t75, 0, 2),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ];
    let per_category = (0..k_n)
        .map(|k| {
            let mut v = Vec::new();
            for t in 0..t_n {
                for r in 0..r_n {
                    v.push(precision[idx_p(t, r, k, 0, 2)]);
                }
            }
            mean(v)
        })
        .collect();
    CocoStats {
        stats,
        per_category,
    }
}
