"""Golden values for detection: box IoU / GIoU, the GIoU and focal losses, NMS and COCO box AP.

    $MTKD_TORCH_PYTHON scripts/golden_detection.py

Writes crates/vision-tasks/tests/golden/detection.json. The box ops and losses come from
torchvision.ops (box_iou, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss, nms,
batched_nms); the COCO numbers from pycocotools' COCOeval (iouType 'bbox', default parameters),
independent of the Rust code that reads the file.

Boxes are [x1, y1, x2, y2] in pixels, float32: every box is rounded to 2 decimals and cast to
float32 before it goes into torchvision, and the float32 values are written (as exact doubles),
so the Rust side reads exactly what torchvision saw. Outputs are written at full precision.
torchvision's nms drops a box whose IoU with a kept, higher-scored box is > iou_threshold
(strictly); scores are distinct and no pairwise IoU lies within 1e-4 of a case's threshold, so
float32 rounding cannot flip a decision.

Keys
  box_iou      [{a [N,4], b [M,4], iou [N,M]}]      torchvision.ops.box_iou
  giou         [{a, b, giou [N,M]}]                 torchvision.ops.generalized_box_iou
  giou_loss    [{a [N,4], b [N,4], loss [N]}]       generalized_box_iou_loss(reduction="none")
  focal        [{logits [N,K], targets [N,K] (0/1), alpha, gamma, loss [N,K]}]
                                                    sigmoid_focal_loss(reduction="none")
  nms          [{name, boxes [N,4], scores [N], iou_threshold, keep [int]}]   keep in nms's order
                                                    (decreasing score)
  batched_nms  [{name, boxes, scores, classes [int], iou_threshold, keep}]
  coco         [{name, images [{id, width, height, file_name}], categories [{id, name}],
                 annotations [{id, image_id, category_id, bbox [x,y,w,h], area, iscrowd}],
                 detections [{image_id, category_id, bbox [x,y,w,h], score}], stats [12]}]
               stats = COCOeval.stats after evaluate/accumulate/summarize: AP@[.5:.95], AP50,
               AP75, AP small/medium/large, AR@1, AR@10, AR@100, AR small/medium/large (maxDets
               100 for the area rows); -1 where pycocotools finds no ground truth in an area range.
               GT and detection bbox values are rounded to 2 decimals (area = w * h of the
               rounded values) before the evaluation.

The box_iou case with a zero-area box (x1 == x2) in `a` pairs it with boxes of positive area
only: torchvision then gives IoU 0 (union = the other box's area); two zero-area boxes would
give 0 / 0 = NaN, which JSON cannot hold, so that pair is not included.
"""
import contextlib
import copy
import importlib.metadata
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import ops

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 1e-4  # no pairwise IoU this close to an NMS threshold


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def nested(t):
    return t.detach().tolist()


def rows(t):
    return [[float(x) for x in r] for r in t.detach().tolist()]


def f32_boxes(t):
    """Rounded to 2 decimals, as float32."""
    return torch.round(t.double() * 100.0).div(100.0).float()


def random_boxes(g, n, lo=0.0, hi=100.0, min_wh=1.0, max_wh=40.0):
    xy = lo + torch.rand(n, 2, generator=g) * (hi - lo)
    wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
    return f32_boxes(torch.cat([xy, xy + wh], 1))


def clusters(g, n_clusters, per, jitter, hi=200.0):
    """Groups of jittered copies of random boxes: many near-duplicates."""
    centres = random_boxes(g, n_clusters, 0.0, hi, 8.0, 60.0)
    out = []
    for b in centres:
        wh = (b[2:] - b[:2]).repeat(2)
        out.append(b + (torch.rand(per, 4, generator=g) - 0.5) * 2.0 * jitter * wh)
    boxes = torch.cat(out)
    x1 = torch.minimum(boxes[:, 0], boxes[:, 2] - 1.0)
    y1 = torch.minimum(boxes[:, 1], boxes[:, 3] - 1.0)
    return f32_boxes(torch.stack([x1, y1, boxes[:, 2], boxes[:, 3]], 1))


def distinct_scores(g, n):
    # A random permutation of n evenly spaced values plus a small noise: no ties.
    perm = torch.randperm(n, generator=g).float()
    return ((perm + 0.5 + 0.4 * (torch.rand(n, generator=g) - 0.5)) / n).float()


def safe(boxes, thr, classes=None):
    iou = ops.box_iou(boxes, boxes)
    if classes is not None:
        iou = iou * (classes[:, None] == classes[None, :])
    iou.fill_diagonal_(0.0)
    return not bool(((iou - thr).abs() < MARGIN).any())


def box_iou_cases():
    g = torch.Generator().manual_seed(10)
    a = random_boxes(g, 7)
    b = random_boxes(g, 9)
    random = {"a": a, "b": b}
    # identical boxes (IoU 1 on the diagonal) and boxes far apart (IoU 0)
    same = random_boxes(g, 4)
    far = f32_boxes(same + 500.0)
    ident = {"a": same, "b": torch.cat([same, far])}
    # a zero-area box (x1 == x2) in a; b has positive areas only (see the module docstring)
    zero = f32_boxes(torch.tensor([[10.0, 10.0, 10.0, 30.0], [0.0, 0.0, 20.0, 20.0], [5.5, 5.5, 25.25, 12.0]]))
    b = f32_boxes(torch.tensor([[0.0, 0.0, 20.0, 40.0], [8.0, 12.0, 40.0, 20.0], [50.0, 50.0, 60.0, 70.0]]))
    degenerate = {"a": zero, "b": b}
    out = []
    for c in (random, ident, degenerate):
        iou = ops.box_iou(c["a"], c["b"])
        assert torch.isfinite(iou).all()
        out.append({"a": rows(c["a"]), "b": rows(c["b"]), "iou": rows(iou)})
    return out


def giou_cases():
    g = torch.Generator().manual_seed(11)
    a = random_boxes(g, 6)
    b = random_boxes(g, 8)
    same = random_boxes(g, 3)
    c2 = {"a": same, "b": torch.cat([same, f32_boxes(same + 300.0), random_boxes(g, 2)])}
    out = []
    for c in ({"a": a, "b": b}, c2):
        out.append({"a": rows(c["a"]), "b": rows(c["b"]), "giou": rows(ops.generalized_box_iou(c["a"], c["b"]))})
    return out


def giou_loss_cases():
    g = torch.Generator().manual_seed(12)
    a = random_boxes(g, 10)
    b = random_boxes(g, 10)
    b[0] = a[0]  # loss 0
    b[1] = f32_boxes(a[1] + 200.0)  # disjoint and far: loss near 2
    b[2] = f32_boxes(a[2] + torch.tensor([1.0, 1.0, 1.0, 1.0]))  # slightly shifted
    loss = ops.generalized_box_iou_loss(a, b, reduction="none")
    return [{"a": rows(a), "b": rows(b), "loss": flat(loss)}]


def focal_cases():
    g = torch.Generator().manual_seed(13)
    n, k = 12, 5
    logits = torch.randn(n, k, generator=g) * 3.0
    logits[0, 0], logits[0, 1] = 25.0, -25.0  # saturated
    targets = (torch.rand(n, k, generator=g) < 0.3).float()
    alpha, gamma = 0.25, 2.0
    loss = ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return [{"logits": rows(logits), "targets": rows(targets), "alpha": alpha, "gamma": gamma, "loss": rows(loss)}]


def pearson_cases():
    """mtkd's Pearson-style feature KD: per sample and channel, standardise over the locations
    (biased variance, eps 1e-6), then the mean squared difference over channels and locations."""
    g = torch.Generator().manual_seed(17)
    b, c, l = 3, 4, 21
    s = torch.randn(b, c, l, 1, generator=g) * 2.0 + 0.5
    t = torch.randn(b, c, l, 1, generator=g) * 50.0 - 3.0  # another scale entirely
    t[1] = s[1] * 40.0 + 7.0  # a perfectly correlated channel set: loss 0 up to eps
    def norm(x):
        f = x.flatten(2)
        return (f - f.mean(-1, keepdim=True)) / (f.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    loss = ((norm(s) - norm(t)) ** 2).flatten(1).mean(-1)
    return [{"student": nested(s), "teacher": nested(t), "loss": flat(loss)}]


def class_kd_cases():
    """mtkd's detection class KD: binary KL per location and class at temperature T (written
    with BCE: KL(p_t || p_s) = BCE(s / T, p_t) - BCE(t / T, p_t)), times T^2, summed over
    classes, averaged over locations with foreground weights max(max_k sigmoid(t_k), positive)."""
    g = torch.Generator().manual_seed(19)
    b, k, l, temp = 2, 3, 17, 2.0
    s = torch.randn(b, k + 5, l, generator=g) * 2.0
    t = torch.randn(b, k + 5, l, generator=g) * 3.0 - 1.0
    classes = torch.full((b, l), -1, dtype=torch.int64)
    classes[0, 3], classes[0, 4], classes[1, 10] = 0, 2, 1
    pt = torch.sigmoid(t[:, :k] / temp)
    bce = lambda z: F.binary_cross_entropy_with_logits(z, pt, reduction="none")
    kl = (bce(s[:, :k] / temp) - bce(t[:, :k] / temp)).sum(1) * temp * temp  # [B, L]
    w = torch.maximum(torch.sigmoid(t[:, :k]).amax(1), (classes >= 0).float())
    loss = (w * kl).sum(1) / w.sum(1)
    return [{"student": nested(s), "teacher": nested(t), "classes": nested(classes), "temperature": temp,
             "loss": flat(loss)}]


def nms_cases():
    specs = [
        ("n5", 20, lambda g: clusters(g, 2, 3, 0.15, 60.0)[:5], 0.5),
        ("n50", 21, lambda g: clusters(g, 10, 5, 0.15, 100.0), 0.6),
        ("n300", 22, lambda g: random_boxes(g, 300, 0.0, 300.0, 5.0, 80.0), 0.3),
        ("near-duplicates", 23, lambda g: clusters(g, 12, 15, 0.08), 0.5),
    ]
    out = []
    for name, seed, make, thr in specs:
        for attempt in range(100):
            g = torch.Generator().manual_seed(seed * 1000 + attempt)
            boxes = make(g)
            scores = distinct_scores(g, boxes.shape[0])
            if safe(boxes, thr):
                break
        else:
            raise SystemExit(f"nms case {name}: no draw keeps IoUs away from the threshold")
        keep = ops.nms(boxes, scores, thr)
        print(f"nms {name}: N={boxes.shape[0]} thr={thr} kept {keep.numel()}")
        out.append({"name": name, "boxes": rows(boxes), "scores": flat(scores), "iou_threshold": thr,
                    "keep": [int(i) for i in keep.tolist()]})
    return out


def batched_nms_cases():
    specs = [("n60-c3", 30, 4, 15, 3, 0.5), ("n300-c5", 31, 15, 20, 5, 0.4)]
    out = []
    for name, seed, n_clusters, per, n_classes, thr in specs:
        for attempt in range(100):
            g = torch.Generator().manual_seed(seed * 1000 + attempt)
            # each cluster's boxes get random classes: the same cluster is shared across classes
            boxes = clusters(g, n_clusters, per, 0.1)
            classes = torch.randint(0, n_classes, (boxes.shape[0],), generator=g)
            scores = distinct_scores(g, boxes.shape[0])
            if safe(boxes, thr, classes):
                break
        else:
            raise SystemExit(f"batched_nms case {name}: no draw keeps IoUs away from the threshold")
        keep = ops.batched_nms(boxes, scores, classes, thr)
        blind = ops.nms(boxes, scores, thr)
        assert keep.numel() > blind.numel(), "class-awareness should matter"
        print(f"batched_nms {name}: N={boxes.shape[0]} classes={n_classes} thr={thr} kept {keep.numel()} "
              f"(class-blind nms keeps {blind.numel()})")
        out.append({"name": name, "boxes": rows(boxes), "scores": flat(scores),
                    "classes": [int(c) for c in classes.tolist()], "iou_threshold": thr,
                    "keep": [int(i) for i in keep.tolist()]})
    return out


# ---- COCO ----

def r2(v):
    return round(float(v), 2)


def xywh(x, y, w, h):
    return [r2(x), r2(y), r2(w), r2(h)]


def gt_box(g, size, lo_side, hi_side):
    w = lo_side + float(torch.rand((), generator=g)) * (hi_side - lo_side)
    h = w * (0.6 + 0.8 * float(torch.rand((), generator=g)))
    w, h = min(w, size - 1.0), min(h, size - 1.0)
    x = float(torch.rand((), generator=g)) * (size - w)
    y = float(torch.rand((), generator=g)) * (size - h)
    return xywh(x, y, w, h)


def jitter(g, bbox, amount, size):
    x, y, w, h = bbox
    d = [(float(torch.rand((), generator=g)) - 0.5) * 2.0 * amount for _ in range(4)]
    x1, y1 = x + d[0] * w, y + d[1] * h
    x2, y2 = x + w + d[2] * w, y + h + d[3] * h
    x1, y1 = max(0.0, min(x1, size - 1.0)), max(0.0, min(y1, size - 1.0))
    x2, y2 = max(x1 + 0.5, min(x2, size)), max(y1 + 0.5, min(y2, size))
    return xywh(x1, y1, x2 - x1, y2 - y1)


def iou_xywh(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def annotation(aid, image_id, cat, bbox):
    area = bbox[2] * bbox[3]
    # pycocotools' area ranges are closed at both ends; stay off the boundaries
    assert all(abs(area - edge) > 1e-3 for edge in (32.0 ** 2, 96.0 ** 2)), area
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": area, "iscrowd": 0}


def evaluate(dataset, detections):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(detections))  # loadRes adds area/id/iscrowd to the dicts
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats]


def coco_case(name, images, categories, annotations, detections):
    if name != "perfect":
        # distinct scores: the order of tied detections would be an implementation detail
        assert len({d["score"] for d in detections}) == len(detections), name
    dataset = {"images": images, "categories": categories, "annotations": annotations}
    print(f"coco {name}: {len(images)} images, {len(annotations)} annotations, {len(detections)} detections")
    stats = evaluate(dataset, detections)
    return {"name": name, "images": images, "categories": categories, "annotations": annotations,
            "detections": detections, "stats": stats}


def coco_mixed():
    g = torch.Generator().manual_seed(40)
    size = 200
    images = [{"id": 101 + i, "width": size, "height": size, "file_name": f"mixed_{i}.png"} for i in range(8)]
    categories = [{"id": 1, "name": "cell"}, {"id": 3, "name": "nucleus"}, {"id": 7, "name": "debris"}]
    sides = [(8.0, 28.0), (36.0, 90.0), (100.0, 170.0)]  # small, medium, large
    jitters = [0.02, 0.05, 0.1, 0.2, 0.3, 0.45]
    annotations, detections, ious = [], [], []
    aid = 1
    for i, img in enumerate(images):
        if i == 7:
            # no annotation at all, but three false positives
            for _ in range(3):
                detections.append({"image_id": img["id"], "category_id": [1, 3, 7][_],
                                   "bbox": gt_box(g, size, 10.0, 60.0), "score": float(torch.rand((), generator=g))})
            continue
        cats = [1, 3] if i % 3 == 0 else [1, 3, 7]  # category 7 absent from images 0, 3, 6
        n = 2 + int(torch.randint(0, 4, (), generator=g))
        for j in range(n):
            cat = cats[int(torch.randint(0, len(cats), (), generator=g))]
            lo, hi = sides[(i + j) % 3] if not (i == 1 and j == 0) else sides[2]
            bbox = gt_box(g, size, lo, hi)
            annotations.append(annotation(aid, img["id"], cat, bbox))
            aid += 1
            if float(torch.rand((), generator=g)) < 0.15:
                continue  # a miss
            amt = jitters[(aid + i) % len(jitters)]
            det = jitter(g, bbox, amt, size)
            ious.append(iou_xywh(det, bbox))
            detections.append({"image_id": img["id"], "category_id": cat, "bbox": det,
                               "score": float(torch.rand((), generator=g))})
            if i == 2 and j == 0:
                # two more detections of the same object (duplicates: at most one is a true positive)
                for amt in (0.03, 0.08):
                    detections.append({"image_id": img["id"], "category_id": cat,
                                       "bbox": jitter(g, bbox, amt, size),
                                       "score": float(torch.rand((), generator=g))})
        for _ in range(int(torch.randint(1, 4, (), generator=g))):  # false positives
            detections.append({"image_id": img["id"], "category_id": [1, 3, 7][int(torch.randint(0, 3, (), generator=g))],
                               "bbox": gt_box(g, size, 8.0, 80.0), "score": float(torch.rand((), generator=g))})
        if i == 4:
            # a right box with the wrong class
            a = annotations[-1]
            other = 7 if a["category_id"] != 7 else 1
            detections.append({"image_id": img["id"], "category_id": other, "bbox": jitter(g, a["bbox"], 0.02, size),
                               "score": 0.9})
    areas = [a["area"] for a in annotations]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2 and any(32 ** 2 < a < 96 ** 2 for a in areas)
    print(f"coco mixed: matched-detection IoUs {min(ious):.2f}..{max(ious):.2f}")
    return coco_case("mixed", images, categories, annotations, detections)


def coco_tiny():
    g = torch.Generator().manual_seed(41)
    size = 64
    images = [{"id": i + 1, "width": size, "height": size, "file_name": f"tiny_{i}.png"} for i in range(12)]
    categories = [{"id": 1, "name": "nucleus"}]
    annotations, detections = [], []
    aid = 1
    for i, img in enumerate(images):
        gts = []
        for _ in range(1 + int(torch.randint(0, 6, (), generator=g))):
            bbox = gt_box(g, size, 4.0, 14.0)
            annotations.append(annotation(aid, img["id"], 1, bbox))
            gts.append(bbox)
            aid += 1
        start = len(detections)
        for bbox in gts:
            if float(torch.rand((), generator=g)) < 0.1:
                continue
            amt = [0.05, 0.1, 0.2, 0.3][int(torch.randint(0, 4, (), generator=g))]
            detections.append({"image_id": img["id"], "category_id": 1, "bbox": jitter(g, bbox, amt, size),
                               "score": 0.3 + 0.7 * float(torch.rand((), generator=g))})
        if i == 5:
            # 130 detections in all, the true ones scored low: ranked past 100, maxDets cuts them
            for d in detections[start:]:
                d["score"] *= 0.01
            n_fp = 130 - (len(detections) - start)
        else:
            n_fp = int(torch.randint(0, 4, (), generator=g))
        for _ in range(n_fp):
            detections.append({"image_id": img["id"], "category_id": 1, "bbox": gt_box(g, size, 3.0, 16.0),
                               "score": float(torch.rand((), generator=g))})
    per_image = {}
    for d in detections:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) >= 130, per_image
    return coco_case("tiny", images, categories, annotations, detections)


def coco_perfect():
    g = torch.Generator().manual_seed(42)
    size = 128
    images = [{"id": 10 + i, "width": size, "height": size, "file_name": f"perfect_{i}.png"} for i in range(4)]
    categories = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}]
    annotations, detections = [], []
    aid = 1
    for img in images:
        for j in range(3):
            bbox = gt_box(g, size, 6.0, 28.0) if j < 2 else gt_box(g, size, 40.0, 80.0)  # no large box
            cat = [2, 5][(aid + j) % 2]
            annotations.append(annotation(aid, img["id"], cat, bbox))
            detections.append({"image_id": img["id"], "category_id": cat, "bbox": list(bbox), "score": 1.0})
            aid += 1
    return coco_case("perfect", images, categories, annotations, detections)


def main():
    out = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pycocotools": importlib.metadata.version("pycocotools"),
        "box_iou": box_iou_cases(),
        "giou": giou_cases(),
        "giou_loss": giou_loss_cases(),
        "focal": focal_cases(),
        "pearson": pearson_cases(),
        "class_kd": class_kd_cases(),
        "nms": nms_cases(),
        "batched_nms": batched_nms_cases(),
        "coco": [coco_mixed(), coco_tiny(), coco_perfect()],
    }
    for c in out["coco"]:
        print(f"coco {c['name']} stats: {[round(s, 4) for s in c['stats']]}")
    path = ROOT / "crates/vision-tasks/tests/golden/detection.json"
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
