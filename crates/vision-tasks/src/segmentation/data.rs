//! The common segmentation folder layout (VOC / Cityscapes style):
//!
//! ```text
//! <root>/<split>/images/<name>.png|.jpg   the images (one size for the whole set)
//! <root>/<split>/masks/<name>.png         8-bit index masks: the class of each pixel,
//!                                         255 = not labelled (greyscale or palette PNG)
//! ```
//!
//! with `<split>` = `train` and `val` (or `test`). A palette PNG's indices are the classes (its
//! colours are ignored, as VOC's masks are read); an RGB mask is refused, since colours would
//! need a colour-to-class table.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};

use super::{image_label, IGNORE};
use crate::data::{Annotations, ImageSet};
use crate::error::{io_err, Error, Result};

/// Read one 8-bit index mask: `(height, width, classes per pixel)`.
pub fn read_index_mask(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "index-mask PNG",
        reason,
    };
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    use png::{BitDepth, ColorType};
    match (info.color_type, info.bit_depth) {
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Eight) => {}
        (ColorType::Rgb | ColorType::Rgba, _) => return Err(bad(
            "an RGB mask where an index mask is expected: save the mask as an 8-bit greyscale or \
                 palette PNG whose values are the class numbers (255 = not labelled)"
                .into(),
        )),
        (c, d) => {
            return Err(bad(format!(
                "{c:?} at {d:?} bits; masks must be 8-bit greyscale or palette PNGs"
            )))
        }
    }
    let (w, h) = (info.width as usize, info.height as usize);
    buf.truncate(w * h);
    Ok((h, w, buf))
}

fn files_with(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| exts.contains(&x.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Read `<dir>/images` and `<dir>/masks` (one split of the layout above) as an [`ImageSet`]
/// with masks, images converted to `channels` (1 or 3). Every image must have a mask of its
/// size with values in `0..num_classes` or 255; the error names the file otherwise.
pub fn read_seg_folder(dir: &Path, num_classes: usize, channels: usize) -> Result<ImageSet> {
    let images_dir = dir.join("images");
    let masks_dir = dir.join("masks");
    let images = files_with(&images_dir, &["png", "jpg", "jpeg"])?;
    if images.is_empty() {
        return Err(Error::Invalid {
            what: images_dir.display().to_string(),
            reason: "holds no .png or .jpg image".into(),
        });
    }
    if num_classes == 0 || num_classes > IGNORE as usize {
        return Err(Error::Invalid {
            what: dir.display().to_string(),
            reason: format!(
                "segmentation needs 1 to {} classes, got {num_classes}",
                IGNORE
            ),
        });
    }
    let mut shape: Option<(usize, usize, PathBuf)> = None;
    let mut pixels = Vec::new();
    let mut masks = Vec::new();
    let mut labels = Vec::new();
    for img_path in &images {
        let stem = img_path.file_stem().unwrap_or_default();
        let mask_path = masks_dir.join(stem).with_extension("png");
        if !mask_path.is_file() {
            return Err(Error::Invalid {
                what: img_path.display().to_string(),
                reason: format!("has no mask {}", mask_path.display()),
            });
        }
        let img = image::open(img_path).map_err(|e| Error::Format {
            path: img_path.clone(),
            format: "image",
            reason: e.to_string(),
        })?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (mh, mw, mask) = read_index_mask(&mask_path)?;
        if (mh, mw) != (h, w) {
            return Err(Error::Invalid {
                what: mask_path.display().to_string(),
                reason: format!(
                    "mask is {mw}x{mh} but its image {} is {w}x{h}",
                    img_path.display()
                ),
            });
        }
        match &shape {
            None => shape = Some((h, w, img_path.clone())),
            Some((h0, w0, first)) if (*h0, *w0) != (h, w) => {
                return Err(Error::Invalid {
                    what: img_path.display().to_string(),
                    reason: format!(
                        "is {w}x{h} but {} is {w0}x{h0}; the images of a set share one size (tile or resize them first)",
                        first.display()
                    ),
                })
            }
            _ => {}
        }
        if let Some((i, &v)) = mask
            .iter()
            .enumerate()
            .find(|(_, &v)| v != IGNORE && v as usize >= num_classes)
        {
            return Err(Error::Invalid {
                what: mask_path.display().to_string(),
                reason: format!(
                    "pixel ({}, {}) has class {v}, outside 0..{num_classes} (255 marks unlabelled pixels)",
                    i % w,
                    i / w
                ),
            });
        }
        pixels.extend(crate::data::read_image(img_path, 0, channels)?);
        let m = ndarray::ArrayView2::from_shape((h, w), &mask).map_err(|e| Error::Invalid {
            what: mask_path.display().to_string(),
            reason: e.to_string(),
        })?;
        labels.push(image_label(m, num_classes));
        masks.extend_from_slice(&mask);
    }
    let (h, w, _) = shape.unwrap_or((0, 0, PathBuf::new()));
    let n = images.len();
    let shape_err = |e: ndarray::ShapeError| Error::Invalid {
        what: dir.display().to_string(),
        reason: e.to_string(),
    };
    let images = Array4::from_shape_vec((n, channels, h, w), pixels).map_err(shape_err)?;
    let masks = Array3::from_shape_vec((n, h, w), masks).map_err(shape_err)?;
    let mut set = ImageSet::new(images, labels, num_classes)?;
    set.annotations = Annotations::Masks(masks);
    Ok(set)
}

/// Write an 8-bit index mask `[H, W]` as a greyscale PNG.
pub fn write_index_mask(path: &Path, h: usize, w: usize, mask: &[u8]) -> Result<()> {
    image::GrayImage::from_raw(w as u32, h as u32, mask.to_vec())
        .ok_or_else(|| Error::Invalid {
            what: path.display().to_string(),
            reason: "mask buffer does not match its size".into(),
        })?
        .save(path)
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "PNG",
            reason: e.to_string(),
        })
}
