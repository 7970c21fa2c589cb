"""Wrap a PyTorch classifier or segmentation model into mtkd's teacher contract and write it as a
TorchScript file.

The contract (crates/teachers/src/lib.rs): `forward(x)` takes a float batch [B, C, H, W] and
returns the tuple (logits [B, K], feature_map [B, C', H', W']), the feature map being the output of
a named layer (the last convolutional map, from which mtkd average-pools the embedding); with
--logits-only it returns just logits [B, K].

    # a torchvision architecture, randomly initialised (seeded) or from a state dict
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --torchvision resnet18 --num-classes 10 \\
        --input-shape 3,32,32 --out /tmp/resnet18.pt
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --torchvision mobilenet_v2 --num-classes 10 \\
        --input-shape 3,32,32 --state-dict weights.pth --out teachers/mbv2.pt
    # one-channel input (resnet* and mobilenet_v2 only): the first convolution is replaced
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --torchvision resnet18 --num-classes 10 \\
        --in-channels 1 --input-shape 1,28,28 --out /tmp/resnet18-gray.pt
    # a torchvision segmentation model (random init: nothing is downloaded, backbone included);
    # forward then returns (per-pixel logits [B, K, H, W], feature map)
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --torchvision deeplabv3_mobilenet_v3_large \
        --num-classes 11 --input-shape 3,64,64 --out /tmp/deeplab.pt
    # any nn.Module: a python file and a factory function in it that takes no arguments
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --module my_net.py:build --feature-layer body.stage3 \\
        --input-shape 3,32,32 --out /tmp/my_net.pt

Options
  --torchvision NAME | --module FILE.py:FACTORY   where the model comes from (one is required)
  --state-dict FILE     weights loaded with torch.load(FILE, map_location='cpu') (a plain state dict,
                        or a checkpoint dict holding one under 'state_dict' or 'model'; a
                        'module.' prefix from DataParallel is stripped)
  --num-classes K       classes of the torchvision head (default 1000); for --module, checked
                        against the model's output when given
  --in-channels C       input channels of the first convolution (torchvision resnet*, mobilenet_v2);
                        with --state-dict, pretrained RGB stem filters are summed (C = 1) or
                        repeated and scaled by 3/C (C > 3), as timm's adapt_input_conv does.
                        (Or keep the teacher RGB and give it `[[teachers]] input` in the config.)
  --feature-layer NAME  dotted module name whose output is the feature map (defaults: resnet* ->
                        layer4, mobilenet_v2 -> features, deeplabv3_* -> classifier.0 (the ASPP),
                        fcn_* -> classifier.2, lraspp_* -> classifier.cbr; required otherwise
                        unless --logits-only)
  --segmentation        a --module model is a segmentation model: its output (a tensor, or a
                        dict's 'out' as torchvision's) is per-pixel logits [B, K, H, W]
                        (implied for torchvision.models.segmentation models)
  --logits-only         forward returns logits only (logit KD)
  --input-shape C,H,W   per-sample input of the trace (default 3,224,224; the channel count
                        defaults to --in-channels); the example batch is [2, C, H, W]
  --seed S              torch.manual_seed before the model is built (default 0)
  --out FILE.pt         the TorchScript file (written to FILE.pt.tmp, then renamed)

The model is put in eval mode, wrapped in a module that captures the feature layer's output with a
forward hook, and traced with torch.jit.trace. The saved file is reloaded with torch.jit.load and its
outputs are compared with the eager model's (max abs diff < 1e-5) on the example batch and on a
batch of another size. scripts/teacher_logits.py runs a saved teacher on a fixed input for the Rust
tests.
"""
import argparse
import difflib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

TOLERANCE = 1e-5
DEFAULT_FEATURE_LAYERS = {
    "resnet": "layer4",
    "mobilenet_v2": "features",
    "deeplabv3": "classifier.0",
    "fcn": "classifier.2",
    "lraspp": "classifier.cbr",
}
SEGMENTATION_FAMILIES = ("deeplabv3", "fcn", "lraspp")


class SegmentationOut(nn.Module):
    """A segmentation model's per-pixel logits: torchvision's models return {'out': ..., 'aux': ...}."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


class ExportError(Exception):
    """A problem with the user's request; printed as one message without a traceback."""


class FeatureTap(nn.Module):
    """Runs `model` and returns (logits, output of `layer`), caught by a forward hook."""

    def __init__(self, model, layer_name, layer):
        super().__init__()
        self.model = model
        self.layer_name = layer_name
        self._captured = []
        # The hook is plain Python, run while tracing, so the captured tensor is part of the graph.
        layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        # A copy, so that a later in-place op of the model (`out += identity`, ReLU(inplace=True))
        # cannot change the captured map.
        self._captured.append(output.clone() if isinstance(output, torch.Tensor) else output)

    def forward(self, x):
        self._captured = []
        logits = self.model(x)
        captured, self._captured = self._captured, []
        if len(captured) != 1:
            raise ExportError(
                f"feature layer `{self.layer_name}` ran {len(captured)} times in one forward pass; "
                "choose a layer that runs exactly once"
            )
        return logits, captured[0]


class LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def parse_ints(text, n, what):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n or any(v <= 0 for v in values):
        raise ExportError(f"{what} must be {n} positive integers separated by commas, got `{text}`")
    return values


def replace_first_conv(model, name, channels):
    """Give the stem convolution of a torchvision resnet*/mobilenet_v2 `channels` inputs."""
    if name.startswith("resnet"):
        parent, attr = model, "conv1"
    elif name == "mobilenet_v2":
        parent, attr = model.features[0], "0"
    else:
        raise ExportError(
            f"--in-channels is implemented for torchvision resnet* and mobilenet_v2 only, not `{name}`; "
            "build the model yourself and export it with --module FILE.py:FACTORY"
        )
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Conv2d(
        channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )
    # The initialisation torchvision gives these stems.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def build_torchvision(name, num_classes, in_channels):
    try:
        import torchvision
    except ImportError as e:
        raise ExportError(
            f"torchvision cannot be imported ({e}); `cargo xtask setup` installs the version paired "
            "with mtkd's torch into its virtual environment"
        ) from None
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    if name in segmentation:
        if in_channels is not None and in_channels != 3:
            raise ExportError("--in-channels is not implemented for segmentation models; give the teacher `[[teachers]] input`")
        # weights_backbone=None: nothing is downloaded; aux_loss off: forward's 'out' only.
        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
    available = torchvision.models.list_models(module=torchvision.models) + segmentation
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ExportError(
            f"unknown torchvision classification model `{name}`.{hint} "
            f"Available: {', '.join(sorted(available))}"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels is not None and in_channels != 3:
        replace_first_conv(model, name, in_channels)
    return model


def build_from_file(spec):
    path, sep, factory = spec.rpartition(":")
    if not sep or not path or not factory:
        raise ExportError(f"--module wants FILE.py:FACTORY, got `{spec}`")
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"--module file {file} does not exist")
    mod_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(mod_spec)
    # Let the file import its siblings.
    sys.path.insert(0, str(file.resolve().parent))
    mod_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ExportError(f"{file} has no callable `{factory}`")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ExportError(f"{file}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict(model, file):
    if not Path(file).is_file():
        raise ExportError(f"state dict {file} does not exist")
    try:
        sd = torch.load(file, map_location="cpu")
    except Exception as e:  # weights_only refusals, corrupt files
        raise ExportError(f"cannot load the state dict {file}: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ExportError(f"{file} does not hold a state dict (a dict of parameter name -> tensor)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = model.state_dict()
    sd = adapt_input_conv(sd, own)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:8]))
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:8]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:8]))
    if problems:
        raise ExportError(
            f"state dict {file} does not fit the model ({'. '.join(problems)}). Check --num-classes, "
            "--in-channels and the architecture."
        )
    model.load_state_dict(sd)


def adapt_input_conv(sd, own):
    """Pretrained RGB stem weights for a model with other input channels (--in-channels), as the
    usual model libraries do (timm's adapt_input_conv): one channel gets the sum of the three RGB
    filters (a grey image is R = G = B, so the response is unchanged); C > 3 channels get the RGB
    filters repeated and scaled by 3 / C."""
    out = dict(sd)
    for k, v in sd.items():
        want = own.get(k)
        if (
            want is None
            or v.dim() != 4
            or want.dim() != 4
            or v.shape[1] != 3
            or want.shape[1] == 3
            or v.shape[0] != want.shape[0]
            or v.shape[2:] != want.shape[2:]
        ):
            continue
        c = want.shape[1]
        if c == 1:
            out[k] = v.sum(dim=1, keepdim=True)
        else:
            reps = -(-c // 3)
            out[k] = v.repeat(1, reps, 1, 1)[:, :c] * (3.0 / c)
        print(f"export_teacher: {k}: RGB filters adapted to {c} input channel(s)", file=sys.stderr)
    return out


def find_layer(model, name):
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    children = [n for n, _ in model.named_children()]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    nested = next((n for n in modules if "." in n), None)
    dots = f" (use dots for nested ones, e.g. `{nested}`)" if nested else ""
    raise ExportError(
        f"feature layer `{name}` is not a module of the model.{hint} "
        f"Top-level children: {', '.join(children) or '(none)'}{dots}"
    )


def run(module, x):
    with torch.no_grad():
        out = module(x)
    return out if isinstance(out, tuple) else (out,)


def check_outputs(out, batch, num_classes, dense=False):
    logits = out[0]
    rank, want = (4, "per-pixel logits [B, K, H, W]") if dense else (2, "logits [B, K]")
    if not isinstance(logits, torch.Tensor) or logits.dim() != rank or logits.shape[0] != batch:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ExportError(f"the model returns {got}, not {want}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ExportError(f"the model returns {logits.shape[1]} logits, but --num-classes is {num_classes}")
    if len(out) > 1:
        fmap = out[1]
        if not isinstance(fmap, torch.Tensor) or fmap.dim() != 4 or fmap.shape[0] != batch:
            got = list(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
            raise ExportError(
                f"the feature layer outputs {got}, not a feature map [B, C', H', W']; "
                "choose a convolutional layer (e.g. the last stage before pooling)"
            )


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Export a PyTorch classifier as an mtkd TorchScript teacher (see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torchvision", metavar="NAME", help="torchvision model name, e.g. resnet18")
    src.add_argument("--module", metavar="FILE.py:FACTORY", help="python file and factory returning an nn.Module")
    p.add_argument("--state-dict", metavar="FILE", help="weights to load (default: random init)")
    p.add_argument("--num-classes", type=int, metavar="K", help="classes (torchvision default 1000)")
    p.add_argument("--in-channels", type=int, metavar="C", help="input channels (resnet*, mobilenet_v2)")
    p.add_argument("--feature-layer", metavar="NAME", help="dotted name of the feature-map layer")
    p.add_argument("--logits-only", action="store_true", help="forward returns logits only")
    p.add_argument("--segmentation", action="store_true", help="a --module model gives per-pixel logits")
    p.add_argument("--input-shape", metavar="C,H,W", help="per-sample input shape (default 3,224,224)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the random init (default 0)")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="TorchScript file to write")
    args = p.parse_args(argv)

    if args.logits_only and args.feature_layer:
        raise ExportError("--feature-layer and --logits-only exclude each other")
    if args.in_channels is not None and args.in_channels <= 0:
        raise ExportError("--in-channels must be positive")
    if args.num_classes is not None and args.num_classes <= 0:
        raise ExportError("--num-classes must be positive")
    if args.in_channels is not None and args.module:
        raise ExportError("--in-channels applies to --torchvision models; build a --module with the channels it needs")
    if args.input_shape:
        shape = parse_ints(args.input_shape, 3, "--input-shape")
    else:
        shape = [args.in_channels or 3, 224, 224]
    if args.in_channels is not None and shape[0] != args.in_channels:
        raise ExportError(f"--input-shape has {shape[0]} channels but --in-channels is {args.in_channels}")

    torch.manual_seed(args.seed)
    if args.torchvision:
        name = args.torchvision
        num_classes = args.num_classes if args.num_classes is not None else 1000
        model = build_torchvision(name, num_classes, args.in_channels)
        if name.startswith("resnet"):
            family = "resnet"
        elif name in DEFAULT_FEATURE_LAYERS:
            family = name
        else:
            family = name.split("_")[0]  # deeplabv3_*, fcn_*, lraspp_*
        args.segmentation = args.segmentation or family in SEGMENTATION_FAMILIES
        if args.feature_layer is None and not args.logits_only:
            if family not in DEFAULT_FEATURE_LAYERS:
                raise ExportError(
                    f"no default feature layer for torchvision `{name}`: pass --feature-layer NAME "
                    f"(top-level children: {', '.join(n for n, _ in model.named_children())}) or --logits-only"
                )
            args.feature_layer = DEFAULT_FEATURE_LAYERS[family]
    else:
        num_classes = args.num_classes
        model = build_from_file(args.module)
        if args.feature_layer is None and not args.logits_only:
            raise ExportError(
                "a --module model needs --feature-layer NAME (top-level children: "
                f"{', '.join(n for n, _ in model.named_children()) or '(none)'}) or --logits-only"
            )
    if args.state_dict:
        load_state_dict(model, args.state_dict)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)

    inner = SegmentationOut(model) if args.segmentation else model
    if args.logits_only:
        wrapper = LogitsOnly(inner)
    else:
        wrapper = FeatureTap(inner, args.feature_layer, find_layer(model, args.feature_layer))
    wrapper.eval()

    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(args.seed))
    try:
        eager = run(wrapper, example)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"the model fails on an input of shape {list(example.shape)}: {str(e).splitlines()[0]}. "
            "Check --input-shape and --in-channels."
        ) from None
    check_outputs(eager, 2, num_classes, args.segmentation)

    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit as deprecated; TorchScript is still what libtorch/tch loads.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        traced.save(str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    loaded = torch.jit.load(str(out), map_location="cpu")
    loaded.eval()
    got = run(loaded, example)
    if len(got) != len(eager):
        raise ExportError(f"{out} returns {len(got)} output(s), the eager model {len(eager)}")
    diff = max_diff(got, eager)
    # Another batch size: a trace that baked in B=2 would fail or differ here.
    other = torch.randn(3, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    try:
        diff = max(diff, max_diff(run(loaded, other), run(wrapper, other)))
    except Exception as e:
        raise ExportError(f"{out} fails on a batch of 3 (the trace fixed the batch size?): {e}") from None
    if diff >= TOLERANCE:
        raise ExportError(f"{out} differs from the eager model by {diff:.3g} (limit {TOLERANCE:g})")

    fmap = list(got[1].shape) if len(got) > 1 else None
    print(
        f"{out}: logits {list(got[0].shape)}, feature map "
        f"{fmap if fmap else 'none (logits only)'}"
        f"{f' from `{args.feature_layer}`' if fmap else ''}, input [B, {', '.join(map(str, shape))}], "
        f"max abs diff {diff:.1e}, {out.stat().st_size} bytes"
    )


if __name__ == "__main__":
    try:
        main()
    except ExportError as e:
        print(f"export_teacher: {e}", file=sys.stderr)
        sys.exit(2)
