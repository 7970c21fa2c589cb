//! Where a task's images come from: the dataset formats mtkd reads ([`DatasetKind`]), the
//! task each one trains, and [`read_split`], the one place that turns a format and its options
//! into an [`ImageSet`] through the readers of [`crate::data`], [`crate::segmentation`] and
//! [`crate::detection`]. The engine's `[data]` section names a kind and its options; subsets
//! and class-name checks are the engine's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{self, ImageSet, Split};
use crate::detection::coco;
use crate::error::{Error, Result};
use crate::segmentation::synthetic::{self, SceneConfig};
use crate::task::TaskKind;

/// Dataset formats that mtkd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// MNIST layout (Fashion-MNIST, MNIST): IDX files, gzip or not.
    Mnist,
    /// CIFAR-10 binary version.
    Cifar10,
    /// CIFAR-100 binary version.
    Cifar100,
    /// `root/train/<class>/*.png|jpg` and `root/val/<class>/...` (or `test/`).
    ImageFolder,
    /// Segmentation: `root/train/{images,masks}/` and `root/val/...` (or `test/`); masks are
    /// 8-bit index PNGs, 255 = not labelled (`mtkd_vision_tasks::segmentation::data`).
    SegmentationFolder,
    /// Segmentation: seeded synthetic scenes (`[data] scenes`) of objects from the MNIST-layout
    /// set at `root` (Fashion-MNIST) pasted onto textured canvases, exact masks.
    SyntheticScenes,
    /// Detection: COCO-JSON, `root/annotations/instances_{train,val}.json` with the images in
    /// `root/train/` and `root/val/` (`mtkd_vision_tasks::detection::coco`); every image is
    /// resized to `image_size` (boxes with it).
    Coco,
    /// Detection: the synthetic scenes of `synthetic-scenes` with the exact box of every
    /// object's visible pixels, written once as a COCO folder and read back through the COCO
    /// reader (`$MTKD_DATA_DIR/scenes-coco/<hash>/`).
    SyntheticDetection,
}

impl DatasetKind {
    /// The task this kind of data trains.
    pub fn task(self) -> TaskKind {
        match self {
            DatasetKind::SegmentationFolder | DatasetKind::SyntheticScenes => {
                TaskKind::Segmentation
            }
            DatasetKind::Coco | DatasetKind::SyntheticDetection => TaskKind::Detection,
            _ => TaskKind::Classification,
        }
    }

    /// Whether the data are Fashion-MNIST's IDX files or made from them (what `cargo xtask
    /// data` fetches).
    pub fn reads_mnist_files(self) -> bool {
        matches!(
            self,
            DatasetKind::Mnist | DatasetKind::SyntheticScenes | DatasetKind::SyntheticDetection
        )
    }
}

/// A dataset as the `[data]` section describes it: its format, its (resolved) folder and the
/// options the format reads.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub kind: DatasetKind,
    pub root: &'a Path,
    /// `mnist`: the class count (default 10); `segmentation-folder`: with the background
    /// (default: `class_names`' count).
    pub num_classes: Option<usize>,
    /// How many class names the section gives (the segmentation folder's default count).
    pub class_names: usize,
    /// `image-folder` and `coco`: the square size images are resized to when read.
    pub image_size: Option<u32>,
    /// `image-folder`, `segmentation-folder`, `coco`: 1 (grey) or 3 (RGB).
    pub channels: Option<usize>,
    /// The synthetic kinds: how the scenes are made.
    pub scenes: Option<&'a SceneConfig>,
}

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

impl Source<'_> {
    /// The size and channels single images are read at for this data (0: their own size).
    pub fn geometry(&self) -> (u32, usize) {
        match self.kind {
            DatasetKind::Mnist => (28, 1),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => (32, 3),
            DatasetKind::ImageFolder => (self.image_size.unwrap_or(32), self.channels.unwrap_or(3)),
            // Segmentation images keep their own size.
            DatasetKind::SegmentationFolder => (0, self.channels.unwrap_or(3)),
            DatasetKind::SyntheticScenes | DatasetKind::SyntheticDetection => (0, 1),
            DatasetKind::Coco => (self.image_size.unwrap_or(0), self.channels.unwrap_or(3)),
        }
    }

    /// The side of square images read at one size: the synthetic scenes' size, or
    /// `image_size` (COCO, image folders); 0 when the images keep their own sizes.
    pub fn square_side(&self) -> u32 {
        match self.kind {
            DatasetKind::SyntheticScenes | DatasetKind::SyntheticDetection => {
                self.scenes.map_or(0, |s| s.size as u32)
            }
            _ => self.image_size.unwrap_or(0),
        }
    }

    /// The class count the format fixes without reading images: the binary formats (with
    /// `num_classes` for IDX files); `None` for folders and annotations, which say it.
    pub fn known_classes(&self) -> Option<usize> {
        match self.kind {
            DatasetKind::Mnist => Some(self.num_classes.unwrap_or(10)),
            DatasetKind::Cifar10 => Some(10),
            DatasetKind::Cifar100 => Some(100),
            _ => None,
        }
    }

    /// The class folders of an image folder (its `train/` sub-folders, sorted: the label order
    /// the reader gives); `None` for other kinds or when they cannot be read.
    pub fn class_folders(&self) -> Option<Vec<String>> {
        if self.kind != DatasetKind::ImageFolder {
            return None;
        }
        let v: Vec<String> = data::class_dirs(&self.root.join("train"))
            .ok()?
            .iter()
            .filter_map(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        (!v.is_empty()).then_some(v)
    }

    /// Read one split, whole.
    pub fn read_split(&self, split: Split) -> Result<ImageSet> {
        let root = self.root;
        Ok(match self.kind {
            DatasetKind::Mnist => data::read_idx_dir(root, split, self.num_classes.unwrap_or(10))?,
            DatasetKind::Cifar10 => data::read_cifar_dir(root, split, false)?,
            DatasetKind::Cifar100 => data::read_cifar_dir(root, split, true)?,
            DatasetKind::ImageFolder => data::read_image_folder(
                &split_dir(root, split),
                self.image_size.unwrap_or(32),
                self.channels.unwrap_or(3),
            )?,
            DatasetKind::SegmentationFolder => crate::segmentation::data::read_seg_folder(
                &split_dir(root, split),
                self.num_classes.unwrap_or(self.class_names),
                self.channels.unwrap_or(3),
            )?,
            DatasetKind::SyntheticScenes => {
                let sc = self.scenes()?;
                let source = data::read_mnist_dir(root, split)?;
                let (n, seed) = scene_count(sc, split);
                synthetic::generate(&source, n, sc, seed)?
            }
            DatasetKind::Coco => read_coco(
                root,
                coco_split(root, split),
                self.channels.unwrap_or(3),
                self.image_size,
            )?,
            DatasetKind::SyntheticDetection => self.scenes_coco(split)?,
        })
    }

    /// The COCO ids of a split's images (in set order) and of the categories (in class order),
    /// for result files: `Some` for COCO data, `None` for every other kind (ids are index + 1).
    pub fn coco_ids(&self, split: Split) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
        if self.kind != DatasetKind::Coco {
            return Ok(None);
        }
        Ok(Some(coco::read_coco_ids(
            self.root,
            coco_split(self.root, split),
        )?))
    }

    fn scenes(&self) -> Result<&SceneConfig> {
        self.scenes.ok_or_else(|| Error::Invalid {
            what: "data.scenes".into(),
            reason: "is missing: the synthetic kinds need it".into(),
        })
    }

    /// The synthetic detection scenes of a split, as a COCO folder under
    /// `$MTKD_DATA_DIR/scenes-coco/<hash of the scene settings and split>/` (written on first
    /// use, then read like any COCO data).
    fn scenes_coco(&self, split: Split) -> Result<ImageSet> {
        let sc = self.scenes()?;
        let (n, seed) = scene_count(sc, split);
        let name = match split {
            Split::Train => "train",
            Split::Test => "val",
        };
        let key = serde_json::to_string(&(sc, name, "mtkd scenes-coco v1")).map_err(|e| {
            Error::Invalid {
                what: "data.scenes".into(),
                reason: e.to_string(),
            }
        })?;
        let base = std::env::var_os("MTKD_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("runs"));
        let dir = base
            .join("scenes-coco")
            .join(mtkd_records::fsio::stable_hash(key.as_bytes()));
        if !coco::annotation_path(&dir, name).is_file() {
            let source = data::read_mnist_dir(self.root, split)?;
            let (set, dropped) = synthetic::generate_detection(&source, n, sc, seed)?;
            tracing::info!(dir = %dir.display(), split = name, scenes = n, dropped,
                "writing the synthetic detection scenes as COCO");
            coco::write_coco(&dir, name, &set)?;
        }
        read_coco(&dir, name, 1, None)
    }
}

/// How many scenes a split has and the seed they are drawn with.
fn scene_count(sc: &SceneConfig, split: Split) -> (usize, u64) {
    match split {
        Split::Train => (sc.train, sc.seed.wrapping_mul(2)),
        Split::Test => (sc.test, sc.seed.wrapping_mul(2).wrapping_add(1)),
    }
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

/// The COCO split name of `split`: `train`, or for the test split `val` (or `test`).
fn coco_split(root: &Path, split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => ["val", "test"]
            .into_iter()
            .find(|s| coco::annotation_path(root, s).is_file())
            .unwrap_or("val"),
    }
}

/// A COCO split, its counts logged.
fn read_coco(
    root: &Path,
    split: &str,
    channels: usize,
    image_size: Option<u32>,
) -> Result<ImageSet> {
    let c = coco::read_coco(root, split, channels, image_size.map(|s| s as usize))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: DatasetKind, root: &Path) -> Source<'_> {
        Source {
            kind,
            root,
            num_classes: None,
            class_names: 0,
            image_size: None,
            channels: None,
            scenes: None,
        }
    }

    #[test]
    fn each_kind_says_its_task_geometry_and_fixed_classes() {
        let root = Path::new("nowhere");
        let s = |k| source(k, root);
        assert_eq!(s(DatasetKind::Mnist).geometry(), (28, 1));
        assert_eq!(s(DatasetKind::Cifar100).geometry(), (32, 3));
        assert_eq!(s(DatasetKind::ImageFolder).geometry(), (32, 3));
        assert_eq!(s(DatasetKind::SyntheticDetection).geometry(), (0, 1));
        assert_eq!(s(DatasetKind::Mnist).known_classes(), Some(10));
        let emnist = Source {
            num_classes: Some(26),
            ..s(DatasetKind::Mnist)
        };
        assert_eq!(emnist.known_classes(), Some(26));
        assert_eq!(s(DatasetKind::Cifar100).known_classes(), Some(100));
        assert_eq!(s(DatasetKind::Coco).known_classes(), None);
        assert_eq!(DatasetKind::SyntheticScenes.task(), TaskKind::Segmentation);
        assert_eq!(DatasetKind::Coco.task(), TaskKind::Detection);
        assert_eq!(DatasetKind::ImageFolder.task(), TaskKind::Classification);
    }

    #[test]
    fn synthetic_data_without_scenes_names_the_field() {
        let e = source(DatasetKind::SyntheticScenes, Path::new("nowhere"))
            .read_split(Split::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.scenes"), "{e}");
    }

    #[test]
    fn class_folders_are_sorted_and_only_an_image_folders() {
        let d = std::env::temp_dir().join(format!("mtkd-source-{}", std::process::id()));
        for c in ["shoe", "bag", "coat"] {
            std::fs::create_dir_all(d.join("train").join(c)).unwrap();
        }
        std::fs::write(d.join("train/notes.txt"), "not a class").unwrap();
        assert_eq!(
            source(DatasetKind::ImageFolder, &d).class_folders(),
            Some(vec!["bag".into(), "coat".into(), "shoe".into()])
        );
        assert_eq!(source(DatasetKind::Mnist, &d).class_folders(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
