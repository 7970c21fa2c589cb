//! In-memory image datasets and their readers: IDX (MNIST / Fashion-MNIST, gzip or not),
//! CIFAR-10/100 binary, and ImageFolder trees (PNG, JPEG).

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{s, Array4};

use crate::error::{io_err, Error, Result};

/// What the images of a set are annotated with beyond their class: each task's own targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Annotations {
    /// Classification: the class is the whole target.
    Classes,
    /// Segmentation: the class of every pixel `[N, H, W]` (`segmentation::IGNORE` = not
    /// labelled).
    Masks(ndarray::Array3<u8>),
    /// Detection: the objects of every image.
    Objects(Vec<Vec<crate::objects::Object>>),
}

impl Annotations {
    /// The task these annotations are the targets of.
    pub fn task(&self) -> crate::kind::TaskKind {
        match self {
            Annotations::Classes => crate::kind::TaskKind::Classification,
            Annotations::Masks(_) => crate::kind::TaskKind::Segmentation,
            Annotations::Objects(_) => crate::kind::TaskKind::Detection,
        }
    }

    /// Segmentation's masks, `None` for the other tasks.
    pub fn masks(&self) -> Option<&ndarray::Array3<u8>> {
        match self {
            Annotations::Masks(m) => Some(m),
            _ => None,
        }
    }

    /// Detection's objects, `None` for the other tasks.
    pub fn objects(&self) -> Option<&[Vec<crate::objects::Object>]> {
        match self {
            Annotations::Objects(o) => Some(o),
            _ => None,
        }
    }

    /// The annotations of the images at `indices`, in that order.
    fn select(&self, indices: &[usize]) -> Annotations {
        match self {
            Annotations::Classes => Annotations::Classes,
            Annotations::Masks(m) => {
                let (_, h, w) = m.dim();
                let mut out = ndarray::Array3::<u8>::zeros((indices.len(), h, w));
                for (dst, &src) in indices.iter().enumerate() {
                    out.slice_mut(s![dst, .., ..])
                        .assign(&m.slice(s![src, .., ..]));
                }
                Annotations::Masks(out)
            }
            Annotations::Objects(o) => {
                Annotations::Objects(indices.iter().map(|&i| o[i].clone()).collect())
            }
        }
    }
}

/// Images as `u8` `[N, C, H, W]` with integer labels, fully in memory.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub images: Array4<u8>,
    /// Each image's class. For segmentation and detection, the image's most frequent
    /// (foreground) class ([`crate::objects::image_label`]): what subsets stratify by and
    /// per-class weight records group by.
    pub labels: Vec<i64>,
    pub num_classes: usize,
    /// Class names in label order (numbers when the format has none).
    pub class_names: Vec<String>,
    /// The task's targets beyond the class.
    pub annotations: Annotations,
    /// Which samples carry their label (`None`: every one). An unlabelled sample's label,
    /// mask or objects are placeholders (class 0, every pixel `objects::IGNORE`, no
    /// objects) that nothing reads: the training step replaces them by the teachers'
    /// pseudo-targets (`Task::pseudo_targets`).
    pub labelled: Option<Vec<bool>>,
}

impl ImageSet {
    /// Build a set, checking that labels and images agree.
    pub fn new(images: Array4<u8>, labels: Vec<i64>, num_classes: usize) -> Result<ImageSet> {
        if images.shape()[0] != labels.len() {
            return Err(Error::Invalid {
                what: "images/labels".into(),
                reason: format!("{} images but {} labels", images.shape()[0], labels.len()),
            });
        }
        if let Some((i, bad)) = first_bad_label(&labels, num_classes) {
            return Err(Error::Invalid {
                what: "labels".into(),
                reason: format!("sample {i} has label {bad}, outside 0..{num_classes}"),
            });
        }
        let class_names = (0..num_classes).map(|c| c.to_string()).collect();
        Ok(ImageSet {
            images,
            labels,
            num_classes,
            class_names,
            annotations: Annotations::Classes,
            labelled: None,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `(C, H, W)` of every image.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        let s = self.images.shape();
        (s[1], s[2], s[3])
    }

    /// The first `n` samples (or all of them), e.g. for quick runs.
    pub fn take(&self, n: usize) -> ImageSet {
        self.range(0, n.min(self.len()))
    }

    /// A seeded subset of `n` samples in which every class keeps its share of the set (largest
    /// remainders), in the set's order: what `train_subset` takes, so a subset of a set sorted
    /// by class (an ImageFolder) still holds every class.
    pub fn stratified(&self, n: usize, seed: u64) -> ImageSet {
        self.select(&stratified_indices(&self.labels, self.num_classes, n, seed))
    }

    /// The samples at `indices`, in that order (indices must be in range).
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let (c, h, w) = self.image_shape();
        let mut images = Array4::<u8>::zeros((indices.len(), c, h, w));
        for (dst, &src) in indices.iter().enumerate() {
            images
                .slice_mut(s![dst, .., .., ..])
                .assign(&self.images.slice(s![src, .., .., ..]));
        }
        ImageSet {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            annotations: self.annotations.select(indices),
            labelled: self
                .labelled
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
        }
    }

    /// Whether sample `i` carries its label.
    pub fn is_labelled(&self, i: usize) -> bool {
        self.labelled.as_ref().is_none_or(|l| l[i])
    }

    /// How many samples carry their label.
    pub fn labelled_count(&self) -> usize {
        match &self.labelled {
            Some(l) => l.iter().filter(|&&x| x).count(),
            None => self.len(),
        }
    }

    /// The set with only the samples at `keep` labelled: every other sample's label and
    /// targets are replaced by placeholders (class 0, masks of `segmentation::IGNORE`, no
    /// objects), so that nothing can read them.
    pub fn hide_labels(&self, keep: &[usize]) -> ImageSet {
        let mut flag = vec![false; self.len()];
        for &i in keep {
            flag[i] = self.is_labelled(i);
        }
        let mut out = self.clone();
        for (i, &l) in flag.iter().enumerate() {
            if !l {
                out.labels[i] = 0;
            }
        }
        match &mut out.annotations {
            Annotations::Classes => {}
            Annotations::Masks(m) => {
                for (i, &l) in flag.iter().enumerate() {
                    if !l {
                        m.slice_mut(s![i, .., ..]).fill(crate::objects::IGNORE);
                    }
                }
            }
            Annotations::Objects(o) => {
                for (i, &l) in flag.iter().enumerate() {
                    if !l {
                        o[i].clear();
                    }
                }
            }
        }
        out.labelled = Some(flag);
        out
    }

    /// A dense set whose annotations keep only the classes in `classes` (a specialist
    /// teacher's training set, docs/METHOD.md section 12): a mask's pixels of any other
    /// foreground class become background (class 0), or unlabelled (ignored by the loss) with
    /// `ignore_others`; a detection image's objects of any other class are dropped, as if nobody
    /// had annotated them (detection has no ignore regions: `ignore_others` is refused). Every
    /// image is kept. Returns the set and the number of pixels or objects changed;
    /// classification sets are refused (their class subset drops samples instead).
    pub fn keep_classes(
        &self,
        classes: &[usize],
        ignore_others: bool,
    ) -> Result<(ImageSet, usize)> {
        let mut out = self.clone();
        let mut changed = 0;
        match &mut out.annotations {
            Annotations::Classes => {
                return Err(Error::Invalid {
                    what: "classes".into(),
                    reason: "a classification set keeps classes by dropping samples".into(),
                })
            }
            Annotations::Masks(m) => {
                let mut keep = [false; 256];
                keep[0] = true;
                keep[crate::objects::IGNORE as usize] = true;
                for &c in classes {
                    keep[c.min(255)] = true;
                }
                let other = if ignore_others {
                    crate::objects::IGNORE
                } else {
                    0
                };
                for v in m.iter_mut() {
                    if !keep[*v as usize] {
                        *v = other;
                        changed += 1;
                    }
                }
            }
            Annotations::Objects(_) if ignore_others => {
                return Err(Error::Invalid {
                    what: "others".into(),
                    reason: "a detection set has no ignore regions: the other classes' boxes \
                             are dropped (others = \"background\")"
                        .into(),
                })
            }
            Annotations::Objects(o) => {
                for (i, objs) in o.iter_mut().enumerate() {
                    let before = objs.len();
                    objs.retain(|ob| classes.contains(&ob.class));
                    changed += before - objs.len();
                    out.labels[i] = crate::objects::image_label(objs);
                }
            }
        }
        Ok((out, changed))
    }

    /// A dense set whose annotations have the classes of each pair in `pairs` swapped (a
    /// teacher with systematically wrong annotations, docs/METHOD.md section 12): a mask's
    /// pixels of one class of a pair take the other's (foreground classes only), an object of
    /// one takes the other's class (its box stays); image labels are recomputed from the result.
    /// Unlabelled pixels stay unlabelled. Returns the set and the number
    /// of pixels or objects changed. A class outside `0..num_classes`, a pair of one class or a
    /// class in two pairs is refused, and so is a classification set (its labels are edited by
    /// `classification::labels::apply`).
    pub fn swap_classes(&self, pairs: &[[usize; 2]]) -> Result<(ImageSet, usize)> {
        let k = self.num_classes;
        check_pairs(pairs, k).map_err(|reason| Error::Invalid {
            what: "flip_pairs".into(),
            reason,
        })?;
        let mut map: Vec<usize> = (0..k).collect();
        for [a, b] in pairs {
            map.swap(*a, *b);
        }
        let mut out = self.clone();
        let mut changed = 0;
        match &mut out.annotations {
            Annotations::Classes => {
                return Err(Error::Invalid {
                    what: "flip_pairs".into(),
                    reason: "a classification set's labels are swapped by \
                             classification::labels::apply"
                        .into(),
                })
            }
            Annotations::Masks(_) if pairs.iter().flatten().any(|&c| c == 0) => {
                return Err(Error::Invalid {
                    what: "flip_pairs".into(),
                    reason: "swaps foreground classes of masks; class 0 (background) stays \
                             background"
                        .into(),
                })
            }
            Annotations::Masks(m) => {
                let mut lut: [u8; 256] = std::array::from_fn(|v| v as u8);
                for (c, &to) in map.iter().enumerate().take(256) {
                    lut[c] = to as u8;
                }
                lut[crate::objects::IGNORE as usize] = crate::objects::IGNORE;
                for v in m.iter_mut() {
                    let to = lut[*v as usize];
                    if to != *v {
                        *v = to;
                        changed += 1;
                    }
                }
                for (i, l) in out.labels.iter_mut().enumerate() {
                    *l = crate::objects::mask_label(m.slice(s![i, .., ..]), k);
                }
            }
            Annotations::Objects(o) => {
                for (i, objs) in o.iter_mut().enumerate() {
                    for ob in objs.iter_mut() {
                        if let Some(&to) = map.get(ob.class) {
                            if to != ob.class {
                                ob.class = to;
                                changed += 1;
                            }
                        }
                    }
                    out.labels[i] = crate::objects::image_label(objs);
                }
            }
        }
        Ok((out, changed))
    }

    /// This set followed by `images` `[N, C, H, W]` without labels (placeholders as
    /// [`ImageSet::hide_labels`] writes them). The images must have this set's shape.
    pub fn with_unlabelled(&self, images: &Array4<u8>) -> Result<ImageSet> {
        let (c, h, w) = self.image_shape();
        let s2 = images.shape();
        if (s2[1], s2[2], s2[3]) != (c, h, w) {
            return Err(Error::Invalid {
                what: "unlabelled images".into(),
                reason: format!(
                    "are {} x {} x {} (C x H x W), the labelled ones {c} x {h} x {w}",
                    s2[1], s2[2], s2[3]
                ),
            });
        }
        let n = s2[0];
        let all = ndarray::concatenate(ndarray::Axis(0), &[self.images.view(), images.view()])
            .map_err(|e| Error::Invalid {
                what: "unlabelled images".into(),
                reason: e.to_string(),
            })?;
        let annotations = match &self.annotations {
            Annotations::Classes => Annotations::Classes,
            Annotations::Masks(m) => {
                let blank = ndarray::Array3::<u8>::from_elem((n, h, w), crate::objects::IGNORE);
                Annotations::Masks(
                    ndarray::concatenate(ndarray::Axis(0), &[m.view(), blank.view()]).map_err(
                        |e| Error::Invalid {
                            what: "unlabelled masks".into(),
                            reason: e.to_string(),
                        },
                    )?,
                )
            }
            Annotations::Objects(o) => {
                let mut o = o.clone();
                o.extend(std::iter::repeat_n(Vec::new(), n));
                Annotations::Objects(o)
            }
        };
        let mut labelled: Vec<bool> = (0..self.len()).map(|i| self.is_labelled(i)).collect();
        labelled.extend(std::iter::repeat_n(false, n));
        let mut labels = self.labels.clone();
        labels.extend(std::iter::repeat_n(0, n));
        Ok(ImageSet {
            images: all,
            labels,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            annotations,
            labelled: Some(labelled),
        })
    }

    /// Split off the last `n` samples as a second set: `(first, last)`.
    pub fn split_tail(&self, n: usize) -> (ImageSet, ImageSet) {
        let k = self.len().saturating_sub(n);
        (self.range(0, k), self.range(k, self.len()))
    }

    /// The samples `a..b`.
    fn range(&self, a: usize, b: usize) -> ImageSet {
        self.select(&(a..b).collect::<Vec<_>>())
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::Format {
                path: path.to_path_buf(),
                format: "gzip",
                reason: format!("truncated or corrupt ({e})"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse one IDX file (unsigned byte data): returns the dimensions and the payload.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "IDX",
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("missing the 0x0000 magic prefix".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "data type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("header is truncated".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let payload = bytes.len() - header;
    if payload != expected {
        return Err(bad(format!(
            "dimensions {dims:?} need {expected} bytes of data, the file has {payload} (truncated?)"
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Read an IDX image file `[N, H, W]` and its label file `[N]` into a single-channel set.
pub fn read_idx_pair(images: &Path, labels: &Path, num_classes: usize) -> Result<ImageSet> {
    let (idims, ibytes) = read_idx(images)?;
    let (ldims, lbytes) = read_idx(labels)?;
    if idims.len() != 3 {
        return Err(Error::Format {
            path: images.to_path_buf(),
            format: "IDX images",
            reason: format!("expected 3 dimensions [N, H, W], got {idims:?}"),
        });
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(Error::Format {
            path: labels.to_path_buf(),
            format: "IDX labels",
            reason: format!(
                "expected [{}] labels to match {}, got {ldims:?}",
                idims[0],
                images.display()
            ),
        });
    }
    let arr = Array4::from_shape_vec((idims[0], 1, idims[1], idims[2]), ibytes).map_err(|e| {
        Error::Invalid {
            what: images.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    let labels_v: Vec<i64> = lbytes.into_iter().map(i64::from).collect();
    if let Some((i, bad)) = first_bad_label(&labels_v, num_classes) {
        return Err(Error::Format {
            path: labels.to_path_buf(),
            format: "IDX labels",
            reason: format!(
                "sample {i} has label {bad}, but the dataset has {num_classes} classes (0..{})",
                num_classes - 1
            ),
        });
    }
    ImageSet::new(arr, labels_v, num_classes)
}

/// The first label outside `0..num_classes`, with its sample index.
fn first_bad_label(labels: &[i64], num_classes: usize) -> Option<(usize, i64)> {
    labels
        .iter()
        .copied()
        .enumerate()
        .find(|&(_, l)| l < 0 || l as usize >= num_classes)
}

/// Split of a standard dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// MNIST-layout folder (`train-images-idx3-ubyte[.gz]`, `t10k-...`), 10 classes.
pub fn read_mnist_dir(root: &Path, split: Split) -> Result<ImageSet> {
    read_idx_dir(root, split, 10)
}

/// An MNIST-style folder of IDX files (`train-images-idx3-ubyte[.gz]`,
/// `t10k-labels-idx1-ubyte[.gz]`, ...) with `num_classes` classes (10 for MNIST and
/// Fashion-MNIST; EMNIST's splits have others): a label outside `0..num_classes` is an error
/// naming the file.
pub fn read_idx_dir(root: &Path, split: Split, num_classes: usize) -> Result<ImageSet> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |stem: String| -> Result<PathBuf> {
        for cand in [format!("{stem}.gz"), stem.clone()] {
            let p = root.join(&cand);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(Error::Io {
            path: root.join(format!("{stem}.gz")),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "file not found (nor without .gz)",
            ),
        })
    };
    let images = find(format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find(format!("{prefix}-labels-idx1-ubyte"))?;
    read_idx_pair(&images, &labels, num_classes)
}

/// CIFAR binary batches. `label_bytes` is 1 for CIFAR-10 and 2 for CIFAR-100 (coarse, fine:
/// the fine label is used).
pub fn read_cifar_files(
    files: &[PathBuf],
    label_bytes: usize,
    num_classes: usize,
) -> Result<ImageSet> {
    const PIXELS: usize = 3 * 32 * 32;
    let record = label_bytes + PIXELS;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(Error::Format {
                path: path.clone(),
                format: "CIFAR binary",
                reason: format!(
                    "{} bytes is not a multiple of the {record}-byte record",
                    bytes.len()
                ),
            });
        }
        for (r, rec) in bytes.chunks_exact(record).enumerate() {
            let label = i64::from(rec[label_bytes - 1]);
            if label as usize >= num_classes {
                return Err(Error::Format {
                    path: path.clone(),
                    format: "CIFAR binary",
                    reason: format!(
                        "record {r} has label {label}, but the dataset has {num_classes} classes"
                    ),
                });
            }
            labels.push(label);
            images.extend_from_slice(&rec[label_bytes..]);
        }
    }
    let n = labels.len();
    let arr = Array4::from_shape_vec((n, 3, 32, 32), images).map_err(|e| Error::Invalid {
        what: "CIFAR".into(),
        reason: e.to_string(),
    })?;
    ImageSet::new(arr, labels, num_classes)
}

/// CIFAR-10 (`data_batch_{1..5}.bin`, `test_batch.bin`) or CIFAR-100 (`train.bin`, `test.bin`).
pub fn read_cifar_dir(root: &Path, split: Split, hundred: bool) -> Result<ImageSet> {
    if hundred {
        let f = match split {
            Split::Train => "train.bin",
            Split::Test => "test.bin",
        };
        read_cifar_files(&[root.join(f)], 2, 100)
    } else {
        let files: Vec<PathBuf> = match split {
            Split::Train => (1..=5)
                .map(|i| root.join(format!("data_batch_{i}.bin")))
                .collect(),
            Split::Test => vec![root.join("test_batch.bin")],
        };
        read_cifar_files(&files, 1, 10)
    }
}

/// The class folders of an ImageFolder split `root` (its sub-folders), sorted: label `i` is
/// the `i`-th.
pub fn class_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    Ok(classes)
}

/// An ImageFolder tree (`root/<class>/<image>`), classes sorted by name. Every image is resized
/// (bilinear) to `size x size` and converted to `channels` (1 or 3).
pub fn read_image_folder(root: &Path, size: u32, channels: usize) -> Result<ImageSet> {
    let classes = class_dirs(root)?;
    if classes.is_empty() {
        return Err(Error::Invalid {
            what: root.display().to_string(),
            reason: "an ImageFolder root needs one sub-folder per class".into(),
        });
    }
    let (h, w) = (size as usize, size as usize);
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        files.sort();
        for f in files {
            pixels.extend(read_image(&f, size, channels)?);
            labels.push(label as i64);
        }
    }
    let n = labels.len();
    let arr = Array4::from_shape_vec((n, channels, h, w), pixels).map_err(|e| Error::Invalid {
        what: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut set = ImageSet::new(arr, labels, classes.len())?;
    set.class_names = classes
        .iter()
        .map(|c| {
            c.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    Ok(set)
}

/// A folder of images without labels (PNG or JPEG, its sub-folders included, in sorted path
/// order), each read as [`read_image`] does: resized to `size x size` (0: kept at its own
/// size, which must then be `expect_hw`) in `channels`. An empty folder, an unreadable image
/// or one of another size is an error that names the file.
pub fn read_unlabelled_folder(
    root: &Path,
    size: u32,
    channels: usize,
    expect_hw: (usize, usize),
) -> Result<Array4<u8>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let p = e.map_err(io_err(dir))?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::Invalid {
            what: root.display().to_string(),
            reason: "holds no images (PNG or JPEG) for data.unlabelled".into(),
        });
    }
    let (h, w) = expect_hw;
    let mut pixels = Vec::with_capacity(files.len() * channels * h * w);
    for f in &files {
        let img = image::open(f).map_err(|e| Error::Format {
            path: f.clone(),
            format: "image",
            reason: e.to_string(),
        })?;
        let native = img.color().channel_count() as usize;
        let grey_native = matches!(native, 1 | 2);
        if size == 0 && (img.height() as usize, img.width() as usize) != (h, w) {
            return Err(Error::Format {
                path: f.clone(),
                format: "image",
                reason: format!(
                    "is {} x {} (W x H), the training images {w} x {h}",
                    img.width(),
                    img.height()
                ),
            });
        }
        if channels == 3 && grey_native {
            return Err(Error::Format {
                path: f.clone(),
                format: "image",
                reason: "is a grey image, the training images have 3 channels (RGB)".into(),
            });
        }
        if channels == 1 && !grey_native {
            return Err(Error::Format {
                path: f.clone(),
                format: "image",
                reason: format!("has {native} channels, the training images are grey (1 channel)"),
            });
        }
        pixels.extend(read_image(f, size, channels)?);
    }
    Array4::from_shape_vec((files.len(), channels, h, w), pixels).map_err(|e| Error::Invalid {
        what: root.display().to_string(),
        reason: e.to_string(),
    })
}

/// One image file (PNG or JPEG) as ImageFolder reads it: resized (bilinear) to `size x size`
/// (kept at its own size when `size` is 0), converted to `channels` (1: grey, 3: RGB),
/// `[C, H, W]` bytes.
pub fn read_image(path: &Path, size: u32, channels: usize) -> Result<Vec<u8>> {
    let img = image::open(path).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "image",
        reason: e.to_string(),
    })?;
    let img = if size == 0 {
        img
    } else {
        img.resize_exact(size, size, image::imageops::FilterType::Triangle)
    };
    let hw = (img.width() * img.height()) as usize;
    Ok(if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        let rgb = img.to_rgb8();
        let raw = rgb.as_raw();
        // HWC -> CHW
        (0..3)
            .flat_map(|c| (0..hw).map(move |i| raw[i * 3 + c]))
            .collect()
    })
}

/// The indices of [`ImageSet::stratified`], increasing.
pub fn stratified_indices(labels: &[i64], num_classes: usize, n: usize, seed: u64) -> Vec<usize> {
    let total = labels.len();
    if n >= total {
        return (0..total).collect();
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes.max(1)];
    for (i, &l) in labels.iter().enumerate() {
        let c = (l.max(0) as usize).min(by_class.len() - 1);
        by_class[c].push(i);
    }
    // Quotas: the floor of each class's share, the rest to the largest remainders.
    let mut quota: Vec<usize> = by_class.iter().map(|v| v.len() * n / total).collect();
    let mut rest: Vec<(usize, usize)> = by_class
        .iter()
        .enumerate()
        .map(|(c, v)| ((v.len() * n) % total, c))
        .collect();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = n - quota.iter().sum::<usize>();
    for (_, c) in rest {
        if left == 0 {
            break;
        }
        if quota[c] < by_class[c].len() {
            quota[c] += 1;
            left -= 1;
        }
    }
    let mut out = Vec::with_capacity(n);
    for (c, idx) in by_class.iter_mut().enumerate() {
        idx.sort_by_key(|&i| (mix(seed, i as u64), i));
        out.extend_from_slice(&idx[..quota[c]]);
    }
    out.sort_unstable();
    out
}

/// splitmix64 of (seed, i): a seeded order that does not depend on anything else.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks pairs of classes to swap (`flip_pairs`) against `k` classes: each pair two different
/// classes in `0..k`, each class in one pair at most. `Err` says which rule a pair breaks.
pub fn check_pairs(pairs: &[[usize; 2]], k: usize) -> std::result::Result<(), String> {
    for p in pairs {
        if p[0] >= k || p[1] >= k || p[0] == p[1] {
            return Err(format!("pair {p:?} needs two different classes in 0..{k}"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for c in pairs.iter().flatten() {
        if !seen.insert(*c) {
            return Err(format!("class {c} appears in two pairs"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod stratified_tests {
    use super::*;

    #[test]
    fn a_subset_of_a_class_sorted_set_keeps_every_class_in_proportion() {
        // 10 classes of 100 samples each, sorted by class (as an ImageFolder reads them).
        let labels: Vec<i64> = (0..1000).map(|i| i / 100).collect();
        let idx = stratified_indices(&labels, 10, 250, 7);
        assert_eq!(idx.len(), 250);
        let mut counts = [0usize; 10];
        for &i in &idx {
            counts[labels[i] as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 25), "{counts:?}");
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        // Seeded: the same seed, the same subset; another seed, another one.
        assert_eq!(idx, stratified_indices(&labels, 10, 250, 7));
        assert_ne!(idx, stratified_indices(&labels, 10, 250, 8));
        // Uneven classes: the total is exact and each class is within one of its share.
        let labels: Vec<i64> = (0..103)
            .map(|i| {
                if i < 70 {
                    0
                } else if i < 100 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let idx = stratified_indices(&labels, 3, 10, 1);
        assert_eq!(idx.len(), 10);
        let c0 = idx.iter().filter(|&&i| labels[i] == 0).count();
        assert!((6..=7).contains(&c0), "{c0}");
        assert_eq!(stratified_indices(&labels, 3, 500, 1).len(), 103);
    }
}
