"""Leakage checks on the model: ``target_leakage`` and ``causal_leakage``.

Both catch models that look like they learn beautifully because they read their answers.

``target_leakage``: after the shared overfit, the one batch is evaluated again through the
user's own ``training_step`` with the targets shuffled and the inputs unchanged. A model that
does not see its targets keeps predicting the answers it memorised, so its loss against the
shuffled targets is far worse; a model that copies them does about as well. Two exact
preliminaries keep it quiet where it must be: if the model's outputs do not change at all when
only the targets change, the forward pass does not read them (pass, whatever the loss does);
and integer targets are shuffled over every position, so a sequence model fed its target
prefix (teacher forcing, which is legitimate) sees gibberish it cannot predict. A feature
column that *is* the label is caught from the batch alone.

``causal_leakage``: when the batch is a next-token problem (targets are the inputs shifted by
one position, or equal to them for models that shift inside), the output at position t must
not depend on inputs after t. Measured like ``batch_independence``, along the time axis: the
gradient of one position's output with respect to the inputs (the embedding outputs, for
token ids) at later positions must be exactly zero, with the model in eval mode. The first
module whose output already depends on the future is found by the same gradient test on each
module's output, in the order they ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flightcheck.checks import Verdict
from flightcheck.preflight.batch import MIN_GAIN_SHARE, _cudnn_off
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.registry import Skip, register
from flightcheck.preflight.roles import Path, map_tensors, path_str
from flightcheck.preflight.sandbox import _is_bookkeeping, _seed_all, primary_tensor
from flightcheck.preflight.task import IGNORE_INDEX, align_classes, is_integer
from flightcheck.utils import modes_preserved, preserved_rng

# =========================================================================== target_leakage
#: With shuffled targets, a model that does not read them loses at least about the fraction of
#: targets that changed times what it gained by fitting (a confident wrong answer costs more than
#: chance); a copying model loses close to nothing. Below this share of that, it copies.
TARGET_LEAK_SHARE = 0.25
#: For classification: a model that does not use the targets fed to it keeps its predictions when
#: they are shuffled (it matches them only by chance); one whose predictions switch to the shuffled
#: targets on at least this share of the changed entries is copying them, whatever the loss says.
FOLLOW_SHARE = 0.25
#: ... and at least this far above how often the memorised predictions agree with them by chance.
FOLLOW_MARGIN = 0.2
#: For one label per sample: feeding a shuffled label must not raise that label's log-probability
#: by this many nats on average. The measurement has no noise (same inputs, same random draws, only
#: the labels differ): a model that does not read labels changes nothing (exactly 0), a head that
#: reads them to push the true class down (ArcFace/CosFace margins) goes negative; a classifier
#: that leans towards the label it is handed reads its answer, however little it has learned to
#: rely on it within the overfit budget. 0.2 nats (x1.22) leaves room for float rounding only.
FED_LABEL_RISE = 0.2
#: Shuffling must change at least this fraction of the target entries to say anything.
MIN_CHANGED = 0.2
#: Outputs within this relative tolerance with real and shuffled targets are "unchanged".
SAME_OUTPUT_RTOL = 1e-4
#: A batch needs this many samples before one feature matching the label means a leak (a binary
#: feature matches a binary label by chance with probability about 2**-n).
MIN_SAMPLES_BINARY = 16
MIN_SAMPLES = 8
#: |correlation| of a feature with the target above this: the feature is an affine copy of it.
COPY_CORRELATION = 1.0 - 1e-6
_SHUFFLE_SEED = 20240229
_NOT_FEATURES = ("weight", "mask", "length", "lens", "index", "idx")

_TARGET_CAUSES = (
    "the targets are passed into the model: a decoder fed the target sequence without shifting it "
    "right (or under a mask that lets position t see target t), or a loss helper calling model(x, y)",
    "a feature column that is the label (or computed from it) left in the inputs",
    "a dataset whose inputs were built after the labels were appended to them",
)
_TARGET_ADVICE = (
    "print what forward receives and check no argument is derived from the targets",
    "for teacher forcing, feed targets shifted right by one (a start token first) under a causal mask",
    "drop label-derived columns from the features before training",
)


def shuffled_targets(target: Tensor, generator: torch.Generator) -> tuple[Tensor, float]:
    """The target shuffled, and the fraction of its entries (samples, for float targets) that changed.

    Integer targets (class ids, token ids, masks) are shuffled over every position, ignored
    entries (-100) left in place: a token sequence becomes gibberish, so a decoder fed its target
    prefix cannot predict it. Float targets are permuted across the batch, rows kept whole.
    """
    device = target.device
    if is_integer(target):
        flat = target.reshape(-1)
        kept = torch.nonzero(flat != IGNORE_INDEX).flatten().cpu()
        if kept.numel() < 2:
            raise Skip("the target has fewer than two entries that are not ignored (-100)")
        perm = kept[torch.randperm(kept.numel(), generator=generator)]
        out = flat.clone()
        out[kept.to(device)] = flat[perm.to(device)]
        changed = float((out[kept.to(device)] != flat[kept.to(device)]).float().mean())
        return out.reshape(target.shape), changed
    n = target.shape[0]
    perm = torch.randperm(n, generator=generator)
    if n >= 2 and bool((perm == torch.arange(n)).all()):
        perm = perm.roll(1)
    out = target[perm.to(device)]
    changed = float((out != target).reshape(n, -1).any(dim=1).float().mean())
    return out, changed


def copied_features(inputs: list[tuple[Path, Tensor]], target: Tensor) -> list[dict[str, Any]]:
    """Input features that are the target itself: a column that is an exact affine function of a
    one-value-per-sample target, or a block of columns that is its one-hot encoding."""
    n = target.shape[0] if target.dim() else 0
    if target.dim() not in (1, 2) or (target.dim() == 2 and target.shape[1] != 1) or n < MIN_SAMPLES:
        return []
    y = target.reshape(n).double()
    values, counts = torch.unique(y, return_counts=True)
    if values.numel() < 2:
        return []
    if values.numel() == 2 and (n < MIN_SAMPLES_BINARY or int(counts.min()) < 4):
        return []
    found = []
    yc = y - y.mean()
    for path, t in inputs:
        # a feature table or a token sequence: (batch, columns); a lone per-sample value next to the
        # target (sample weights, lengths, indices) is read by the loss, not the model
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 2 or any(w in path_str(path).lower() for w in _NOT_FEATURES):
            continue
        x = t.reshape(n, -1)[:, :4096].double()
        xc = x - x.mean(dim=0)
        ss = (xc * xc).sum(dim=0)
        corr = (xc * yc[:, None]).sum(dim=0) / torch.sqrt(ss * (yc * yc).sum()).clamp_min(1e-300)
        corr = torch.where(ss > 0, corr, torch.zeros_like(corr))
        for col in torch.nonzero(corr.abs() >= COPY_CORRELATION).flatten().tolist()[:5]:
            found.append({"input": path_str(path), "column": col, "kind": "copy", "correlation": float(corr[col])})
        if values.numel() >= 3 and is_integer(target) and x.shape[1] >= values.numel():
            indicators = []
            for v, c in zip(values.tolist(), counts.tolist()):
                match = torch.nonzero(((x != 0) == (y == v)[:, None]).all(dim=0)).flatten()
                if c < 2 or match.numel() == 0:
                    break
                indicators.append(int(match[0]))
            else:
                found.append({"input": path_str(path), "columns": indicators, "kind": "one_hot"})
    return found


def judge_copied_features(target_name: str, copies: list[dict[str, Any]]) -> Verdict | None:
    if not copies:
        return None
    first = copies[0]
    if first["kind"] == "copy":
        what = (
            f"column {first['column']} of {first['input']} is an exact copy of {target_name} "
            f"(correlation {first['correlation']:+.6f} over the batch)"
        )
    else:
        what = f"columns {first['columns']} of {first['input']} are the one-hot encoding of {target_name}"
    return Verdict(
        "target_leakage",
        "error",
        f"{what}: the model can read its answer from its input, and will look perfect "
        "in training and validation while learning nothing usable.",
        causes=_TARGET_CAUSES[1:],
        advice=_TARGET_ADVICE[2:] + ("check how the feature table was built (joins, label encoders)",),
        target=first["input"],
        data={"copies": copies[:10], "target": target_name},
    )


def judge_target_leakage(
    target_name: str,
    initial: float,
    fitted: float,
    shuffled: float,
    changed: float,
    output_changed: bool,
    follows: float | None = None,
    chance: float | None = None,
    rise: float | None = None,
) -> Verdict | None:
    """The fitted model's loss with shuffled targets against its loss with the real ones.

    Args:
        target_name: which part of the batch was treated as the target (``batch[1]``).
        initial: the loss at initialisation; ``fitted``: after the overfit, real targets;
            ``shuffled``: after the overfit, shuffled targets (inputs unchanged).
        changed: the fraction of target entries the shuffle changed.
        output_changed: whether the model's outputs changed when only the targets did.
        follows: for classification, the share of changed entries where the prediction with
            shuffled targets is the shuffled target (a copier follows them);
        chance: ... the same share for the prediction with the real targets (agreement by chance).
        rise: for one class label per sample, the mean rise of the fed (shuffled) label's
            log-probability: zero for a model that does not read labels, negative for one that
            reads them to push them down (an ArcFace-style margin), positive for a copier.
    """
    data = {
        "target": target_name,
        "initial_loss": initial,
        "fitted_loss": fitted,
        "shuffled_targets_loss": shuffled,
        "changed_fraction": changed,
        "output_changed": output_changed,
        "follows_shuffled": follows,
        "chance_agreement": chance,
        "fed_label_logprob_rise": rise,
    }
    if not output_changed:
        if math.isfinite(shuffled) and abs(shuffled - fitted) <= 1e-6 * max(abs(fitted), 1e-12):
            raise Skip(f"the loss does not change when {target_name} is shuffled: it does not use it as the target")
        return Verdict(  # the forward pass does not read the targets: nothing to copy from
            "target_leakage",
            "info",
            f"the model's outputs are unchanged when {target_name} is shuffled: the forward pass does not read it.",
            target=target_name,
            data=data,
        )
    if not all(math.isfinite(v) for v in (initial, fitted, shuffled)):
        raise Skip("a loss was not finite")
    gain = initial - fitted
    if gain <= MIN_GAIN_SHARE * max(abs(initial), 1e-12):
        raise Skip(f"the overfit did not lower the loss enough ({initial:.4g} -> {fitted:.4g}) to compare")
    if changed < MIN_CHANGED:
        raise Skip(f"shuffling changed only {changed:.0%} of {target_name} (most entries are the same value)")
    share = (shuffled - fitted) / (changed * gain)
    data["loss_rise_share"] = share
    following = follows is not None and chance is not None and follows >= FOLLOW_SHARE and follows - chance >= FOLLOW_MARGIN
    pulled = rise is not None and rise >= FED_LABEL_RISE
    if share < TARGET_LEAK_SHARE or following or pulled:
        if following:
            how = f"its predictions follow the shuffled {target_name} on {follows:.0%} of the changed entries"
        elif pulled:
            how = (
                f"feeding it a shuffled label raises that label's probability {math.exp(rise):.2f}-fold on average: "
                "its answers lean towards whatever label it is given"
            )
        else:
            how = (
                f"it does about as well with {target_name} shuffled ({changed:.0%} of entries changed) as with "
                "the real one"
            )
        return Verdict(
            "target_leakage",
            "error",
            f"the model's forward pass reads {target_name} (its outputs change when only {target_name} "
            f"changes), and after overfitting {how}: loss {shuffled:.4g} against {fitted:.4g} with the real "
            f"targets (it started at {initial:.4g}). It is copying its answers.",
            causes=_TARGET_CAUSES,
            advice=_TARGET_ADVICE,
            target=target_name,
            data=data,
        )
    return Verdict(
        "target_leakage",
        "info",
        f"the forward pass reads {target_name} (teacher forcing?), but with it shuffled the fitted model's "
        f"loss rises from {fitted:.4g} to {shuffled:.4g}: it does not copy its answers.",
        target=target_name,
        data=data,
    )


class _OutputCapture:
    """Every floating output of the LightningModule's forward and its top-level children (not
    loss modules or metrics kept as attributes: they read the targets by design)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.outputs: list[Tensor] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [self.module.register_forward_hook(self._hook)]
        handles += [
            child.register_forward_hook(self._hook)
            for _, child in self.module.named_children()
            if not _is_bookkeeping(child)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, _m: nn.Module, _args: Any, output: Any) -> None:
        t = primary_tensor(output, None)
        if t is not None:
            self.outputs.append(t.detach().float())


def _same_outputs(a: list[Tensor], b: list[Tensor]) -> bool:
    if len(a) != len(b) or not a:
        return len(a) == len(b)
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        scale = float(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).abs().max()) if x.numel() else 0.0
        if not torch.allclose(x, y, rtol=SAME_OUTPUT_RTOL, atol=SAME_OUTPUT_RTOL * max(scale, 1e-12), equal_nan=True):
            return False
    return True


def _seeded_evaluate(ctx: PreflightContext, batch: Any) -> tuple[Any, list[Tensor]]:
    capture = _OutputCapture(ctx.module)
    with preserved_rng():
        _seed_all(_SHUFFLE_SEED)  # the same random draws (noise layers) with real and shuffled targets
        record = ctx.evaluate(batch, capture.installed())
    return record, capture.outputs


def _following(
    real: Tensor, shuffled: Tensor, target: Tensor, shuffled_target: Tensor
) -> tuple[float | None, float | None, float | None]:
    """Over the entries the shuffle changed: how often the prediction with shuffled targets is the
    shuffled target, how often the prediction with the real targets is (chance), and the mean
    rise of the shuffled target's log-probability when it is fed in place of the real one."""
    a, b = align_classes(real, target), align_classes(shuffled, shuffled_target)
    if a is None or b is None or a[0].shape != b[0].shape:
        return None, None, None
    changed = (a[1] != b[1]) & (a[1] != IGNORE_INDEX) & (b[1] != IGNORE_INDEX)
    if int(changed.sum()) < 8:
        return None, None, None
    fed = b[1][changed].long()
    if a[0].shape[-1] == 1:  # one logit for two classes: class 1 when it is positive
        if bool(((fed != 0) & (fed != 1)).any()):
            return None, None, None
        sign = fed.float() * 2 - 1

        def log_prob(logits: Tensor) -> Tensor:
            return F.logsigmoid(sign * logits[changed].float().reshape(-1))

        def predicted(logits: Tensor) -> Tensor:
            return (logits[changed].reshape(-1) > 0).long()

    else:

        def log_prob(logits: Tensor) -> Tensor:
            return logits[changed].float().log_softmax(-1).gather(1, fed.unsqueeze(1)).reshape(-1)

        def predicted(logits: Tensor) -> Tensor:
            return logits[changed].argmax(dim=-1)

    follows = (predicted(b[0]) == fed).float().mean()
    chance = (predicted(a[0]) == fed).float().mean()
    rise = (log_prob(b[0]) - log_prob(a[0])).mean()
    return float(follows), float(chance), float(rise)


@register(
    "target_leakage",
    phase="fitted",
    summary="the model cannot read its targets: no label column in the inputs, no copying of the targets",
)
def target_leakage(ctx: PreflightContext) -> Iterator[Verdict]:
    target, name = ctx.target, ctx.target_name
    if target is None or name is None:
        raise Skip("no target was found in the batch (name it with Preflight(target=...))")
    copy = judge_copied_features(name, copied_features(ctx.inputs, target))
    if copy is not None:
        yield copy
        return
    if target.dim() == 0 or ctx.batch_size is None or target.shape[0] != ctx.batch_size or ctx.batch_size < 2:
        raise Skip(f"{name} has no batch dimension to shuffle")
    if ctx.target_path is not None and not ctx.user_named_target and not ctx.task.known:
        raise Skip(
            f"the model's output cannot be matched to {name}, so it may not be the target "
            "(name the target with Preflight(target=...))"
        )
    run = ctx.overfit
    initial = run.initial_loss
    real, real_out = _seeded_evaluate(ctx, ctx.batch)
    if initial is None or real.loss is None:
        raise Skip("training_step reported no loss")
    generator = torch.Generator().manual_seed(_SHUFFLE_SEED)
    shuffled_target, changed = shuffled_targets(target, generator)
    shuffled, shuffled_out = _seeded_evaluate(ctx, ctx.replaced({ctx.target_path: shuffled_target}))
    if not real_out or not shuffled_out:
        raise Skip("the model's outputs could not be captured (no floating tensor out of its forward or children)")
    follows = chance = rise = None
    if ctx.task.is_classification and real.output is not None and shuffled.output is not None:
        follows, chance, rise = _following(real.output, shuffled.output, target, shuffled_target)
        if target.numel() != target.shape[0]:
            rise = None  # sequences: a decoder fed gibberish grows less sure of everything, fed tokens included
    verdict = judge_target_leakage(
        name,
        initial,
        real.loss,
        shuffled.loss if shuffled.loss is not None else float("nan"),
        changed,
        output_changed=not _same_outputs(real_out, shuffled_out),
        follows=follows,
        chance=chance,
        rise=rise,
    )
    if verdict is not None:
        yield verdict


# =========================================================================== causal_leakage
#: Gradient reaching a later position above this fraction of the largest is a real dependence; a
#: causal computation gives exact zeros there (a masked softmax weight is exactly 0).
CAUSAL_RTOL = 1e-5
#: Positions of agreement needed to call the batch a next-token problem.
NEXT_TOKEN_AGREEMENT = 0.99
#: Limits on the search for the first module that sees the future.
LOCATE_MAX_MODULES = 512
LOCATE_MAX_SECONDS = 10.0

_CAUSAL_CAUSES = (
    "self-attention without a causal mask (is_causal=False, or no attn_mask / tgt_mask passed)",
    "a causal mask off by one (torch.triu(..., diagonal=0) masks the diagonal; diagonal=1 is causal), "
    "or a boolean mask with True/False the wrong way round",
    "a bidirectional recurrent layer (bidirectional=True)",
    "a convolution padded on both sides (causal convolutions pad on the left only)",
    "the decoder is fed the targets instead of the inputs (targets are the inputs one step ahead)",
)
_CAUSAL_ADVICE = (
    "use torch.nn.functional.scaled_dot_product_attention(..., is_causal=True) or pass "
    "nn.Transformer.generate_square_subsequent_mask(T) as the mask",
    "test it in isolation: change the last input token and check no earlier output changes",
)


@dataclasses.dataclass(frozen=True)
class SequenceSource:
    """A batch tensor the model reads, and where its positions sit in the sequence: position s of
    the tensor holds sequence position ``s + offset`` (targets shifted by one have offset 1)."""

    path: Path
    tensor: Tensor
    offset: int


def next_token_relation(inputs: Tensor, target: Tensor) -> str | None:
    """``"shifted"`` when the target is the input one position ahead along dim 1, ``"equal"`` when
    it is the input itself (models that shift inside), else ``None``."""
    if inputs.dim() < 2 or inputs.shape != target.shape or inputs.shape[1] < 3:
        return None
    if is_integer(inputs) != is_integer(target):
        return None
    for relation, a, b in (("shifted", inputs[:, 1:], target[:, :-1]), ("equal", inputs, target)):
        same = a == b
        if is_integer(target):
            valid = b != IGNORE_INDEX
            if same.dim() > valid.dim():
                same = same.all(dim=-1)
            count = int(valid.sum())
            if count >= 4 and int((same & valid).sum()) >= NEXT_TOKEN_AGREEMENT * count:
                return relation
        elif float(same.float().mean()) >= NEXT_TOKEN_AGREEMENT:
            return relation
    return None


def next_token_layout(inputs: Tensor, target: Tensor) -> tuple[str, int] | None:
    """``(relation, time_axis)`` for a next-token pair: batch-first ``(batch, time, ...)`` (time
    axis 1), or time-major ``(time, batch, ...)`` (time axis 0, as in PyTorch's word language
    model, whose targets are often flattened to ``(time * batch,)``)."""
    if inputs.dim() < 2:
        return None
    if target.shape != inputs.shape:
        if target.dim() == 1 and target.numel() == inputs.numel() and inputs.dim() == 2:
            target = target.reshape(inputs.shape)
        else:
            return None
    relation = next_token_relation(inputs, target)
    if relation is not None:
        return relation, 1
    relation = next_token_relation(inputs.transpose(0, 1), target.transpose(0, 1))
    if relation is not None:
        return relation, 0
    return None


def sequence_sources(ctx: PreflightContext) -> tuple[list[SequenceSource], str, int]:
    """The batch's sequence tensors with their offsets, how the batch was recognised, and its
    time axis (1 for ``(batch, time, ...)``, 0 for ``(time, batch, ...)``)."""
    declared = ctx.options.causal
    target = ctx.target
    candidates = [(p, t) for p, t in ctx.inputs if t.dim() >= 2 and (is_integer(t) or torch.is_floating_point(t))]
    if target is not None:
        for path, t in candidates:
            layout = next_token_layout(t, target)
            if layout is not None:
                relation, axis = layout
                how = (
                    f"{ctx.target_name} is {path_str(path)} one position ahead"
                    if relation == "shifted"
                    else f"{ctx.target_name} equals {path_str(path)} (the model shifts it)"
                ) + ("; time-major batch" if axis == 0 else "")
                sources = [SequenceSource(path, t, 0)]
                if ctx.target_path is not None and target.shape == t.shape:
                    sources.append(SequenceSource(ctx.target_path, target, 1 if relation == "shifted" else 0))
                return sources, how, axis
    if declared:
        if not candidates:
            raise Skip("causal=True, but the batch has no tensor with a time axis (batch, time, ...)")
        path, t = candidates[0]
        return [SequenceSource(path, t, 0)], f"causal=True (sequence {path_str(path)})", 1
    if target is None:
        raise Skip("no target in the batch to recognise a next-token problem (declare it with causal=True)")
    raise Skip(
        f"not a next-token problem: {ctx.target_name} is not the input shifted by one position "
        "(declare an autoregressive model with causal=True)"
    )


@dataclasses.dataclass
class _Leaf:
    tensor: Tensor
    shift: int  # the sequence position of the leaf's position 0
    name: str  # the batch tensor it came from


class _CausalProbe:
    """Makes the model's sequence inputs gradient-carrying leaves and records module outputs.

    Float sequences become leaves in the batch itself; token ids are followed through the outputs
    of ``nn.Embedding`` layers fed (a slice of) a source tensor. Every module's output that has the
    batch and time axes first (or time then batch, for a time-major batch) is recorded, in the
    order the modules finished, to find the first that depends on the future. Everything read
    back is put in ``(batch, time, ...)`` order.
    """

    def __init__(self, module: nn.Module, batch_size: int, sources: list[SequenceSource], time_axis: int = 1) -> None:
        self.module, self.batch_size, self.sources, self.time_axis = module, batch_size, sources, time_axis
        self.leaves: list[_Leaf] = []
        self.recorded: list[tuple[str, nn.Module, Tensor]] = []
        self.top: list[tuple[str, Tensor]] = []
        self._handles: list[Any] = []

    def bt(self, t: Tensor) -> Tensor:
        """``t`` in ``(batch, time, ...)`` order (a view)."""
        return t if self.time_axis == 1 else t.transpose(0, 1)

    def leafed_batch(self, batch: Any) -> Any:
        floats = {s.path: s for s in self.sources if torch.is_floating_point(s.tensor)}

        def leaf(path: Path, t: Tensor) -> Tensor:
            source = floats.get(path)
            if source is None:
                return t
            out = t.detach().clone().requires_grad_(True)
            self.leaves.append(_Leaf(out, source.offset, path_str(path)))
            return out

        return map_tensors(batch, leaf)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        names = {id(m): n for n, m in self.module.named_modules()}
        for m in self.module.modules():
            if isinstance(m, nn.Embedding):
                self._handles.append(m.register_forward_hook(self._embedding))
            if m is not self.module:
                self._handles.append(m.register_forward_hook(self._record(names.get(id(m), "?"))))
        self._handles.append(self.module.register_forward_hook(self._top("forward")))
        for name, child in self.module.named_children():
            self._handles.append(child.register_forward_hook(self._top(name)))
        try:
            yield
        finally:
            for h in self._handles:
                h.remove()

    def _shift_of(self, ids: Tensor) -> tuple[int, str] | None:
        b = self.batch_size
        if ids.dim() < 2:
            return None
        ids = self.bt(ids)
        if ids.shape[0] != b:
            return None
        length = ids.shape[1]
        for source in self.sources:
            if not is_integer(source.tensor) or source.tensor.dim() != ids.dim():
                continue
            s = self.bt(source.tensor)
            if s.shape[0] != b:
                continue
            for k in (0, 1):
                if k + length <= s.shape[1] and torch.equal(ids, s[:, k : k + length]):
                    return k + source.offset, path_str(source.path) + (" from position 1" if k else "")
        return None

    def _embedding(self, _m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        ids = args[0] if args else None
        if not isinstance(ids, Tensor) or not isinstance(output, Tensor):
            return None
        found = self._shift_of(ids)
        if found is None:
            return None
        out = output.detach().requires_grad_(True)
        self.leaves.append(_Leaf(out, *found))
        return out

    def _record(self, name: str) -> Any:
        def hook(m: nn.Module, _args: Any, output: Any) -> None:
            t = primary_tensor(output, self.batch_size if self.time_axis == 1 else None)
            if t is None or not t.requires_grad or t.dim() < 2:
                return
            t = self.bt(t)
            if t.shape[0] == self.batch_size:
                self.recorded.append((name, m, t))

        return hook

    def _top(self, name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            t = primary_tensor(output, None)
            if t is not None:
                self.top.append((name, t))

        return hook

    def output(self) -> Tensor | None:
        """The LightningModule's output (else its last top-level child's), as ``(batch, time, ...)``."""
        named = dict(self.top)
        out = named.get("forward", self.top[-1][1] if self.top else None)
        if out is None or out.dim() < 2:
            return None
        b = self.batch_size
        if self.bt(out).shape[0] == b:
            return self.bt(out)
        if out.shape[0] % b == 0 and out.shape[0] // b >= 2:  # logits flattened to (batch * time, vocab)
            steps = out.shape[0] // b
            if self.time_axis == 1:
                return out.reshape(b, steps, *out.shape[1:])
            return out.reshape(steps, b, *out.shape[1:]).transpose(0, 1)
        return None


def future_dependence(grads: list[Tensor | None], shifts: list[int], position: int) -> tuple[list[int], float]:
    """The sequence positions after ``position`` that sample 0's output at ``position`` depends
    on, and the largest gradient mass anywhere (to judge "depends" relative to it)."""
    masses: dict[int, float] = {}
    for g, shift in zip(grads, shifts):
        if g is None or g.dim() < 2:
            continue
        per_position = g[0].detach().abs().reshape(g.shape[1], -1).sum(dim=1).double().cpu()
        for s, m in enumerate(per_position.tolist()):
            masses[s + shift] = masses.get(s + shift, 0.0) + m
    top = max(masses.values(), default=0.0)
    future = sorted(p for p, m in masses.items() if p > position and m > CAUSAL_RTOL * top)
    return future, top


def _ranges(positions: list[int]) -> str:
    out, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            out.append(str(start) if start == p else f"{start}-{p}")
            start = None
    return ", ".join(out[:4]) + (", ..." if len(out) > 4 else "")


def judge_causal_leakage(measure: CausalMeasure, how: str) -> Verdict:
    """The verdict for an output position that depends on later ones (``measure.position``)."""
    assert measure.position is not None
    where = f"; the first module whose output already depends on the future is {measure.module}" if measure.module else ""
    fed = (
        f" The model is fed {', '.join(measure.fed)}, which holds the inputs one position ahead: "
        "position t sees the token it must predict."
        if measure.fed
        else ""
    )
    return Verdict(
        "causal_leakage",
        "error",
        f"this is a next-token problem ({how}), but with the model in eval mode its output at position "
        f"{measure.position} depends on inputs at later positions ({_ranges(measure.future)}, of "
        f"{measure.length}){where}.{fed} The model can read what it is asked to predict: the training "
        "loss will look great and generation will fail.",
        causes=_CAUSAL_CAUSES,
        advice=_CAUSAL_ADVICE,
        target=measure.module,
        data={
            "position": measure.position,
            "future_positions": measure.future[:50],
            "module": measure.module,
            "sequence_length": measure.length,
            "fed_ahead": measure.fed,
            "recognised_by": how,
        },
    )


def _locate(probe: Any, shifts: list[int], leaves_: list[Tensor], position: int, length: int) -> str | None:
    """The first recorded module (in the order modules finished) whose output at ``position``
    depends on later positions, or ``None`` when none can be told within the limits."""
    began = time.perf_counter()
    for i, (name, module, t) in enumerate(probe.recorded):
        if i >= LOCATE_MAX_MODULES or time.perf_counter() - began > LOCATE_MAX_SECONDS:
            return None
        if t.shape[1] != length:
            continue
        grads = torch.autograd.grad(t[0, position].float().sum(), leaves_, allow_unused=True, retain_graph=True)
        if future_dependence([None if g is None else probe.bt(g) for g in grads], shifts, position)[0]:
            return f"{name} ({type(module).__name__})"
    return None


@dataclasses.dataclass
class CausalMeasure:
    """What the probe found: the first probed position reading the future (``None`` if none)."""

    position: int | None
    future: list[int]
    module: str | None
    length: int
    fed: list[str]  # sources fed to the model whose positions sit ahead of the inputs (the targets)
    depends: bool  # the output depends on the inputs at all


def measure_causal_leakage(ctx: PreflightContext, sources: list[SequenceSource], time_axis: int = 1) -> CausalMeasure:
    """Probe the output at a few positions (0, 1, a quarter, a half, the last but one) for
    dependence on later positions, and locate the first module that sees the future."""
    module = ctx.module
    batch_size = int(sources[0].tensor.shape[1 - time_axis])
    with modes_preserved(module), torch.enable_grad(), _cudnn_off():
        module.eval()
        probe = _CausalProbe(module, batch_size, sources, time_axis)
        batch = probe.leafed_batch(ctx.batch)
        ctx.evaluate(batch, probe.installed())
        if not probe.leaves:
            raise Skip("the model's sequence inputs could not be followed (no nn.Embedding is fed them)")
        out = probe.output()
        if out is None or not out.requires_grad:
            raise Skip("the model's output has no (batch, time, ...) layout that depends on the inputs")
        length = out.shape[1]
        leaves_ = [leaf.tensor for leaf in probe.leaves]
        shifts = [leaf.shift for leaf in probe.leaves]
        in_order = probe.bt
        fed = sorted({leaf.name for leaf in probe.leaves if leaf.shift > 0})
        depends = False
        for position in sorted({0, 1, length // 4, length // 2, length - 2}):
            if not 0 <= position < length - 1:
                continue
            grads = torch.autograd.grad(out[0, position].float().sum(), leaves_, allow_unused=True, retain_graph=True)
            future, top = future_dependence([None if g is None else in_order(g) for g in grads], shifts, position)
            depends = depends or top > 0
            if future:
                where = _locate(probe, shifts, leaves_, position, length)
                return CausalMeasure(position, future, where, length, fed, True)
        return CausalMeasure(None, [], None, length, fed, depends)


@register(
    "causal_leakage",
    phase="initial",
    summary="an autoregressive model's output at position t depends on no input after t",
)
def causal_leakage(ctx: PreflightContext) -> Iterator[Verdict]:
    if ctx.options.causal is False:
        raise Skip("switched off with causal=False")
    sources, how, time_axis = sequence_sources(ctx)
    measure = measure_causal_leakage(ctx, sources, time_axis)
    if not measure.depends:
        ctx.overfit  # noqa: B018 - e.g. a zero-initialised output layer: no dependence until it has trained
        measure = measure_causal_leakage(ctx, sources, time_axis)
        if not measure.depends:
            raise Skip("the output does not depend on the sequence inputs through a differentiable path")
    if measure.position is not None:
        yield judge_causal_leakage(measure, how)


__all__ = [
    "CausalMeasure",
    "SequenceSource",
    "copied_features",
    "future_dependence",
    "judge_causal_leakage",
    "judge_copied_features",
    "judge_target_leakage",
    "measure_causal_leakage",
    "next_token_layout",
    "next_token_relation",
    "sequence_sources",
    "shuffled_targets",
]
