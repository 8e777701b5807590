r"""
Prediction stability
^^^^^^^^^^^^^^^^^^^^

Predict one fixed batch on a schedule and watch how the answers move: a model that gives
one answer to everything has collapsed, one whose answers keep flipping after its loss has
flattened is unstable, one whose answers stopped changing while its loss is still high has
stagnated.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from flightcheck.callbacks._probe import (
    OutputOrigin,
    PredictionFn,
    ProbeSchedule,
    ProbeSource,
    SummedCounts,
    TargetFn,
    default_inputs,
    DefaultPrediction,
    default_target,
    fingerprint,
    fitting,
    model_unreachable,
    predict_probe,
    probing,
    same_fingerprint,
)
from flightcheck.callbacks.base import FlightcheckCallback, OnFinding
from flightcheck.checks.predictions import (
    CONFIDENT_MARGIN,
    DEFAULT_PATIENCE,
    ProbeReading,
    is_collapsed,
    is_still,
    is_unstable,
    prediction_collapse,
    prediction_instability,
    prediction_stagnation,
)
from flightcheck.signals.predictions import (
    TASKS,
    OutputSpec,
    answer_agreement,
    answer_changes,
    answer_confidence,
    class_histogram,
    confident,
    infer_output_kind,
    minority_share,
    normalized_entropy,
    predicted_answers,
    r_squared,
    skill_score,
    spread,
    target_answers,
    valid_positions,
    variance,
)
from flightcheck.utils.batch import step_loss

#: Keys of ``trainer.callback_metrics`` read for the training loss when ``training_step``
#: returns none (manual optimisation returning ``None``).
LOSS_KEYS: tuple[str, ...] = ("train_loss", "loss", "train/loss", "train_loss_step")

#: The initial loss is the mean of the first few steps' losses: one batch of a small-batch run
#: is too noisy a reference, and a few steps have not yet moved the weights far.
INITIAL_LOSS_STEPS = 5

#: Readings kept for judging (a few windows' worth; the charts keep the full history).
_HISTORY = 32

_JUDGES = (
    ("prediction_collapse", is_collapsed),
    ("prediction_instability", is_unstable),
    ("prediction_stagnation", is_still),
)


class PredictionStability(FlightcheckCallback):
    r"""Watch the answers of a fixed probe batch: churn, diversity, confidence; collapse,
    instability and stagnation.

    On a schedule, and after every validation, the model predicts the probe batch in eval
    mode without gradients. Nothing of training is touched: RNG states, module modes and
    the module's public attributes are restored, no data loader is iterated, and weights
    after training are bit-identical to a run without this callback. The figures are
    reduced over ranks (torchmetrics states) so every rank reaches the same verdict, and
    move to the host once per probe.

    TensorBoard charts:

    - ``flightcheck/predictions/churn``: the share of answers that changed since the last
      probe (regression: the RMS change over the targets' spread). High early, near zero
      once the model has settled.
    - ``flightcheck/predictions/diversity``: the entropy of the answers over ``ln C``
      (1: every class equally often, 0: one class for everything); regression: the spread
      of predictions across inputs over the targets' spread.
    - ``flightcheck/predictions/confidence``: the mean probability the model gives its own
      answers (classification only).

    Args:
        probe_batch: the batch to predict, as your data loader yields it. Default: the first
            validation batch (taken from Lightning's sanity check, without touching the
            loader), else the first training batch.
        every_n_steps: optimizer steps between probes. Default: the trainer's
            ``log_every_n_steps``, so the probe's one host transfer falls on a step where
            Lightning already syncs. The model is also probed before the first step and
            after every validation.
        prediction_fn: ``prediction_fn(pl_module, batch) -> Tensor``, the prediction to watch.
            Default: ``pl_module(x)`` with ``x`` the batch's first element (tuple/list), its
            ``"x"``/``"input"``/``"inputs"``/``"input_ids"``/``"image"``/... entry (dict) or
            the batch itself (tensor), else ``pl_module(batch)``; of a dict output its
            ``"logits"``/``"preds"``/``"y_hat"`` entry, else the first tensor of the output
            (first element of a tuple). When neither call works the callback says so once
            (an ``info`` note) and stays off.
        target_fn: ``target_fn(batch) -> Tensor | None``, the labels the answers are compared
            with. Default: the batch's second element, or its ``"y"``/``"target"``/``"label"``/
            ``"labels"``/``"mask"``/... entry. Without labels, collapse needs every answer to be
            identical.
        task: how to read the prediction: ``"auto"`` (from its shape and the labels; see
            :func:`~flightcheck.signals.predictions.infer_output_kind`), ``"multiclass"``,
            ``"multilabel"``, ``"binary"`` or ``"regression"``.
        warmup_steps: no verdict before this global step (a fresh model often gives one answer
            to everything). Default: two probe intervals.
        patience: consecutive probes a condition must hold on before it is reported, and be
            absent on before it counts as cleared.
        on_finding: called with each new finding (global rank 0).

    Example::

        import lightning as L
        from flightcheck.callbacks.prediction_stability import PredictionStability

        trainer = L.Trainer(callbacks=[PredictionStability(every_n_steps=100)])
        trainer.fit(model, datamodule=dm)

    Under sharded strategies (FSDP, DeepSpeed stage 3) give a ``prediction_fn`` that runs the
    forward pass the strategy expects: the default calls the LightningModule directly.
    """

    name = "prediction_stability"

    def __init__(
        self,
        probe_batch: Any = None,
        every_n_steps: int | None = None,
        prediction_fn: PredictionFn | None = None,
        target_fn: TargetFn | None = None,
        task: str = "auto",
        warmup_steps: int | None = None,
        patience: int = DEFAULT_PATIENCE,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        if prediction_fn is not None and not callable(prediction_fn):
            raise TypeError(f"prediction_fn must be a callable (pl_module, batch) -> Tensor, got {type(prediction_fn).__name__}")
        if target_fn is not None and not callable(target_fn):
            raise TypeError(f"target_fn must be a callable (batch) -> Tensor | None, got {type(target_fn).__name__}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be None (two probe intervals) or an int >= 0, got {warmup_steps!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self._source = ProbeSource(probe_batch)
        self._schedule = ProbeSchedule(every_n_steps)
        self.prediction_fn: PredictionFn = prediction_fn or DefaultPrediction()
        self._off = False
        self.target_fn: TargetFn = target_fn or default_target
        self.task = task
        self.warmup_steps = warmup_steps
        self.patience = patience
        self.readings: list[ProbeReading] = []
        self.initial_loss: float | None = None
        self._resume: dict[str, Any] | None = None  # a checkpoint's probe series, until taken up
        self._fresh_probe()

    def _fresh_probe(self) -> None:
        """Forget everything tied to one probe batch (a new fit or a resumed run takes a new one)."""
        self._spec: OutputSpec | None = None
        self._made_by: str | None = None
        self._labels: Tensor | None = None
        self._valid: Tensor | None = None
        self._first: Tensor | None = None
        self._previous: Tensor | None = None
        self._previous_confidence: Tensor | None = None
        self._label_top_share: tuple[float, ...] | None = None
        self._target_spread: float | None = None
        self._target_variance: float | None = None
        self._peak_spread = 0.0
        self._metrics: dict[str, Any] = {}
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        self._initial_sum: Tensor | None = None
        self._initial_steps = 0
        self._pending: tuple[Tensor, Tensor | None] | None = None
        self._resumed_spec: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def collective_due(self, hook: str, trainer: Any) -> int:
        # every probe agrees once, after its forward pass and before its figures are reduced over ranks
        if self._off:
            return 0
        if hook == "on_train_start":
            return 1
        if hook == "on_train_batch_end":
            return int(self._schedule.peek(trainer))
        if hook == "on_validation_end":
            return int(fitting(trainer) and self._schedule.spaced(trainer))
        return 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._source.reset()
            self._schedule.reset()
            self._fresh_probe()
            self._off = False

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._source.offer_validation(trainer, batch, batch_idx, dataloader_idx)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._resume is not None:
            self._restore_losses(pl_module)
            batch = self._source.get(trainer, pl_module)
            # a probe from a training batch: its first probe decides, on the restored schedule;
            # or the checkpointed run's probe series goes on: no new reference (the ranks still agree)
            if batch is None or self._take_up_resume(trainer, pl_module, batch):
                self._probe(trainer, pl_module, wanted=False)
                return
        # the untrained model's answers, the reference, when the probe is already known (given,
        # or from the sanity check); a probe taken from the first training batch starts at the
        # first scheduled step instead, so no step outside the looks syncs
        self._probe(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._source.offer_training(trainer, batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            # kept on the device: no host sync on ordinary steps
            loss = loss.detach().float().reshape(())
            self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss
            self._loss_steps += 1
            if self.initial_loss is None and self._initial_steps < INITIAL_LOSS_STEPS:
                self._initial_sum = loss.clone() if self._initial_sum is None else self._initial_sum + loss
                self._initial_steps += 1
        if self._schedule.due(trainer):
            self._probe(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if fitting(trainer) and self._schedule.spaced(trainer):
            self._probe(trainer, pl_module)

    # ------------------------------------------------------------------ the probe
    def _probe(self, trainer: Any, pl_module: Any, wanted: bool = True) -> None:
        if self._off:
            return
        batch = None
        if wanted:
            self._schedule.mark(trainer)
            batch = self._source.get(trainer, pl_module)
            if batch is not None and self._resume is not None:
                self._take_up_resume(trainer, pl_module, batch)
        with probing(pl_module):
            reduce, unreachable = None, None
            if batch is not None:
                first = self._spec is None
                try:
                    if first:  # the first probe also reads how the prediction is made
                        with OutputOrigin() as origin:
                            output = predict_probe(trainer, pl_module, batch, self.prediction_fn)
                        self._made_by = origin.of(output)
                    else:
                        output = predict_probe(trainer, pl_module, batch, self.prediction_fn)
                    reduce = self._measure(trainer, output, batch)
                except Exception as err:
                    if not first or not isinstance(self.prediction_fn, DefaultPrediction):
                        raise  # an internal error, loudly (the other ranks hear it at their agreement)
                    unreachable = err
            # Every rank agrees here, after the failure-prone part and before the collectives
            # that reduce the figures: the ranks probe together, stay off together, or step aside together.
            agreed = self.agree(trainer, reduce is None and unreachable is None, unreachable is not None)
            if agreed[1]:
                self._off, self._spec = True, None
                model_unreachable(self, trainer, unreachable or RuntimeError(f"the probe failed on {agreed.who(1)}"))
                return
            if agreed[0] or reduce is None:  # some rank had no probe batch: none probes this time
                for metric in self._metrics.values():
                    metric.reset()
                return
            figures = reduce()
        values = _to_host(figures)
        reading = self._reading(trainer, values)
        if reading is None:
            return
        self.readings = (self.readings + [reading])[-_HISTORY:]
        self._log(trainer, reading)
        self._judge(trainer)

    def _measure(self, trainer: Any, output: Tensor, batch: Any) -> Callable[[], dict[str, Tensor]]:
        """Every figure of this probe, measured on this rank now (no collective); the function
        returned reduces them over ranks (the probe's collectives) into device tensors."""
        if self._spec is None:
            target = self.target_fn(batch)
            inputs = _inputs_or_none(batch)
            self._spec = infer_output_kind(output, target, self.task, inputs, made_by=self._made_by)
            if self._previous is not None and self._resumed_spec != dataclasses.asdict(self._spec):
                self._previous = self._previous_confidence = self._first = None  # read differently now
            answers = predicted_answers(output, self._spec)
            self._labels = None if target is None else target_answers(target, self._spec, answers)
            self._valid = valid_positions(self._labels, self._spec, answers)
        spec = self._spec
        answers = predicted_answers(output, spec)
        if self._previous is not None and self._previous.shape != answers.shape:
            raise ValueError(
                f"the probe's prediction changed shape from {tuple(self._previous.shape)} to {tuple(answers.shape)}"
            )
        regression = spec.task == "regression"
        weight = None if regression else self._valid
        means: list[tuple[str, Any]] = []
        counts: list[tuple[str, Any, Tensor]] = []

        def mean(name: str, value: Tensor | None, w: Tensor | None = None) -> None:
            metric = self._metric(name, MeanMetric, output.device)
            if value is None:  # an empty update keeps every rank's collectives in step
                metric.update(torch.zeros(0, device=output.device))
            else:
                metric.update(value, w)
            means.append((name, metric))

        finite = torch.isfinite(output).all() if output.is_floating_point() else torch.ones((), dtype=torch.bool)
        mean("finite", finite.float().to(output.device))  # 1.0 only when every rank's output is finite

        changes = None if self._previous is None else answer_changes(self._previous, answers, spec)
        mean("churn", changes, weight)
        mean("drift", None if self._first is None else answer_changes(self._first, answers, spec), weight)
        labelled = self._labels is not None
        mean("agreement", answer_agreement(answers, self._labels, spec) if labelled else None, weight if labelled else None)
        if regression:
            mean("spread", spread(answers))
            if self._target_spread is None:
                mean("target_spread", spread(self._labels) if labelled else None)
                mean("target_variance", variance(self._labels) if labelled else None)
        else:
            conf = answer_confidence(output, spec)
            if not conf.numel():
                conf = None  # class ids: no probabilities
            mean("confidence", conf, weight if conf is not None else None)
            sure = None
            if changes is not None and conf is not None and self._previous_confidence is not None:
                # a flip between two answers the model was sure of: not a borderline case
                sure = changes * (confident(self._previous_confidence, spec, CONFIDENT_MARGIN) & confident(conf, spec, CONFIDENT_MARGIN))
            mean("confident_churn", sure, weight if sure is not None else None)
            counts.append(("histogram", *self._counts("histogram", class_histogram(answers, spec, self._valid))))
            if self._label_top_share is None and self._labels is not None:
                counts.append(("label_histogram", *self._counts("label_histogram", class_histogram(self._labels, spec))))
        interval = None if self._loss_sum is None else self._loss_sum / max(self._loss_steps, 1)
        if interval is None:
            interval = _logged_loss(trainer, output.device)
        mean("loss", interval, None if interval is None else torch.tensor(float(max(self._loss_steps, 1)), device=output.device))
        if self._initial_sum is not None and self.initial_loss is None:
            mean("initial_loss", self._initial_sum / self._initial_steps)
        self._loss_sum, self._loss_steps = None, 0
        self._pending = (answers, None if regression else conf)

        def reduce() -> dict[str, Tensor]:
            figures: dict[str, Tensor] = {}
            for name, metric in means:
                figures[name] = metric.compute()
                metric.reset()
            for name, metric, shape in counts:
                summed = metric.compute().reshape(shape)
                metric.reset()
                if name == "histogram":
                    figures["answers"] = summed[0].sum()
                    figures["diversity"] = normalized_entropy(summed).mean()
                    figures["top_share"] = 1 - minority_share(summed)
                    figures["top_answer"] = summed[0].argmax().float()
                else:
                    figures["label_top_share"] = 1 - minority_share(summed)
            return figures

        return reduce

    def _metric(self, name: str, cls: type, device: torch.device) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            # "disable": torchmetrics' NaN check would sync; non-finite outputs are caught apart
            metric = self._metrics[name] = cls(nan_strategy="disable").to(device)
        return metric

    def _counts(self, name: str, histogram: Tensor) -> tuple[Any, torch.Size]:
        """The summing metric of ``name``, updated with this rank's ``histogram`` (its
        ``compute`` sums over ranks), and the histogram's shape."""
        metric = self._metrics.get(name)
        if metric is None or metric.counts.numel() != histogram.numel():
            metric = self._metrics[name] = SummedCounts(histogram.numel()).to(histogram.device)
        metric.update(histogram)
        return metric, histogram.shape

    def _reading(self, trainer: Any, values: dict[str, Any]) -> ProbeReading | None:
        spec = self._spec
        assert spec is not None
        answers, conf = self._pending  # type: ignore[misc]
        self._pending = None
        if values["finite"] != 1.0:
            return None  # NaN/Inf outputs are NonFiniteGuard's; keep the last good answers
        self._previous, self._previous_confidence = answers, conf
        if self._first is None:
            self._first = answers
        loss = _num(values["loss"])
        if "initial_loss" in values:
            self.initial_loss = _num(values["initial_loss"])
        elif self.initial_loss is None and self._initial_sum is None and loss is not None:
            self.initial_loss = loss  # only a logged loss: the first one seen
        common = dict(
            step=int(trainer.global_step),
            task=spec.task,
            churn=_num(values["churn"]),
            drift=_num(values["drift"]),
            loss=loss,
        )
        if spec.task == "regression":
            if "target_spread" in values:
                self._target_spread = _num(values["target_spread"]) or None
                self._target_variance = _num(values["target_variance"])
            mse = _num(values["agreement"])
            skill = None if mse is None or not self._target_variance else r_squared(mse, self._target_variance)
            pred_spread = _num(values["spread"]) or 0.0
            self._peak_spread = max(self._peak_spread, pred_spread)
            reference = self._target_spread or self._peak_spread or None
            scale = reference or 1.0
            return ProbeReading(
                **{**common, "churn": _sqrt_over(common["churn"], scale), "drift": _sqrt_over(common["drift"], scale)},
                answers=int(answers.shape[0]),
                diversity=None if reference is None else pred_spread / reference,
                skill=skill,
                spread=pred_spread,
                reference_spread=reference,
                reference="targets" if self._target_spread else "peak",
            )
        if "label_top_share" in values:
            self._label_top_share = tuple(values["label_top_share"])
        accuracy = _num(values["agreement"])
        skill = None
        if accuracy is not None and self._label_top_share:
            skill = skill_score(accuracy, sum(self._label_top_share) / len(self._label_top_share))
        return ProbeReading(
            **common,
            skill=skill,
            answers=int(values["answers"]),
            diversity=_num(values["diversity"]),
            confidence=_num(values.get("confidence")),
            confident_churn=_num(values.get("confident_churn")),
            top_share=tuple(values["top_share"]),
            label_top_share=self._label_top_share,
            top_answer=int(values["top_answer"]) if spec.task == "multiclass" else None,
        )

    def _log(self, trainer: Any, r: ProbeReading) -> None:
        scalars = {
            "flightcheck/predictions/churn": r.churn,
            "flightcheck/predictions/diversity": r.diversity,
            "flightcheck/predictions/confidence": r.confidence,
        }
        self.hub(trainer).log_scalars({k: v for k, v in scalars.items() if v is not None}, step=r.step)

    def _judge(self, trainer: Any) -> None:
        warmup = self.warmup_steps if self.warmup_steps is not None else 2 * self._schedule.interval(trainer)
        verdicts = {
            "prediction_collapse": prediction_collapse(self.readings, warmup_steps=warmup, patience=self.patience),
            "prediction_instability": prediction_instability(self.readings, warmup_steps=warmup, patience=self.patience),
            "prediction_stagnation": prediction_stagnation(
                self.readings, initial_loss=self.initial_loss, warmup_steps=warmup, patience=self.patience
            ),
        }
        recent = [r for r in self.readings if r.churn is not None][-self.patience :]
        for check, holds in _JUDGES:
            verdict = verdicts[check]
            if verdict is not None:
                self.report_verdict(trainer, verdict)
            elif len(recent) == self.patience and not any(holds(r) for r in recent):
                self.resolve(check, "probe")

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        # read at checkpoint time only: the series of answers, so a resumed run goes on with it
        batch = self._source.get_known()
        probe = None
        if batch is not None and self._spec is not None and self._previous is not None:
            probe = {
                "fingerprint": fingerprint(batch),
                "spec": dataclasses.asdict(self._spec),
                "previous": self._previous.detach().cpu(),
                "previous_confidence": None if self._previous_confidence is None
                else self._previous_confidence.detach().cpu(),
                "first": None if self._first is None else self._first.detach().cpu(),
                "peak_spread": self._peak_spread,
                "batch": self._source.portable(),
            }
        elif self._resume is not None:
            probe = self._resume.get("probe")  # restored, not taken up yet: keep it as it came
        return {
            "initial_loss": self.initial_loss,
            "readings": [vars(r).copy() for r in self.readings],
            "schedule": self._schedule.state_dict(),
            "loss_sum": None if self._loss_sum is None else float(self._loss_sum),
            "loss_steps": self._loss_steps,
            "initial_sum": None if self._initial_sum is None else float(self._initial_sum),
            "initial_steps": self._initial_steps,
            "probe": probe,
        }

    def _restore_losses(self, pl_module: Any) -> None:
        state = self._resume or {}
        device = getattr(pl_module, "device", None)
        if state.get("loss_sum") is not None:
            self._loss_sum = torch.tensor(float(state["loss_sum"]), device=device)
            self._loss_steps = int(state.get("loss_steps", 0))
        if state.get("initial_sum") is not None and self.initial_loss is None:
            self._initial_sum = torch.tensor(float(state["initial_sum"]), device=device)
            self._initial_steps = int(state.get("initial_steps", 0))

    def _take_up_resume(self, trainer: Any, pl_module: Any, batch: Any) -> bool:
        """Go on with the checkpoint's answers when the probe is the same batch; every rank
        decides alike (a rank that probes while another does not would hang a collective)."""
        state, self._resume = self._resume or {}, None
        probe = state.get("probe")
        same = probe is not None and same_fingerprint(probe.get("fingerprint"), fingerprint(batch))
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            same = bool(trainer.strategy.reduce_boolean_decision(same, all=True))
        if not same:
            return False
        device = getattr(pl_module, "device", None)

        def back(t: Any) -> Tensor | None:
            return t.to(device) if isinstance(t, Tensor) else None

        self._previous, self._first = back(probe.get("previous")), back(probe.get("first"))
        self._previous_confidence = back(probe.get("previous_confidence"))
        self._peak_spread = float(probe.get("peak_spread", 0.0))
        self._resumed_spec = dict(probe.get("spec") or {})
        return True

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.initial_loss = state.get("initial_loss")
        if state.get("schedule"):
            self._schedule.load_state_dict(state["schedule"])
        probe = state.get("probe") or {}
        if probe.get("batch") is not None:
            self._source.restore(probe["batch"])
        self._resume = dict(state)
        readings = []
        for d in state.get("readings", []):
            d = dict(d)
            for key in ("top_share", "label_top_share"):
                if d.get(key) is not None:
                    d[key] = tuple(d[key])
            readings.append(ProbeReading(**d))
        self.readings = readings


# ---------------------------------------------------------------------- helpers
def _loss_of(outputs: Any) -> Tensor | None:
    loss = step_loss(outputs)
    return loss if loss is not None and loss.numel() == 1 else None


def _logged_loss(trainer: Any, device: torch.device) -> Tensor | None:
    metrics = getattr(trainer, "callback_metrics", {}) or {}
    for key in LOSS_KEYS:
        value = metrics.get(key)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value.detach().float().reshape(()).to(device)
    return None


def _inputs_or_none(batch: Any) -> Tensor | None:
    try:
        x = default_inputs(batch)
    except TypeError:
        return None
    return x if isinstance(x, Tensor) else None


def _to_host(figures: dict[str, Tensor]) -> dict[str, Any]:
    """One host transfer for every figure of a probe: scalars become floats, vectors lists."""
    names = list(figures)
    flat = torch.cat([figures[n].detach().float().reshape(-1) for n in names]).tolist()
    out: dict[str, Any] = {}
    i = 0
    for n in names:
        size = figures[n].numel()
        out[n] = flat[i] if figures[n].dim() == 0 else flat[i : i + size]
        i += size
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def _sqrt_over(mean_square: float | None, scale: float) -> float | None:
    return None if mean_square is None else (max(mean_square, 0.0) ** 0.5) / scale


__all__ = ["PredictionStability"]
