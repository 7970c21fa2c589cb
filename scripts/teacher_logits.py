"""Run a TorchScript teacher on a fixed input and write its outputs as JSON (for the Rust tests).

    $MTKD_TORCH_PYTHON scripts/teacher_logits.py --model /tmp/resnet18.pt --shape 2,3,32,32 --out /tmp/r18.json
    $MTKD_TORCH_PYTHON scripts/teacher_logits.py --native resnet8 --weights W.safetensors \
        --shape 2,1,28,28 --classes 10 --precision bf16 --out /tmp/r8.json

--native builds mtkd's architecture as its PyTorch twin (scripts/student_zoo.py, the same
parameter names) with the weights of an mtkd .safetensors file, in eval mode (it returns
(logits, feature_map)). --precision bf16 runs the model as mtkd's `teacher_precision = "bf16"`
does: weights, buffers and input cast to bfloat16, the outputs back to float32.

The input is deterministic and needs no file:
    x = torch.arange(B*C*H*W, dtype=torch.float32).reshape(B, C, H, W).sin()
The model is loaded on the CPU with torch.jit.load, put in eval mode and run without gradients.
The JSON written (atomically, via OUT.tmp) is
    {"shape": logits shape [B, K], "logits": the logits flattened row-major,
     "features_shape": [B, C', H', W'] or null, "features_sum": sum of the feature map or null,
     "input_shape": [B, C, H, W]}
features_* are null for a logits-only teacher (forward returns one tensor).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description="Run a TorchScript teacher on a fixed input; write JSON.")
    p.add_argument("--model", metavar="FILE", help="TorchScript teacher file")
    p.add_argument("--native", metavar="ARCH", help="an mtkd architecture (with --weights, --classes)")
    p.add_argument("--weights", metavar="FILE", help="its .safetensors weights")
    p.add_argument("--classes", type=int, help="its class count")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--shape", required=True, metavar="B,C,H,W", help="input batch shape")
    p.add_argument("--out", required=True, metavar="FILE.json", help="JSON file to write")
    args = p.parse_args(argv)

    try:
        shape = [int(v) for v in args.shape.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or any(v <= 0 for v in shape):
        sys.exit(f"teacher_logits: --shape must be four positive integers B,C,H,W, got `{args.shape}`")
    if args.native:
        if not args.weights or not args.classes:
            sys.exit("teacher_logits: --native needs --weights and --classes")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import student_zoo
        from bench_eager import read_safetensors

        model = student_zoo.build(args.native, shape[1], args.classes)
        missing, unexpected = model.load_state_dict(read_safetensors(args.weights), strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"teacher_logits: {args.weights} does not fit {args.native}: "
                     f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        args.model = args.native
    else:
        if not args.model or not Path(args.model).is_file():
            sys.exit(f"teacher_logits: model file {args.model} does not exist")
        model = torch.jit.load(args.model, map_location="cpu")
    model.eval()
    n = shape[0] * shape[1] * shape[2] * shape[3]
    x = torch.arange(n, dtype=torch.float32).reshape(shape).sin()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = type(out)(t.float() if isinstance(t, torch.Tensor) else t for t in out)
    elif isinstance(out, torch.Tensor):
        out = out.float()

    if isinstance(out, torch.Tensor):
        logits, features = out, None
    elif isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        logits, features = out
    else:
        sys.exit(f"teacher_logits: {args.model} returns {type(out).__name__}, not logits or (logits, feature_map)")
    if logits.dim() != 2 or logits.shape[0] != shape[0]:
        sys.exit(f"teacher_logits: logits have shape {list(logits.shape)}, expected [{shape[0]}, K]")

    result = {
        "shape": list(logits.shape),
        "logits": [float(v) for v in logits.reshape(-1).tolist()],
        "features_shape": list(features.shape) if features is not None else None,
        "features_sum": float(features.sum()) if features is not None else None,
        "input_shape": shape,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, out_path)
    fs = result["features_shape"]
    print(f"{out_path}: logits {result['shape']}, features {fs if fs else 'none'}")


if __name__ == "__main__":
    main()
