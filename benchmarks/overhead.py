"""What flightcheck's monitors cost per training step, next to the usual alternatives.

A ~10M-parameter MLP (LayerNorm + ReLU blocks, Adam) trains on synthetic batches, once per
variant, the variants interleaved over ``--repeats`` rounds so that a noisy machine hurts
them alike:

- ``no callbacks``: the baseline step;
- ``floor: one fused _foreach_norm``: one fused read of the gradients, kept on the device —
  the least any gradient monitor can cost;
- ``floor: one dot per tensor (CPU)``: the same read as BLAS dot products, which flightcheck
  uses on a CPU, where ``_foreach_norm`` has no fused kernel (CPU runs only);
- ``GradientMonitor``: flightcheck's gradient monitor at its defaults;
- ``GradientMonitor + NonFiniteGuard``: the two core monitors, sharing one read of the gradients;
- ``flightcheck in-flight monitors``: ``flightcheck.default_callbacks(preflight=False)``,
  every in-flight monitor that exists in this checkout;
- ``Lightning grad_norm every step``: ``lightning.pytorch.utilities.grad_norm`` logged with
  ``self.log_dict`` in ``on_before_optimizer_step``, the documented recipe;
- ``per-parameter .norm().item()``: the hand-written loop (one sync per tensor on a GPU).

Each row gives the median step time (the typical step) and the mean over the timed steps
(which includes the logging steps, where monitors move their figures to the host), their
ratio to the baseline; the time spent inside the variant's own hooks per step, and as a share
of the baseline step (on a shared, busy machine the step times drift by more than the
monitors cost; the time in the hooks is the steadier figure); and the memory the variant
keeps: tensors held by its callbacks between steps, and on CUDA the growth of peak allocated
memory over the baseline.

    python benchmarks/overhead.py                      # CPU, and CUDA too when available
    python benchmarks/overhead.py --steps 100 --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.nn import functional as F

#: Untimed steps before the timed ones: past the monitors' start-up (GradientMonitor measures
#: the update ratio on every step for its first 100 steps, then on every 4th and on logging
#: steps), so the figures are those of the long stretch of a run. ``--warmup 5`` times the start-up.
WARMUP_STEPS = 110
#: The run the trainer is told it is in (``max_steps``); the data runs out long before. The
#: monitors look more often on short runs (at least 32 looks per planned run), so a 161-step
#: plan would time a look every 10 steps; a long plan times the cadence of a real run, a look
#: per ``log_every_n_steps``.
PLANNED_STEPS = 100_000


# ----------------------------------------------------------------------------- the model
class MLP(pl.LightningModule):
    """~9.5M parameters: 1024 -> 2048 -> 2048 -> 1024 -> 1024 -> 10, LayerNorm + ReLU."""

    def __init__(self, widths: tuple[int, ...] = (1024, 2048, 2048, 1024, 1024), classes: int = 10):
        super().__init__()
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.ReLU()))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(self.blocks(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class Batches(torch.utils.data.IterableDataset):
    """The same few pre-made batches over and over: no data-loading cost in the step."""

    def __init__(self, batch_size: int, steps: int, dim: int = 1024, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(batch_size, dim, generator=g), torch.randint(0, classes, (batch_size,), generator=g))
                        for _ in range(4)]
        self.steps = steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


# ----------------------------------------------------------------------------- the alternatives
class FusedNormFloor(pl.Callback):
    """One fused read of every gradient, the result left on the device."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms = torch._foreach_norm(grads)


class DotFloor(pl.Callback):
    """One read of every gradient the way flightcheck reads them on a CPU (a BLAS dot product
    per large tensor, ``_foreach_norm`` having no fused CPU kernel), left on the device."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms = [torch.dot(p.grad.view(-1), p.grad.view(-1)) for p in pl_module.parameters()
                      if p.grad is not None]


class LightningGradNorm(pl.Callback):
    """Lightning's documented recipe, logged every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class ItemLoop(pl.Callback):
    """The hand-written loop: one ``.item()`` (one GPU sync) per parameter tensor."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms = {n: p.grad.norm().item() for n, p in pl_module.named_parameters() if p.grad is not None}


class HookClock:
    """Wall time spent inside the hooks of some callbacks: on a CPU exactly what they add to a
    step; on CUDA their launch cost plus any wait for the device they force."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.total = 0.0
        self.running = False  # only inside the timed window: not the first steps, not the end of the run
        for cb in callbacks:
            for name in [n for n in dir(type(cb)) if n.startswith("on_") or n in ("setup", "teardown")]:
                hook = getattr(cb, name, None)
                if callable(hook):
                    setattr(cb, name, self._timed(hook))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.running:
                return hook(*args, **kwargs)
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed


class StepTimer(pl.Callback):
    """Wall time from one batch start to the next (CPU); the window's total time on CUDA."""

    def __init__(self, cuda: bool, clock: HookClock, last: int) -> None:
        self.cuda = cuda
        self.clock = clock
        self.last = last  # the final batch: its start closes the timed window
        self.starts: list[float] = []
        self.hook_marks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.cuda and batch_idx in (WARMUP_STEPS, self.last):
            torch.cuda.synchronize()  # window edges only: the steps between keep their asynchrony
        self.clock.running = WARMUP_STEPS <= batch_idx < self.last
        self.starts.append(time.perf_counter())
        self.hook_marks.append(self.clock.total)

    def step_times(self) -> list[float]:
        timed = self.starts[WARMUP_STEPS:]
        return [b - a for a, b in zip(timed[:-1], timed[1:])]

    def net_step_times(self) -> list[float]:
        """Each timed step less the time spent in the measured callbacks' hooks during it:
        the work every variant shares (CPU only: on CUDA the hooks overlap the device's work)."""
        marks = self.hook_marks[WARMUP_STEPS:]
        hooks = [b - a for a, b in zip(marks[:-1], marks[1:])]
        return [t - h for t, h in zip(self.step_times(), hooks)]


def _flightcheck_gradient_monitor() -> list[Any]:
    from flightcheck import GradientMonitor

    return [GradientMonitor()]


def _flightcheck_core() -> list[Any]:
    from flightcheck import GradientMonitor, NonFiniteGuard

    return [NonFiniteGuard(), GradientMonitor()]


def _flightcheck_monitors() -> list[Any]:
    import flightcheck

    return flightcheck.default_callbacks(preflight=False)


VARIANTS: list[tuple[str, Callable[[], list[Any]]]] = [
    ("no callbacks", lambda: []),
    ("floor: one fused _foreach_norm", lambda: [FusedNormFloor()]),
    ("floor: one dot per tensor (CPU)", lambda: [DotFloor()]),
    ("GradientMonitor", _flightcheck_gradient_monitor),
    ("GradientMonitor + NonFiniteGuard", _flightcheck_core),
    ("flightcheck in-flight monitors", _flightcheck_monitors),
    ("Lightning grad_norm every step", lambda: [LightningGradNorm()]),
    ("per-parameter .norm().item()", lambda: [ItemLoop()]),
]


# ----------------------------------------------------------------------------- measuring
def held_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the tensors an object keeps (through attributes, containers), each storage
    counted once; storages already in ``seen`` (the model's own, put there by the caller)
    are not counted, so a view of a weight costs nothing."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if isinstance(obj, nn.Parameter):
            return 0  # the model's own weights, not the monitor's
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module, pl.Trainer, torch.optim.Optimizer)):
        return 0  # the model, the trainer and the optimizer's state are not the monitor's
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        return sum(held_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return held_bytes(vars(obj), seen, depth + 1)
    return 0


def run_variant(make: Callable[[], list[Any]], device: str, steps: int, batch_size: int, log_every: int,
                tmp: str) -> dict[str, Any]:
    callbacks = make()
    cuda = device == "cuda"
    clock = HookClock(callbacks)
    timer = StepTimer(cuda, clock, last=steps + WARMUP_STEPS)
    torch.manual_seed(0)
    model = MLP()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_steps=PLANNED_STEPS,  # the data ends the run after steps + WARMUP_STEPS + 1 batches
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(tmp, name="overhead"),
        callbacks=[timer, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every,
    )
    data = torch.utils.data.DataLoader(Batches(batch_size, steps + WARMUP_STEPS + 1), batch_size=None)
    with contextlib.redirect_stdout(io.StringIO()):  # end-of-run summaries of the monitors
        trainer.fit(model, data)
    times = timer.step_times()
    if cuda:  # one synchronised window: the mean is the honest figure
        times = [sum(times) / len(times)] * len(times)
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model_storages |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    out = {"times": times, "net": [] if cuda else timer.net_step_times(),
           "held": held_bytes(callbacks, seen=model_storages),
           "params": sum(p.numel() for p in model.parameters()),
           "hooks": [clock.total / len(times)]}
    out["cuda_peak"] = torch.cuda.max_memory_allocated() if cuda else None
    findings = [f for cb in callbacks for f in getattr(cb, "findings", []) if f.check == "internal_error"]
    if findings:
        out["note"] = f"internal error: {findings[0].message}"
    return out


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MB"


def measure(device: str, steps: int, repeats: int, batch_size: int, log_every: int, tmp: str) -> str:
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    variants = [(n, m) for n, m in VARIANTS if device == "cpu" or "(CPU)" not in n]
    for round_ in range(repeats):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for name, make in order:
            if name in skipped:
                continue
            try:
                r = run_variant(make, device, steps, batch_size, log_every, tmp)
            except Exception as err:  # noqa: BLE001 - a monitor not in this checkout yet
                skipped[name] = f"{type(err).__name__}: {err}"
                continue
            agg = results.setdefault(name, {"times": [], "hooks": [], "net": [],
                                            **{k: v for k, v in r.items() if k not in ("times", "hooks", "net")}})
            agg["times"].extend(r["times"])
            agg["hooks"].extend(r["hooks"])
            agg["net"].extend(r["net"])
    base = results["no callbacks"]
    base_median, base_mean = statistics.median(base["times"]), statistics.fmean(base["times"])
    # The denominator of "hooks / step": on a shared machine one variant's median step drifts
    # by more than the monitors cost, so the step is taken net of the hooks in every variant's
    # runs, pooled (the same work in all of them): a far steadier figure than one variant's.
    pooled = [t for r in results.values() for t in r["net"]]
    step = statistics.median(pooled) if pooled else base_median
    lines = [
        f"**{device.upper()}**, {base['params'] / 1e6:.1f}M-parameter MLP, batch {batch_size}, Adam, "
        f"{steps} timed steps after {WARMUP_STEPS} untimed ones x {repeats} rounds per variant, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, log_every_n_steps={log_every}; "
        f"hooks / step is over {step * 1e3:.1f} ms, the median step net of the hooks, pooled over every run",
        "",
        "| variant | median ms/step | vs none | mean ms/step | vs none | in its hooks, ms/step | "
        "hooks / step | extra memory held | CUDA peak vs none |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, _ in variants:
        if name in skipped:
            lines.append(f"| {name} | – | – | – | – | – | – | – | skipped: {skipped[name][:80]} |")
            continue
        r = results[name]
        med, mean = statistics.median(r["times"]), statistics.fmean(r["times"])
        peak = None if r["cuda_peak"] is None else r["cuda_peak"] - base["cuda_peak"]
        note = f" ({r['note']})" if r.get("note") else ""
        hooks = statistics.fmean(r["hooks"])
        lines.append(
            f"| {name}{note} | {med * 1e3:.1f} | {med / base_median:.3f}x | {mean * 1e3:.1f} | "
            f"{mean / base_mean:.3f}x | {hooks * 1e3:.2f} | {hooks / step:.1%} | {_mb(r['held'])} | "
            f"{_mb(peak) if peak is not None else '–'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps per run (default 50)")
    parser.add_argument("--log-every-n-steps", type=int, default=50,
                        help="the Trainer's logging interval, where monitors read back (default 50, Lightning's)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the variants (default 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, then CUDA when available")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 1024 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                        help=f"untimed steps first (default {WARMUP_STEPS}: past the monitors' start-up phase)")
    args = parser.parse_args(argv)
    globals()["WARMUP_STEPS"] = max(1, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "flightcheck"):
        logging.getLogger(name).setLevel(logging.ERROR)
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"], "cuda": ["cuda"]}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for device in devices[args.device]:
            batch = args.batch_size or (1024 if device == "cuda" else 16)
            print(measure(device, args.steps, args.repeats, batch, args.log_every_n_steps, tmp), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
