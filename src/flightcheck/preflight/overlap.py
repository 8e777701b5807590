"""``split_overlap``: validation samples that are also training samples.

Each sample of the training and validation data is reduced to a content hash of its inputs
(every tensor, array, string or number in it except the target), over a bounded sample of each
split, and the hashes are compared. Nothing the run uses is touched: samples are read from the
loaders' datasets by index (the indices the loaders' samplers would visit, so two loaders over
one dataset with disjoint index subsets are told apart), iterable datasets from a
single-process copy of the loader, and every random generator is put back afterwards.

Samples that come out differently each time they are read (random augmentation) cannot be
compared exactly: the check says so and skips rather than report a clean bill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from flightcheck.checks import Verdict
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.fetch import (
    NoBatch,
    flatten_loaders,
    generators_preserved,
    request_data,
    request_train_data,
    single_process,
)
from flightcheck.preflight.registry import Skip, register
from flightcheck.preflight.roles import TARGET_KEYS, leaves
from flightcheck.utils import preserved_rng

#: Default number of batches' worth of samples hashed per split (``Preflight(overlap_batches=...)``).
OVERLAP_BATCHES = 1000
#: The most seconds spent reading samples, per split.
OVERLAP_MAX_SECONDS = 10.0
#: A sampler is iterated for at most this many indices (samplers can be infinite).
MAX_SAMPLER_INDICES = 5_000_000
#: Samples read twice to tell whether reading is deterministic.
REPEAT_PROBE = 8
#: The estimated share of validation samples also in training above which the split is broken
#: (error) or suspicious (warning); tiny overlaps (a heading repeated in both) are a note.
OVERLAP_ERROR_SHARE = 0.10
OVERLAP_WARN_SHARE = 0.01
OVERLAP_MIN_COUNT = 3
#: Share of sampled training samples that are exact copies of another before it is worth a warning.
DUPLICATE_WARN_SHARE = 0.20


class Unhashable(Exception):  # noqa: N818
    """The samples cannot be compared exactly; the message says why."""


# --------------------------------------------------------------------------- hashing one sample
def _feed(h: Any, obj: Any, depth: int = 0) -> None:
    if depth > 20:
        h.update(b"<deep>")
    elif isinstance(obj, Tensor):
        t = obj.detach()
        if t.is_sparse or t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        if obj.dtype == object:
            h.update(b"O")
            for x in obj.reshape(-1):
                _feed(h, x, depth + 1)
        else:
            h.update(f"A{obj.dtype}{obj.shape}".encode())
            h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (str, bytes, bool, int, float, type(None), np.generic)):
        h.update(f"{type(obj).__name__}:".encode())
        h.update(obj if isinstance(obj, bytes) else repr(obj).encode())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key], depth + 1)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _feed(h, x, depth + 1)
        h.update(b"]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, depth + 1)
    elif hasattr(obj, "mode") and hasattr(obj, "size") and callable(getattr(obj, "tobytes", None)):  # PIL image
        h.update(f"I{obj.mode}{obj.size}".encode())
        h.update(obj.tobytes())
    else:
        text = repr(obj)
        h.update((type(obj).__name__ if " at 0x" in text else text).encode())


def inputs_of(item: Any, target: int | str | None = None) -> Any:
    """The sample without its target: a tuple's last element (or ``target``) and a dict's
    ``y``/``label(s)``/``target(s)`` keys are left out; a lone tensor is all input."""
    if isinstance(item, Mapping):
        drop = {k for k in item if (target is not None and k == target) or str(k).lower() in TARGET_KEYS}
        kept = {k: v for k, v in item.items() if k not in drop}
        return kept if kept else item
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        cut = len(item) - 1 if not isinstance(target, int) else target % len(item)
        return [v for i, v in enumerate(item) if i != cut]
    return item


def digest(item: Any, target: int | str | None = None) -> bytes:
    """A content hash of one sample's inputs."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, inputs_of(item, target))
    return h.digest()


# --------------------------------------------------------------------------- hashing one split
@dataclasses.dataclass
class SplitHashes:
    """The hashes of a sample of one split's samples."""

    digests: list[bytes]
    indices: list[int]  # dataset index (or position in the stream) of each digest
    total: int | None  # samples in the split, when known
    seconds: float
    source: str  # "dataset" (read by index) or "stream" (iterated)

    @property
    def sampled_share(self) -> float:
        if not self.total:
            return 1.0
        return min(1.0, len(self.digests) / self.total)


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sampler_indices(loader: DataLoader) -> list[int]:
    """The dataset indices ``loader`` visits in an epoch, without duplicates, in increasing order
    (its sampler is iterated with every generator put back)."""
    sampler: Iterable[Any] = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    with preserved_rng(), generators_preserved([loader]):
        seen: set[int] = set()
        for entry in itertools.islice(iter(sampler), MAX_SAMPLER_INDICES):
            if isinstance(entry, (list, tuple)):
                seen.update(int(i) for i in entry)
            else:
                seen.add(int(entry))
    return sorted(seen)


def _map_style(data: Any) -> tuple[Dataset, list[int]] | None:
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return None
        try:
            return data.dataset, sampler_indices(data)
        except TypeError:  # a sampler yielding keys that are not integers
            return None
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return data, list(range(len(data)))  # type: ignore[arg-type]
    return None


def _budget(data: Any, batches: int) -> int:
    batch_size = getattr(data, "batch_size", None) or 1
    return max(1, batches * int(batch_size))


def hash_split(
    data: Any,
    *,
    batches: int = OVERLAP_BATCHES,
    max_seconds: float = OVERLAP_MAX_SECONDS,
    target: int | str | None = None,
    seed: int = 0,
) -> SplitHashes:
    """Hash up to ``batches`` batches' worth of samples of ``data`` (a DataLoader or a Dataset).

    A map-style dataset is read by index at a uniform random sample of the indices its loader
    visits; an iterable one from a single-process copy of its loader, from the start. Raises
    :class:`Unhashable` when reading the same samples twice gives different contents.
    """
    began = time.perf_counter()
    if not isinstance(data, (DataLoader, Dataset)):
        # a user's own iterable of batches: it cannot be copied, and reading it would move it on
        raise Unhashable(
            f"the data is a {type(data).__name__}, neither a DataLoader nor a Dataset: it is not read, so that "
            "training gets it untouched"
        )
    budget = _budget(data, batches)
    with preserved_rng():
        mapped = _map_style(data)
        if mapped is not None:
            dataset, indices = mapped
            order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
            chosen = [indices[i] for i in order[:budget]]
            _check_repeatable(lambda: (dataset[i] for i in chosen[:REPEAT_PROBE]), target)
            _reseed(seed)
            digests, kept = [], []
            for i in chosen:
                digests.append(digest(dataset[i], target))
                kept.append(i)
                if time.perf_counter() - began > max_seconds:
                    break
            return SplitHashes(digests, kept, len(indices), time.perf_counter() - began, "dataset")
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=None)
        digests = []
        with generators_preserved([loader]):
            _check_repeatable(lambda: itertools.islice(_stream_samples(loader), REPEAT_PROBE), target)
            _reseed(seed)
            for item in itertools.islice(_stream_samples(loader), budget):
                digests.append(digest(item, target))
                if time.perf_counter() - began > max_seconds:
                    break
        total = None
        try:
            total = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            pass
        return SplitHashes(digests, list(range(len(digests))), total, time.perf_counter() - began, "stream")


def _stream_samples(loader: DataLoader) -> Iterator[Any]:
    """The samples of an iterated loader, one at a time (batches split along their first axis)."""
    copy = single_process(loader)
    for batch in copy:
        if copy.batch_size is None and copy.batch_sampler is None:
            yield batch
            continue
        sizes = {int(t.shape[0]) for _, t in leaves(batch) if t.dim() > 0}
        if len(sizes) != 1:
            yield batch
            continue
        n = sizes.pop()
        for i in range(n):
            yield _index(batch, i, n)


def _index(batch: Any, i: int, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[i] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _index(v, i, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and not any(isinstance(v, Tensor) for v in batch):
            return batch[i]  # a collated list of strings
        return [_index(v, i, n) for v in batch]
    return batch


def _check_repeatable(draw: Any, target: int | str | None) -> None:
    first, second = [], []
    for seed, out in ((1, first), (2, second)):
        _reseed(seed)
        out.extend(digest(item, target) for item in draw())
    if first != second:
        raise Unhashable(
            "samples come out differently each time they are read (random augmentation in the dataset "
            "or its transforms, or a shuffled stream), so they cannot be compared exactly"
        )


# --------------------------------------------------------------------------- comparing splits
@dataclasses.dataclass
class OverlapResult:
    """Training and validation hashes compared."""

    train: SplitHashes
    val: SplitHashes
    shared_val_indices: list[int]  # validation samples found in the sampled training samples
    train_duplicates: int  # sampled training samples that repeat an earlier sampled one
    same_data: bool = False  # the very same dataset and indices

    @property
    def found(self) -> int:
        return len(self.shared_val_indices)

    @property
    def estimated_share(self) -> float:
        """The share of validation samples that are training samples, corrected for how much of
        the training data was hashed."""
        if not self.val.digests:
            return 0.0
        seen = self.found / len(self.val.digests)
        return min(1.0, seen / max(self.train.sampled_share, 1e-12))

    @property
    def duplicate_share(self) -> float:
        return self.train_duplicates / len(self.train.digests) if self.train.digests else 0.0


def compare_splits(train: SplitHashes, val: SplitHashes, same_data: bool = False) -> OverlapResult:
    counts = Counter(train.digests)
    shared = [i for i, d in zip(val.indices, val.digests) if d in counts]
    duplicates = sum(c - 1 for c in counts.values())
    return OverlapResult(train, val, shared, duplicates, same_data)


def find_split_overlap(
    train: Any,
    val: Any,
    *,
    batches: int = OVERLAP_BATCHES,
    max_seconds: float = OVERLAP_MAX_SECONDS,
    target: int | str | None = None,
) -> OverlapResult:
    """Hash samples of ``train`` and ``val`` (DataLoaders or Datasets, or lists of them) and compare.

    Raises :class:`Unhashable` when either split's samples differ each time they are read.
    """
    trains, vals = _as_list(train), _as_list(val)
    same = len(trains) == len(vals) and all(_same_source(a, b) for a, b in zip(trains, vals))
    val_hashes = _merge([hash_split(v, batches=batches, max_seconds=max_seconds, target=target, seed=1) for v in vals])
    train_hashes = _merge(
        [hash_split(t, batches=batches, max_seconds=max_seconds, target=target, seed=2) for t in trains]
    )
    return compare_splits(train_hashes, val_hashes, same)


def _as_list(data: Any) -> list[Any]:
    items = [x for x in flatten_loaders(data) if x is not None]
    if not items:
        raise Unhashable("no data")
    return items


def _same_source(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, DataLoader) and isinstance(b, DataLoader) and a.dataset is b.dataset:
        ma, mb = _map_style(a), _map_style(b)
        return ma is not None and mb is not None and ma[1] == mb[1]
    return False


def _merge(parts: list[SplitHashes]) -> SplitHashes:
    if len(parts) == 1:
        return parts[0]
    totals = [p.total for p in parts]
    return SplitHashes(
        [d for p in parts for d in p.digests],
        [i for p in parts for i in p.indices],
        None if any(t is None for t in totals) else sum(t for t in totals if t is not None),
        sum(p.seconds for p in parts),
        "+".join(sorted({p.source for p in parts})),
    )


# --------------------------------------------------------------------------- the judge
def judge_split_overlap(result: OverlapResult) -> list[Verdict]:
    """An error when a large share of the validation data is training data, a warning for a
    smaller but real share or heavy duplication inside the training data, a note otherwise."""
    verdicts = []
    train, val = result.train, result.val
    scope = (
        f"{len(val.digests)} validation samples against {len(train.digests)} training samples"
        + (f" ({train.sampled_share:.0%} of the training data)" if train.total else "")
    )
    data = {
        "validation_sampled": len(val.digests),
        "training_sampled": len(train.digests),
        "training_total": train.total,
        "validation_total": val.total,
        "found": result.found,
        "estimated_share": result.estimated_share,
        "examples": result.shared_val_indices[:10],
        "training_duplicates": result.train_duplicates,
        "seconds": train.seconds + val.seconds,
    }
    share = result.estimated_share
    if result.same_data:
        verdicts.append(
            Verdict(
                "split_overlap",
                "error",
                "the validation data is the training data: both loaders read the same dataset at the same "
                "indices. Validation scores will say nothing about generalisation.",
                causes=("val_dataloader returns the training dataset (a copy-paste slip)",),
                advice=("split the data once, by index, before building the loaders",),
                data=data,
            )
        )
    elif (share >= OVERLAP_ERROR_SHARE and result.found >= 2) or (
        share >= OVERLAP_WARN_SHARE and result.found >= OVERLAP_MIN_COUNT
    ):
        severity = "error" if share >= OVERLAP_ERROR_SHARE and result.found >= 2 else "warning"
        verdicts.append(
            Verdict(
                "split_overlap",
                severity,
                f"{result.found} of {len(val.digests)} validation samples are also in the training data "
                f"(about {share:.0%} of the validation set, hashing {scope}); e.g. validation samples "
                f"{', '.join(map(str, result.shared_val_indices[:5]))}. Validation scores overstate how well "
                "the model generalises.",
                causes=(
                    "the validation set was cut from the data after the training set was taken from all of it",
                    "random_split or shuffling applied separately to each split with different seeds",
                    "duplicated records in the raw data landing in both splits",
                    "augmented copies of training samples saved as validation samples",
                ),
                advice=(
                    "split once, by index (or by a group key such as the document or the patient), then build both "
                    "loaders from the disjoint index sets",
                    "drop exact duplicates before splitting",
                ),
                data=data,
            )
        )
    elif result.found:
        verdicts.append(
            Verdict(
                "split_overlap",
                "info",
                f"{result.found} of {len(val.digests)} validation samples also occur in the training data "
                f"(about {share:.1%}, hashing {scope}): too few to matter, likely repeated short samples.",
                data=data,
            )
        )
    dup = result.duplicate_share
    if dup >= DUPLICATE_WARN_SHARE and len(train.digests) >= 20:
        verdicts.append(
            Verdict(
                "split_overlap",
                "warning",
                f"{dup:.0%} of {len(train.digests)} sampled training samples are exact copies of another one: "
                "the model sees them far more often than the rest and validation on such data is easy to fool.",
                causes=("the data was concatenated with itself (or an epoch saved twice)", "oversampling done by copy"),
                advice=("deduplicate the training data, or oversample with a WeightedRandomSampler instead",),
                target="training data",
                data={**data, "duplicate_share": dup},
            )
        )
    return verdicts


# --------------------------------------------------------------------------- the pre-flight check
def _val_data(trainer: Any) -> Any:
    if not getattr(trainer, "limit_val_batches", 1):
        raise Skip("validation is switched off (limit_val_batches=0)")
    loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
    source = getattr(loop, "_data_source", None)
    if source is None:
        raise Skip("the validation data cannot be found on this Trainer")
    try:
        return request_data(source, "val_dataloader")
    except NoBatch as err:
        raise Skip(f"no validation data ({err})") from None


@register(
    "split_overlap",
    phase="batch",
    summary="no validation sample is also a training sample; no heavy duplication in the training data",
)
def split_overlap(ctx: PreflightContext) -> list[Verdict]:
    trainer = ctx.trainer
    val = _val_data(trainer)
    try:
        train = request_train_data(trainer)
    except NoBatch as err:
        raise Skip(str(err)) from None
    try:
        result = find_split_overlap(
            train, val, batches=ctx.options.overlap_batches, target=ctx.options.target, max_seconds=OVERLAP_MAX_SECONDS
        )
    except Unhashable as err:
        raise Skip(str(err)) from None
    verdicts = judge_split_overlap(result)
    if not verdicts:
        verdicts = [
            Verdict(
                "split_overlap",
                "info",
                f"no overlap in {len(result.val.digests)} validation and {len(result.train.digests)} training samples "
                f"({result.train.sampled_share:.0%} of the training data hashed, {result.train.seconds + result.val.seconds:.1f} s)",
                data={"validation_sampled": len(result.val.digests), "training_sampled": len(result.train.digests)},
            )
        ]
    return verdicts


__all__ = [
    "OVERLAP_BATCHES",
    "OverlapResult",
    "SplitHashes",
    "Unhashable",
    "compare_splits",
    "digest",
    "find_split_overlap",
    "hash_split",
    "inputs_of",
    "judge_split_overlap",
    "sampler_indices",
]
