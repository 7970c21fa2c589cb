//! The DSB2018 nuclei tiles: the one real fluorescence image (512 x 512, uint16) and its
//! instance mask of 125 nuclei that ship in the PyPI wheel of `stardist` 0.9.2, cut into 64 x 64
//! tiles in the segmentation folder layout mtkd reads (`data.kind = "segmentation-folder"`):
//!
//! ```text
//! <data_dir>/nuclei-tiles/train/{images,masks}/*.png   165 tiles, stride 32, rows 0..384
//! <data_dir>/nuclei-tiles/val/{images,masks}/*.png      16 tiles, stride 64, rows 384..512
//! ```
//!
//! The two splits come from disjoint parts of the image. Masks are binary index PNGs:
//! 0 = background, 1 = nucleus (any instance). The image is scaled to 8 bits between its 1st
//! and 99.8th percentiles (the normalisation stardist's own examples use).
//!
//! The same tiles for detection, in the COCO layout mtkd reads (`data.kind = "coco"`):
//!
//! ```text
//! <data_dir>/nuclei-det/{train,val}/*.png
//! <data_dir>/nuclei-det/annotations/instances_{train,val}.json
//! ```
//!
//! one category (`1`, "nucleus"); every instance's box is the box of its pixels inside the tile
//! (a nucleus cut by the tile's edge keeps the part inside), its area the pixel count. Instances
//! with fewer than [`MIN_PIXELS`] pixels in a tile are left out (slivers at the edge); the
//! count is printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const WHEEL: &str = "stardist==0.9.2";
const IMAGE: &str = "stardist/data/images/img2d.tif";
const MASK: &str = "stardist/data/images/mask2d.tif";
const TILE: usize = 64;
/// A nucleus needs this many pixels in a tile to be a detection box there.
pub const MIN_PIXELS: usize = 12;

pub fn dir() -> Result<PathBuf> {
    Ok(crate::data::data_dir()?.join("nuclei-tiles"))
}

/// The detection tiles' folder.
pub fn det_dir() -> Result<PathBuf> {
    Ok(crate::data::data_dir()?.join("nuclei-det"))
}

fn complete(dir: &Path) -> bool {
    dir.join("val").join("masks").join("done").is_file()
        && dir
            .with_file_name("nuclei-det")
            .join("annotations")
            .join("done")
            .is_file()
}

/// COCO JSON of one split's tiles: `(file name, boxes [x, y, w, h, area])`.
fn coco_json(tiles: &[(String, Vec<[usize; 5]>)]) -> String {
    let images: Vec<String> = tiles
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            format!(
                "{{\"id\": {}, \"file_name\": \"{name}\", \"width\": {TILE}, \"height\": {TILE}}}",
                i + 1
            )
        })
        .collect();
    let mut anns = Vec::new();
    for (i, (_, boxes)) in tiles.iter().enumerate() {
        for b in boxes {
            anns.push(format!(
                "{{\"id\": {}, \"image_id\": {}, \"category_id\": 1, \"bbox\": [{}, {}, {}, {}], \"area\": {}, \"iscrowd\": 0}}",
                anns.len() + 1,
                i + 1,
                b[0],
                b[1],
                b[2],
                b[3],
                b[4]
            ));
        }
    }
    format!(
        "{{\"images\": [\n  {}\n],\n\"annotations\": [\n  {}\n],\n\"categories\": [{{\"id\": 1, \"name\": \"nucleus\"}}]}}\n",
        images.join(",\n  "),
        anns.join(",\n  ")
    )
}

/// The boxes `[x, y, w, h, pixels]` of the instances of a tile of the instance mask.
fn instance_boxes(
    mask: &[u16],
    w: usize,
    y0: usize,
    x0: usize,
    dropped: &mut usize,
) -> Vec<[usize; 5]> {
    let mut ext: std::collections::BTreeMap<u16, [usize; 5]> = Default::default();
    for y in 0..TILE {
        for x in 0..TILE {
            let id = mask[(y0 + y) * w + x0 + x];
            if id == 0 {
                continue;
            }
            let e = ext.entry(id).or_insert([usize::MAX, usize::MAX, 0, 0, 0]);
            e[0] = e[0].min(x);
            e[1] = e[1].min(y);
            e[2] = e[2].max(x + 1);
            e[3] = e[3].max(y + 1);
            e[4] += 1;
        }
    }
    ext.into_values()
        .filter(|e| {
            let keep = e[4] >= MIN_PIXELS;
            *dropped += usize::from(!keep);
            keep
        })
        .map(|e| [e[0], e[1], e[2] - e[0], e[3] - e[1], e[4]])
        .collect()
}

fn read_u16(path: &Path) -> Result<(usize, usize, Vec<u16>)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a TIFF file", path.display()))?;
    let (w, h) = dec.dimensions()?;
    let data = match dec.read_image()? {
        tiff::decoder::DecodingResult::U16(v) => v,
        tiff::decoder::DecodingResult::U8(v) => v.into_iter().map(u16::from).collect(),
        _ => bail!(
            "{}: expected an 8- or 16-bit greyscale TIFF",
            path.display()
        ),
    };
    if data.len() != (w * h) as usize {
        bail!(
            "{}: {} values for {w} x {h} pixels",
            path.display(),
            data.len()
        );
    }
    Ok((h as usize, w as usize, data))
}

fn write_png(path: &Path, w: usize, h: usize, pixels: &[u8]) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}

/// Make the tiles (fetching the wheel with the set-up's pip when needed).
pub fn ensure(python: &Path) -> Result<PathBuf> {
    let target = dir()?;
    if complete(&target) {
        return Ok(target);
    }
    eprintln!(
        "xtask: making the nuclei tiles from the PyPI wheel {WHEEL} into {}",
        target.display()
    );
    let work = crate::data::fresh_download_dir(&target)?;
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
        .arg(&work)
        .arg(WHEEL)
        .status()
        .with_context(|| format!("cannot run {} -m pip", python.display()))?;
    if !status.success() {
        bail!("`pip download --no-deps {WHEEL}` failed (is PyPI reachable?)");
    }
    let wheel = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip download left no wheel")?;
    // A wheel is a zip file: Python's standard library extracts the two members.
    let status = Command::new(python)
        .args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(m, sys.argv[2]) for m in sys.argv[3:]]",
        ])
        .arg(&wheel)
        .arg(&work)
        .args([IMAGE, MASK])
        .status()?;
    if !status.success() {
        bail!(
            "could not extract {IMAGE} and {MASK} from {}",
            wheel.display()
        );
    }
    let (h, w, img) = read_u16(&work.join(IMAGE))?;
    let (mh, mw, mask) = read_u16(&work.join(MASK))?;
    if (h, w) != (mh, mw) {
        bail!("the nuclei image is {w}x{h} but its mask {mw}x{mh}");
    }
    let mut sorted = img.clone();
    sorted.sort_unstable();
    let q = |p: f64| f64::from(sorted[((sorted.len() - 1) as f64 * p) as usize]);
    let (lo, hi) = (q(0.01), q(0.998));
    let img8: Vec<u8> = img
        .iter()
        .map(|&v| {
            ((f64::from(v) - lo) / (hi - lo).max(1.0) * 255.0)
                .clamp(0.0, 255.0)
                .round() as u8
        })
        .collect();
    let mask8: Vec<u8> = mask.iter().map(|&v| u8::from(v > 0)).collect();
    let split_row = h - h / 4;
    let tmp = target.join(".tiles");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let det_target = det_dir()?;
    let det_tmp = target.with_file_name(".nuclei-det.tmp");
    if det_tmp.exists() {
        std::fs::remove_dir_all(&det_tmp)?;
    }
    std::fs::create_dir_all(det_tmp.join("annotations"))?;
    let mut dropped = 0usize;
    let mut nboxes = 0usize;
    let mut counts = [0usize; 2];
    for (split, rows, stride) in [
        ("train", 0..split_row, TILE / 2),
        ("val", split_row..h, TILE),
    ] {
        let images = tmp.join(split).join("images");
        let masks = tmp.join(split).join("masks");
        std::fs::create_dir_all(&images)?;
        std::fs::create_dir_all(&masks)?;
        let det_images = det_tmp.join(split);
        std::fs::create_dir_all(&det_images)?;
        let mut det_tiles = Vec::new();
        let mut y = rows.start;
        while y + TILE <= rows.end {
            let mut x = 0;
            while x + TILE <= w {
                let cut = |src: &[u8]| -> Vec<u8> {
                    (y..y + TILE)
                        .flat_map(|yy| src[yy * w + x..yy * w + x + TILE].iter().copied())
                        .collect()
                };
                let name = format!("y{y:03}-x{x:03}.png");
                write_png(&images.join(&name), TILE, TILE, &cut(&img8))?;
                write_png(&masks.join(&name), TILE, TILE, &cut(&mask8))?;
                write_png(&det_images.join(&name), TILE, TILE, &cut(&img8))?;
                let boxes = instance_boxes(&mask, w, y, x, &mut dropped);
                nboxes += boxes.len();
                det_tiles.push((name, boxes));
                counts[usize::from(split == "val")] += 1;
                x += stride;
            }
            y += stride;
        }
        std::fs::write(
            det_tmp
                .join("annotations")
                .join(format!("instances_{split}.json")),
            coco_json(&det_tiles),
        )?;
    }
    std::fs::write(det_tmp.join("annotations").join("done"), b"")?;
    if det_target.exists() {
        std::fs::remove_dir_all(&det_target)?;
    }
    std::fs::rename(&det_tmp, &det_target)?;
    eprintln!(
        "xtask: nuclei detection tiles in {}: {nboxes} boxes, {dropped} slivers under {MIN_PIXELS} pixels left out",
        det_target.display()
    );
    std::fs::write(tmp.join("val").join("masks").join("done"), b"")?;
    if target.join("train").exists() {
        std::fs::remove_dir_all(target.join("train"))?;
    }
    if target.join("val").exists() {
        std::fs::remove_dir_all(target.join("val"))?;
    }
    std::fs::rename(tmp.join("train"), target.join("train"))?;
    std::fs::rename(tmp.join("val"), target.join("val"))?;
    std::fs::remove_dir_all(&tmp)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "xtask: nuclei tiles: {} training and {} validation tiles of {TILE}x{TILE}",
        counts[0], counts[1]
    );
    Ok(target)
}
