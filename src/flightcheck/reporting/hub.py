"""One reporting hub per Trainer: every flightcheck callback of a run reports through it.

The hub owns the sinks (findings file, TensorBoard, console) and the scalar logging, and it
writes on global rank 0 only. It is created in ``setup`` on every rank because resolving the
log directory (``trainer.log_dir``) is a collective under DDP.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

from flightcheck.findings import Finding
from flightcheck.reporting.sinks import ConsoleSink, JsonlSink, TensorBoardSink, configure_console

FINDINGS_DIRNAME = "flightcheck"
FINDINGS_FILENAME = "findings.jsonl"

_HUBS: weakref.WeakKeyDictionary[Any, ReportHub] = weakref.WeakKeyDictionary()


def tensorboard_writer(trainer: Any) -> Any:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None`` when there is none."""
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = _tensorboard_experiment(logger)
        if experiment is not None:
            return experiment
    return None


def _tensorboard_experiment(logger: Any) -> Any:
    # by name, so that ``lightning.pytorch`` and ``pytorch_lightning`` loggers (and their
    # subclasses) both count, and no other logger's experiment is created by asking for it
    if not any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
        return None
    experiment = logger.experiment
    # On ranks other than 0 Lightning hands out a dummy experiment with no add_text.
    return experiment if hasattr(experiment, "add_text") else None


def _tensorboard_event(logger: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Write ``metrics`` to a TensorBoard logger as *one* event holding every scalar.

    ``TensorBoardLogger.log_metrics`` makes an event per scalar, and each goes through the
    event writer's bounded queue (10 deep): a flush of a hundred per-layer charts then waits
    on the writer thread's disk writes. One ``Summary`` with many values reads back the same
    (one scalar series per tag). Returns ``False`` (nothing written) for any other logger or
    writer, which then takes the ordinary path.
    """
    experiment = _tensorboard_experiment(logger)
    get_writer = getattr(experiment, "_get_file_writer", None)
    # torch's SummaryWriter only: tensorboardX's writer takes its own protobuf classes
    if get_writer is None or not type(experiment).__module__.startswith("torch.utils.tensorboard"):
        return False
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        prefix = getattr(logger, "_prefix", "") or ""
        join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
        values = [Summary.Value(tag=f"{prefix}{join}{tag}" if prefix else tag, simple_value=float(value))
                  for tag, value in metrics.items()]
        get_writer().add_summary(Summary(value=values), step)
    except Exception:  # noqa: BLE001 - an unexpected writer or protobuf: the ordinary path then
        return False
    return True


class ReportHub:
    """Carries findings and instruments of one run out to files, TensorBoard and the console."""

    def __init__(self, trainer: Any, log_dir: str | None) -> None:
        self._trainer = weakref.ref(trainer)
        self.log_dir = log_dir
        self.is_writer = bool(getattr(trainer, "is_global_zero", True))
        self._sinks: list[Any] | None = None
        self.users = 0
        #: ids of ``on_finding`` hooks whose failure was already logged in this run
        self.hook_failures: set[int] = set()

    @property
    def findings_dir(self) -> str | None:
        return None if self.log_dir is None else os.path.join(self.log_dir, FINDINGS_DIRNAME)

    @property
    def findings_path(self) -> str | None:
        d = self.findings_dir
        return None if d is None else os.path.join(d, FINDINGS_FILENAME)

    def _build_sinks(self) -> list[Any]:
        sinks: list[Any] = []
        if not self.is_writer:
            return sinks
        configure_console()
        sinks.append(ConsoleSink())
        if self.findings_path is not None:
            sinks.append(JsonlSink(self.findings_path))
        trainer = self._trainer()
        writer = tensorboard_writer(trainer) if trainer is not None else None
        if writer is not None:
            sinks.append(TensorBoardSink(writer))
        return sinks

    def emit(self, finding: Finding) -> None:
        if self._sinks is None:
            self._sinks = self._build_sinks()
        for sink in self._sinks:
            sink.emit(finding)

    # ----------------------------------------------------------------- instruments
    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars to every logger (TensorBoard, CSV, ...); rank 0 only."""
        trainer = self._trainer()
        if not self.is_writer or trainer is None or not metrics:
            return
        for logger in trainer.loggers:
            if not _tensorboard_event(logger, metrics, step):
                logger.log_metrics(dict(metrics), step=step)

    @property
    def tensorboard(self) -> Any:
        """The run's ``SummaryWriter`` on rank 0 (for text and histograms), else ``None``."""
        trainer = self._trainer()
        if not self.is_writer or trainer is None:
            return None
        return tensorboard_writer(trainer)

    def close(self) -> None:
        for sink in self._sinks or []:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self._sinks = None


def resolve_log_dir(trainer: Any) -> str | None:
    """The logger's directory, else ``default_root_dir`` (no logger, or a logger without a
    directory). A collective under DDP."""
    try:
        log_dir = trainer.log_dir
    except Exception:
        log_dir = None
    return log_dir if log_dir else getattr(trainer, "default_root_dir", None)


def attach_hub(trainer: Any) -> ReportHub:
    """The hub of ``trainer``, created by the first callback that attaches (in ``setup``, on
    every rank); each attach is paired with a :func:`detach_hub` in ``teardown``."""
    hub = _HUBS.get(trainer)
    if hub is None:
        hub = ReportHub(trainer, resolve_log_dir(trainer))
        _HUBS[trainer] = hub
    hub.users += 1
    return hub


def detach_hub(trainer: Any) -> None:
    hub = _HUBS.get(trainer)
    if hub is None:
        return
    hub.users -= 1
    if hub.users <= 0:
        del _HUBS[trainer]
        hub.close()


def hub_for(trainer: Any) -> ReportHub:
    """The hub of ``trainer``: the attached one, else a detached one that resolves the log
    directory without a collective (for use outside ``fit``)."""
    hub = _HUBS.get(trainer)
    if hub is None:
        root = getattr(trainer, "default_root_dir", None)
        loggers = getattr(trainer, "loggers", None) or []
        if loggers:
            root = getattr(loggers[0], "log_dir", None) or getattr(loggers[0], "save_dir", None) or root
        hub = ReportHub(trainer, root)
    return hub
