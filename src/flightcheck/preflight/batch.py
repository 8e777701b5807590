"""Checks on how the model reads its batch: ``batch_independence`` and ``input_dependence``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from flightcheck.checks import Verdict
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.registry import Skip, register
from flightcheck.preflight.roles import leaves, map_tensors, path_str
from flightcheck.preflight.sandbox import Abort, primary_tensor
from flightcheck.preflight.task import is_integer
from flightcheck.utils import modes_preserved

# --------------------------------------------------------------------------- batch_independence
#: Gradient reaching other samples above this fraction of the largest is a real dependence; an
#: independent computation gives exact zeros there.
LEAK_RTOL = 1e-5


def sample_dependence(grads: list[Tensor | None], batch_size: int) -> Tensor:
    """Total absolute gradient per sample of the batch, summed over the input tensors."""
    total = torch.zeros(batch_size, dtype=torch.float64)
    for g in grads:
        if g is not None and g.dim() > 0 and g.shape[0] == batch_size:
            total += g.detach().abs().reshape(batch_size, -1).sum(dim=1).double().cpu()
    return total


def judge_batch_independence(dependence: Tensor, sample: int, where: str) -> Verdict | None:
    """Whether the output of ``sample`` depends on other samples' inputs (``dependence[j]`` is the
    gradient mass reaching sample ``j``)."""
    top = float(dependence.max())
    if top == 0.0:
        raise Skip(_NO_PATH)
    others = dependence.clone()
    others[sample] = 0.0
    leaking = torch.nonzero(others > LEAK_RTOL * top).flatten().tolist()
    if not leaking:
        return None
    before = sum(1 for j in leaking if j < sample)
    return Verdict(
        "batch_independence",
        "error",
        f"with the model in eval mode, the output for sample {sample} depends on the inputs of {len(leaking)} other "
        f"sample{'s' if len(leaking) != 1 else ''} of the batch (e.g. {', '.join(map(str, leaking[:5]))}); "
        f"measured at {where}.",
        causes=(
            "a view/reshape that mixes the batch axis with another one (view where permute/transpose was meant)",
            "a recurrent or attention layer reading (batch, time) as (time, batch): check batch_first",
            "a softmax, normalisation or reduction over dim 0",
            *(
                ("samples see only earlier samples: the batch axis is used as a time axis",)
                if before == len(leaking)
                else ()
            ),
        ),
        advice=(
            "compute the gradient of one sample's output with respect to the inputs and find the first layer "
            "where other samples get gradient",
            "use permute/transpose to reorder axes; view only to split/merge them",
        ),
        data={
            "sample": sample,
            "other_samples": leaking[:50],
            "count": len(leaking),
            "earlier": before,
            "later": len(leaking) - before,
        },
    )


class _InputProbe:
    """Makes the model's inputs gradient-carrying leaves and captures its output.

    ``forward`` mode hooks the LightningModule's own forward: its tensor arguments become
    leaves, the output is captured and the step stops there (so mixing done on purpose in the
    training step, like mixup, is not blamed on the model). ``children`` mode, for a step that
    never calls ``self(...)``, makes the batch's float tensors leaves and takes the output of
    the last top-level submodule. Either way, token ids are followed into the model through the
    outputs of ``nn.Embedding`` layers.
    """

    def __init__(self, module: nn.Module, batch_size: int, mode: str) -> None:
        self.module, self.batch_size, self.mode = module, batch_size, mode
        self.leaves: list[Tensor] = []
        self.output: Tensor | None = None
        self.called = False
        #: the batch's 1-D integer tensors: a 1-D ids tensor is per-sample only if it is one of them
        #: (``arange(T)`` position ids are not, even when T equals the batch size)
        self.batch_ids: list[Tensor] = []
        self._inside = mode == "children"
        self._handles: list[Any] = []

    def leaf(self, t: Tensor) -> Tensor:
        if torch.is_floating_point(t) and t.dim() > 0 and t.shape[0] == self.batch_size:
            t = t.detach().clone().requires_grad_(True)
            self.leaves.append(t)
        return t

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if self.mode == "forward":
            self._handles.append(self.module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(self.module.register_forward_hook(self._post))
        else:
            for _, child in self.module.named_children():
                self._handles.append(child.register_forward_hook(self._child))
        for m in self.module.modules():
            if isinstance(m, nn.Embedding):
                self._handles.append(m.register_forward_hook(self._embedding))
        try:
            yield
        finally:
            for h in self._handles:
                h.remove()

    def _pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.called:
            return None
        self.called = self._inside = True
        return map_tensors(args, lambda _p, t: self.leaf(t)), map_tensors(kwargs, lambda _p, t: self.leaf(t))

    def _post(self, _m: nn.Module, _args: Any, output: Any) -> None:
        if self._inside:
            self._inside = False
            self.output = primary_tensor(output, self.batch_size)
            raise Abort("captured")

    def _child(self, _m: nn.Module, _args: Any, output: Any) -> None:
        t = primary_tensor(output, self.batch_size)
        if t is not None:
            self.output = t

    def _embedding(self, _m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        ids = args[0] if args else None
        if not self._inside or not isinstance(ids, Tensor) or ids.dim() == 0 or ids.shape[0] != self.batch_size:
            return None
        if ids.dim() == 1 and not any(t.shape == ids.shape and torch.equal(t, ids) for t in self.batch_ids):
            return None
        out = output.detach().requires_grad_(True)
        self.leaves.append(out)
        return out


def _cudnn_off() -> contextlib.AbstractContextManager[Any]:
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
    )


_NO_PATH = (
    "the output does not depend on the inputs through a differentiable path "
    "(integer inputs without nn.Embedding, or a forward under torch.no_grad)"
)


@dataclasses.dataclass
class ProbedInputs:
    """The model's inputs as gradient-carrying leaves, and its output built from them."""

    leaves: list[Tensor]
    output: Tensor
    where: str  # "the LightningModule's forward" or "the training step's last submodule"


@contextlib.contextmanager
def probed_inputs(ctx: PreflightContext, eval_mode: bool = True) -> Iterator[ProbedInputs]:
    """Run ``training_step`` once with the model's inputs made leaves that require grad.

    Inside the block the output's graph is alive, so a check can take gradients of any part of
    the output with respect to any part of the inputs (``torch.autograd.grad(..., allow_unused=True)``).
    Float inputs with the batch as first dimension are leaves; token ids are followed through
    the outputs of ``nn.Embedding`` layers. With ``eval_mode`` the model is in eval mode (batch
    norm on running statistics) and cuDNN is off (its recurrent layers refuse backward in eval).
    Raises :class:`Skip` when the output does not depend on the inputs in a differentiable way.
    """
    batch_size = ctx.batch_size
    if batch_size is None:
        raise Skip("the batch's tensors do not share a leading batch dimension")
    module = ctx.module
    with modes_preserved(module), torch.enable_grad(), _cudnn_off() if eval_mode else contextlib.nullcontext():
        if eval_mode:
            module.eval()
        ids = [t for _, t in leaves(ctx.batch) if t.dim() == 1 and is_integer(t)]
        probe = _InputProbe(module, batch_size, "forward")
        probe.batch_ids = ids
        record = ctx.runner.evaluate(ctx.batch, within=probe.installed())
        where = "the LightningModule's forward"
        if not probe.called:
            probe = _InputProbe(module, batch_size, "children")
            probe.batch_ids = ids
            batch = map_tensors(ctx.batch, lambda _p, t: probe.leaf(t))
            record = ctx.runner.evaluate(batch, within=probe.installed())
            where = "the training step's last submodule"
        if record.error is not None:
            raise Skip(f"training_step failed{' in eval mode' if eval_mode else ''}: {record.error}")
        if probe.output is None:
            raise Skip("the model's output has no floating tensor with the batch as its first dimension")
        if not probe.leaves or not probe.output.requires_grad:
            raise Skip(_NO_PATH)
        yield ProbedInputs(probe.leaves, probe.output, where)


def measure_batch_independence(ctx: PreflightContext) -> tuple[Tensor, int, str]:
    """``(dependence, sample, where)``: the gradient mass each sample's inputs get from the output
    of ``sample``, for the first sample (middle, first, last) whose output depends on any input."""
    batch_size = ctx.batch_size
    if batch_size is not None and batch_size < 2:
        raise Skip("the batch has a single sample")
    with probed_inputs(ctx) as probed:
        for sample in dict.fromkeys((batch_size // 2, 0, batch_size - 1)):
            grads = torch.autograd.grad(
                probed.output[sample].float().sum(), probed.leaves, allow_unused=True, retain_graph=True
            )
            dependence = sample_dependence(list(grads), batch_size)
            if float(dependence.max()) > 0:
                return dependence, sample, probed.where
    raise Skip(_NO_PATH)


@register(
    "batch_independence",
    phase="initial",
    summary="each sample's output depends on that sample's input only (model in eval mode)",
)
def batch_independence(ctx: PreflightContext) -> Iterator[Verdict]:
    try:
        dependence, sample, where = measure_batch_independence(ctx)
    except Skip as skip:
        if str(skip) != _NO_PATH:
            raise
        ctx.overfit  # noqa: B018 - e.g. a zero-initialised last layer: no dependence until it has trained
        dependence, sample, where = measure_batch_independence(ctx)
        where += " after the overfit"
    verdict = judge_batch_independence(dependence, sample, where)
    if verdict is not None:
        yield verdict


# --------------------------------------------------------------------------- input_dependence
#: Zeroing the inputs must change the fitted model's loss by more than this fraction: a model that
#: reads its inputs gives very different answers without them (it predicts what it memorised from
#: them); one that ignores them gives the same loss. A fitted model that is *worse* with its real
#: inputs than without has not learned yet (other checks say why), it is not ignoring them.
INPUT_DEPENDENCE_RTOL = 0.01
#: The overfit must have lowered the loss by this share of its start for the comparison to mean
#: anything (a model still at chance level gives about the same loss either way).
MIN_GAIN_SHARE = 0.05
#: Outputs equal within this relative tolerance with real and zeroed inputs: the inputs are ignored.
SAME_OUTPUT_RTOL = 1e-6
_NOT_ZEROED = ("mask", "length", "lens", "index", "position")


def zeroable(path: str, t: Tensor) -> bool:
    """Float features, and token ids; not masks, lengths or positions (zeroing those breaks the step)."""
    if any(word in path.lower() for word in _NOT_ZEROED):
        return False
    return torch.is_floating_point(t) or (is_integer(t) and t.dim() >= 2)


def judge_input_dependence(initial: float, fitted: float, zeroed: float, same_output: bool) -> Verdict | None:
    """The fitted model's loss with its real inputs against its loss with them zeroed."""
    data = {"initial_loss": initial, "fitted_loss": fitted, "zeroed_inputs_loss": zeroed, "same_output": same_output}
    causes = (
        "forward reads something other than its input (a stored tensor, a constant, the wrong argument)",
        "the input is overwritten or multiplied by zero before the first layer",
        "inputs that are the same for every sample (a data pipeline returning constants)",
        "weights driven to zero by heavy regularisation",
    )
    advice = ("print what forward actually feeds its first layer", "look at a few raw batches")
    if same_output:
        return Verdict(
            "input_dependence",
            "error",
            "the model gives exactly the same output with its inputs zeroed: it ignores its input.",
            causes=causes,
            advice=advice,
            data=data,
        )
    if not (math.isfinite(initial) and math.isfinite(fitted) and math.isfinite(zeroed)):
        return None
    if initial - fitted <= MIN_GAIN_SHARE * max(abs(initial), 1e-12):
        raise Skip(f"the overfit did not lower the loss enough ({initial:.4g} -> {fitted:.4g}) to compare")
    if abs(zeroed - fitted) <= INPUT_DEPENDENCE_RTOL * max(abs(zeroed), abs(fitted), 1e-12):
        return Verdict(
            "input_dependence",
            "error",
            f"after overfitting, the loss is {fitted:.4g} with the real inputs and {zeroed:.4g} with them "
            f"zeroed (it started at {initial:.4g}): the model hardly uses its input.",
            causes=causes,
            advice=advice,
            data=data,
        )
    return None


@register(
    "input_dependence",
    phase="fitted",
    summary="after overfitting, the loss is clearly better with the real inputs than with zeroed ones",
)
def input_dependence(ctx: PreflightContext) -> Iterator[Verdict]:
    if ctx.target_path is None:
        raise Skip("no separate target in the batch (one tensor is both input and target; name it with target=)")
    inputs = [(p, t) for p, t in ctx.inputs if zeroable(path_str(p), t)]
    if not inputs:
        raise Skip("no input tensor besides the target")
    run = ctx.overfit
    fitted = ctx.fitted
    initial = run.initial_loss
    if initial is None or fitted.loss is None:
        raise Skip("training_step reported no loss")
    zeroed = ctx.evaluate(ctx.replaced({p: torch.zeros_like(t) for p, t in inputs}))
    same = (
        fitted.output is not None
        and zeroed.output is not None
        and fitted.output.shape == zeroed.output.shape
        and bool(torch.allclose(fitted.output.float(), zeroed.output.float(), rtol=SAME_OUTPUT_RTOL, atol=0.0))
    )
    verdict = judge_input_dependence(
        initial, fitted.loss, zeroed.loss if zeroed.loss is not None else float("nan"), same
    )
    if verdict is not None:
        yield verdict


__all__ = [
    "ProbedInputs",
    "judge_batch_independence",
    "judge_input_dependence",
    "measure_batch_independence",
    "probed_inputs",
    "sample_dependence",
    "zeroable",
]
