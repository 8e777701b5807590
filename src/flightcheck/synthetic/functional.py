"""The pure core of :mod:`flightcheck.synthetic`: samplers, reference answers and metrics.

Every sampler takes an explicit ``torch.Generator`` and never draws from the global random
streams, so building a data set leaves the user's training reproducible. The reference
answers (the Bayes accuracy of Gaussian clusters, the mean IoU of a per-pixel rule) are
plain functions of the data's parameters, testable on their own.
"""

from __future__ import annotations

import math

import torch

#: class ids painted by :func:`render_shapes`; 0 is the background, as in torchvision.
BACKGROUND, SQUARE, DISC = 0, 1, 2
SHAPE_NAMES = ("background", "square", "disc")
#: pixel intensity of each class before noise: background sits 1 away from either shape,
#: so a pixel's own intensity tells its class up to the noise.
SHAPE_LEVELS = (0.0, 1.0, -1.0)


# ---------------------------------------------------------------------------- draws
def uniform_int(low: torch.Tensor | int, high: torch.Tensor | int, generator: torch.Generator) -> torch.Tensor:
    """An integer drawn uniformly from ``[low, high]`` (both included), elementwise over tensors.

    ``torch.randint`` takes only scalar bounds; here each element has its own.
    """
    low, high = torch.as_tensor(low), torch.as_tensor(high)
    shape = torch.broadcast_shapes(low.shape, high.shape)
    return low + (torch.rand(shape, generator=generator) * (high - low + 1)).floor().long()


# ---------------------------------------------------------------------------- labels
def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class ids in random order, each class ``n // num_classes`` or one more times.

    Exact balance makes the chance accuracy exactly ``1 / num_classes`` on every split.
    """
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def flip_labels(labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a fraction ``rate`` of labels by a uniformly drawn *different* class.

    No classifier can then beat ``1 - rate`` in expectation: the flipped labels carry no
    information about the input.
    """
    if rate <= 0:
        return labels
    flip = torch.rand(labels.shape, generator=generator) < rate
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(flip, (labels + shift) % num_classes, labels)


# ---------------------------------------------------------------------------- Gaussian clusters
def simplex_centers(num_classes: int, dim: int, separation: float, generator: torch.Generator) -> torch.Tensor:
    """``num_classes`` points in ``R^dim``, every pair exactly ``separation`` apart, randomly rotated.

    The corners of a regular simplex: the standard basis vectors of ``R^K`` (pairwise distance
    √2) centred and expressed in the ``K-1`` dimensional plane they span, then embedded in
    ``R^dim`` by a random orthonormal map. Needs ``dim >= num_classes - 1``.
    """
    k = num_classes
    corners = torch.eye(k, dtype=torch.float64) - 1.0 / k  # rows: centred basis vectors
    # an orthonormal basis of the plane orthogonal to (1, ..., 1): the first k-1 right singular vectors
    _, _, vh = torch.linalg.svd(corners)
    plane = corners @ vh[: k - 1].T  # (k, k-1), pairwise distances √2
    embed, _ = torch.linalg.qr(torch.randn(dim, k - 1, generator=generator, dtype=torch.float64))
    centers = plane @ embed.T * (separation / math.sqrt(2.0))
    return centers.to(torch.float32)


def simplex_bayes_accuracy(num_classes: int, separation: float) -> float:
    """Accuracy of the best possible classifier on equiprobable unit-variance Gaussian clusters
    whose centres are pairwise ``separation`` apart.

    Rotate the simplex so that centre ``k`` is ``a·e_k`` with ``a = separation/√2`` (an extra
    dimension along ``(1, ..., 1)`` carries no information). With equal priors and identity
    covariance the Bayes rule picks the largest coordinate, so it is right when
    ``a + z_y > z_k`` for every other ``k``::

        P(correct) = ∫ φ(z) Φ(z + a)^(K-1) dz

    For two classes this is ``Φ(separation / 2)``. The rule is linear in ``x``, so a linear
    classifier (logistic regression) can reach this accuracy, and nothing can beat it.
    """
    a = separation / math.sqrt(2.0)
    z = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    integrand = density * torch.special.ndtr(z + a) ** (num_classes - 1)
    return float(torch.trapezoid(integrand, z).clamp(0.0, 1.0))


# ---------------------------------------------------------------------------- shapes
def draw_shapes(
    n: int, image_size: int, columns: torch.Tensor, min_radius: int, max_radius: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random squares and discs wholly inside the image, one per slot.

    Args:
        n: images.
        image_size: side of the square images.
        columns: ``(S, 2)`` for each of the ``S`` slots, the ``[start, stop)`` columns its shape
            must lie in.
        min_radius, max_radius: half-size range (a shape is ``2r+1`` pixels wide).

    Returns:
        kinds ``(n, S)`` (``SQUARE`` or ``DISC``), integer centres ``(n, S, 2)`` as ``(row, col)``
        and radii ``(n, S)``.
    """
    slots = columns.shape[0]
    kinds = torch.randint(SQUARE, DISC + 1, (n, slots), generator=generator)
    radii = torch.randint(min_radius, max_radius + 1, (n, slots), generator=generator)
    rows = uniform_int(radii, image_size - 1 - radii, generator)
    cols = uniform_int(columns[:, 0] + radii, columns[:, 1] - 1 - radii, generator)
    return kinds, torch.stack([rows, cols], dim=-1), radii


def render_shapes(kinds: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, image_size: int) -> torch.Tensor:
    """Paint shapes into class-id maps.

    Args:
        kinds: ``(N, S)`` class ids per shape slot (``SQUARE``, ``DISC``; ``BACKGROUND`` leaves
            the slot empty). Later slots are painted over earlier ones.
        centers: ``(N, S, 2)`` integer pixel centres ``(row, col)``.
        radii: ``(N, S)`` integer half-sizes: a square covers ``2r+1`` pixels a side, a disc the
            pixels within ``r`` of its centre; both span exactly the same rows and columns.
        image_size: side of the square images.

    Returns:
        ``(N, image_size, image_size)`` int64 map of class ids.
    """
    n, slots = kinds.shape
    grid = torch.arange(image_size)
    rows = grid.view(1, image_size, 1)
    cols = grid.view(1, 1, image_size)
    out = torch.zeros(n, image_size, image_size, dtype=torch.int64)
    for s in range(slots):
        cy = centers[:, s, 0].view(n, 1, 1)
        cx = centers[:, s, 1].view(n, 1, 1)
        r = radii[:, s].view(n, 1, 1)
        dy, dx = rows - cy, cols - cx
        square = (dy.abs() <= r) & (dx.abs() <= r)
        disc = dy**2 + dx**2 <= r**2
        kind = kinds[:, s].view(n, 1, 1)
        inside = torch.where(kind == SQUARE, square, disc) & (kind != BACKGROUND)
        out = torch.where(inside, kind, out)
    return out


def shapes_image(label_map: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """``(N, 1, H, W)`` float images: each class's intensity (:data:`SHAPE_LEVELS`) plus Gaussian noise."""
    levels = torch.tensor(SHAPE_LEVELS)
    clean = levels[label_map]
    noise = torch.randn(clean.shape, generator=generator) * noise_std
    return (clean + noise).unsqueeze(1)


def per_pixel_rule(images: torch.Tensor, noise_std: float, priors: torch.Tensor) -> torch.Tensor:
    """The reference segmenter: each pixel's most probable class given its own intensity alone.

    With Gaussian noise around each class's level (:data:`SHAPE_LEVELS`) and the classes'
    pixel frequencies as priors, that is ``argmax_c log p_c - (x - level_c)² / (2 noise_std²)``:
    the threshold between background and a shape sits ``noise_std² · ln(p_background / p_shape)``
    beyond the midpoint, since background pixels are the commoner. No per-pixel classifier is
    right more often; anything better must look at neighbours.

    Args:
        images: ``(N, 1, H, W)`` images.
        noise_std: the pixel noise's standard deviation (0: the nearest level).
        priors: ``(3,)`` share of pixels of each class (see :func:`class_frequencies`).

    Returns:
        ``(N, H, W)`` class ids.
    """
    levels = torch.tensor(SHAPE_LEVELS).view(1, -1, 1, 1)
    distance = (images - levels) ** 2  # (N, 3, H, W)
    if noise_std == 0:
        return distance.argmin(1)
    log_prior = priors.clamp(min=1e-12).log().view(1, -1, 1, 1)
    return (log_prior - distance / (2 * noise_std**2)).argmax(1)


def class_frequencies(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of pixels of each class in ``label_map``."""
    counts = torch.bincount(label_map.reshape(-1), minlength=num_classes).double()
    return (counts / counts.sum()).float()


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of intersection over union, pooled over the whole set.

    Intersections and unions are summed over all images before dividing (as a
    ``torchmetrics`` ``MulticlassJaccardIndex(average="macro")`` accumulated over the set);
    a class absent from both prediction and target is left out of the mean.
    """
    pred, target = pred.reshape(-1), target.reshape(-1)
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum()
        if union > 0:
            ious.append((p & t).sum() / union)
    return float(torch.stack(ious).mean()) if ious else float("nan")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of paired boxes ``(..., 4)`` in ``(x1, y1, x2, y2)`` form."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def shape_boxes(centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Tight ``(x1, y1, x2, y2)`` boxes of rendered shapes, on pixel edges: a shape covering
    columns ``a..b`` has ``x1 = a`` and ``x2 = b + 1``."""
    cy, cx = centers[..., 0], centers[..., 1]
    return torch.stack([cx - radii, cy - radii, cx + radii + 1, cy + radii + 1], dim=-1).to(torch.float32)


def threshold_box_rule(
    images: torch.Tensor, num_objects: int, noise_std: float, priors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference detector for :class:`ShapesDetection`: in each of the ``num_objects``
    vertical strips, the tight box of the pixels :func:`per_pixel_rule` calls a shape, and the
    class most of them have. Returns ``(N, K, 4)`` boxes and ``(N, K)`` labels."""
    classes = per_pixel_rule(images, noise_std, priors)
    n, h, w = classes.shape
    strip = w // num_objects
    boxes = torch.zeros(n, num_objects, 4)
    labels = torch.full((n, num_objects), SQUARE, dtype=torch.int64)
    idx_r, idx_c = torch.arange(h), torch.arange(strip)
    big = torch.tensor(10**6)  # stands in for "no shape pixel here" in the min/max below
    for k in range(num_objects):
        part = classes[:, :, k * strip : (k + 1) * strip]
        fg = part != BACKGROUND
        any_row, any_col = fg.any(2), fg.any(1)
        y1 = torch.where(any_row, idx_r, big).min(1).values
        y2 = torch.where(any_row, idx_r, -big).max(1).values + 1
        x1 = torch.where(any_col, idx_c, big).min(1).values + k * strip
        x2 = torch.where(any_col, idx_c, -big).max(1).values + 1 + k * strip
        found = any_row.any(1)
        boxes[:, k] = torch.where(found.unsqueeze(1), torch.stack([x1, y1, x2, y2], 1), 0).float()
        discs = (part == DISC).flatten(1).sum(1)
        squares = (part == SQUARE).flatten(1).sum(1)
        labels[:, k] = torch.where(discs > squares, DISC, SQUARE)
    return boxes, labels


# ---------------------------------------------------------------------------- sequences
def place_tokens(
    counts: torch.Tensor,
    tokens: torch.Tensor,
    seq_len: int,
    filler_low: int,
    filler_high: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sequences holding ``counts[n, j]`` copies of ``tokens[j]``, the rest filler, shuffled.

    Args:
        counts: ``(N, J)`` how many copies of each signal token each sequence holds
            (row sums at most ``seq_len``).
        tokens: ``(J,)`` the signal token ids.
        filler_low, filler_high: filler ids are drawn uniformly from ``[filler_low, filler_high)``.

    Returns:
        ``(N, seq_len)`` int64 token ids.
    """
    n = counts.shape[0]
    out = torch.randint(filler_low, filler_high, (n, seq_len), generator=generator)
    ends = counts.cumsum(1)
    starts = ends - counts
    pos = torch.arange(seq_len).view(1, 1, seq_len)
    in_slot = (pos >= starts.unsqueeze(2)) & (pos < ends.unsqueeze(2))  # (N, J, L)
    for j in range(tokens.numel()):
        out = torch.where(in_slot[:, j], tokens[j], out)
    order = torch.rand(n, seq_len, generator=generator).argsort(dim=1)
    return out.gather(1, order)
