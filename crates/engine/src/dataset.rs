//! Turning the `[data]` section into loaded train and test sets and their loaders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::DataConfig;
use crate::record::LabelledCount;
use mtkd_vision_tasks::data::{ImageSet, Split};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};

pub use mtkd_vision_tasks::source::resolve_root;

/// The train and test sets of a config.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Arc<ImageSet>,
    pub test: Arc<ImageSet>,
    pub root: PathBuf,
    /// COCO data read whole: the COCO ids of the test images (in set order) and of the
    /// categories (in class order), for result files. `None`: ids are index + 1.
    pub test_coco_ids: Option<(Vec<u64>, Vec<u64>)>,
    /// With unlabelled samples: how many the training set holds and how many are labelled.
    pub labelled: Option<LabelledCount>,
}

impl Datasets {
    /// One split of a config's dataset, its subset taken and its class names set (what
    /// `mtkd eval` reads without the other split).
    pub fn load_split(cfg: &DataConfig, split: Split) -> Result<ImageSet> {
        let root = resolve_root(&cfg.root);
        let hint = if cfg.kind.reads_mnist_files() && cfg.root == Path::new("fashion-mnist") {
            "; run `cargo xtask data` to fetch Fashion-MNIST (Debian package dataset-fashion-mnist)"
        } else {
            ""
        };
        let which = match split {
            Split::Train => "training",
            Split::Test => "test",
        };
        let set = cfg
            .source(&root)
            .read_split(split)
            .with_context(|| format!("loading the {which} split of {}{hint}", root.display()))?;
        // Subsets are seeded and stratified by class (the same for every run seed, so the runs
        // of a comparison see the same images); `subset = "first"` keeps the first N.
        let (n, seed) = match split {
            Split::Train => (cfg.train_subset, 0x7261_696e),
            Split::Test => (cfg.test_subset, 0x7465_7374),
        };
        let mut set = match cfg.subset {
            _ if n == 0 => set,
            crate::config::SubsetKind::First => set.take(n),
            crate::config::SubsetKind::Stratified => set.stratified(n, seed),
        };
        if let Some(k) = cfg.num_classes.filter(|&k| k != set.num_classes) {
            anyhow::bail!(
                "data.num_classes = {k}, but the {which} split of {} has {} classes (the format \
                 says how many); remove data.num_classes or correct it",
                root.display(),
                set.num_classes
            );
        }
        if !cfg.class_names.is_empty() {
            if cfg.class_names.len() != set.num_classes {
                anyhow::bail!(
                    "data.class_names has {} names, but dataset {} has {} classes",
                    cfg.class_names.len(),
                    root.display(),
                    set.num_classes
                );
            }
            set.class_names = cfg.class_names.clone();
        }
        Ok(set)
    }

    /// The train and test sets of a config, the training set with its unlabelled part
    /// (`labels`, `unlabelled`, `labelled_share`), its counts logged.
    pub fn load(cfg: &DataConfig) -> Result<Datasets> {
        let root = resolve_root(&cfg.root);
        let (train, labelled) = with_unlabelled(cfg, Self::load_split(cfg, Split::Train)?)?;
        let test = Self::load_split(cfg, Split::Test)?;
        if train.image_shape() != test.image_shape() || train.num_classes != test.num_classes {
            anyhow::bail!(
                "dataset {}: train images {:?} ({} classes) and test images {:?} ({} classes) disagree",
                root.display(),
                train.image_shape(),
                train.num_classes,
                test.image_shape(),
                test.num_classes
            );
        }
        tracing::info!(root = %root.display(), train = train.len(), test = test.len(),
            shape = ?train.image_shape(), classes = train.num_classes, "dataset loaded");
        let test_coco_ids = coco_ids_of(cfg, Split::Test)?;
        Ok(Datasets {
            train: Arc::new(train),
            test: Arc::new(test),
            root,
            test_coco_ids,
            labelled,
        })
    }

    /// The training set without its unlabelled samples, the labelled ones repeated (each copy
    /// augmented on its own) to the length of the whole set: what a run that does not distil
    /// trains on, so that it takes as many steps as a distilling run of the same config.
    pub fn labelled_only(mut self) -> Datasets {
        let set = &self.train;
        if set.labelled.is_none() {
            return self;
        }
        let keep: Vec<usize> = (0..set.len()).filter(|&i| set.is_labelled(i)).collect();
        let idx: Vec<usize> = keep.iter().copied().cycle().take(set.len()).collect();
        let mut only = set.select(&idx);
        only.labelled = None;
        self.labelled = self.labelled.map(|c| LabelledCount {
            samples: only.len(),
            labelled: only.len(),
            distinct_labelled: c.distinct_labelled,
        });
        tracing::info!(
            labelled = keep.len(),
            samples = only.len(),
            "no distillation: the unlabelled samples are dropped, the labelled ones repeated"
        );
        self.train = Arc::new(only);
        self
    }

    /// Input `(C, H, W)` of the networks (after the training transforms).
    /// Fails when the transforms do not fit the images (e.g. three normalisation means for grey
    /// images).
    pub fn input_shape(&self, cfg: &DataConfig) -> Result<(i64, i64, i64)> {
        let (c, h, w) = self.train_loader(cfg, 1, 0)?.output_shape();
        Ok((c as i64, h as i64, w as i64))
    }

    pub fn num_classes(&self) -> i64 {
        self.train.num_classes as i64
    }

    pub fn train_loader(
        &self,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
    ) -> Result<BatchLoader> {
        BatchLoader::new(
            Arc::clone(&self.train),
            LoaderConfig {
                batch_size,
                shuffle: true,
                drop_last: false,
                augment: Some(cfg.augment.clone()),
                eval_resize: None,
                normalize: cfg.normalize.clone(),
                seed,
            },
        )
        .context("data.normalize / data.augment")
    }

    pub fn test_loader(&self, cfg: &DataConfig, batch_size: usize) -> Result<BatchLoader> {
        self.eval_loader(cfg, Arc::clone(&self.test), batch_size)
    }

    /// Batches of `set` in order, prepared as the test split is (no augmentation).
    pub fn eval_loader(
        &self,
        cfg: &DataConfig,
        set: Arc<ImageSet>,
        batch_size: usize,
    ) -> Result<BatchLoader> {
        BatchLoader::new(
            set,
            LoaderConfig {
                batch_size,
                shuffle: false,
                drop_last: false,
                augment: None,
                eval_resize: cfg.eval_resize.clone(),
                normalize: cfg.normalize.clone(),
                seed: 0,
            },
        )
        .context("data.normalize")
    }
}

/// `set` with the unlabelled part of `cfg`: all but `labels`' share of its labels hidden, the
/// images of `unlabelled` appended, the labelled samples repeated to `labelled_share` (default
/// [`crate::config::DEFAULT_LABELLED_SHARE`]).
fn with_unlabelled(
    cfg: &DataConfig,
    mut set: ImageSet,
) -> Result<(ImageSet, Option<LabelledCount>)> {
    if let Some(l) = &cfg.labels {
        let n = match (l.fraction, l.keep) {
            (Some(f), _) => ((f * set.len() as f64).round() as usize).max(1),
            (None, Some(k)) if k > set.len() => anyhow::bail!(
                "data.labels.keep = {k}, but the training set has {} samples",
                set.len()
            ),
            (None, Some(k)) => k,
            (None, None) => anyhow::bail!("data.labels needs fraction or keep"),
        };
        let keep = mtkd_vision_tasks::data::stratified_indices(
            &set.labels,
            set.num_classes,
            n,
            0x6c61_6265 ^ l.seed,
        );
        set = set.hide_labels(&keep);
    }
    if let Some(u) = &cfg.unlabelled {
        let dir = resolve_root(&u.root);
        let (c, h, w) = set.image_shape();
        // Formats that resize their images resize these too; the others need their size.
        let size = match cfg.kind {
            crate::config::DatasetKind::ImageFolder | crate::config::DatasetKind::Coco => {
                cfg.source(&dir).geometry().0
            }
            _ => 0,
        };
        let images = mtkd_vision_tasks::data::read_unlabelled_folder(&dir, size, c, (h, w))
            .with_context(|| format!("data.unlabelled: reading {}", dir.display()))?;
        set = set
            .with_unlabelled(&images)
            .with_context(|| format!("data.unlabelled: {}", dir.display()))?;
    }
    let distinct_labelled = set.labelled_count();
    let share = cfg
        .labelled_share
        .unwrap_or(crate::config::DEFAULT_LABELLED_SHARE);
    if share > 0.0 {
        let labelled: Vec<usize> = (0..set.len()).filter(|&i| set.is_labelled(i)).collect();
        let (nl, nu) = (labelled.len(), set.len() - labelled.len());
        if nl > 0 && nu > 0 {
            let copies = ((share * nu as f64) / ((1.0 - share) * nl as f64))
                .ceil()
                .max(1.0) as usize;
            let mut idx: Vec<usize> = (0..set.len()).collect();
            for _ in 1..copies {
                idx.extend_from_slice(&labelled);
            }
            set = set.select(&idx);
        }
    }
    let count = set.labelled.is_some().then(|| LabelledCount {
        samples: set.len(),
        labelled: set.labelled_count(),
        distinct_labelled,
    });
    if let Some(c) = &count {
        tracing::info!(
            samples = c.samples,
            labelled = c.labelled,
            distinct_labelled = c.distinct_labelled,
            "training set with unlabelled samples"
        );
    }
    Ok((set, count))
}

/// The COCO ids of a split's images (in set order) and of the categories (in class order),
/// for result files: `Some` for COCO data read whole, `None` when ids are index + 1 (a subset,
/// or data that is not a COCO folder of the user's).
pub fn coco_ids_of(cfg: &DataConfig, split: Split) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
    let subset = match split {
        Split::Train => cfg.train_subset,
        Split::Test => cfg.test_subset,
    };
    if subset != 0 {
        return Ok(None);
    }
    let root = resolve_root(&cfg.root);
    Ok(cfg.source(&root).coco_ids(split)?)
}
