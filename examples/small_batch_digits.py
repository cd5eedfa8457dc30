"""Small-batch training from scratch on scikit-learn's bundled digits (offline, CPU, minutes).

BGN and CBN exist for training with tiny batches, where BatchNorm's statistics of a few
images are noisy. This trains the same small CNN from scratch at batch sizes 2, 4 and 16
with each normalisation layer below and compares test accuracy over seeds:

* ``bn``              ``nn.BatchNorm2d``, the baseline every difference is taken against;
* ``bgn G=C/2``, ``bgn G=C/4``, ``bgn G=1``
                      ``stochnorm_ext.BatchGroupNorm2d``: statistics over the batch and a
                      group of C/G whole channels (fewer groups = more values per
                      statistic, what a small batch needs);
* ``cbn k=2/4/8``     ``stochnorm_ext.Conv2dCBN`` (conv + Cross-Iteration BN, rho = 1):
                      statistics averaged over the current and k - 1 previous steps,
                      compensated for the weight change by a Taylor step; plain BN during
                      a burn-in of the first epoch;
* ``cbn k=8 rho=0``   the same averaging without the compensation (the CBN paper's ablation);
* ``gn G=C/4``        ``nn.GroupNorm`` with groups of 4 channels: batch-independent;
* controls ``bgn G=C`` and ``cbn k=1``: both are BatchNorm by definition, so they must
  match ``bn`` within noise (anything else is a bug in this package's layers).

Every layer trains with the same recipe: SGD (momentum 0.9, weight decay 5e-4 on conv and
linear weights only), learning rate scaled linearly with the batch size
(``--lr`` at batch 16), cosine schedule, the same number of epochs at every batch size (so
batch 2 takes 8x the steps of batch 16). Seeds are paired: for one seed every layer and
batch size starts from the same conv/linear initialisation and sees the same image
order. Test accuracy is measured in eval mode (running statistics, as a user would
deploy the model) on a fixed stratified third of the digits never used in training.

    python examples/small_batch_digits.py                  # defaults: 5 seeds, batch 2 4 16
    python examples/small_batch_digits.py --smoke          # tiny run for CI (seconds)
    python examples/small_batch_digits.py --seeds 10 --batch-sizes 2 4 8 16 32 --epochs 6

Needs scikit-learn (``load_digits`` ships with it; nothing is downloaded) and, for the
plot, matplotlib.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List, Sequence, Tuple

# OpenMP threads that spin while they wait make these tiny ops 10-50x slower when other
# processes share the cores; sleeping waits cost little here. Only takes effect if torch
# is not imported yet (running this file as a script).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import stochnorm_ext as sx  # noqa: E402

DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_batch_digits.png")
BASELINE = "bn"
RECIPE = dict(momentum=0.9, weight_decay=5e-4)


# --------------------------------------------------------------------------- layers
def conv_norm(layer: str, cin: int, cout: int, burnin: int) -> nn.Module:
    """A 3x3 conv (no bias) followed by the normalisation ``layer`` (a name of LAYERS).
    The conv is created first in every case, so one seed gives every layer the same
    conv weights."""
    kind, _, arg = layer.partition(" ")
    if kind == "cbn":
        window, rho = _cbn_args(arg)
        return sx.Conv2dCBN(cin, cout, 3, padding=1, window=window, burnin=burnin, rho=rho)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if kind == "bn":
        return nn.Sequential(conv, nn.BatchNorm2d(cout))
    if kind == "bgn":
        return nn.Sequential(conv, sx.BatchGroupNorm2d(cout, num_groups=_groups(arg, cout)))
    if kind == "gn":
        return nn.Sequential(conv, nn.GroupNorm(_groups(arg, cout), cout))
    raise ValueError(f"unknown layer {layer!r}: expected bn, bgn G=..., cbn k=... or gn G=...")


def _groups(arg: str, channels: int) -> int:
    """``G=C``, ``G=C/k`` or ``G=k`` -> the number of groups for ``channels`` channels."""
    spec = arg.removeprefix("G=")
    if spec == "C":
        return channels
    if spec.startswith("C/"):
        return channels // int(spec[2:])
    return int(spec)


def _cbn_args(arg: str):
    """``k=4`` or ``k=4 rho=0`` -> (window, rho)."""
    fields = dict(f.split("=") for f in arg.split())
    return int(fields["k"]), float(fields.get("rho", 1.0))


LAYERS = ("bn", "bgn G=C", "bgn G=C/2", "bgn G=C/4", "bgn G=1",
          "cbn k=1", "cbn k=2", "cbn k=4", "cbn k=8", "cbn k=8 rho=0", "gn G=C/4")
CONTROLS = ("bgn G=C", "cbn k=1")


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def load_data(train_images: int = 0, split_seed: int = 0) -> Dict[str, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float32, standardised with the training set's mean and sd;
    a stratified 2/3 train, 1/3 test split (fixed across seeds). ``train_images > 0``
    keeps only that many training images (a random subset, for the smoke run)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.RandomState(split_seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        cut = (2 * len(idx)) // 3
        train.append(idx[:cut])
        test.append(idx[cut:])
    train = np.sort(rng.permutation(np.concatenate(train))[:train_images or None])
    train, test = torch.as_tensor(train), torch.as_tensor(np.concatenate(test))
    mean, sd = x[train].mean(), x[train].std()
    x = (x - mean) / sd
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


# --------------------------------------------------------------------------- model
class Net(nn.Module):
    """3 x (conv 3x3 + norm, ReLU) with a max-pool after the second -> global average
    pool -> linear head. ``layer``: the normalisation (a name of LAYERS)."""

    def __init__(self, layer: str, burnin: int = 0, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_norm(layer, 1, width // 2, burnin), nn.ReLU(),
            conv_norm(layer, width // 2, width, burnin), nn.ReLU(),
            nn.MaxPool2d(2),
            conv_norm(layer, width, width, burnin), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.features(x))


def train(model: nn.Module, x, y, batch_size: int, epochs: int, lr: float,
          rng: np.random.RandomState) -> None:
    """SGD with a cosine schedule; every batch holds exactly ``batch_size`` images (the
    images left over after the last full batch of an epoch are skipped that epoch)."""
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    groups = sx.bn_param_groups(model, lr, RECIPE["weight_decay"], c=1.0)  # no decay on norms
    opt = torch.optim.SGD(groups, momentum=RECIPE["momentum"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(len(x)))
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    """Test accuracy in % in eval mode (the norm layers use their running statistics)."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() * 100


def run_one(task: Tuple[str, int, int, int, float, int]) -> float:
    """Train one network from scratch; its test accuracy in %. ``task`` is (layer, batch
    size, seed, epochs, learning rate at batch 16, training images or 0 for all). The
    seed fixes the initialisation and the image order: the same for every layer."""
    layer, batch_size, seed, epochs, base_lr, train_images = task
    data = load_data(train_images)
    torch.manual_seed(seed)
    steps_per_epoch = len(data["train_x"]) // batch_size
    model = Net(layer, burnin=steps_per_epoch)  # CBN: plain BN for the first epoch
    lr = base_lr * batch_size / 16  # linear scaling rule
    train(model, data["train_x"], data["train_y"], batch_size, epochs, lr, np.random.RandomState(seed))
    return accuracy(model, data["test_x"], data["test_y"])


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_all(args: argparse.Namespace) -> Dict[int, Dict[str, List[float]]]:
    """Every (seed, batch size, layer) run, in ``args.jobs`` processes; returns
    ``{batch size: {layer: [accuracy per seed]}}``."""
    tasks = [(layer, b, seed, args.epochs, args.lr, args.train_images)
             for seed in range(args.seeds) for b in args.batch_sizes for layer in args.layers]
    per_seed = len(tasks) // args.seeds
    acc = {b: {layer: [] for layer in args.layers} for b in args.batch_sizes}
    # Processes, not threads: these ops are too small for intra-op threads to pay off.
    # "spawn": a forked child of a process that already ran torch ops can hang in OpenMP.
    pool = None if args.jobs == 1 else ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(args.threads,))
    start = time.time()
    try:
        results = pool.map(run_one, tasks) if pool else map(run_one, tasks)
        for i, ((layer, b, *_), a) in enumerate(zip(tasks, results), 1):  # in task order
            acc[b][layer].append(a)
            if i % per_seed == 0:
                print(f"seed {i // per_seed - 1} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.shutdown()
    return acc


# --------------------------------------------------------------------------- statistics
def mean_sd(values: Sequence[float]) -> tuple:
    a = np.asarray(values, dtype=float)
    return a.mean(), (a.std(ddof=1) if len(a) > 1 else 0.0)


def format_table(acc: Dict[int, Dict[str, List[float]]], layers: Sequence[str]) -> str:
    """Markdown table: one row per layer, per batch size the test accuracy (mean ± sd) and
    the paired difference against BatchNorm (mean ± sd of the per-seed differences)."""
    sizes = list(acc)
    head = "| layer | " + " | ".join(f"batch {b}: acc (%) | Δ vs bn" for b in sizes) + " |"
    rule = "|---|" + "---|---|" * len(sizes)
    lines = [head, rule]
    for layer in layers:
        cells = []
        for b in sizes:
            m, s = mean_sd(acc[b][layer])
            cells.append(f"{m:.1f} ± {s:.1f}")
            if layer == BASELINE:
                cells.append("")
            else:
                dm, ds = mean_sd(np.subtract(acc[b][layer], acc[b][BASELINE]))
                cells.append(f"{dm:+.1f} ± {ds:.1f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(stats: Dict[int, Dict[str, tuple]], path: str, title: str) -> bool:
    """Test accuracy against batch size, one line per layer, error bars ± sd; ``stats``:
    ``{batch size: {layer: (mean, sd)}}``. Left the whole range, right the top 4 points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    sizes = list(stats)
    layers = list(stats[sizes[0]])
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[0::2] + tab20[1::2]  # 20 distinct colours, the strong ones first
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    for ax in axes:
        for i, layer in enumerate(layers):
            means, sds = zip(*(stats[b][layer] for b in sizes))
            # Small horizontal offsets keep overlapping error bars apart.
            xs = np.asarray(sizes, dtype=float) * 1.03 ** (i - (len(layers) - 1) / 2)
            ax.errorbar(xs, means, yerr=sds, capsize=3, marker="o", markersize=4, color=colors[i % 20],
                        linestyle=":" if layer in CONTROLS else "-", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size (same epochs, learning rate scaled with the batch size)")
    top = max(m for per_layer in stats.values() for m, _ in per_layer.values())
    axes[1].set_ylim(math.floor(top) - 3, min(100.0, top + 1))
    axes[0].set_ylabel("test accuracy (%), mean ± sd over seeds")
    axes[1].set_title("zoom", fontsize=9)
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right center")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 16],
                        help="training batch sizes (default 2 4 16)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs at every batch size (default 3)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate at batch 16 (default 0.1)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS, metavar="LAYER",
                        help=f"layers to compare (default all: {', '.join(LAYERS)})")
    parser.add_argument("--out", default=None,
                        help=f"plot path (default {DEFAULT_PLOT}; none in --smoke unless given)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--train-images", type=int, default=0,
                        help="train on a random subset of this many images (default 0: all 1195)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny setting for CI: 2 seeds, batch 2 and 8, 2 epochs on 40 images, 1 process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.batch_sizes, args.epochs, args.train_images, args.jobs = 2, [2, 8], 2, 40, 1
    elif args.out is None:
        args.out = DEFAULT_PLOT
    if min(args.seeds, args.epochs, args.jobs, args.threads) < 1 or args.train_images < 0:
        parser.error("--seeds, --epochs, --jobs and --threads must be >= 1, --train-images >= 0")
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes must be >= 2 (BatchNorm needs two images)")
    if BASELINE not in args.layers:
        args.layers.insert(0, BASELINE)  # every difference is taken against it
    return args


def _cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv=None) -> dict:
    """Run the comparison; print the table; return ``{"accuracy": {batch size: {layer:
    [acc per seed]}}, "table": str, "plot": path or None, "seconds": wall time,
    "cpu_seconds": CPU time}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, cpu_start = time.time(), _cpu_seconds()
    acc = run_all(args)
    seconds, cpu_seconds = time.time() - start, _cpu_seconds() - cpu_start
    data = load_data(args.train_images)

    print(f"Digits from scratch: {len(data['train_y'])} training / {len(data['test_y'])} test "
          f"images, {args.seeds} seeds, {args.epochs} epochs, lr {args.lr} x batch/16.")
    table = format_table(acc, args.layers)
    print("Test accuracy (%, eval mode), mean ± sd over seeds; Δ vs bn: mean ± sd of the "
          "per-seed differences.")
    print(table)
    # CPU time says what the run costs on a quiet machine; wall time also counts the waits
    # for cores that other programs hold.
    print(f"total time {seconds:.1f} s ({cpu_seconds:.1f} CPU s), {args.jobs} processes x "
          f"{args.threads} torch threads, torch {torch.__version__}")
    saved = None
    if args.out:
        title = f"digits from scratch: {args.seeds} seeds, {args.epochs} epochs"
        stats = {b: {layer: mean_sd(a) for layer, a in per_layer.items()} for b, per_layer in acc.items()}
        if plot(stats, args.out, title):
            saved = args.out
            print(f"plot saved to {saved}")
    return {"accuracy": acc, "table": table, "plot": saved, "seconds": seconds, "cpu_seconds": cpu_seconds}


if __name__ == "__main__":
    main()
