"""Token sequences whose label is a known function of the tokens."""

from __future__ import annotations

import torch

from flightcheck.synthetic import functional
from flightcheck.synthetic.base import ClassificationAnswers, SyntheticDataModule, _check_float, _check_int

_RULES = ("marker", "majority", "parity")
#: token id never used in the data, free to serve as padding (``nn.Embedding(padding_idx=0)``)
PAD = 0
#: the token the "marker" and "parity" rules count
MARKER = 1


class SequenceClassification(ClassificationAnswers, SyntheticDataModule):
    """Classify token-id sequences by a known rule: can this sequence model learn at all?

    Batches are ``(tokens, y)``: ``tokens`` int64 ``(B, seq_len)`` ids in ``[1, vocab_size)`` (id 0
    is never used, so it can be padding) and ``y`` int64 class ids ``(B,)``. Classes are exactly
    balanced. The rules, each a fixed function of the tokens:

    - ``"marker"`` (2 classes): is token 1 in the sequence? Positive sequences hold it 1 to 3
      times at random places. A bag-of-embeddings model (embedding, mean over positions, linear)
      reaches 100%: the marker's count is a linear feature of the bag.
    - ``"majority"`` (``num_classes`` classes): which of tokens ``1..num_classes`` occurs most
      often? The winner is strict by construction (it occurs ``m`` times, each other class token
      fewer). Token counts decide it, so a bag of embeddings with a hidden layer reaches 100%.
    - ``"parity"`` (2 classes): is token 1 in the sequence an odd number of times? Counting mod 2
      is out of reach of a linear bag of embeddings (it stays at chance), while a recurrent or
      attention model, or an MLP over the counts, reaches 100%: a test of real sequence capacity.

    Other tokens are filler drawn uniformly from the ids the rule does not use.

    The known answer: ``expected_accuracy = 1 - label_noise`` (a fraction ``label_noise`` of the
    labels is replaced by a random other class, which no model can predict on fresh data;
    training accuracy above it is memorisation); ``chance_accuracy = 1 / num_classes``;
    ``chance_loss = ln(num_classes)``.

    Args:
        vocab_size: number of token ids, including the unused id 0 (so ``nn.Embedding(vocab_size, d)``).
        seq_len: tokens per sequence.
        rule: ``"marker"``, ``"majority"`` or ``"parity"``.
        num_classes: classes of the ``"majority"`` rule (the others have 2).
        label_noise: fraction of labels replaced by a random different class, in ``[0, 1)``.
        n_train, n_val, n_test, batch_size, seed: see :class:`SyntheticDataModule`.

    Example::

        dm = SequenceClassification(vocab_size=32, seq_len=16, rule="marker")
        tokens, y = next(iter(dm.train_dataloader()))   # (32, 16) int64, (32,) int64
    """

    def __init__(
        self,
        vocab_size: int = 32,
        seq_len: int = 16,
        rule: str = "marker",
        num_classes: int = 3,
        label_noise: float = 0.0,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)
        if rule not in _RULES:
            raise ValueError(f"rule must be one of {list(_RULES)}, got {rule!r}")
        self.rule = rule
        self.num_classes = _check_int("num_classes", num_classes, 2) if rule == "majority" else 2
        self.seq_len = _check_int("seq_len", seq_len, self.num_classes if rule == "majority" else 1)
        # the rule's own tokens are 1..signal; at least one filler id beyond them
        signal = self.num_classes if rule == "majority" else 1
        self.vocab_size = _check_int("vocab_size", vocab_size, signal + 2)
        self.label_noise = _check_float("label_noise", label_noise, 0.0, 1.0)
        self.input_shape = (self.seq_len,)
        self._signal_tokens = torch.arange(1, signal + 1)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = functional.balanced_labels(n, self.num_classes, generator)
        counts = self._signal_counts(y, generator)
        tokens = functional.place_tokens(
            counts, self._signal_tokens, self.seq_len, len(self._signal_tokens) + 1, self.vocab_size, generator
        )
        return tokens, functional.flip_labels(y, self.num_classes, self.label_noise, generator)

    def _signal_counts(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """How many copies of each rule token each sequence holds, so that the rule gives ``y``."""
        n, length = len(y), self.seq_len
        if self.rule == "marker":
            present = torch.randint(1, min(3, length) + 1, (n,), generator=generator)
            return torch.where(y == 1, present, 0).unsqueeze(1)
        if self.rule == "parity":
            # a count of the right parity, uniform over those that fit in the sequence
            halves = functional.uniform_int(0, (length - y) // 2, generator)
            return (2 * halves + y).unsqueeze(1)
        # majority: the winner m times (1 <= m <= seq_len // num_classes), every other class token fewer
        k = self.num_classes
        m = torch.randint(1, length // k + 1, (n, 1), generator=generator)
        others = functional.uniform_int(torch.zeros(n, k, dtype=torch.long), m - 1, generator)
        return torch.where(torch.arange(k) == y.unsqueeze(1), m, others)

    def rule_labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rule applied to ``(N, seq_len)`` tokens: the labels before any label noise."""
        if self.rule == "marker":
            return (tokens == MARKER).any(1).long()
        if self.rule == "parity":
            return (tokens == MARKER).sum(1) % 2
        counts = torch.stack([(tokens == t).sum(1) for t in self._signal_tokens.tolist()], dim=1)
        return counts.argmax(1)

    @property
    def expected_accuracy(self) -> float:
        """``1 - label_noise``: a model that can express the rule reaches it, nothing beats it."""
        return 1.0 - self.label_noise

    def _summary(self) -> str:
        what = {
            "marker": "is token 1 present",
            "majority": f"which of tokens 1..{self.num_classes} is most frequent",
            "parity": "is token 1 there an odd number of times",
        }[self.rule]
        noise = f" with {self.label_noise:.0%} of labels flipped" if self.label_noise else ""
        return (
            f"'{self.rule}' rule ({what}) on sequences of {self.seq_len} tokens from a vocabulary "
            f"of {self.vocab_size}{noise}; tokens int64 (B, {self.seq_len}), y int64 (B,)"
        )
