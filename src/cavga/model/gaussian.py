"""A per-position Gaussian of a feature map over normal images, and the Mahalanobis distance map it gives.

The deviation maps of cavga (the latent Gaussian of ``mu`` inside a CAVGA model, and the PaDiM-style baseline on
pretrained features) both ask the same question of every position p of a feature map: how far is this image's
feature vector f_p from the normal images' feature vectors at p, in the metric of their covariance?

    d_p(f) = sqrt((f_p - m_p)^T S_p^-1 (f_p - m_p))

with m_p and S_p the mean and covariance over the normal training images (Defard et al., PaDiM, 2020). With fewer
images than channels S_p is singular, so it is shrunk towards a multiple of the identity:
S_p + shrinkage * (trace(S_p) / C) * I. The amount is relative to the features' own scale, so the same default
serves features of any magnitude (PaDiM adds a fixed 0.01 I to features of unit scale).

The statistics are buffers: they are saved with the weights (safetensors) and travel into an exported graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from cavga.errors import ConfigError

DEFAULT_SHRINKAGE = 0.01


def latent_positions(mu: torch.Tensor) -> torch.Tensor:
    """mu as a feature map (B, C, h, w): the flattened latent (B, D) is one position with D channels."""
    return mu if mu.dim() == 4 else mu[:, :, None, None]


class PositionGaussian(nn.Module):
    """N(mean_p, cov_p) per position p of a (C, h, w) feature map; ``forward`` returns distances (B, 1, h, w)."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.channels, self.height, self.width = channels, height, width
        positions = height * width
        self.register_buffer("mean", torch.zeros(positions, channels))
        self.register_buffer("precision", torch.eye(channels).expand(positions, channels, channels).clone())
        self.register_buffer("n_images", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return int(self.n_images) > 1

    def _check(self, features: torch.Tensor) -> None:
        expected = (self.channels, self.height, self.width)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ConfigError(f"PositionGaussian expects features (B, {expected}), got {tuple(features.shape)}")

    @torch.no_grad()
    def fit(
        self, batches: Iterable[torch.Tensor], shrinkage: float = DEFAULT_SHRINKAGE, neighbourhood: int = 0
    ) -> PositionGaussian:
        """Fit the mean and the shrunk inverse covariance of every position from batches (B, C, h, w).

        ``neighbourhood`` r > 0 fits position p on the feature vectors of every position within r cells of p
        (a (2r + 1)^2 window, edges replicated) of every image: a part that sits a cell off in another image
        still counts as normal there, and each Gaussian rests on (2r + 1)^2 times more vectors."""
        if shrinkage <= 0:
            raise ConfigError(f"shrinkage must be positive, got {shrinkage}")
        if neighbourhood < 0:
            raise ConfigError(f"neighbourhood must be >= 0 cells, got {neighbourhood}")
        total = outer = None
        n = images = 0
        for features in batches:
            self._check(features)
            images += features.shape[0]
            for f in _window(features.detach().to(torch.float64), neighbourhood):  # float64: sums of squares cancel
                f = f.flatten(2)  # (B, C, P)
                s, o = f.sum(0), torch.einsum("bcp,bdp->pcd", f, f)
                total, outer = (s, o) if total is None else (total + s, outer + o)
                n += f.shape[0]
        if images < 2:
            raise ConfigError(f"a per-position Gaussian needs at least 2 normal images, got {images}")
        mean = (total / n).T  # (P, C)
        cov = (outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # trace / C per position
        eye = torch.eye(self.channels, dtype=torch.float64, device=cov.device)
        cov = cov + shrinkage * scale[:, None, None] * eye
        self.mean.copy_(mean.to(self.mean))
        # Cholesky, not a batched LU: the covariance is symmetric positive definite after shrinkage (and MKL's
        # batched float64 LU fails on large batches).
        self.precision.copy_(torch.cholesky_inverse(torch.linalg.cholesky(cov)).to(self.precision))
        self.n_images.fill_(images)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every position's feature vector: (B, 1, h, w), >= 0."""
        self._check(features)
        d = features.flatten(2).transpose(1, 2) - self.mean  # (B, P, C)
        q = torch.einsum("bpc,pcd,bpd->bp", d, self.precision, d)
        return q.clamp_min(0.0).sqrt().view(-1, 1, self.height, self.width)


def _window(features: torch.Tensor, radius: int) -> Iterable[torch.Tensor]:
    """``features`` (B, C, h, w) shifted by every offset of a (2 radius + 1)^2 window, edges replicated."""
    if radius == 0 or features.shape[-2:] == (1, 1):  # a single position is its own whole window
        yield features
        return
    h, w = features.shape[-2:]
    padded = torch.nn.functional.pad(features, (radius,) * 4, mode="replicate")
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            yield padded[..., dy : dy + h, dx : dx + w]


def cross_fitted_scores(
    features: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    folds: int,
    shrinkage: float = DEFAULT_SHRINKAGE,
    batch_size: int = 32,
    neighbourhood: int = 0,
) -> torch.Tensor:
    """Out-of-fold image scores of normal images (N, C, h, w): image i is scored, ``score(distances)`` (B, 1, h, w)
    -> (B,), by the Gaussian fitted on the images of the other ``folds - 1`` folds (fold = i mod ``folds``).

    Scores of images a Gaussian has seen are biased low (it was fitted to them); these are not, and every normal
    training image contributes one, so a threshold taken from them rests on many more images than a small
    held-out slice (README, "What works and what does not")."""
    n = features.shape[0]
    if folds < 2 or n < 2 * folds:
        raise ConfigError(f"cross-fitting over {folds} folds needs at least {2 * max(folds, 2)} images, got {n}")
    fold = torch.arange(n) % folds
    out = torch.empty(n, dtype=torch.float64)
    for k in range(folds):
        held, kept = (fold == k).nonzero()[:, 0], (fold != k).nonzero()[:, 0]
        gaussian = PositionGaussian(*features.shape[1:]).to(features.device)
        batches = (features[kept[i : i + batch_size]] for i in range(0, len(kept), batch_size))
        gaussian.fit(batches, shrinkage, neighbourhood)
        for i in range(0, len(held), batch_size):
            idx = held[i : i + batch_size]
            out[idx] = score(gaussian(features[idx])).detach().double().cpu()
    return out


DEVIATION_TOP_FRACTION = 0.02  # the deviation classifier's image logit: mean of its top 2 % position logits


class DeviationClassifier(nn.Module):
    """CAVGA_w beyond the paper: a logistic classifier of each latent position from its deviation from the normal
    Gaussian there, (mu_p - m_p, (mu_p - m_p)^2, d_p) (2 C + 1 inputs, standardized, then a 1 x 1 convolution),
    and an image logit from the mean of the top :data:`DEVIATION_TOP_FRACTION` positions (multiple-instance: an
    image is anomalous where some of it is). Fitted after the Gaussian on the training examples
    (:func:`cavga.engine.classifier.fit_deviation_classifier`); parameters and statistics are saved with the model.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.channels, self.height, self.width = channels, height, width
        inputs = 2 * channels + 1
        self.conv = nn.Conv2d(inputs, 1, 1)
        self.register_buffer("shift", torch.zeros(1, inputs, 1, 1))
        self.register_buffer("scale", torch.ones(1, inputs, 1, 1))
        self.register_buffer("n_examples", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return int(self.n_examples) > 0

    def inputs(self, mu: torch.Tensor, gaussian: PositionGaussian) -> torch.Tensor:
        """The raw per-position inputs (B, 2 C + 1, h, w) of a conv latent ``mu`` (B, C, h, w)."""
        mean = gaussian.mean.T.reshape(1, self.channels, self.height, self.width)
        d = mu - mean
        return torch.cat([d, d * d, gaussian(mu)], dim=1)

    def position_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-position anomalous logits (B, 1, h, w) of raw inputs."""
        return self.conv((inputs - self.shift) / self.scale)

    def forward(self, mu: torch.Tensor, gaussian: PositionGaussian) -> torch.Tensor:
        return self.position_logits(self.inputs(mu, gaussian))

    def memory_weight(self, inputs: torch.Tensor) -> torch.Tensor:
        """knn_classifier's weight of the memory's distance at each position (B, 1, h, w) of raw inputs: (1 + the
        anomalous probability) / 2, a deviation counted in full where a defect is seen and half where none is."""
        return (1.0 + torch.sigmoid(self.position_logits(inputs))) / 2.0


def top_mean_logit(position_logits: torch.Tensor, fraction: float = DEVIATION_TOP_FRACTION) -> torch.Tensor:
    """The image logit (B,) of per-position logits (B, 1, h, w): the mean of the largest ``fraction`` of them."""
    flat = position_logits.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)
