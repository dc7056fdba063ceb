"""A memory of the normal images' latent vectors, and the nearest-neighbour distance map it gives.

The per-position Gaussian (:mod:`cavga.model.gaussian`) asks how far mu_p is from the normal vectors *at p*; on
surfaces that are not aligned from one image to the next (tiles, fabrics photographed anywhere) the right question
is how far mu_p is from the normal vectors *anywhere*. PatchCore (Roth et al., CVPR 2022) answers it with the
distance to the nearest vector of a memory of every normal patch, thinned to a coreset by greedy k-center
selection (each new member is the vector farthest from the members so far), so that rare normal patterns stay
in the memory where a random sample would drop them:

    d_p(f) = min_j || f_p - b_j ||

Beyond PatchCore's own neighbourhood (a 3 x 3 average of its backbone features), the memory may compare the mean
of a ``window`` x ``window`` block of latent positions around each position instead of the position alone
(stride 1, the window cut at the border and averaged over the positions it holds). A wider window sees a defect
that is a change of texture over a large region (Magnetic Tile's uneven grinding bands) rather than a small spot;
the window is applied to the normal vectors the memory is filled from and to every vector it is asked about.
With ``both_scales`` each vector holds the position's own mu beside its window's mean, the mean multiplied by a
weight fitted on the normal vectors so that both halves spread as much (the square root of the ratio of their total
variances): one nearest-neighbour search then sees a small spot (the position's half) and a large region (the
window's half), where a window alone blurs the spot into its surroundings. Two memories searched apart (the
position's and a window's, :func:`two_memory_distance`) give the larger of their distances, each in its own
normal unit.

The memory is a buffer of a fixed size: it is saved with the weights (safetensors) and travels into an exported
graph. With fewer normal vectors than its size the rest of it repeats them (a repeat changes no minimum).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cavga.errors import ConfigError

DEFAULT_MEMORY_SIZE = 16384
# Greedy selection reads every candidate once per member; beyond this many, a seeded random share of the normal
# vectors are the candidates (a 256 px category of 700 images has 700 000).
CANDIDATE_LIMIT = 262144
# greedy_coreset selects on a random projection of wider vectors to this many dimensions: 64, the fewest that kept
# every development set's figures within 0.005 of 128's (benchmarks/studies/coreset_study.py).
PROJECTION_DIM = 64
_CHUNK = 2048  # memory rows per distance block
# Query positions per distance block: a (_QUERY_BLOCK, _CHUNK) block of floats (8 MB) stays in the cache between its
# product, its mask and its minimum (3x faster than one block of a whole batch on a 2-core CPU, measured with 32
# images of 1024 positions against 8192 rows).
_QUERY_BLOCK = 1024


def greedy_coreset(vectors: torch.Tensor, size: int, seed: int = 0, projection: int = PROJECTION_DIM) -> torch.Tensor:
    """Indices (size,) of a greedy k-center coreset of ``vectors`` (N, C), N > size: a seeded first member, then
    each time the vector whose distance to its nearest member so far is largest.

    Where C exceeds ``projection`` (0: never) the distances are those of a seeded Gaussian random projection to
    ``projection`` dimensions (PatchCore's own trick, Johnson-Lindenstrauss: distances kept to a small factor),
    which makes the selection's one pass over the candidates per member cheaper; the rows kept are the originals.
    The candidates are held transposed (C, N): a row times a (C, N) matrix reads memory in order, several times
    faster on a CPU than the (N, C) matrix times a vector."""
    n = vectors.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if projection and vectors.shape[1] > projection:
        matrix = torch.randn(vectors.shape[1], projection, generator=generator) / projection**0.5
        vectors = vectors @ matrix.to(vectors)
    squared = vectors.pow(2).sum(1)
    columns = vectors.T.contiguous()
    nearest = torch.full((n,), float("inf"), dtype=vectors.dtype, device=vectors.device)
    chosen = torch.empty(size, dtype=torch.long)
    current = int(torch.randint(n, (1,), generator=generator))
    for i in range(size):
        chosen[i] = current
        distance = (vectors[current][None] @ columns)[0].mul_(-2.0).add_(squared).add_(squared[current])
        torch.minimum(nearest, distance, out=nearest)
        current = int(nearest.argmax())
    return chosen


def patch_features(levels: dict[int, torch.Tensor], pool: int = 1, grid: int | None = None) -> torch.Tensor:
    """Patch features of a trunk's maps ``levels`` (stride -> (B, C_s, h_s, w_s)), as PatchCore builds them: each
    map averaged over its ``pool`` x ``pool`` neighbourhood (PatchCore's 3) at its own resolution (the border
    averaged over the positions it holds), then brought onto the grid of stride ``grid`` (default: the middle
    stride; finer maps by averaging their blocks, coarser ones bilinearly) and concatenated, finest first:
    (B, sum of C_s, h, w)."""
    strides = sorted(levels)
    size = levels[strides[len(strides) // 2] if grid is None else grid].shape[-2:]
    parts = []
    for stride in strides:
        level = window_mean(levels[stride], pool)
        ratio = level.shape[-1] // size[-1]
        if ratio > 1:
            level = F.avg_pool2d(level, ratio)
        elif level.shape[-2:] != size:
            level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        parts.append(level)
    return torch.cat(parts, dim=1)


def window_mean(features: torch.Tensor, window: int) -> torch.Tensor:
    """The mean of each position's ``window`` x ``window`` block of ``features`` (B, C, h, w), same shape; at the
    border, the mean of the positions the block holds. ``window`` 1: the features themselves."""
    if window == 1:
        return features
    return F.avg_pool2d(features, window, stride=1, padding=window // 2, count_include_pad=False)


class LatentMemory(nn.Module):
    """``size`` normal feature vectors of ``channels``; ``forward`` gives each position's distance (B, 1, h, w) to
    the nearest of them. ``window`` (odd): each vector is the mean of that block of positions (:func:`window_mean`);
    ``both_scales``: the position's own vector beside it (2 x ``channels`` a row)."""

    def __init__(
        self, channels: int, size: int = DEFAULT_MEMORY_SIZE, window: int = 1, both_scales: bool = False
    ) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"memory_size must be positive, got {size}")
        if window < 1 or window % 2 == 0:
            raise ConfigError(f"memory_window must be a positive odd number of positions, got {window}")
        if both_scales and window == 1:
            raise ConfigError(
                "memory_both_scales needs a memory_window above 1 (the window's scale beside the position's)"
            )
        self.channels, self.size, self.window, self.both_scales = channels, size, window, both_scales
        self.register_buffer("bank", torch.zeros(size, channels * (2 if both_scales else 1)))
        # both_scales: the weight of the window's half, fitted with the bank (1 until then).
        self.register_buffer("window_weight", torch.ones(()))
        self.register_buffer("n_vectors", torch.zeros((), dtype=torch.long))  # distinct vectors held
        # The index of the normal image each row came from (in the order fit() read them): the calibration leaves
        # an image's own rows out when it scores that image (infer.left_out_memory_scores).
        self.register_buffer("owner", torch.full((size,), -1, dtype=torch.long))
        # The distance's normal unit where two memories are compared (:func:`two_memory_distance`; 1 until set).
        self.register_buffer("unit", torch.ones(()))

    @property
    def fitted(self) -> bool:
        return int(self.n_vectors) > 0

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ConfigError(f"LatentMemory expects features (B, {self.channels}, h, w), got {tuple(features.shape)}")

    def _vectors(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, P, C') vector of every position the memory compares: the window's mean, or with both_scales
        the position's vector and the window's mean times ``weight`` (the fitted window_weight by default)."""
        pooled = window_mean(features, self.window)
        if self.both_scales:
            w = self.window_weight if weight is None else weight
            pooled = torch.cat([features, pooled * w.to(pooled.dtype)], dim=1)
        return pooled.flatten(2).transpose(1, 2)

    @staticmethod
    def _spread(vectors: torch.Tensor) -> torch.Tensor:
        """Total variance of (N, C) vectors: the mean squared distance from their mean."""
        return (vectors - vectors.mean(0)).pow(2).sum(1).mean()

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], seed: int = 0, projection: int = PROJECTION_DIM) -> LatentMemory:
        """Fill the memory from batches (B, C, h, w) of normal images: every position's vector, thinned by
        :func:`greedy_coreset` (selecting on a random projection to ``projection`` dimensions) where there are
        more than ``size``. The selection runs on the features' device
        (a GPU's bandwidth makes its one pass over the candidates per member cheap); the indices are drawn on the
        CPU, so a seed selects the same rows on any device."""
        parts, owners, images = [], [], 0
        one = torch.ones(())
        for features in batches:
            self._check(features)
            b, positions = features.shape[0], features.shape[-2] * features.shape[-1]
            parts.append(self._vectors(features.detach(), one).reshape(b * positions, -1).float())
            owners.append(torch.arange(images, images + b).repeat_interleave(positions))
            images += b
        if not parts:
            raise ConfigError("the latent memory needs at least one normal image")
        vectors, owner = torch.cat(parts), torch.cat(owners)
        if self.both_scales:  # weight the window's half to spread as much as the position's
            c = self.channels
            weight = (self._spread(vectors[:, :c]) / self._spread(vectors[:, c:]).clamp_min(1e-12)).sqrt()
            vectors[:, c:] *= weight
            self.window_weight.fill_(float(weight))
        if vectors.shape[0] > CANDIDATE_LIMIT:
            generator = torch.Generator().manual_seed(seed)
            keep = torch.randperm(vectors.shape[0], generator=generator)[:CANDIDATE_LIMIT]
            vectors, owner = vectors[keep.to(vectors.device)], owner[keep]
        if vectors.shape[0] > self.size:
            keep = greedy_coreset(vectors, self.size, seed, projection)
            vectors, owner = vectors[keep.to(vectors.device)], owner[keep]
        held = vectors.shape[0]
        repeats = torch.arange(self.size) % held  # fewer vectors than rows: repeat them
        self.bank.copy_(vectors[repeats.to(vectors.device)].to(self.bank))
        self.owner.copy_(owner[repeats])
        self.n_vectors.fill_(held)
        return self

    def forward(self, features: torch.Tensor, leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """Euclidean distance of every position's vector to its nearest memory row: (B, 1, h, w), >= 0.
        ``leave_out`` (B,): for each image, the index of a normal image whose rows do not count (its own)."""
        self._check(features)
        b, _, h, w = features.shape
        f = self._vectors(features)  # (B, P, C')
        flat = f.reshape(-1, f.shape[-1])  # (B * P, C')
        bank_sq = self.bank.pow(2).sum(-1)  # ||b_j||^2, once for every block of queries
        if torch.jit.is_tracing() or torch.compiler.is_exporting():  # a symbolic batch: one block, no loop
            nearest = self._nearest_squared(flat, bank_sq, None)
        else:
            image = torch.arange(b, device=f.device).repeat_interleave(h * w) if leave_out is not None else None
            parts = [
                self._nearest_squared(
                    flat[start : start + _QUERY_BLOCK],
                    bank_sq,
                    None if image is None else leave_out[image[start : start + _QUERY_BLOCK]],
                )
                for start in range(0, flat.shape[0], _QUERY_BLOCK)
            ]
            nearest = torch.cat(parts)
        return (nearest + flat.pow(2).sum(-1)).clamp_min(0.0).sqrt().view(b, 1, h, w)

    def _nearest_squared(
        self, queries: torch.Tensor, bank_sq: torch.Tensor, leave_out: torch.Tensor | None
    ) -> torch.Tensor:
        """min_j (||b_j||^2 - 2 q . b_j) of each query row (Q, C'): its squared distance to the nearest memory row
        less ||q||^2 (added by the caller); ``bank_sq``: every row's ||b_j||^2. ``leave_out`` (Q,): the owner whose
        rows do not count for each query.
        One matrix product per block of memory rows writes the whole difference (addmm), so a (Q, chunk) block is
        written once and read twice (masked where asked, then its minimum)."""
        nearest = None
        for start in range(0, self.size, _CHUNK):
            rows = self.bank[start : start + _CHUNK]
            d = torch.addmm(bank_sq[start : start + _CHUNK][None, :], queries, rows.T, alpha=-2.0)  # (Q, chunk)
            if leave_out is not None:
                d.masked_fill_(self.owner[start : start + _CHUNK][None, :] == leave_out[:, None], float("inf"))
            block = d.amin(-1)
            nearest = block if nearest is None else torch.minimum(nearest, block)
        return nearest


def two_memory_distance(
    fine: LatentMemory, coarse: LatentMemory | None, features: torch.Tensor, leave_out: torch.Tensor | None = None
) -> torch.Tensor:
    """The latent_knn distance (B, 1, h, w): ``fine``'s alone, or with a ``coarse`` memory (a wider window,
    searched apart) the larger of the two distances, each divided by its memory's normal ``unit``. A spot stands
    out of the position's memory, a region of different texture out of the window's, and the units put the two on
    one scale: 1 is as far as a normal image's score reaches."""
    distance = fine(features, leave_out)
    if coarse is None:
        return distance
    return torch.maximum(distance / fine.unit, coarse(features, leave_out) / coarse.unit)
