//! COCO-format detection data: a reader of `instances_<split>.json` files (images and box
//! annotations) into an [`ImageSet`] with boxes, a writer of such folders (the synthetic scenes
//! are stored this way), and a writer of detections in COCO's result format.
//!
//! # Layout
//! ```text
//! <root>/annotations/instances_<split>.json
//! <root>/<split>/<file_name>        (PNG or JPEG)
//! ```
//!
//! # Rules (nothing is dropped without being counted in [`ReadReport`] and the log)
//! - Category ids may be any integers; classes are their ranks in increasing id order.
//! - An annotation whose `category_id` is not among the categories, whose `image_id` is not
//!   among the images, or whose box has a negative or non-finite width or height is an error
//!   naming the file and the annotation id. A corrupt JSON is an error with its line and column.
//! - Boxes reaching outside the image are clipped to it (counted as `clipped`); a box of zero
//!   width or height, before or after clipping, cannot be learnt or matched and is left out
//!   (counted as `degenerate`).
//! - Crowd annotations (`iscrowd = 1`) are left out (counted as `crowd`): mtkd neither learns
//!   from nor evaluates crowd regions.
//! - An image without annotations is a valid negative: its detections are false positives.
//! - Images are read at their own size, which must be the same for all, or resized to `size`
//!   (boxes and areas scaled with them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::Array4;
use serde::{Deserialize, Serialize};

use super::eval::DetBox;
use super::Object;
use crate::data::{read_image, Annotations, ImageSet};
use crate::error::{io_err, Error, Result};

#[derive(Debug, Deserialize, Serialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    #[serde(default)]
    width: Option<u64>,
    #[serde(default)]
    height: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
struct CocoAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Debug, Deserialize, Serialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

#[derive(Debug, Deserialize, Serialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

/// What reading a COCO file counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    pub images: usize,
    pub boxes: usize,
    /// Images without any box (valid negatives).
    pub negatives: usize,
    /// Boxes clipped to the image.
    pub clipped: usize,
    /// Boxes of zero width or height, left out.
    pub degenerate: usize,
    /// Crowd annotations, left out.
    pub crowd: usize,
}

/// A COCO split as read: the image set (with `boxes`), the COCO ids of its images (in set
/// order) and categories (in class order), and the counts.
#[derive(Debug, Clone)]
pub struct CocoSet {
    pub set: ImageSet,
    pub image_ids: Vec<u64>,
    pub category_ids: Vec<u64>,
    pub report: ReadReport,
}

/// The annotation file of `split` under `root`.
pub fn annotation_path(root: &Path, split: &str) -> PathBuf {
    root.join("annotations")
        .join(format!("instances_{split}.json"))
}

pub use crate::objects::image_label;

/// The annotation file of a split, parsed, with its path.
fn read_annotations(root: &Path, split: &str) -> Result<(PathBuf, CocoFile)> {
    let json = annotation_path(root, split);
    let text = std::fs::read_to_string(&json).map_err(io_err(&json))?;
    let file: CocoFile = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: json.clone(),
        format: "COCO annotation (JSON)",
        reason: e.to_string(),
    })?;
    Ok((json, file))
}

/// The image ids (file order) and category ids (sorted, the class order) of a COCO split,
/// without reading images.
pub fn read_coco_ids(root: &Path, split: &str) -> Result<(Vec<u64>, Vec<u64>)> {
    let (_, file) = read_annotations(root, split)?;
    let mut cats: Vec<u64> = file.categories.iter().map(|c| c.id).collect();
    cats.sort_unstable();
    Ok((file.images.iter().map(|i| i.id).collect(), cats))
}

/// Read split `split` of the COCO folder `root` with `channels` image channels (1 or 3),
/// resizing every image to `size x size` when `size` is given.
pub fn read_coco(
    root: &Path,
    split: &str,
    channels: usize,
    size: Option<usize>,
) -> Result<CocoSet> {
    let (json, file) = read_annotations(root, split)?;
    let bad = |reason: String| Error::Format {
        path: json.clone(),
        format: "COCO annotation (JSON)",
        reason,
    };
    if file.categories.is_empty() {
        return Err(bad("it lists no categories".into()));
    }
    if file.images.is_empty() {
        return Err(bad("it lists no images".into()));
    }
    let mut cats: Vec<&CocoCategory> = file.categories.iter().collect();
    cats.sort_by_key(|c| c.id);
    for w in cats.windows(2) {
        if w[0].id == w[1].id {
            return Err(bad(format!("category id {} appears twice", w[0].id)));
        }
    }
    let class_of: BTreeMap<u64, usize> = cats.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    let mut index_of: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, im) in file.images.iter().enumerate() {
        if index_of.insert(im.id, i).is_some() {
            return Err(bad(format!("image id {} appears twice", im.id)));
        }
    }
    let dir = root.join(split);
    let n = file.images.len();
    let mut pixels: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(n);
    for im in &file.images {
        let path = dir.join(&im.file_name);
        if !path.is_file() {
            return Err(Error::Io {
                path: path.clone(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("image {} of {} is missing", im.id, json.display()),
                ),
            });
        }
        let (w, h) = image::image_dimensions(&path).map_err(|e| Error::Format {
            path: path.clone(),
            format: "image",
            reason: e.to_string(),
        })?;
        let (w, h) = (w as usize, h as usize);
        if let (Some(fw), Some(fh)) = (im.width, im.height) {
            if (fw as usize, fh as usize) != (w, h) {
                return Err(bad(format!(
                    "image {} ({}) is {w}x{h} but the file says {fw}x{fh}",
                    im.id,
                    path.display()
                )));
            }
        }
        let target = size.unwrap_or(0) as u32;
        pixels.push(read_image(&path, target, channels)?);
        dims.push((h, w));
    }
    let (oh, ow) = match size {
        Some(s) => (s, s),
        None => {
            let first = dims[0];
            if let Some((i, d)) = dims.iter().enumerate().find(|(_, d)| **d != first) {
                return Err(bad(format!(
                    "images differ in size ({} is {}x{}, {} is {}x{}); set data.image_size to resize them",
                    file.images[0].file_name, first.1, first.0, file.images[i].file_name, d.1, d.0
                )));
            }
            first
        }
    };
    let mut images = Array4::<u8>::zeros((n, channels, oh, ow));
    for (i, p) in pixels.into_iter().enumerate() {
        images
            .index_axis_mut(ndarray::Axis(0), i)
            .as_slice_mut()
            .expect("a fresh array is contiguous")
            .copy_from_slice(&p);
    }
    let mut report = ReadReport {
        images: n,
        ..Default::default()
    };
    let mut objects: Vec<Vec<Object>> = vec![Vec::new(); n];
    for a in &file.annotations {
        let Some(&class) = class_of.get(&a.category_id) else {
            return Err(bad(format!(
                "annotation {} has category_id {}, which is not among the categories {:?}",
                a.id,
                a.category_id,
                cats.iter().map(|c| c.id).collect::<Vec<_>>()
            )));
        };
        let Some(&i) = index_of.get(&a.image_id) else {
            return Err(bad(format!(
                "annotation {} refers to image_id {}, which is not among the images",
                a.id, a.image_id
            )));
        };
        let [x, y, w, h] = a.bbox;
        if !(x.is_finite() && y.is_finite() && w.is_finite() && h.is_finite()) || w < 0.0 || h < 0.0
        {
            return Err(bad(format!(
                "annotation {} has bbox {:?}: [x, y, width, height] needs a finite, non-negative \
                 width and height",
                a.id, a.bbox
            )));
        }
        if a.iscrowd != 0 {
            report.crowd += 1;
            continue;
        }
        let (ih, iw) = dims[i];
        let (sx, sy) = (ow as f64 / iw as f64, oh as f64 / ih as f64);
        let (cx1, cy1) = (x.clamp(0.0, iw as f64), y.clamp(0.0, ih as f64));
        let (cx2, cy2) = ((x + w).clamp(0.0, iw as f64), (y + h).clamp(0.0, ih as f64));
        if w == 0.0 || h == 0.0 || cx2 <= cx1 || cy2 <= cy1 {
            report.degenerate += 1;
            continue;
        }
        if (cx1, cy1, cx2, cy2) != (x, y, x + w, y + h) {
            report.clipped += 1;
        }
        let area = a.area.unwrap_or(w * h) * sx * sy;
        objects[i].push(Object {
            class,
            bbox: [
                (cx1 * sx) as f32,
                (cy1 * sy) as f32,
                (cx2 * sx) as f32,
                (cy2 * sy) as f32,
            ],
            area: area as f32,
        });
        report.boxes += 1;
    }
    report.negatives = objects.iter().filter(|o| o.is_empty()).count();
    if report.clipped + report.degenerate + report.crowd > 0 {
        tracing::warn!(
            file = %json.display(),
            clipped = report.clipped,
            degenerate = report.degenerate,
            crowd = report.crowd,
            "COCO boxes outside the image were clipped; zero-size and crowd boxes were left out"
        );
    }
    tracing::info!(file = %json.display(), images = n, boxes = report.boxes,
        negatives = report.negatives, "read COCO detection split");
    let labels = objects.iter().map(|o| image_label(o)).collect();
    let mut set = ImageSet::new(images, labels, cats.len())?;
    set.class_names = cats.iter().map(|c| c.name.clone()).collect();
    set.annotations = Annotations::Objects(objects);
    Ok(CocoSet {
        set,
        image_ids: file.images.iter().map(|im| im.id).collect(),
        category_ids: cats.iter().map(|c| c.id).collect(),
        report,
    })
}

/// Write `set` (which must have boxes) as split `split` of a COCO folder under `root`: images
/// as PNG files `000000.png`, ... (ids from 1) and `annotations/instances_<split>.json`
/// (category ids from 1, in class order). Files are written beside and renamed into place.
pub fn write_coco(root: &Path, split: &str, set: &ImageSet) -> Result<()> {
    let objects = set.annotations.objects().ok_or_else(|| Error::Invalid {
        what: "write_coco".into(),
        reason: "the set has no boxes".into(),
    })?;
    let (c, h, w) = set.image_shape();
    let dir = root.join(split);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let ann_dir = root.join("annotations");
    std::fs::create_dir_all(&ann_dir).map_err(io_err(&ann_dir))?;
    let mut images = Vec::with_capacity(set.len());
    let mut annotations = Vec::new();
    for (i, objs) in objects.iter().enumerate() {
        let name = format!("{i:06}.png");
        let path = dir.join(&name);
        let img = set.images.index_axis(ndarray::Axis(0), i);
        let raw: Vec<u8> = if c == 1 {
            img.iter().copied().collect()
        } else {
            (0..h * w)
                .flat_map(|p| (0..c).map(move |ch| (ch, p)))
                .map(|(ch, p)| img[[ch, p / w, p % w]])
                .collect()
        };
        let color = if c == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        image::save_buffer(&path, &raw, w as u32, h as u32, color).map_err(|e| Error::Format {
            path: path.clone(),
            format: "PNG",
            reason: e.to_string(),
        })?;
        images.push(CocoImage {
            id: i as u64 + 1,
            file_name: name,
            width: Some(w as u64),
            height: Some(h as u64),
        });
        for o in objs {
            let [x1, y1, x2, y2] = o.bbox.map(f64::from);
            annotations.push(CocoAnnotation {
                id: annotations.len() as u64 + 1,
                image_id: i as u64 + 1,
                category_id: o.class as u64 + 1,
                bbox: [x1, y1, x2 - x1, y2 - y1],
                area: Some(f64::from(o.area)),
                iscrowd: 0,
            });
        }
    }
    let file = CocoFile {
        images,
        annotations,
        categories: set
            .class_names
            .iter()
            .enumerate()
            .map(|(k, n)| CocoCategory {
                id: k as u64 + 1,
                name: n.clone(),
            })
            .collect(),
    };
    let path = annotation_path(root, split);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(&file).map_err(|e| Error::Invalid {
        what: "write_coco".into(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

#[derive(Serialize)]
struct CocoResult {
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    score: f64,
}

/// Write detections in COCO's result format (a JSON list of `image_id`, `category_id`,
/// `bbox = [x, y, w, h]`, `score`), mapping set indices and classes back to COCO ids (an index
/// beyond `image_ids` or `category_ids` is written as index + 1, the ids [`write_coco`] gives).
pub fn write_results(
    path: &Path,
    dets: &[DetBox],
    image_ids: &[u64],
    category_ids: &[u64],
) -> Result<()> {
    let out: Vec<CocoResult> = dets
        .iter()
        .map(|d| CocoResult {
            image_id: image_ids
                .get(d.image as usize)
                .copied()
                .unwrap_or(d.image + 1),
            category_id: category_ids
                .get(d.category)
                .copied()
                .unwrap_or(d.category as u64 + 1),
            bbox: d.bbox.map(|v| (v * 100.0).round() / 100.0),
            score: (d.score * 1e5).round() / 1e5,
        })
        .collect();
    let text = serde_json::to_string(&out).map_err(|e| Error::Invalid {
        what: "write_results".into(),
        reason: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}
