"""``flightcheck analyze``: the curve diagnosis of any TensorBoard run, read back from disk.

Reads the scalars of every run under a directory with TensorBoard's own event reader (a run
made without flightcheck too), finds the training and validation loss by name, and replays
them through :func:`flightcheck.checks.curves.diagnose`, the judgment the
:class:`~flightcheck.LossCurveMonitor` makes live: divergence, oscillation, plateaus,
spikes, over- and underfitting, each with the step it began.

A run is a directory that holds event files (``events.out.tfevents.*``), as TensorBoard
counts them. A run with no loss series, or an event file that is truncated or corrupt, is
reported as such; what could be read is still judged.

Example::

    from flightcheck.analyze import analyze

    for report in analyze("lightning_logs"):
        print(report.format())
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from flightcheck.checks.curves import Diagnosis, diagnose
from flightcheck.findings import Severity

EVENT_FILE_MARK = "tfevents"

#: Training-loss tags tried first, in order (Lightning's ``self.log("train_loss", ...,
#: on_step=True, on_epoch=True)`` writes ``train_loss_step`` and ``train_loss_epoch``).
TRAIN_TAGS: tuple[str, ...] = (
    "train_loss_step",
    "train_loss",
    "train/loss_step",
    "train/loss",
    "loss/train",
    "training_loss",
    "training/loss",
    "loss_step",
    "loss",
    "train_loss_epoch",
    "train/loss_epoch",
    "epoch_loss",
)
#: Validation-loss tags tried first, in order.
VAL_TAGS: tuple[str, ...] = (
    "val_loss",
    "val/loss",
    "val_loss_epoch",
    "val/loss_epoch",
    "valid_loss",
    "valid/loss",
    "validation_loss",
    "validation/loss",
    "loss/val",
    "loss/valid",
    "loss/validation",
    "eval_loss",
    "eval/loss",
    "epoch_val_loss",
)
_VAL_WORDS = frozenset({"val", "valid", "validation", "eval", "evaluation", "dev"})
_OTHER_WORDS = frozenset({"test", "lr", "grad", "norm", "flightcheck"})
#: fewer points than this in the step-level training series and the epoch-level one is used
MIN_TRAIN_POINTS = 8


@dataclasses.dataclass
class Series:
    """One scalar series of a run."""

    tag: str
    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.values.size)


@dataclasses.dataclass
class RunReport:
    """What ``analyze`` found in one run: the series it used, its diagnosis, or why none."""

    run: str
    train: Series | None = None
    val: Series | None = None
    diagnosis: Diagnosis | None = None
    problems_reading: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)

    @property
    def worst(self) -> Severity | None:
        return None if self.diagnosis is None else self.diagnosis.worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "train_tag": None if self.train is None else self.train.tag,
            "train_points": 0 if self.train is None else len(self.train),
            "val_tag": None if self.val is None else self.val.tag,
            "val_points": 0 if self.val is None else len(self.val),
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "reading_problems": list(self.problems_reading),
            "error": self.error,
            "tags": list(self.tags),
        }

    def format(self, markdown: bool = False) -> str:
        head = f"run {self.run or '.'}"
        if self.train is not None:
            head += f" (training: {self.train.tag}, {len(self.train)} points"
            head += f"; validation: {self.val.tag}, {len(self.val)} points)" if self.val is not None else "; no validation)"
        lines = [f"## {head}" if markdown else f"== {head}"]
        lines += [f"warning: {p}" for p in self.problems_reading]
        if self.error:
            lines.append(f"not judged: {self.error}")
        if self.diagnosis is not None:
            lines.append(self.diagnosis.format(markdown=markdown))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading
def find_runs(logdir: str) -> list[str]:
    """Every directory under ``logdir`` (itself included) that holds an event file, sorted."""
    if not os.path.exists(logdir):
        raise FileNotFoundError(f"no such directory: {logdir}")
    if os.path.isfile(logdir):
        return [os.path.dirname(os.path.abspath(logdir))] if EVENT_FILE_MARK in os.path.basename(logdir) else []
    runs = []
    for root, _dirs, files in os.walk(logdir):
        if any(EVENT_FILE_MARK in f for f in files):
            runs.append(root)
    return sorted(runs)


class _ReadProblems(logging.Handler):
    """Collects what TensorBoard's reader says about truncated or corrupt records."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if re.search(r"truncated|corrupt|data ?loss|failed", text, re.IGNORECASE):
            self.messages.append(text)


@contextlib.contextmanager
def _listening_to_tensorboard() -> Iterator[_ReadProblems]:
    tb_log = logging.getLogger("tensorboard")
    handler = _ReadProblems()
    level, propagate = tb_log.level, tb_log.propagate
    tb_log.addHandler(handler)
    tb_log.setLevel(logging.DEBUG)
    tb_log.propagate = False  # its DEBUG chatter stays out of the user's console
    try:
        yield handler
    finally:
        tb_log.removeHandler(handler)
        tb_log.setLevel(level)
        tb_log.propagate = propagate


def read_scalars(run_dir: str) -> tuple[dict[str, Series], list[str]]:
    """``(series by tag, reading problems)`` of one run directory (its own event files only).

    Reads plain scalar summaries (PyTorch's ``SummaryWriter``, Lightning) and TF2-style
    scalar tensors. A truncated or corrupt event file yields the events before the damage
    and a problem line naming the file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    problems: list[str] = []
    with _listening_to_tensorboard() as heard:
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
    for message in dict.fromkeys(heard.messages):
        problems.append(f"an event file could not be read to the end ({message}); using the events before it")
    tags = accumulator.Tags()
    series: dict[str, Series] = {}
    for tag in tags.get("scalars", []):
        events = accumulator.Scalars(tag)
        series[tag] = _series(tag, [(e.step, e.value) for e in events])
    for tag in tags.get("tensors", []):
        if tag in series:
            continue
        points = []
        for e in accumulator.Tensors(tag):
            value = _scalar_tensor(e.tensor_proto)
            if value is not None:
                points.append((e.step, value))
        if points:
            series[tag] = _series(tag, points)
    return series, problems


def _scalar_tensor(proto: Any) -> float | None:
    try:
        from tensorboard.util import tensor_util

        arr = tensor_util.make_ndarray(proto)
    except Exception:  # noqa: BLE001 - not a numeric tensor: not a scalar series
        return None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr.reshape(()))


def _series(tag: str, points: list[tuple[int, float]]) -> Series:
    # A resumed run writes some steps twice: keep the last value written for a step.
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[int(step)] = float(value)
    steps = np.array(sorted(by_step), dtype=np.float64)
    values = np.array([by_step[int(s)] for s in steps], dtype=np.float64)
    return Series(tag, steps, values)


# ----------------------------------------------------------------------------- choosing
def _words(tag: str) -> list[str]:
    return [w for w in re.split(r"[/_\-.\s]+", tag.lower()) if w]


def pick_train_tag(tags: Sequence[str], lengths: dict[str, int] | None = None) -> str | None:
    """The training loss's tag: a known name, else a tag with the word ``loss`` and no
    validation or test word. A step-level series too short to judge gives way to the
    epoch-level one."""
    lengths = lengths or {}
    found = [t for t in TRAIN_TAGS if t in tags]
    if not found:
        found = sorted(
            (t for t in tags if "loss" in _words(t) and not (set(_words(t)) & (_VAL_WORDS | _OTHER_WORDS))),
            key=lambda t: ("train" not in _words(t), "epoch" in _words(t), t),
        )
    if not found:
        return None
    best = found[0]
    if lengths.get(best, MIN_TRAIN_POINTS) < MIN_TRAIN_POINTS:
        longer = [t for t in found[1:] if lengths.get(t, 0) > lengths.get(best, 0)]
        if longer:
            best = max(longer, key=lambda t: lengths.get(t, 0))
    return best


def pick_val_tag(tags: Sequence[str]) -> str | None:
    """The validation loss's tag: a known name, else a tag with the word ``loss`` and a
    validation word (``val``, ``valid``, ``validation``, ``eval``, ``dev``)."""
    for t in VAL_TAGS:
        if t in tags:
            return t
    found = sorted(
        (t for t in tags if "loss" in _words(t) and set(_words(t)) & _VAL_WORDS and "flightcheck" not in _words(t)),
        key=lambda t: ("step" in _words(t), t),
    )
    return found[0] if found else None


# ----------------------------------------------------------------------------- judging
def analyze_run(
    run_dir: str,
    *,
    root: str | None = None,
    train_tag: str | None = None,
    val_tag: str | None = None,
    **options: Any,
) -> RunReport:
    """Read one run and diagnose its curves; ``options`` go to :func:`diagnose`."""
    name = os.path.relpath(run_dir, root) if root else run_dir
    report = RunReport(run="." if name == "." else name)
    try:
        series, report.problems_reading = read_scalars(run_dir)
    except Exception as err:  # noqa: BLE001 - an unreadable run is reported, the others go on
        report.error = f"its event files could not be read: {type(err).__name__}: {err}"
        return report
    report.tags = sorted(series)
    if not series:
        report.error = "no scalars in its event files (an empty or unfinished run)"
        return report
    lengths = {t: len(s) for t, s in series.items()}
    chosen_train = train_tag if train_tag is not None else pick_train_tag(list(series), lengths)
    if chosen_train is None or chosen_train not in series:
        wanted = f"--train-tag {train_tag!r} is not among its tags" if train_tag else "no training loss found"
        report.error = f"{wanted}; tags: {', '.join(sorted(series)) or 'none'}"
        return report
    report.train = series[chosen_train]
    chosen_val = val_tag if val_tag is not None else pick_val_tag(list(series))
    if chosen_val is not None:
        if chosen_val not in series:
            report.problems_reading.append(f"--val-tag {val_tag!r} is not among its tags; judged without validation")
        else:
            report.val = series[chosen_val]
    if len(report.train) == 0:
        report.error = f"{chosen_train} has no points"
        return report
    val = report.val
    report.diagnosis = diagnose(
        report.train.steps,
        report.train.values,
        None if val is None else val.steps,
        None if val is None else val.values,
        val_name=chosen_val or "val_loss",
        train_name=chosen_train,
        **options,
    )
    return report


def analyze(
    logdir: str,
    *,
    train_tag: str | None = None,
    val_tag: str | None = None,
    **options: Any,
) -> list[RunReport]:
    """Diagnose every run under ``logdir``; ``options`` go to :func:`diagnose` (e.g.
    ``target_error``, ``floor``, ``warmup_steps``)."""
    runs = find_runs(logdir)
    return [analyze_run(r, root=logdir, train_tag=train_tag, val_tag=val_tag, **options) for r in runs]


def worst_severity(reports: Sequence[RunReport]) -> Severity | None:
    ranked = [r.worst for r in reports if r.worst is not None]
    return max(ranked, key=lambda s: s.rank) if ranked else None


__all__ = [
    "RunReport",
    "Series",
    "TRAIN_TAGS",
    "VAL_TAGS",
    "analyze",
    "analyze_run",
    "find_runs",
    "pick_train_tag",
    "pick_val_tag",
    "read_scalars",
    "worst_severity",
]
