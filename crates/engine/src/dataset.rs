//! Turning the `[data]` section into loaded train and test sets and their loaders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::{DataConfig, DatasetKind};
use mtkd_vision_tasks::data::{self, ImageSet, Split};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};

/// Resolve a dataset root: absolute as given; relative under `$MTKD_DATA_DIR` when it exists
/// there, else relative to the working directory.
pub fn resolve_root(root: &Path) -> PathBuf {
    if root.is_absolute() {
        return root.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("MTKD_DATA_DIR") {
        let cand = PathBuf::from(dir).join(root);
        if cand.exists() {
            return cand;
        }
    }
    root.to_path_buf()
}

/// `root/train`, or for the test split `root/val` (or `root/test`).
fn split_dir(root: &Path, split: Split) -> PathBuf {
    match split {
        Split::Train => root.join("train"),
        Split::Test => ["val", "test"]
            .iter()
            .map(|s| root.join(s))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| root.join("val")),
    }
}

/// The train and test sets of a config.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Arc<ImageSet>,
    pub test: Arc<ImageSet>,
    pub root: PathBuf,
    /// COCO data read whole: the COCO ids of the test images (in set order) and of the
    /// categories (in class order), for result files. `None`: ids are index + 1.
    pub test_coco_ids: Option<(Vec<u64>, Vec<u64>)>,
}

impl Datasets {
    /// One split of a config's dataset, its subset taken and its class names set (what
    /// `mtkd eval` reads without the other split).
    pub fn load_split(cfg: &DataConfig, split: Split) -> Result<ImageSet> {
        let root = resolve_root(&cfg.root);
        let hint = match cfg.kind {
            DatasetKind::Mnist | DatasetKind::SyntheticScenes | DatasetKind::SyntheticDetection
                if cfg.root == Path::new("fashion-mnist") =>
            {
                "; run `cargo xtask data` to fetch Fashion-MNIST (Debian package dataset-fashion-mnist)"
            }
            _ => "",
        };
        let read = || -> Result<ImageSet> {
            let set = match cfg.kind {
                DatasetKind::Mnist => {
                    data::read_idx_dir(&root, split, cfg.num_classes.unwrap_or(10))?
                }
                DatasetKind::Cifar10 => data::read_cifar_dir(&root, split, false)?,
                DatasetKind::Cifar100 => data::read_cifar_dir(&root, split, true)?,
                DatasetKind::ImageFolder => {
                    let sub = split_dir(&root, split);
                    data::read_image_folder(
                        &sub,
                        cfg.image_size.unwrap_or(32),
                        cfg.channels.unwrap_or(3),
                    )?
                }
                DatasetKind::SegmentationFolder => {
                    let sub = split_dir(&root, split);
                    let k = cfg.num_classes.unwrap_or(cfg.class_names.len());
                    mtkd_vision_tasks::segmentation::data::read_seg_folder(
                        &sub,
                        k,
                        cfg.channels.unwrap_or(3),
                    )?
                }
                DatasetKind::SyntheticScenes => {
                    let sc = cfg
                        .scenes
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("data.scenes is missing"))?;
                    let source = data::read_mnist_dir(&root, split)?;
                    let (n, seed) = match split {
                        Split::Train => (sc.train, sc.seed.wrapping_mul(2)),
                        Split::Test => (sc.test, sc.seed.wrapping_mul(2).wrapping_add(1)),
                    };
                    mtkd_vision_tasks::segmentation::synthetic::generate(&source, n, sc, seed)?
                }
                DatasetKind::Coco => {
                    let name = coco_split(&root, split);
                    read_coco(cfg, &root, name)?
                }
                DatasetKind::SyntheticDetection => scenes_coco(cfg, &root, split)?,
            };
            Ok(set)
        };
        let which = match split {
            Split::Train => "training",
            Split::Test => "test",
        };
        let set = read()
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

    /// A COCO split read for a config (`image_size`, `channels`), its counts logged.
    pub fn load(cfg: &DataConfig) -> Result<Datasets> {
        let root = resolve_root(&cfg.root);
        let train = Self::load_split(cfg, Split::Train)?;
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
        })
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
        BatchLoader::new(
            Arc::clone(&self.test),
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

/// The COCO split name of `split`: `train`, or for the test split `val` (or `test`).
fn coco_split(root: &Path, split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => ["val", "test"]
            .into_iter()
            .find(|s| mtkd_vision_tasks::detection::coco::annotation_path(root, s).is_file())
            .unwrap_or("val"),
    }
}

fn read_coco(cfg: &DataConfig, root: &Path, split: &str) -> Result<ImageSet> {
    let c = mtkd_vision_tasks::detection::coco::read_coco(
        root,
        split,
        cfg.channels.unwrap_or(3),
        cfg.image_size.map(|s| s as usize),
    )?;
    let r = &c.report;
    tracing::info!(
        split,
        images = r.images,
        boxes = r.boxes,
        negatives = r.negatives,
        clipped = r.clipped,
        degenerate = r.degenerate,
        crowd = r.crowd,
        "COCO split read"
    );
    Ok(c.set)
}

/// The synthetic detection scenes of a split, as a COCO folder under
/// `$MTKD_DATA_DIR/scenes-coco/<hash of the scene settings and split>/` (written on first use,
/// then read like any COCO data).
fn scenes_coco(cfg: &DataConfig, root: &Path, split: Split) -> Result<ImageSet> {
    let sc = cfg
        .scenes
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("data.scenes is missing"))?;
    let (n, seed, name) = match split {
        Split::Train => (sc.train, sc.seed.wrapping_mul(2), "train"),
        Split::Test => (sc.test, sc.seed.wrapping_mul(2).wrapping_add(1), "val"),
    };
    let key = serde_json::to_string(&(sc, name, "mtkd scenes-coco v1"))?;
    let base = std::env::var_os("MTKD_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("runs"));
    let dir = base
        .join("scenes-coco")
        .join(crate::config::stable_hash(key.as_bytes()));
    let ann = mtkd_vision_tasks::detection::coco::annotation_path(&dir, name);
    if !ann.is_file() {
        let source = data::read_mnist_dir(root, split)?;
        let (set, dropped) =
            mtkd_vision_tasks::segmentation::synthetic::generate_detection(&source, n, sc, seed)?;
        tracing::info!(dir = %dir.display(), split = name, scenes = n, dropped,
            "writing the synthetic detection scenes as COCO");
        mtkd_vision_tasks::detection::coco::write_coco(&dir, name, &set)
            .with_context(|| format!("writing the synthetic scenes to {}", dir.display()))?;
    }
    let set = read_coco(
        &DataConfig {
            channels: Some(1),
            image_size: None,
            ..cfg.clone()
        },
        &dir,
        name,
    )?;
    Ok(set)
}

/// The image ids (file order, as the reader keeps them) and category ids (sorted by id, the
/// reader's class order) of a COCO split.
/// The COCO ids of a split's images (in set order) and of the categories (in class order),
/// for result files: `Some` for COCO data read whole, `None` when ids are index + 1 (a subset,
/// or data that is not a COCO folder of the user's).
pub fn coco_ids_of(cfg: &DataConfig, split: Split) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
    let subset = match split {
        Split::Train => cfg.train_subset,
        Split::Test => cfg.test_subset,
    };
    if cfg.kind != DatasetKind::Coco || subset != 0 {
        return Ok(None);
    }
    let root = resolve_root(&cfg.root);
    Ok(Some(coco_ids(&root, coco_split(&root, split))?))
}

fn coco_ids(root: &Path, split: &str) -> Result<(Vec<u64>, Vec<u64>)> {
    let c = mtkd_vision_tasks::detection::coco::read_coco_ids(root, split)?;
    Ok(c)
}
