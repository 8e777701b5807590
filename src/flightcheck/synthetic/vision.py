"""Images of simple shapes: per-pixel masks for segmentation, boxes for detection.

Both modules paint squares (class 1) and discs (class 2) on a background (class 0), with the
torchvision convention that 0 means background. Before noise, background pixels are 0,
squares +1 and discs -1, so a pixel's class can be read from its own intensity; the noise
(``noise_std``) is what a model has to see through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from flightcheck.synthetic import functional
from flightcheck.synthetic.base import SyntheticDataModule, _check_float, _check_int

# the smallest half-size whose square and disc differ (a radius-1 disc is a plus sign, a
# radius-1 square a 3x3 block); smaller shapes would make the two classes identical
_MIN_RADIUS = 1


def _check_radii(min_radius: int, max_radius: int, room: int, room_name: str) -> tuple[int, int]:
    _check_int("min_radius", min_radius, _MIN_RADIUS)
    _check_int("max_radius", max_radius, _MIN_RADIUS)
    if min_radius > max_radius:
        raise ValueError(f"min_radius must be <= max_radius, got min_radius={min_radius}, max_radius={max_radius}")
    if 2 * max_radius + 1 > room:
        raise ValueError(
            f"max_radius={max_radius} makes shapes {2 * max_radius + 1} pixels wide, more than the "
            f"{room} pixels of {room_name}; lower max_radius or raise image_size"
        )
    return min_radius, max_radius


class ShapesSegmentation(SyntheticDataModule):
    """Segment squares and discs pixel by pixel: can this segmentation network learn at all?

    Each image holds 1 to ``max_shapes`` squares and discs of random size and place (later ones
    painted over earlier ones). Batches are ``(image, mask)`` with ``image`` float32
    ``(B, 1, image_size, image_size)`` and ``mask`` int64 class ids ``(B, image_size, image_size)``:
    0 background, 1 square, 2 disc, ready for ``cross_entropy(logits (B, 3, H, W), mask)``.

    The known answer (mean IoU over the three classes, pooled over the split, see
    :func:`~flightcheck.synthetic.functional.mean_iou`):

    - ``expected_iou``: what the per-pixel rule reaches on the validation split. Each class has its
      own intensity (0, +1, -1) and the noise is Gaussian, so the most probable class of a pixel
      given its intensity alone is a pair of thresholds (set by the noise and the classes' pixel
      frequencies, see :func:`~flightcheck.synthetic.functional.per_pixel_rule`); a 1x1
      convolution learns it. A network that also looks at neighbours does better, up to 1.0
      (the masks are exact), so treat it as the least a working network should reach.
    - ``chance_iou``: predicting background everywhere (the background's share of the pixels,
      divided by 3). An untrained network is about here or below.

    Args:
        image_size: side of the square images, in pixels.
        max_shapes: the most shapes in one image (each image has 1 to ``max_shapes``).
        min_radius, max_radius: half-size of the shapes in pixels (a shape is ``2r+1`` wide).
        noise_std: standard deviation of the pixel noise; the classes' intensities are 1 apart.
        n_train, n_val, n_test, batch_size, seed: see :class:`SyntheticDataModule`.

    Example::

        dm = ShapesSegmentation(image_size=32, seed=0)
        print(dm.describe())  # ... expected_iou 0.9..., chance_iou 0.3...
    """

    num_classes = 3
    class_names = functional.SHAPE_NAMES

    def __init__(
        self,
        image_size: int = 32,
        max_shapes: int = 3,
        min_radius: int = 2,
        max_radius: int = 6,
        noise_std: float = 0.2,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)
        self.image_size = _check_int("image_size", image_size, 3)
        self.max_shapes = _check_int("max_shapes", max_shapes, 1)
        self.min_radius, self.max_radius = _check_radii(min_radius, max_radius, self.image_size, "the image")
        self.noise_std = _check_float("noise_std", noise_std, 0.0)
        self.input_shape = (1, self.image_size, self.image_size)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size
        columns = torch.tensor([[0, size]] * self.max_shapes)
        kinds, centers, radii = functional.draw_shapes(n, size, columns, self.min_radius, self.max_radius, generator)
        count = torch.randint(1, self.max_shapes + 1, (n, 1), generator=generator)
        kinds = torch.where(torch.arange(self.max_shapes) < count, kinds, functional.BACKGROUND)
        masks = functional.render_shapes(kinds, centers, radii, size)
        return functional.shapes_image(masks, self.noise_std, generator), masks

    @property
    def class_frequencies(self) -> torch.Tensor:
        """``(3,)`` share of background, square and disc pixels in the training split."""
        return functional.class_frequencies(self.train_set.tensors[1], self.num_classes)  # type: ignore[attr-defined]

    @property
    def expected_iou(self) -> float:
        """Mean IoU of the per-pixel rule on the validation split: the least a working network reaches."""
        images, masks = self.val_set.tensors  # type: ignore[attr-defined]
        pred = functional.per_pixel_rule(images, self.noise_std, self.class_frequencies)
        return functional.mean_iou(pred, masks, self.num_classes)

    @property
    def chance_iou(self) -> float:
        """Mean IoU of predicting background everywhere, on the validation split."""
        _, masks = self.val_set.tensors  # type: ignore[attr-defined]
        return functional.mean_iou(torch.zeros_like(masks), masks, self.num_classes)

    def expectations(self) -> dict[str, float]:
        return {"expected_iou": self.expected_iou, "chance_iou": self.chance_iou}

    def _summary(self) -> str:
        s = self.image_size
        return (
            f"1-{self.max_shapes} squares/discs per {s}x{s} image, pixel noise {self.noise_std:g}; "
            f"image float32 (B, 1, {s}, {s}), mask int64 (B, {s}, {s}) with 0 background, 1 square, 2 disc"
        )


class _DetectionSet(Dataset):
    """``(image, {"boxes": (K, 4), "labels": (K,)})`` samples; the default collate stacks them.

    ``masks`` keeps the painted class ids ``(N, H, W)`` for reference; batches leave them out.
    """

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.boxes, self.labels, self.masks = images, boxes, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[i], {"boxes": self.boxes[i], "labels": self.labels[i]}


class ShapesDetection(SyntheticDataModule):
    """Find a fixed number of shapes and say what each is: can this detector learn at all?

    Each image holds exactly ``num_objects`` shapes, a square (label 1) or a disc (label 2), one in
    each of ``num_objects`` side-by-side vertical strips, so they never overlap and the ``k``-th
    box is always the ``k``-th from the left. A fixed count keeps batches stackable: a batch is
    ``(image, target)`` with ``image`` float32 ``(B, 1, image_size, image_size)`` and ``target`` a
    dict of ``"boxes"`` float32 ``(B, K, 4)`` and ``"labels"`` int64 ``(B, K)``, the per-image dicts
    of torchvision's detection models stacked; :meth:`as_target_list` turns it into their list.
    Boxes are ``(x1, y1, x2, y2)`` in pixels on pixel edges (a shape covering columns ``a..b``
    has ``x1 = a``, ``x2 = b + 1``), the tight box of the painted pixels.

    The known answer:

    - ``expected_iou`` and ``expected_label_accuracy``: what the threshold-and-box rule reaches on
      the validation split: in each strip, the tight box of the pixels whose own intensity says
      "shape", and the label most of them have. At the default noise (0.1, a tenth of the
      contrast between background and shape) a stray pixel is a one-in-a-million event and
      the rule is essentially exact: a working detector gets close to 1.0 on both.
    - ``chance_iou``: the IoU of always predicting each slot's average training box;
      ``chance_label_accuracy`` is 0.5. A network that stays near these has not learned where
      the shapes are.

    Args:
        image_size: side of the square images, in pixels.
        num_objects: shapes per image (``K``).
        min_radius, max_radius: half-size of the shapes in pixels (a shape is ``2r+1`` wide).
        noise_std: standard deviation of the pixel noise; the classes' intensities are 1 apart.
        n_train, n_val, n_test, batch_size, seed: see :class:`SyntheticDataModule`.

    Example::

        dm = ShapesDetection(image_size=32, num_objects=2)
        image, target = next(iter(dm.train_dataloader()))
        target["boxes"].shape   # (32, 2, 4)
    """

    num_classes = 3
    class_names = functional.SHAPE_NAMES

    def __init__(
        self,
        image_size: int = 32,
        num_objects: int = 1,
        min_radius: int = 2,
        max_radius: int = 6,
        noise_std: float = 0.1,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)
        self.image_size = _check_int("image_size", image_size, 3)
        self.num_objects = _check_int("num_objects", num_objects, 1)
        strip = self.image_size // self.num_objects
        self.min_radius, self.max_radius = _check_radii(
            min_radius, max_radius, strip, f"each of the {self.num_objects} strips"
        )
        self.noise_std = _check_float("noise_std", noise_std, 0.0)
        self.input_shape = (1, self.image_size, self.image_size)

    def _sample(self, n: int, generator: torch.Generator) -> _DetectionSet:
        size, k = self.image_size, self.num_objects
        strip = size // k
        columns = torch.tensor([[j * strip, (j + 1) * strip] for j in range(k)])
        kinds, centers, radii = functional.draw_shapes(n, size, columns, self.min_radius, self.max_radius, generator)
        masks = functional.render_shapes(kinds, centers, radii, size)
        images = functional.shapes_image(masks, self.noise_std, generator)
        return _DetectionSet(images, functional.shape_boxes(centers, radii), kinds, masks)

    @staticmethod
    def as_target_list(target: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A batch's stacked target as torchvision's detection models take it: one dict per image."""
        return [{"boxes": b, "labels": lab} for b, lab in zip(target["boxes"], target["labels"], strict=True)]

    def _reference(self) -> dict[str, Any]:
        val: _DetectionSet = self.val_set  # type: ignore[assignment]
        train: _DetectionSet = self.train_set  # type: ignore[assignment]
        frequencies = functional.class_frequencies(train.masks, self.num_classes)
        boxes, labels = functional.threshold_box_rule(val.images, self.num_objects, self.noise_std, frequencies)
        return {"boxes": boxes, "labels": labels}

    @property
    def expected_iou(self) -> float:
        """Mean box IoU of the threshold-and-box rule on the validation split."""
        val: _DetectionSet = self.val_set  # type: ignore[assignment]
        return float(functional.box_iou(self._reference()["boxes"], val.boxes).mean())

    @property
    def expected_label_accuracy(self) -> float:
        """Label accuracy of the threshold-and-box rule on the validation split."""
        val: _DetectionSet = self.val_set  # type: ignore[assignment]
        return float((self._reference()["labels"] == val.labels).float().mean())

    @property
    def chance_iou(self) -> float:
        """Mean box IoU, on the validation split, of predicting each slot's average training box."""
        train: _DetectionSet = self.train_set  # type: ignore[assignment]
        val: _DetectionSet = self.val_set  # type: ignore[assignment]
        return float(functional.box_iou(train.boxes.mean(0).expand_as(val.boxes), val.boxes).mean())

    @property
    def chance_label_accuracy(self) -> float:
        return 0.5

    def expectations(self) -> dict[str, float]:
        return {
            "expected_iou": self.expected_iou,
            "expected_label_accuracy": self.expected_label_accuracy,
            "chance_iou": self.chance_iou,
            "chance_label_accuracy": self.chance_label_accuracy,
        }

    def _summary(self) -> str:
        s, k = self.image_size, self.num_objects
        return (
            f"{k} square/disc per {s}x{s} image, one per vertical strip, pixel noise {self.noise_std:g}; "
            f"image float32 (B, 1, {s}, {s}), target {{'boxes': float32 (B, {k}, 4) as x1, y1, x2, y2, "
            f"'labels': int64 (B, {k}) with 1 square, 2 disc}}"
        )
