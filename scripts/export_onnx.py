"""Export a run's student to ONNX, check it with ONNX Runtime, and time one image in both formats.

    cargo xtask export-onnx RUN_DIR [--out FILE] [--repeats N]

Reads RUN_DIR/student.pt (the TorchScript student mtkd writes) and RUN_DIR/config.toml (for the
input shape), writes RUN_DIR/student.onnx (opset 17, dynamic batch; input `images`
[B, C, H, W] normalised as the run's test split, output `logits` [B, K]) with PyTorch's
TorchScript-based exporter, then:

- runs ONNX Runtime (CPU) and TorchScript on the same batch of 8 seeded random inputs and fails
  when the logits differ by more than 1e-4 (max abs, relative to the largest logit);
- times a single image (batch 1) in both, one thread each, median over --repeats runs after a
  warm-up, and writes the figures to RUN_DIR/onnx.json and the terminal.
"""

import argparse
import json
import platform
import statistics
import sys
import time
import tomllib
import warnings
from pathlib import Path

import torch


def input_shape(config):
    data = config["data"]
    kind = data["kind"]
    if kind == "mnist":
        c, size = 1, 28
    elif kind in ("cifar10", "cifar100"):
        c, size = 3, 32
    else:
        c, size = data.get("channels", 3), data.get("image_size", 32)
    crop = (data.get("eval_resize") or {}).get("crop")
    if crop:
        size = crop
    return [c, size, size]


def median_ms(fn, x, repeats):
    for _ in range(max(repeats // 10, 5)):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run folder (student.pt, config.toml)")
    p.add_argument("--out", help="the ONNX file (default RUN/student.onnx)")
    p.add_argument("--repeats", type=int, default=200, help="timed single-image runs (default 200)")
    args = p.parse_args()
    run = Path(args.run)
    pt, cfg = run / "student.pt", run / "config.toml"
    for f in (pt, cfg):
        if not f.is_file():
            sys.exit(f"export_onnx: {f} does not exist (give a finished run folder)")
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("export_onnx: onnxruntime is not installed in this Python; `cargo xtask setup` installs it")
    shape = input_shape(tomllib.loads(cfg.read_text()))
    out = Path(args.out) if args.out else run / "student.onnx"
    torch.set_num_threads(1)
    model = torch.jit.load(str(pt))
    model.eval()
    example = torch.zeros([1] + shape)
    tmp = out.with_name(f".{out.name}.tmp")
    # The TorchScript-based exporter is the one that takes a ScriptModule; its deprecation
    # notices are not for the user of this tool.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    tmp.replace(out)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([8] + shape, generator=gen)
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    if got.shape != want.shape or diff > 1e-4 * max(scale, 1.0):
        sys.exit(f"export_onnx: ONNX Runtime's logits differ from TorchScript's by {diff:.3g} (largest logit {scale:.3g})")

    one = torch.randn([1] + shape, generator=gen)
    one_np = one.numpy()
    with torch.no_grad():
        ts_ms = median_ms(model, one, args.repeats)
    ort_ms = median_ms(lambda a: session.run(None, {"images": a}), one_np, args.repeats)
    report = {
        "onnx": str(out),
        "input_shape": [1] + shape,
        "max_abs_diff": diff,
        "largest_logit": scale,
        "single_image_ms": {"torchscript": ts_ms, "onnxruntime": ort_ms},
        "threads": 1,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    (run / "onnx.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"ONNX Runtime vs TorchScript on 8 inputs: max |diff| {diff:.3g} (largest logit {scale:.3g})")
    print(f"one image, 1 thread, median of {args.repeats}: TorchScript {ts_ms:.3f} ms, ONNX Runtime {ort_ms:.3f} ms")


if __name__ == "__main__":
    main()
