"""Wrap a PyTorch classifier, segmentation or detection model into mtkd's teacher contract and write
it as a TorchScript file.

The contract (crates/teachers/src/lib.rs): `forward(x)` takes a float batch [B, C, H, W] and
returns the tuple (logits [B, K], feature_map [B, C', H', W']), the feature map being the output of
a named layer (the last convolutional map, from which mtkd average-pools the embedding); with
--logits-only it returns just logits [B, K].

Detection models (--torchvision fcos_resnet50_fpn | retinanet_resnet50_fpn) follow the DETECTION
contract instead: `forward(x)` takes the normalised batch [B, C, H, W] (torchvision's
GeneralizedRCNNTransform is not used: no resizing, no normalisation) and returns the tuple
(dense [B, K+5, L], features [B, 256, L, 1]). Level l has stride s_l (--det-strides) and
h_l x w_l = ceil(H / s_l) x ceil(W / s_l) locations; the L = sum_l h_l * w_l locations are flattened
level by level, row-major within a level (index = offset_l + y * w_l + x), and location (x, y) of
level l has its centre at ((x + 0.5) * s_l, (y + 0.5) * s_l). Dense channels: 0..K the per-class
logits (sigmoid classifier), K..K+4 the distances (l, t, r, b) from the centre to the box's left,
top, right and bottom sides divided by s_l (clamped at 0), K+4 the centerness logit (FCOS's
bbox_ctrness; RetinaNet has none and gives 0). Features are the FPN outputs, each flattened to
[B, 256, h_l * w_l] and concatenated along the locations. The backbone is a randomly initialised
resnet50 with an FPN over the stages of the strides (4 -> layer1 (C2), 8 -> layer2, 16 -> layer3,
32 -> layer4), no P6/P7; the head has one anchor per location (size = the stride, aspect 1).
FCOS's regression (ltrb / s about torchvision's anchor centre (x * s, y * s)) is shifted to mtkd's
centre: l + 0.5, t + 0.5, r - 0.5, b - 0.5. RetinaNet's deltas are decoded with its BoxCoder
(weights 1, 1, 1, 1) against its anchors (the model's anchor generator's cell anchors placed every
s_l pixels, i.e. torchvision's anchors whenever s_l divides H and W) and re-expressed as ltrb / s_l.

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
    # a detection model (random init, nothing downloaded): forward returns (dense [B, K+5, L],
    # FPN features [B, 256, L, 1]); here L = 16*16 + 8*8 + 4*4 = 336
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --torchvision fcos_resnet50_fpn --num-classes 3 \\
        --in-channels 1 --input-shape 1,64,64 --det-strides 4,8,16 --out /tmp/fcos.pt
    # any nn.Module: a python file and a factory function in it that takes no arguments
    $MTKD_TORCH_PYTHON scripts/export_teacher.py --module my_net.py:build --feature-layer body.stage3 \\
        --input-shape 3,32,32 --out /tmp/my_net.pt

Options
  --torchvision NAME | --module FILE.py:FACTORY   where the model comes from (one is required)
  --state-dict FILE     weights loaded with torch.load(FILE, map_location='cpu') (a plain state dict,
                        or a checkpoint dict holding one under 'state_dict' or 'model'; a
                        'module.' prefix from DataParallel is stripped)
                        (detection models: torchvision FCOS / RetinaNet keys, backbone.body.*,
                        backbone.fpn.*, head.*, for the levels of --det-strides; torchvision's COCO
                        weights, with P6/P7 and other levels, do not fit)
  --num-classes K       classes of the torchvision head (default 1000; detection models 91); for
                        --module, checked against the model's output when given
  --in-channels C       input channels of the first convolution (torchvision resnet*, mobilenet_v2,
                        and the resnet50 of the detection models);
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
  --det-strides S,S,..  detection models only: the FPN levels' strides, increasing powers of two
                        from 4 to 32 (default 4,8,16)
  --input-shape C,H,W   per-sample input of the trace (default 3,224,224; the channel count
                        defaults to --in-channels); the example batch is [2, C, H, W]
  --seed S              torch.manual_seed before the model is built (default 0)
  --out FILE.pt         the TorchScript file (written to FILE.pt.tmp, then renamed)

Levers for speed (each measured in docs/PERF.md): --optimize freezes the trace (torch.jit.freeze: weights
inlined, BatchNorm folded into the convolutions; optimize_for_inference's graphs do not load
back in torch 2.13);
--channels-last stores the weights channels-last; --precision bf16 runs the teacher in bfloat16
(the outputs stay float32, so the Rust side is unchanged). Such exports are checked against the
float32 eager model with a limit relative to the outputs' scale (1e-4; bf16: 0.1).

The model is put in eval mode, wrapped in a module that captures the feature layer's output with a
forward hook (detection models: a module that runs the backbone and head and lays out the dense
output), and traced with torch.jit.trace. The saved file is reloaded with torch.jit.load and its
outputs are compared with the eager model's (max abs diff < 1e-5) on the example batch and on a
batch of another size; a detection export also checks the level sizes, the shapes [B, K+5, L] and
[B, 256, L, 1] and that the outputs are finite. A detection trace holds the anchors and centres of
the traced input (as buffers), so such a teacher takes inputs of the traced H x W only (any batch
size). scripts/teacher_logits.py runs a saved teacher on a fixed input for the Rust tests.
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
DETECTION_MODELS = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn")
DEFAULT_DET_STRIDES = "4,8,16"
STRIDE_TO_LAYER = {4: 1, 8: 2, 16: 3, 32: 4}  # resnet stage (layer1 = C2) of each stride


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


class CastTo(nn.Module):
    """Runs `model` in `dtype`: the input is cast to it, every output back to float32."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x):
        out = self.model(x.to(self.dtype))
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


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


class DetectionDense(nn.Module):
    """A torchvision FCOS / RetinaNet as mtkd's detection teacher: (dense [B, K+5, L], features
    [B, D, L, 1]); see the module docstring for the layout.

    What depends on the locations (FCOS's centre shift; RetinaNet's anchors, mtkd's centres and
    strides) is precomputed for the input size H x W into buffers, so that the trace holds no
    tensor constants or device arguments and follows the module to any device."""

    def __init__(self, model, kind, strides, num_classes, height, width):
        super().__init__()
        self.model = model
        self.kind = kind
        self.strides = list(strides)
        self.num_classes = num_classes
        self.level_sizes = [(-(-height // s), -(-width // s)) for s in self.strides]
        if kind == "fcos":
            # ltrb / s about torchvision's anchor centre (x * s, y * s) -> about ((x + 0.5) * s, ...)
            self.register_buffer("ltrb_shift", torch.tensor([0.5, 0.5, -0.5, -0.5]))
        else:
            gen = model.anchor_generator
            grid = [list(hw) for hw in self.level_sizes]
            steps = [[torch.tensor(s, dtype=torch.int64)] * 2 for s in self.strides]
            centres, scale = [], []
            for (h, w), s in zip(self.level_sizes, self.strides):
                cy, cx = torch.meshgrid(
                    (torch.arange(h, dtype=torch.float32) + 0.5) * s,
                    (torch.arange(w, dtype=torch.float32) + 0.5) * s,
                    indexing="ij",
                )
                centres.append(torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1))
                scale.append(torch.full((h * w, 1), float(s)))
            # the model's cell anchors (size s, aspect 1) placed every s pixels: torchvision's own
            # anchors for this input whenever s divides H and W
            self.register_buffer("anchors", torch.cat(gen.grid_anchors(grid, steps)).float())  # [L, 4]
            self.register_buffer("centres", torch.cat(centres))  # [L, 2]
            self.register_buffer("scale", torch.cat(scale))  # [L, 1]

    def levels(self, x):
        return list(self.model.backbone(x).values())

    def forward(self, x):
        feats = self.levels(x)
        head = self.model.head(feats)
        logits = head["cls_logits"]  # [B, L, K], level by level, row-major in a level (A = 1)
        reg = head["bbox_regression"]  # [B, L, 4]
        if self.kind == "fcos":
            ltrb = (reg + self.ltrb_shift).clamp_min(0.0)
            ctr = head["bbox_ctrness"]  # [B, L, 1]
        else:
            b, n = reg.shape[0], reg.shape[1]
            boxes = self.model.box_coder.decode_single(
                reg.reshape(-1, 4), self.anchors.unsqueeze(0).expand(b, n, 4).reshape(-1, 4)
            ).reshape(b, n, 4)
            ltrb = torch.cat([self.centres - boxes[:, :, :2], boxes[:, :, 2:] - self.centres], dim=2) / self.scale
            ltrb = ltrb.clamp_min(0.0)
            ctr = torch.zeros_like(logits[:, :, :1])  # RetinaNet has no centerness
        dense = torch.cat([logits, ltrb, ctr], dim=2).permute(0, 2, 1)
        features = torch.cat([f.flatten(2) for f in feats], dim=2).unsqueeze(-1)
        return dense, features


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


def parse_strides(text):
    try:
        strides = [int(v) for v in text.split(",")]
    except ValueError:
        strides = []
    if (
        not strides
        or any(s not in STRIDE_TO_LAYER for s in strides)
        or any(a >= b for a, b in zip(strides, strides[1:]))
    ):
        raise ExportError(
            f"--det-strides must be increasing strides from {sorted(STRIDE_TO_LAYER)} "
            f"(powers of two, 4 = resnet layer1 ... 32 = layer4) separated by commas, got `{text}`"
        )
    return strides


def build_detection(name, num_classes, in_channels, strides):
    """A torchvision FCOS / RetinaNet on a resnet50-FPN over the stages of `strides` (no P6/P7), one
    anchor per location of size = the stride; random init, nothing downloaded."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    body = resnet50(weights=None)
    if in_channels is not None and in_channels != 3:
        replace_first_conv(body, "resnet50", in_channels)
    backbone = _resnet_fpn_extractor(
        body, trainable_layers=5, returned_layers=[STRIDE_TO_LAYER[s] for s in strides], extra_blocks=None
    )
    # _resnet_fpn_extractor turns extra_blocks=None into LastLevelMaxPool (an extra 'pool' level);
    # mtkd's levels are the stages only.
    backbone.fpn.extra_blocks = None
    anchors = AnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * len(strides))
    if name == "fcos_resnet50_fpn":
        return FCOS(backbone, num_classes, anchor_generator=anchors), "fcos"
    return RetinaNet(backbone, num_classes, anchor_generator=anchors), "retinanet"


def check_levels(wrapper, x):
    """The FPN levels have ceil(H / s) x ceil(W / s) locations; returns [(h, w)] per level."""
    with torch.no_grad():
        feats = wrapper.levels(x)
    h, w = x.shape[-2:]
    want = wrapper.level_sizes
    got = [tuple(f.shape[-2:]) for f in feats]
    if got != want:
        raise ExportError(
            f"the FPN levels of a {h}x{w} input are {got}, not ceil(H/s) x ceil(W/s) = {want} for "
            f"strides {wrapper.strides}"
        )
    channels = {f.shape[1] for f in feats}
    if len(channels) != 1:
        raise ExportError(f"the FPN levels have different channel counts {sorted(channels)}")
    return got


def check_detection_outputs(out, batch, num_classes, level_sizes):
    if len(out) != 2:
        raise ExportError(f"the detection wrapper returns {len(out)} output(s), not (dense, features)")
    dense, features = out
    n = sum(h * w for h, w in level_sizes)
    want = [batch, num_classes + 5, n]
    if not isinstance(dense, torch.Tensor) or list(dense.shape) != want:
        got = list(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise ExportError(f"the dense output is {got}, not [B, K+5, L] = {want}")
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[0] != batch \
            or features.shape[2] != n or features.shape[3] != 1:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ExportError(f"the features are {got}, not [B, D, L, 1] with B = {batch}, L = {n}")
    for what, t in (("dense output", dense), ("features", features)):
        if not torch.isfinite(t).all():
            raise ExportError(f"the {what} holds non-finite values")
    if (dense[:, num_classes:num_classes + 4] < 0).any():
        raise ExportError("negative ltrb distances in the dense output")


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
    available = torchvision.models.list_models(module=torchvision.models) + segmentation + list(DETECTION_MODELS)
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
    p.add_argument("--det-strides", metavar="S,S,..",
                   help=f"detection models: FPN level strides (default {DEFAULT_DET_STRIDES})")
    p.add_argument("--optimize", action="store_true",
                   help="freeze the trace (weights inlined, BatchNorm folded into the convolutions)")
    p.add_argument("--channels-last", action="store_true",
                   help="store the weights channels-last (the convolutions then run channels-last)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: weights in bfloat16, the input cast to it and the outputs back to float32")
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

    detection = args.torchvision in DETECTION_MODELS
    if args.det_strides is not None and not detection:
        raise ExportError(f"--det-strides applies to the detection models ({', '.join(DETECTION_MODELS)}) only")
    if detection:
        for flag, given in (("--feature-layer", args.feature_layer), ("--logits-only", args.logits_only),
                            ("--segmentation", args.segmentation)):
            if given:
                raise ExportError(f"{flag} does not apply to a detection model (it returns dense outputs and FPN features)")
        strides = parse_strides(args.det_strides or DEFAULT_DET_STRIDES)

    torch.manual_seed(args.seed)
    if detection:
        num_classes = args.num_classes if args.num_classes is not None else 91
        model, kind = build_detection(args.torchvision, num_classes, args.in_channels, strides)
    elif args.torchvision:
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
    if detection:
        wrapper = DetectionDense(model, kind, strides, num_classes, shape[1], shape[2])
    elif args.logits_only:
        wrapper = LogitsOnly(inner)
    else:
        wrapper = FeatureTap(inner, args.feature_layer, find_layer(model, args.feature_layer))
    wrapper.eval()
    reference = wrapper  # the float32 eager model the export is checked against
    if args.precision == "bf16" or args.channels_last:
        import copy

        fast = copy.deepcopy(wrapper)
        if args.channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        if args.precision == "bf16":
            fast = CastTo(fast.to(torch.bfloat16), torch.bfloat16)
        wrapper = fast.eval()

    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(args.seed))
    try:
        level_sizes = check_levels(wrapper, example) if detection else None
        eager = run(wrapper, example)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"the model fails on an input of shape {list(example.shape)}: {str(e).splitlines()[0]}. "
            "Check --input-shape and --in-channels."
        ) from None
    if detection:
        check_detection_outputs(eager, 2, num_classes, level_sizes)
    else:
        check_outputs(eager, 2, num_classes, args.segmentation)

    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit as deprecated; TorchScript is still what libtorch/tch loads.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
            if args.optimize:
                # Freezing inlines the weights and runs the frozen-graph passes (BatchNorm folded
                # into the convolutions, conv-add/mul folding). optimize_for_inference goes
                # further (MKLDNN prepacking) but its graphs do not load back in torch 2.13
                # ("required keyword attribute 'value' is undefined"), so it is not used.
                traced = torch.jit.freeze(traced.eval())

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
    if reference is not wrapper:
        eager = run(reference, example)
    diff = max_diff(got, eager)
    # Another batch size: a trace that baked in B=2 would fail or differ here.
    other = torch.randn(3, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    try:
        got_other = run(loaded, other)
        diff = max(diff, max_diff(got_other, run(reference, other)))
    except Exception as e:
        raise ExportError(f"{out} fails on a batch of 3 (the trace fixed the batch size?): {e}") from None
    if detection:
        check_detection_outputs(got, 2, num_classes, level_sizes)
        check_detection_outputs(got_other, 3, num_classes, level_sizes)
    # Folding BatchNorm into the convolutions (--optimize) reorders float32 sums; bfloat16 keeps
    # 8 significant bits: the limit is relative to the outputs' scale for those exports.
    scale = max(float(t.abs().max()) for t in eager)
    limit = TOLERANCE
    if args.precision == "bf16":
        limit = 0.1 * max(1.0, scale)
    elif args.optimize or args.channels_last:
        limit = 1e-4 * max(1.0, scale)
    if diff >= limit:
        raise ExportError(f"{out} differs from the eager model by {diff:.3g} (limit {limit:g})")

    if detection:
        print(
            f"{out}: {args.torchvision} dense {list(got[0].shape)} (K = {num_classes}, "
            f"L = {got[0].shape[2]}), features {list(got[1].shape)}, levels "
            + ", ".join(f"s{s}: {h}x{w}" for s, (h, w) in zip(strides, level_sizes))
            + f", input [B, {', '.join(map(str, shape))}], max abs diff {diff:.1e}, {out.stat().st_size} bytes"
        )
        return
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
