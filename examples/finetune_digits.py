"""Few-label fine-tuning on scikit-learn's bundled digits (offline, CPU, a few minutes).

Pretrain a small BatchNorm CNN on digits 0-4, then fine-tune it on digits 5-9 with only
a few labelled images per class, comparing:

* ``plain``          fine-tune every layer, BatchNorm as it is, weight decay on weights;
* ``stochnorm``      BatchNorm layers converted with
                     ``stochnorm_ext.convert_model(model, "stochnorm", p=0.5)`` (the
                     pretrained running statistics are kept and feed the moving branch);
* ``l2sp``           ``stochnorm_ext.L2SP`` penalty towards the pretrained weights
                     (alpha 0.1, beta 0.01 on the new head; replaces weight decay);
* ``stochnorm+l2sp`` both;
* ``bn-scale-init``  the "revisiting BN" recipe: the source model is pretrained with
                     every BN scale initialised to 0.1 (``bn_scale_init_``), the input
                     BN at 0.1 * 0.58 and gamma's learning rate divided by 100
                     (``bn_param_groups``); fine-tuning keeps those parameter groups.
                     The other methods start from a source model pretrained the same way
                     but with gamma = 1 and c = 1 (the paper's baseline), so this method
                     changes the pretraining too.

Every model starts with the same shift-free BN input normalisation (``InputNorm``). Each
seed pretrains its own source models, draws its own labelled subset and head
initialisation, shared by all methods (paired comparison). Test accuracy is measured on
a fixed half of the digits 5-9 images that are never used for training, after the last
epoch (no early stopping: there is no validation set with 5 labels per class).

    python examples/finetune_digits.py              # defaults: 5 seeds, 5/10/20 labels
    python examples/finetune_digits.py --smoke      # tiny run for CI (seconds)
    python examples/finetune_digits.py --seeds 10 --epochs 60 --labels 5 10 20 40

Needs scikit-learn (``load_digits`` ships with it; nothing is downloaded), scipy (comes
with scikit-learn) and, for the plot, matplotlib.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

# OpenMP threads that spin while they wait make these tiny ops 10-50x slower when other
# processes share the cores; sleeping waits cost little here. Only takes effect if torch
# is not imported yet (running this file as a script).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import stochnorm_ext as sx  # noqa: E402

METHODS = ("plain", "stochnorm", "l2sp", "stochnorm+l2sp", "bn-scale-init")
DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune_digits.png")

PRETRAIN = dict(lr=0.05, weight_decay=5e-4, batch_size=64)
FINETUNE = dict(lr=0.01, weight_decay=5e-4, batch_size=16)


# --------------------------------------------------------------------------- data
def load_data(split_seed: int = 0) -> Dict[str, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float32 in [0, 1]. Source = digits 0-4 (80/20 train/test),
    target = digits 5-9 relabelled 0-4 (half a labelled pool, half the test set)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.RandomState(split_seed)
    parts = {"src_train": [], "src_test": [], "tgt_pool": [], "tgt_test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        if c < 5:
            cut = int(0.8 * len(idx))
            parts["src_train"].append(idx[:cut])
            parts["src_test"].append(idx[cut:])
        else:
            cut = len(idx) // 2
            parts["tgt_pool"].append(idx[:cut])
            parts["tgt_test"].append(idx[cut:])
    data = {}
    for name, chunks in parts.items():
        idx = torch.as_tensor(np.concatenate(chunks))
        data[name + "_x"] = x[idx]
        data[name + "_y"] = y[idx] if name.startswith("src") else y[idx] - 5
    return data


def few_labels(data, per_class: int, rng: np.random.RandomState):
    """``per_class`` labelled target images of each class, drawn from the pool."""
    y = data["tgt_pool_y"].numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                          for c in range(5)])
    return data["tgt_pool_x"][idx], data["tgt_pool_y"][idx]


# --------------------------------------------------------------------------- model
class Net(nn.Module):
    """InputNorm -> 3 x (conv 3x3, BN, ReLU) with a max-pool -> global average pool -> head.
    ``gamma``: initial BN scale (1 = PyTorch's default; 0.1 for the BN scale init recipe)."""

    def __init__(self, classes: int = 5, gamma: float = 1.0, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            sx.InputNorm(1, gamma=gamma),
            nn.Conv2d(1, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, classes)
        sx.bn_scale_init_(self, gamma)

    def forward(self, x):
        return self.head(self.features(x))


def train(model, x, y, epochs: int, groups, batch_size: int, rng: np.random.RandomState,
          l2sp: Optional[sx.L2SP] = None) -> None:
    """SGD (momentum 0.9) with a cosine learning-rate schedule; ``l2sp`` adds its penalty."""
    n = len(x)
    batches_per_epoch = max(1, math.ceil(n / batch_size))
    opt = torch.optim.SGD(groups, momentum=0.9)
    total = epochs * batches_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for _ in range(epochs):
        # Nearly equal batches (never a batch of one image).
        for idx in np.array_split(rng.permutation(n), batches_per_epoch):
            idx = torch.as_tensor(idx)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if l2sp is not None:
                loss = loss + l2sp.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Test accuracy in % (eval mode: BatchNorm/StochNorm use their running statistics)."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() * 100


def pretrain(data, gamma: float, c: float, epochs: int, seed: int) -> Net:
    """Train a source model on digits 0-4."""
    torch.manual_seed(seed)
    model = Net(gamma=gamma)
    groups = sx.bn_param_groups(model, PRETRAIN["lr"], PRETRAIN["weight_decay"], c=c)
    train(model, data["src_train_x"], data["src_train_y"], epochs, groups,
          PRETRAIN["batch_size"], np.random.RandomState(seed))
    return model


def finetune(method: str, source: Net, x, y, epochs: int, seed: int) -> nn.Module:
    """Fine-tune a copy of ``source`` on (x, y) with a new head, by ``method``."""
    model = copy.deepcopy(source)
    pretrained = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.manual_seed(seed)  # same new head (and mask stream start) for every method
    model.head = nn.Linear(model.head.in_features, 5)
    if "stochnorm" in method:
        sx.convert_model(model, "stochnorm", p=0.5)
    use_l2sp = "l2sp" in method
    # L2-SP replaces weight decay (the L2-SP paper's protocol); BN scale init keeps c = 100.
    groups = sx.bn_param_groups(model, FINETUNE["lr"], 0.0 if use_l2sp else FINETUNE["weight_decay"],
                                c=100.0 if method == "bn-scale-init" else 1.0)
    l2sp = sx.L2SP(model, pretrained, alpha=0.1, beta=0.01) if use_l2sp else None
    train(model, x, y, epochs, groups, FINETUNE["batch_size"], np.random.RandomState(seed), l2sp)
    return model


# --------------------------------------------------------------------------- statistics
def paired_stats(diffs: Sequence[float]) -> Dict[str, float]:
    """Mean and sd of paired differences, two-sided paired t-test and sign-test p-values."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    out = {"mean": d.mean(), "sd": d.std(ddof=1) if len(d) > 1 else float("nan"),
           "wins": wins, "ties": len(d) - wins - losses, "losses": losses,
           "sign_p": stats.binomtest(wins, wins + losses).pvalue if wins + losses else 1.0,
           "t_p": float("nan")}
    if len(d) > 1 and np.ptp(d) > 0:
        out["t_p"] = float(stats.ttest_rel(d, np.zeros_like(d)).pvalue)
    elif len(d) > 1 and d.mean() == 0:
        out["t_p"] = 1.0
    return out


def format_table(acc: Dict[int, Dict[str, List[float]]], methods: Sequence[str]) -> str:
    lines = [f"{'labels':>6}  {'method':<15} {'test acc (%)':>14}  {'diff vs plain':>15}  "
             f"{'W/T/L':>7}  {'sign p':>6}  {'t p':>6}"]
    for k, per_method in acc.items():
        for m in methods:
            a = np.asarray(per_method[m])
            sd = a.std(ddof=1) if len(a) > 1 else 0.0
            row = f"{k:>6}  {m:<15} {a.mean():6.1f} ± {sd:4.1f}  "
            if m != "plain":
                s = paired_stats(a - np.asarray(per_method["plain"]))
                row += (f"{s['mean']:+6.1f} ± {s['sd']:4.1f}  {s['wins']}/{s['ties']}/{s['losses']:<3}"
                        f"  {s['sign_p']:6.3f}  {s['t_p']:6.3f}")
            lines.append(row.rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(acc: Dict[int, Dict[str, List[float]]], methods: Sequence[str], path: str, title: str) -> bool:
    """Bar chart: mean test accuracy ± sd per method, grouped by labels per class."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    ks = list(acc)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 2.2 * len(ks)), 4.6), layout="constrained")
    for i, m in enumerate(methods):
        means = [np.mean(acc[k][m]) for k in ks]
        sds = [np.std(acc[k][m], ddof=1) if len(acc[k][m]) > 1 else 0.0 for k in ks]
        pos = np.arange(len(ks)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(pos, means, width, yerr=sds, capsize=3, label=m)
    ax.set_xticks(np.arange(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("labelled images per class (digits 5-9)")
    ax.set_ylabel("test accuracy (%), mean ± sd")
    lo = min(np.mean(acc[k][m]) - np.std(acc[k][m]) for k in ks for m in methods)
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_title(title, fontsize=9)
    fig.legend(fontsize=8, loc="outside lower center", ncol=len(methods))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (default 30)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="pretraining epochs (default 20)")
    parser.add_argument("--labels", type=int, nargs="+", default=[5, 10, 20],
                        help="labelled images per class (default 5 10 20)")
    parser.add_argument("--out", default=None,
                        help=f"plot path (default {DEFAULT_PLOT}; none in --smoke unless given)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny setting for CI: 2 seeds, 5 labels, 4 pretraining + 5 fine-tuning epochs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.pretrain_epochs, args.labels = 2, 5, 4, [5]
    elif args.out is None:
        args.out = DEFAULT_PLOT
    if args.seeds < 1 or args.epochs < 1 or args.pretrain_epochs < 1 or min(args.labels) < 1:
        parser.error("--seeds, --epochs, --pretrain-epochs and --labels must be >= 1")
    return args


def main(argv=None) -> dict:
    """Run the comparison; print the table; return ``{"accuracy": {labels: {method: [acc per
    seed]}}, "source_accuracy": {...}, "table": str, "plot": path or None, "seconds": float}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    data = load_data()
    acc = {k: {m: [] for m in METHODS} for k in args.labels}
    source_acc = {"standard": [], "bn-scale-init": []}
    for seed in range(args.seeds):
        sources = {
            "standard": pretrain(data, gamma=1.0, c=1.0, epochs=args.pretrain_epochs, seed=seed),
            "bn-scale-init": pretrain(data, gamma=0.1, c=100.0, epochs=args.pretrain_epochs, seed=seed),
        }
        for name, model in sources.items():
            source_acc[name].append(accuracy(model, data["src_test_x"], data["src_test_y"]))
        for k in args.labels:
            x, y = few_labels(data, k, np.random.RandomState(1000 * seed + k))
            for m in METHODS:
                source = sources["bn-scale-init" if m == "bn-scale-init" else "standard"]
                model = finetune(m, source, x, y, args.epochs, seed=1000 * seed + k)
                acc[k][m].append(accuracy(model, data["tgt_test_x"], data["tgt_test_y"]))
        print(f"seed {seed} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.time() - start

    n_test = len(data["tgt_test_y"])
    print(f"Fine-tuning on digits 5-9 (pretrained on 0-4), {args.seeds} seeds, "
          f"{args.epochs} fine-tuning epochs, test set {n_test} images.")
    for name, a in source_acc.items():
        print(f"source model ({name}) accuracy on digits 0-4 test: {np.mean(a):.1f} ± "
              f"{np.std(a, ddof=1) if len(a) > 1 else 0.0:.1f} %")
    table = format_table(acc, METHODS)
    print("W/T/L: seeds where the method beat / tied / lost to plain; p-values two-sided "
          "(sign test, paired t-test).")
    print(table)
    print(f"total time {seconds:.1f} s, {args.threads} torch threads, torch {torch.__version__}, "
          f"StochNorm backend: {os.environ.get('STOCHNORM_EXT_BACKEND') or 'default for CPU'}")
    saved = None
    if args.out:
        title = (f"digits 5-9 after pretraining on 0-4: {args.seeds} seeds, "
                 f"{args.epochs} epochs")
        if plot(acc, METHODS, args.out, title):
            saved = args.out
            print(f"plot saved to {saved}")
    return {"accuracy": acc, "source_accuracy": source_acc, "table": table, "plot": saved,
            "seconds": seconds}


if __name__ == "__main__":
    main()
