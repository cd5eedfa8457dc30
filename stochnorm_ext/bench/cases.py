"""What the benchmark runs on: the default shapes, batches and dtypes per device, the
input configuration of one table (``Case``) and the row-label vocabulary (BGN group specs,
the conv in front of CBN)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List

import torch

# A subset of ResNet-50's BatchNorm shapes (C, H, W): the first stage's bottleneck width, then
# the output width of each of the four stages.
GPU_SHAPES = [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
GPU_BATCHES = [2, 8, 32, 128]
GPU_DTYPES = ["float32", "bfloat16"]
# A short set that finishes in about two minutes on 2 CPU cores.
CPU_SHAPES = [(64, 56, 56), (1024, 14, 14)]
CPU_BATCHES = [8]
CPU_DTYPES = ["float32"]
# Every BatchNorm shape of torchvision's ResNet-50 (v1.5), for ``--shapes resnet50``.
RESNET50_BN_SHAPES = [(64, 112, 112),                                   # stem
                      (64, 56, 56), (256, 56, 56),                      # layer1
                      (128, 56, 56), (128, 28, 28), (512, 28, 28),      # layer2
                      (256, 28, 28), (256, 14, 14), (1024, 14, 14),     # layer3
                      (512, 14, 14), (512, 7, 7), (2048, 7, 7)]         # layer4
SHAPE_PRESETS = {"resnet50": RESNET50_BN_SHAPES}
MEMORY_FORMATS = ["nchw", "channels_last"]
LAYERS = ["stoch_norm", "bgn", "cbn"]
DIRECTIONS = ["fwd", "bwd", "fwd+bwd"]

STOCH_P = 0.5             # probability of the batch branch
BGN_GROUPS = ["C/4"]       # the group counts timed by default (``--bgn-groups``)
CONVS = ["1x1", "3x3"]     # the conv of conv+bn / conv+cbn (``--conv``): 1x1 from C/4, or 3x3 from C
CBN_WINDOW = 4            # the published detection configs: buffer_num=3 -> 4 steps
MOMENTUM, EPS = 0.1, 1e-5

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
# The names our backends' bytes_moved() and the checks of selfcheck use for each layer.
BACKEND_LAYER = {"stoch_norm": "stoch_norm", "bgn": "batch_group_norm", "cbn": "cross_iteration_norm"}
SELFCHECK_CASES = {"stoch_norm": ["stoch_norm"], "bgn": ["bgn_G|C", "bgn_G=2C"], "cbn": ["cbn"]}
# The rows every other row of a case is compared with.
BASELINE_LAYERS = ("bn", "conv+bn")


def base_layer(layer: str) -> str:
    """The layer a row label names: ``bgn G=2C`` is a ``bgn`` row."""
    return layer.split(" ")[0]


def baseline_of(layer: str) -> str:
    """The baseline a row is divided by: ``conv+bn`` for the conv rows, else ``bn``."""
    return "conv+bn" if layer.startswith("conv+") else "bn"


def bgn_groups(spec: str, C: int) -> int:
    """The number of BGN groups a ``--bgn-groups`` spec gives for C channels: ``C/k`` (groups
    of k whole channels), ``C`` (BatchNorm), ``kC`` (each channel cut into k pieces)."""
    text = spec.replace(" ", "").upper()
    try:
        if text.startswith("C/"):
            return max(C // int(text[2:]), 1)
        if text.endswith("C"):
            return C * int(text[:-1] or 1)
    except ValueError:
        pass
    raise ValueError(f"a BGN group spec is C/k, C or kC (e.g. C/4, C, 2C); got {spec!r}")


def bgn_label(spec: str) -> str:
    """The row label of BGN with the groups ``spec``: plain ``bgn`` for the default C/4."""
    return "bgn" if spec.replace(" ", "").upper() == "C/4" else f"bgn G={spec.replace(' ', '').upper()}"


def conv_in_channels(C: int, conv: str) -> int:
    """Input channels of the conv in front of a C-channel norm (``--conv``)."""
    return max(C // 4, 1) if conv == "1x1" else C


@dataclass(frozen=True)
class Case:
    """One input configuration: x is (batch, channels, height, width)."""
    device: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    memory_format: str

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    @property
    def element_size(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def label(self) -> str:
        return (f"{self.batch}x{self.channels}x{self.height}x{self.width} "
                f"{SHORT_DTYPE[self.dtype]} {self.memory_format}")


def case_of(row: dict) -> Case:
    """The case a result row was measured on."""
    return Case(row["device"], row["batch"], row["channels"], row["height"], row["width"],
                row["dtype"], row["memory_format"])


def parse_shape(text: str):
    """``CxHxW`` -> (C, H, W); a preset name (``resnet50``) -> its list of shapes."""
    if text.lower() in SHAPE_PRESETS:
        return list(SHAPE_PRESETS[text.lower()])
    try:
        C, H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is CxHxW, e.g. 64x56x56, or one of "
                                         f"{sorted(SHAPE_PRESETS)}; got {text!r}") from None
    return C, H, W


def cases_for(device: str, args) -> List[Case]:
    """The cases of a run: the options given, else the device's defaults (``--quick``: the
    first of each default)."""
    on_gpu = device == "cuda"
    shapes = ([s for item in args.shapes for s in (item if isinstance(item, list) else [item])]
              if args.shapes else (GPU_SHAPES if on_gpu else CPU_SHAPES))
    batches = args.batches or (GPU_BATCHES if on_gpu else CPU_BATCHES)
    dtypes = args.dtypes or (GPU_DTYPES if on_gpu else CPU_DTYPES)
    formats = args.memory_formats or MEMORY_FORMATS
    if args.quick:  # the first of each unless given explicitly
        shapes = shapes if args.shapes else shapes[:1]
        batches = batches if args.batches else [min(batches)]
        dtypes = dtypes if args.dtypes else dtypes[:1]
        formats = formats if args.memory_formats else ["nchw"]
    return [Case(device, n, C, H, W, dt, fmt) for (C, H, W) in shapes for n in batches
            for dt in dtypes for fmt in formats]
