"""PyTorch twins of mtkd's student architectures (crates/student/src), and their golden file.

    $MTKD_TORCH_PYTHON scripts/student_zoo.py

Writes crates/student/tests/golden/state_dicts.json, which crates/student/tests/zoo.rs compares
with the Rust networks: for every architecture of crates/student/src/arch.rs and for two inputs,
(1, 28, 28) with 10 classes and (3, 32, 32) with 100 classes, the ordered state_dict keys with
their shapes (BatchNorm running statistics included, `num_batches_tracked` excluded: tch has no
such buffer), the feature-map shape [C, H, W] and the number of trainable parameters; and, under
`head_cases`, the same for the dense heads (crates/student/src/head.rs: fcn, aspp, fcos) on a few
backbones, with their logits' shape per sample.

The modules here are written to match the Rust ones name for name, so a state_dict saved from
them loads into mtkd (and back). Every model's forward(x) returns (logits, feature_map): the
feature map is the backbone's last map, the logits come from global average pooling and a linear
layer named `fc`. MobileNetV2 and ShuffleNetV2 follow HobbitLong/RepDistiller
(models/mobilenetv2.py, models/ShuffleNetv2.py) except that the classifier is `fc` (RepDistiller:
`classifier.0`, `linear`), the input channel count is a parameter, and pooling is global.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/student/tests/golden/state_dicts.json"
CASES = [((1, 28, 28), 10), ((3, 32, 32), 100)]


class Twin(nn.Module):
    """A backbone (`features`: its last feature map) and a head: the classifier `fc` after
    global average pooling (every constructor below makes it), or, through `build(..., head)`,
    a dense head under `head.` (`SegHead`, `DetHead`) that replaces `fc`."""

    def features(self, x):
        raise NotImplementedError

    def forward(self, x):
        f = self.features(x)
        head = self._modules.get("head")
        if head is None:
            return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1)), f
        return head(f, x.shape[2:])


# ---------------------------------------------------------------------------------- cnn-small

class ConvBlock(nn.Module):
    """conv (k x k, padding dilation * (k - 1) / 2, no bias) -> BN -> ReLU (crates/student/src/layers.rs)."""

    def __init__(self, cin, cout, k=3, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CnnSmall(Twin):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.block1 = ConvBlock(in_channels, 32)
        self.block2 = ConvBlock(32, 64)
        self.block3 = ConvBlock(64, 64)
        self.fc = nn.Linear(64, num_classes)

    def features(self, x):
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        return self.block3(x)


# ------------------------------------------------------------------------------- CIFAR ResNet

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class CifarResNet(Twin):
    def __init__(self, in_channels, num_classes, depth, filters):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        cin = filters[0]
        for i, (planes, stride) in enumerate(zip(filters[1:], [1, 2, 2])):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, planes, stride if b == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(filters[3], num_classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# ---------------------------------------------------------------------------------- Wide ResNet

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(Twin):
    def __init__(self, in_channels, num_classes, depth, k):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def features(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))


# ------------------------------------------------------------------------ MobileNetV2 (CIFAR)

MBV2_EXPANSION = 6
MBV2_STEM_STRIDE = 2  # RepDistiller: conv_bn(3, input_channel, 2)


def conv_bn(cin, cout, kernel, stride=1, groups=1):
    """conv (kernel x kernel, padding (kernel - 1) / 2, no bias) and its BN, as a pair
    (crates/student/src/layers.rs `conv_bn`); `groups == cin` makes the conv depthwise."""
    conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout)


def conv_bn_relu(cin, cout, kernel, stride):
    return nn.Sequential(*conv_bn(cin, cout, kernel, stride), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(Twin):
    def __init__(self, in_channels, num_classes, width_mult, expansion=MBV2_EXPANSION):
        super().__init__()
        t = expansion
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [t, 24, 2, 1],
            [t, 32, 3, 2],
            [t, 64, 4, 2],
            [t, 96, 3, 1],
            [t, 160, 3, 2],
            [t, 320, 1, 1],
        ]
        cin = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, cin, 3, MBV2_STEM_STRIDE)
        self.blocks = nn.ModuleList()
        for t_, c, n, s in setting:
            cout = int(c * width_mult)
            layers = []
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t_))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(cin, self.last_channel, 1, 1)
        self.fc = nn.Linear(self.last_channel, num_classes)

    def features(self, x):
        x = self.conv1(x)
        for b in self.blocks:
            x = b(x)
        return self.conv2(x)


# ----------------------------------------------------------------------- ShuffleNetV2 (CIFAR)

SHUFFLENETV2_CONFIGS = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


def channel_shuffle(x, groups=2):
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleBasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = int(channels * 0.5)
        self.half = half
        self.conv1, self.bn1 = conv_bn(half, half, 1)
        self.conv2, self.bn2 = conv_bn(half, half, 3, 1, half)
        self.conv3, self.bn3 = conv_bn(half, half, 1)

    def forward(self, x):
        x1, x2 = x[:, : self.half], x[:, self.half:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        # left
        self.conv1, self.bn1 = conv_bn(cin, cin, 3, 2, cin)
        self.conv2, self.bn2 = conv_bn(cin, mid, 1)
        # right
        self.conv3, self.bn3 = conv_bn(cin, mid, 1)
        self.conv4, self.bn4 = conv_bn(mid, mid, 3, 2, mid)
        self.conv5, self.bn5 = conv_bn(mid, mid, 1)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(Twin):
    def __init__(self, in_channels, num_classes, net_size):
        super().__init__()
        out_channels, num_blocks = SHUFFLENETV2_CONFIGS[net_size]
        # RepDistiller's stem is a 1x1 convolution (its 3x3 variant is commented out).
        self.conv1, self.bn1 = conv_bn(in_channels, 24, 1)
        cin = 24
        for i in range(3):
            layers = [DownBlock(cin, out_channels[i])]
            layers += [ShuffleBasicBlock(out_channels[i]) for _ in range(num_blocks[i])]
            cin = out_channels[i]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.conv2, self.bn2 = conv_bn(cin, out_channels[3], 1)
        self.fc = nn.Linear(out_channels[3], num_classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))


# ------------------------------------------------------------------------ dense heads (head.rs)

class FcnHead(nn.Module):
    """FCN head: 3x3 conv-BN-ReLU to max(C / 4, 32) channels, 1x1 classifier; logits upsampled
    bilinearly (align_corners=False) to the input's size. Returns (logits, head features)."""

    def __init__(self, cin, num_classes):
        super().__init__()
        c = max(cin // 4, 32)
        self.block = ConvBlock(cin, c, 3)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, x, out_hw):
        f = self.block(x)
        return upsample(self.classifier(f), out_hw), f


class AsppHead(nn.Module):
    """Light DeepLabV3 head: 1x1, 3x3 dilation 2 and 4, and image-pooling branches of 64
    channels, a 1x1 projection, a 3x3 refinement and a 1x1 classifier."""

    def __init__(self, cin, num_classes):
        super().__init__()
        c = 64
        self.aspp0 = ConvBlock(cin, c, 1)
        self.aspp1 = ConvBlock(cin, c, 3, 2)
        self.aspp2 = ConvBlock(cin, c, 3, 4)
        self.pool = ConvBlock(cin, c, 1)
        self.project = ConvBlock(4 * c, c, 1)
        self.refine = ConvBlock(c, c, 3)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, x, out_hw):
        g = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3])
        cat = torch.cat([self.aspp0(x), self.aspp1(x), self.aspp2(x), g], 1)
        f = self.refine(self.project(cat))
        return upsample(self.classifier(f), out_hw), f


def upsample(logits, out_hw):
    if tuple(logits.shape[2:]) == tuple(out_hw):
        return logits
    return F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)


FPN_CHANNELS = 64
DET_STRIDES = (4, 8, 16)


class GnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gn = nn.GroupNorm(16, c)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)))


class FcosHead(nn.Module):
    """The FCOS-style detection head: a 64-channel FPN on the stride-4 map (1x1 lateral, two
    stride-2 3x3 levels, top-down nearest upsampling, a 3x3 smoothing conv per level), shared
    class and box towers (two 3x3 conv-GroupNorm(16)-ReLU blocks), class / box (ReLU) /
    centerness 3x3 convs. Returns (outputs [B, K + 5, L], features [B, 64, L, 1])."""

    def __init__(self, cin, num_classes):
        super().__init__()
        c = FPN_CHANNELS
        self.lateral = nn.Conv2d(cin, c, 1)
        self.down1 = nn.Conv2d(c, c, 3, 2, 1)
        self.down2 = nn.Conv2d(c, c, 3, 2, 1)
        self.smooth0 = nn.Conv2d(c, c, 3, 1, 1)
        self.smooth1 = nn.Conv2d(c, c, 3, 1, 1)
        self.smooth2 = nn.Conv2d(c, c, 3, 1, 1)
        self.cls_tower = nn.Sequential(GnBlock(c), GnBlock(c))
        self.box_tower = nn.Sequential(GnBlock(c), GnBlock(c))
        self.cls_logits = nn.Conv2d(c, num_classes, 3, 1, 1)
        self.bbox_reg = nn.Conv2d(c, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(c, 1, 3, 1, 1)
        for conv, bias in [(self.cls_logits, -math.log((1 - 0.01) / 0.01)), (self.bbox_reg, 1.0),
                           (self.centerness, 0.0)]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, bias)

    def forward(self, x, out_hw):
        p4 = self.lateral(x)
        p8 = self.down1(p4)
        p16 = self.down2(F.relu(p8))
        p8 = p8 + F.interpolate(p16, size=p8.shape[2:], mode="nearest")
        p4 = p4 + F.interpolate(p8, size=p4.shape[2:], mode="nearest")
        outs, feats = [], []
        for f, smooth in zip((p4, p8, p16), (self.smooth0, self.smooth1, self.smooth2)):
            f = smooth(f)
            ct, bt = self.cls_tower(f), self.box_tower(f)
            o = torch.cat([self.cls_logits(ct), F.relu(self.bbox_reg(bt)), self.centerness(bt)], 1)
            outs.append(o.flatten(2))
            feats.append(f.flatten(2))
        return torch.cat(outs, 2), torch.cat(feats, 2).unsqueeze(-1)


HEADS = {"fcn": FcnHead, "aspp": AsppHead, "fcos": FcosHead}


# ---------------------------------------------------------------------------------- catalogue

RESNET = [16, 16, 32, 64]
RESNET_X4 = [32, 64, 128, 256]

# The order and the names of crates/student/src/arch.rs (NAMES).
ZOO = {
    "cnn-small": lambda c, k: CnnSmall(c, k),
    "resnet8": lambda c, k: CifarResNet(c, k, 8, RESNET),
    "resnet14": lambda c, k: CifarResNet(c, k, 14, RESNET),
    "resnet20": lambda c, k: CifarResNet(c, k, 20, RESNET),
    "resnet32": lambda c, k: CifarResNet(c, k, 32, RESNET),
    "resnet56": lambda c, k: CifarResNet(c, k, 56, RESNET),
    "resnet8x4": lambda c, k: CifarResNet(c, k, 8, RESNET_X4),
    "resnet32x4": lambda c, k: CifarResNet(c, k, 32, RESNET_X4),
    "wrn-16-1": lambda c, k: WideResNet(c, k, 16, 1),
    "wrn-16-2": lambda c, k: WideResNet(c, k, 16, 2),
    "wrn-28-4": lambda c, k: WideResNet(c, k, 28, 4),
    "wrn-40-2": lambda c, k: WideResNet(c, k, 40, 2),
    "mobilenetv2": lambda c, k: MobileNetV2(c, k, 1.0),
    "mobilenetv2-half": lambda c, k: MobileNetV2(c, k, 0.5),
    "shufflenetv2": lambda c, k: ShuffleNetV2(c, k, 1),
}


def build(name, in_channels, num_classes, head="classifier"):
    """The PyTorch twin of mtkd's `name` (an arch.rs name) with `head` (head.rs: classifier,
    fcn, aspp or fcos): a dense head replaces `fc` under the name `head`."""
    model = ZOO[name](in_channels, num_classes)
    if head != "classifier":
        channels = model.fc.in_features
        del model.fc
        model.head = HEADS[head](channels, num_classes)
    return model


# The dense heads on a few backbones (head_cases): (arch, head, input, classes).
HEAD_CASES = [
    (arch, head, (1, 48, 48), 10 if head == "fcos" else 11)
    for head in ("fcn", "aspp", "fcos")
    for arch in ("cnn-small", "resnet8", "resnet14")
] + [("wrn-16-1", "aspp", (3, 32, 32), 5)]


def case(name, in_shape, num_classes, head="classifier"):
    torch.manual_seed(0)
    model = build(name, in_shape[0], num_classes, head).eval()
    state = [
        [k, list(v.shape)]
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    ]
    with torch.no_grad():
        logits, f = model(torch.zeros(2, *in_shape))
    if head == "classifier":
        assert list(logits.shape) == [2, num_classes], (name, logits.shape)
    out = {"arch": name}
    if head != "classifier":
        out["head"] = head
        out["logits_shape"] = list(logits.shape[1:])
    out.update({
        "in_shape": list(in_shape),
        "num_classes": num_classes,
        "feature_shape": list(f.shape[1:]),
        "parameter_count": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "state_dict": state,
    })
    return out


def dump(cases, head_cases):
    """JSON with one state_dict entry per line (readable diffs, moderate size)."""
    out = ["{", '"generator": "scripts/student_zoo.py",']
    for key, group, last in (("cases", cases, False), ("head_cases", head_cases, True)):
        out.append(f'"{key}": [')
        for i, c in enumerate(group):
            head = {k: v for k, v in c.items() if k != "state_dict"}
            out.append("{")
            for k, v in head.items():
                out.append(f"{json.dumps(k)}: {json.dumps(v)},")
            out.append('"state_dict": [')
            entries = [json.dumps(e, separators=(", ", ": ")) for e in c["state_dict"]]
            out.append(",\n".join(entries))
            out.append("]")
            out.append("}," if i + 1 < len(group) else "}")
        out.append("]" if last else "],")
    out.append("}")
    return "\n".join(out) + "\n"


def main():
    cases = [case(name, s, k) for name in ZOO for s, k in CASES]
    head_cases = [case(name, s, k, head) for name, head, s, k in HEAD_CASES]
    text = dump(cases, head_cases)
    json.loads(text)  # well-formed
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    for c in cases + head_cases:
        print(
            f"{c['arch'] + ' ' + c.get('head', ''):>22} {str(tuple(c['in_shape'])):>12} -> features {c['feature_shape']}, "
            f"{c['parameter_count']} parameters, {len(c['state_dict'])} tensors"
        )
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
