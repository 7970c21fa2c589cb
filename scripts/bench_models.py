"""The CIFAR setting of the performance report (docs/PERF.md, `cargo xtask bench`): teachers
ResNet-32x4, WRN-28-4 and RegNetY-400MF as TorchScript files (random weights, seeded), and a
CIFAR-100-shaped dataset of random images (3x32x32, 100 classes) in the CIFAR-100 binary format,
so that `configs/bench-cifar.toml` trains on it with mtkd's own reader. Nothing is downloaded.

    $MTKD_TORCH_PYTHON scripts/bench_models.py --out DIR [--variants fp32,opt,opt-cl,bf16]

writes DIR/data/{train,test}.bin and DIR/teachers/<variant>/<name>.pt through
scripts/export_teacher.py (its --optimize, --channels-last and --precision flags):
  fp32    the plain trace
  opt     frozen (torch.jit.freeze: BatchNorm folded into the convolutions)
  opt-cl  the same with channels-last weights
  bf16    frozen, weights and compute in bfloat16 (outputs float32)
The factories below are what export_teacher.py --module calls (no arguments).
"""
import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import student_zoo  # noqa: E402

NUM_CLASSES = 100
TRAIN, TEST = 1280, 200
VARIANTS = {
    "fp32": [],
    "opt": ["--optimize"],
    "opt-cl": ["--optimize", "--channels-last"],
    "bf16": ["--optimize", "--precision", "bf16"],
}


class LogitsOf(nn.Module):
    """A zoo network (which returns (logits, feature map)) as a logits-only module; export_teacher
    taps the feature map from the named layer."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def resnet32x4():
    return LogitsOf(student_zoo.build("resnet32x4", 3, NUM_CLASSES))


def wrn_28_4():
    return LogitsOf(student_zoo.build("wrn-28-4", 3, NUM_CLASSES))


def regnety_400mf():
    import torchvision

    return torchvision.models.regnet_y_400mf(num_classes=NUM_CLASSES)


# name -> (factory, feature layer)
TEACHERS = {
    "resnet32x4": ("resnet32x4", "net.layer3"),
    "wrn-28-4": ("wrn_28_4", "net.bn1"),
    "regnety-400mf": ("regnety_400mf", "trunk_output"),
}


def write_cifar100(path, n, seed):
    """CIFAR-100 binary records: coarse label, fine label, 3072 bytes (R, G, B planes)."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.randint(0, NUM_CLASSES, (n, 1), generator=g, dtype=torch.uint8)
    coarse = fine // 5
    pixels = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
    rec = torch.cat([coarse, fine, pixels], 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(rec.numpy().tobytes())
    tmp.replace(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_cifar100(data / "train.bin", TRAIN, 1)
    write_cifar100(data / "test.bin", TEST, 2)
    for variant in args.variants.split(","):
        flags = VARIANTS[variant]
        d = args.out / "teachers" / variant
        d.mkdir(parents=True, exist_ok=True)
        for name, (factory, layer) in TEACHERS.items():
            out = d / f"{name}.pt"
            if out.is_file():
                continue
            cmd = [
                sys.executable, str(HERE / "export_teacher.py"),
                "--module", f"{HERE / 'bench_models.py'}:{factory}",
                "--feature-layer", layer, "--num-classes", str(NUM_CLASSES),
                "--input-shape", "3,32,32", "--out", str(out), *flags,
            ]
            subprocess.run(cmd, check=True)
    print(f"bench models and data under {args.out}")


if __name__ == "__main__":
    main()
