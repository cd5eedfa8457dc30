"""``python -m stochnorm_ext.bench``: check the three layers, then time them against BatchNorm.

Per device (CPU, and CUDA when present; ``--device`` picks):

1. Checks the reference against ``nn.BatchNorm2d`` where they coincide, then each layer on
   each available backend against the float64 reference, with the checks of
   ``stochnorm_ext.selfcheck`` (PASS/FAIL and the max relative error; Triton on CPU runs
   under its interpreter: checked, not timed).
2. Measures the copy bandwidth, ``dst.copy_(src)`` on a 256 MiB buffer, with the same
   timer: the ceiling of a memory-bound kernel.
3. Times the training forward (``fwd``), the backward alone (``bwd``, the graph kept and
   backpropagated again) and both (``fwd+bwd``) of, on each case (shape, batch, dtype,
   memory format):

   ``bn``        ``F.batch_norm`` in training, the baseline. Its label names the kernel that
                 ran (``cudnn`` or ``native``: on CUDA, fp32/fp16 go to cuDNN when it is
                 enabled, bf16 never does; on CPU it is always ``native``).
   ``stoch_norm``  our backends, and ``published``: two ``F.batch_norm`` calls (moving
                 branch ``training=False`` on the running buffers, batch branch
                 ``training=True``) mixed by a per-channel mask drawn on the host with
                 NumPy and moved to the device, as in the published code.
   ``bgn``       our backends (``G = C/4``), and ``published``: reshape to ``(N, G, -1)``,
                 ``F.batch_norm``, per-channel affine (the paper's description).
                 ``--bgn-groups`` times other group counts as well, as rows
                 ``bgn G=<spec>`` (``C`` is BatchNorm on our kernels, ``2C`` cuts each
                 channel in two spatial pieces).
   ``cbn``       the normalisation step of our CBN backends with a full window of 3
                 compensated past entries (the backend op, without conv or Jacobians).
   ``conv+bn``   a 1x1 conv from C/4 channels (the conv before every C-channel BN of a
                 ResNet-50 bottleneck) + ``F.batch_norm``: the baseline of ``conv+cbn``;
                 ``--conv 3x3``: a 3x3 conv from C channels (padding 1) instead.
   ``conv+cbn``  the same conv + a whole CBN step (window 4): ``published`` (statistics
                 and their Jacobians from ``torch.autograd.grad`` of the channel mean and
                 mean of squares w.r.t. the conv weight, as the released code does) and our
                 ``Conv2dCBN`` per backend.
4. The small-batch section (on by default; ``--small-batch-only`` runs only it after the
   checks, ``--no-small-batch`` skips it), where a step is bound by the host, not by
   memory bandwidth:

   per call      on a tiny input (2x8x2x2 float32) each layer's module (StochNorm2d; BGN
                 with groups of 4 channels and with one group; Conv2dCBN, window 4) against
                 ``nn.BatchNorm2d`` (conv + CBN against conv + BN, 3x3 conv): training
                 forward, training forward + backward, eval; time per call (us), ratio to
                 BatchNorm, the dispatched non-view ops per call (``count_ops``) and, on
                 CUDA, the kernels launched (``count_launches``; "-" on CPU).
   training step one SGD step (zero_grad, forward, cross-entropy, backward, update) of
                 ``conv_stack()`` (eight 3x3 conv + norm + ReLU blocks, ResNet-18's widths
                 and strides, input 8x3x64x64) and of torchvision's resnet18 (same input,
                 where torchvision imports), built with BatchNorm and converted to each
                 layer with ``stochnorm_ext.convert_model``: ms per step, ratio to the
                 BatchNorm network, ops and launches per step.

   ``--quick`` runs it on the conv stack at an eighth of the widths on 2x3x16x16 and
   without resnet18. Its tables have their own legend; ``--markdown`` writes it into
   ``<!-- bench:DEVICE-small-batch:start/end -->``; ``--csv out.csv`` writes its rows to
   ``out_small_batch.csv``; ``--json`` under ``small_batch``.

   For other code and tests: ``stochnorm_ext.bench.conv_stack`` builds that network (and
   ``with_layer`` converts a copy), ``count_ops(fn, *args)`` counts the non-view ops a call
   dispatches (``OpCounter`` names them), ``count_launches`` the GPU launches.

The table (one per case) and the legend printed under it (also written into the markdown)
explain every column and flag: time (ms), time relative to the baseline (``/BN``;
``conv+*`` rows relative to ``conv+bn``; lower is better) with its spread over the rounds,
relative to our reference backend (``/ref``), GB/s at the bytes moved, that as a fraction
of the copy bandwidth, and the bytes moved relative to the minimum. Where the bytes come
from (``bytes`` column):

  ``kernel``  the backend module's ``bytes_moved(layer, direction, numel, element_size)``
              (``layer``: ``stoch_norm``, ``batch_group_norm`` or
              ``cross_iteration_norm``; ``direction``: ``fwd`` or ``bwd``);
  ``est``     a two-pass estimate: fwd reads x twice and writes y; bwd reads x and dy
              twice and writes dx (BatchNorm kernels, and backends without
              ``bytes_moved``);
  ``ops``     counted while running: every aten op reads its tensor inputs and writes its
              outputs once (views are free; a training batch-norm op makes the extra pass
              of the estimate above). For the eager compositions (reference, published).
  ``-``       conv rows: a conv is not memory-bound, only the time ratio is meaningful.

Timing: on CUDA ``triton.testing.do_bench`` (median; it clears the L2 cache before every
run) when Triton is importable, else CUDA events (median) with the inputs rotated over
enough copies that the working set is twice the L2 cache; on CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks) with the inputs
rotated over twice the last-level cache. Everything is warmed up first.

Right on a shared machine by default:

- CPU threads are chosen for the load (``--threads auto``): 1 thread on 2 cores or fewer,
  or when the 1-minute load average leaves fewer than 2 cores idle (OpenMP threads wait at
  every parallel region for a descheduled sibling, so timings jump by scheduler slices);
  else the idle cores. The header says what was chosen and why; ``--threads N`` overrides
  (with a warning when N is more than the load allows).
- With one CPU thread the clock is the thread's CPU time (``time.thread_time``): every op
  of a step, autograd's backward included, runs on the calling thread, so it counts the
  step's work and not the time the thread waited for a core taken by another process.
  With more threads it is the wall clock. The header names the clock.
- Every timing is taken in ``--rounds`` alternating rounds (default 5): each round times
  every subject once, baseline first in one round and last in the next, so a burst of
  background load lands on both sides of a ratio. A row's time is the median over the
  rounds; its ratios are the medians of the per-round ratios.
- A row whose per-round ratio to the baseline spreads more than ``--max-spread``
  ((max - min) / median, the fastest and slowest round left out from 5 rounds on;
  default 25%) prints ``noisy (spread N%)`` instead of the ratio.
- fwd+bwd must not be faster than fwd (or bwd) alone: when it took less than 90% of
  either in every round, both rows print ``inconsistent: fwd+bwd < fwd`` instead.

No output holds an absolute path of the machine: the recorded command is
``python -m stochnorm_ext.bench`` with the arguments as one re-runs them from the
repository root. ``--dry-run`` prints the plan (cases, subjects, bytes, threads) and runs
nothing; it needs no GPU for ``--device cuda``. Training forwards update running
statistics (and CBN windows) of the timed layers; the drift is accepted (the values stay
finite) and the checks use their own inputs.

Modules, one concern each: ``cases`` (what is run on), ``subjects`` and ``baselines``
(what is timed), ``traffic`` (bytes moved), ``timing``, ``environment`` (threads, load,
paths), ``checks``, ``throughput`` (the layers-against-BatchNorm section), ``report``,
``plot``, ``counting`` (ops and launches per call), ``networks`` (the conv stack, resnet18,
conversion, SGD step), ``small_batch`` (the small-batch section), ``report_small_batch``,
``cli``.

Exit status 1 if a check fails or a benchmark raises (flagged rows are reported, not
failures).
"""
try:  # the one dependency the package itself does not declare (extra "bench")
    import numpy  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "python -m stochnorm_ext.bench needs numpy (and matplotlib for --plot), which stochnorm_ext "
        "itself does not require: pip install numpy matplotlib, or pip install 'stochnorm_ext[bench]'"
    ) from exc

from stochnorm_ext import selfcheck  # noqa: F401,E402 (sets TRITON_INTERPRET before Triton loads)
from stochnorm_ext.bench.cli import main  # noqa: E402
from stochnorm_ext.bench.counting import OpCounter, count_launches, count_ops  # noqa: E402
from stochnorm_ext.bench.networks import RESNET18_WIDTHS, conv_stack, training_step, with_layer  # noqa: E402

__all__ = ["main", "OpCounter", "count_ops", "count_launches", "conv_stack", "with_layer", "training_step",
           "RESNET18_WIDTHS"]
