"""The procedural textures, objects and defects of the built-in demo data (:mod:`cavga.data.synthetic`).

Renderers draw from the random stream they are given only, so one seed gives one image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cavga.errors import ConfigError, DataError

# A defect must change the pixels under its mask by at least this much on average (0-1 scale),
# so that a person can see it; renderers retry with new parameters until it does.
MIN_VISIBLE_CHANGE = 0.08


# ---------------------------------------------------------------------------------------------------
# Clean images. Each renderer returns (image float (H, W, 3) in [0, 1], region where defects may go).
# Sizes are given at 128 px and scaled by n / 128 so every image size shows the same content.
# ---------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (periodic boundary)."""
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    # Filtering in the Fourier domain is periodic like mode="wrap" and much faster for wide kernels.
    transfer = np.exp(-2 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * transfer, s=(n, n))
    return field / (field.std() + 1e-12)


def _rotated_grid(n: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by ``angle_deg`` about the image centre: (across, along)."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2.0
    a = math.radians(angle_deg)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _render_weave(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain-weave fabric: warp and weft threads crossing over/under, fibre noise, uneven lighting."""
    s = n / 128.0
    u, v = _rotated_grid(n, rng.uniform(-3.0, 3.0))
    period = 8.0 * s * rng.uniform(0.96, 1.04)
    u = u / period + rng.uniform(0, 2)
    v = v / period + rng.uniform(0, 2)
    fu, fv = u % 1.0, v % 1.0
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    # Each thread is a rounded ridge across its width that dips where it passes under the other thread.
    warp_h = np.sin(np.pi * fu) * (0.55 + 0.45 * np.sin(np.pi * fv))
    weft_h = np.sin(np.pi * fv) * (0.55 + 0.45 * np.sin(np.pi * fu))
    height = np.where(warp_on_top, warp_h, weft_h)
    fibre = np.where(
        warp_on_top,
        _smooth_noise(rng, n, (2.5 * s, 0.5 * s)),  # fibres run along the (vertical) warp
        _smooth_noise(rng, n, (0.5 * s, 2.5 * s)),
    )
    shade = (0.30 + 0.70 * height**0.7) * (1.0 + 0.10 * fibre)
    shade *= 1.0 + 0.06 * _smooth_noise(rng, n, 30 * s) + rng.uniform(-0.05, 0.05)
    tint = rng.uniform(-0.02, 0.02, size=3)
    warp_colour = np.array([0.50, 0.56, 0.66]) + tint
    weft_colour = np.array([0.60, 0.62, 0.66]) + tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    image = colour * shade[..., None] + 0.012 * rng.standard_normal((n, n, 3))
    return np.clip(image, 0, 1), _border_region(n, 6 * s)


def _render_wood(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Planed wood: warped growth rings (sharp dark latewood lines), long fibres, colour variation."""
    s = n / 128.0
    u, v = _rotated_grid(n, rng.uniform(-4.0, 4.0))
    # Gentle, mostly straight grain: a slow bend along the board plus a little local wobble.
    warp = 2.5 * s * _smooth_noise(rng, n, 30 * s) + 0.8 * s * _smooth_noise(rng, n, (10 * s, 4 * s))
    warp += rng.uniform(3, 8) * s * np.sin(2 * np.pi * v / (220 * s) + rng.uniform(0, 2 * np.pi))
    period = 12.0 * s * rng.uniform(0.9, 1.1)
    phase = 2 * np.pi * (u + warp) / period + rng.uniform(0, 2 * np.pi)
    rings = (0.5 + 0.5 * np.sin(phase)) ** 4  # narrow dark latewood band per period
    fibre = _smooth_noise(rng, n, (7 * s, 0.45 * s))
    blotch = _smooth_noise(rng, n, 25 * s)
    darkness = np.clip(0.55 * rings + 0.10 * fibre + 0.10 * blotch + 0.25, 0, 1)
    light = np.array([0.84, 0.64, 0.42]) + rng.uniform(-0.03, 0.03, size=3)
    dark = np.array([0.52, 0.32, 0.17])
    image = light * (1 - darkness[..., None]) + dark * darkness[..., None]
    image *= 1.0 + rng.uniform(-0.05, 0.05) + 0.03 * _smooth_noise(rng, n, 40 * s)[..., None]
    image += 0.01 * rng.standard_normal((n, n, 3))
    return np.clip(image, 0, 1), _border_region(n, 6 * s)


def _render_pill(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A shaded white capsule tablet with red speckles, centred on a dark matte background."""
    s = n / 128.0
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    cx = (n - 1) / 2 + rng.uniform(-3, 3) * s
    cy = (n - 1) / 2 + rng.uniform(-3, 3) * s
    angle = math.radians(rng.uniform(-6, 6))
    half_len = 24.0 * s * rng.uniform(0.97, 1.03)
    radius = 20.0 * s * rng.uniform(0.97, 1.03)
    a = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)  # along the pill
    b = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)  # across
    ea = np.sign(a) * np.maximum(np.abs(a) - half_len, 0)  # offset from the pill's central segment
    dist = np.hypot(ea, b)
    coverage = np.clip(radius - dist + 0.5, 0, 1)  # anti-aliased edge
    # Surface normal of a cylinder with hemispherical caps, flattened a little (tablets are not round).
    nx = (ea * math.cos(angle) - b * math.sin(angle)) / radius
    ny = (ea * math.sin(angle) + b * math.cos(angle)) / radius
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0, 1)) * 1.6
    norm = np.sqrt(nx**2 + ny**2 + nz**2) + 1e-9
    light = np.array([rng.uniform(-0.5, -0.3), rng.uniform(-0.6, -0.4), 1.0])
    light /= np.linalg.norm(light)
    half = light + np.array([0, 0, 1.0])
    half /= np.linalg.norm(half)
    diffuse = np.clip((nx * light[0] + ny * light[1] + nz * light[2]) / norm, 0, 1)
    specular = np.clip((nx * half[0] + ny * half[1] + nz * half[2]) / norm, 0, 1) ** 40
    base = np.array([0.93, 0.91, 0.86]) + rng.uniform(-0.02, 0.02, size=3)
    surface = np.ones((n, n, 3)) * base
    # Red speckles, like MVTec's pill: small soft discs scattered over the tablet.
    inside = np.argwhere(dist < radius - 3 * s)
    speckle_colour = np.array([0.78, 0.26, 0.20])
    for k in rng.integers(0, len(inside), size=int(rng.integers(35, 55))):
        py, px = inside[k] + rng.uniform(-0.5, 0.5, size=2)
        r = rng.uniform(0.6, 1.3) * s
        y0, y1 = int(py - r - 1), int(py + r + 3)  # a small window around the disc is enough
        x0, x1 = int(px - r - 1), int(px + r + 3)
        disc = np.clip(r + 0.5 - np.hypot(x[y0:y1, x0:x1] - px, y[y0:y1, x0:x1] - py), 0, 1)[..., None]
        surface[y0:y1, x0:x1] = surface[y0:y1, x0:x1] * (1 - disc) + speckle_colour * disc
    surface = surface * (0.45 + 0.55 * diffuse[..., None]) + 0.25 * specular[..., None]
    surface *= 1.0 + 0.015 * _smooth_noise(rng, n, 1.0 * s)[..., None]
    background = np.array([0.17, 0.18, 0.20]) * (1 + rng.uniform(-0.08, 0.08))
    vignette = 1.0 - 0.25 * (np.hypot(x - n / 2, y - n / 2) / n) ** 2
    shadow = ndimage.gaussian_filter(ndimage.shift(coverage, (3 * s, 2 * s), order=1), 4 * s)
    bg = background * (vignette * (1 - 0.5 * shadow))[..., None] + 0.008 * rng.standard_normal((n, n, 3))
    image = bg * (1 - coverage[..., None]) + surface * coverage[..., None]
    # Defects go on the tablet only, a little inside its outline.
    return np.clip(image, 0, 1), dist < radius - 2.5 * s


def _border_region(n: int, margin: float) -> np.ndarray:
    region = np.zeros((n, n), dtype=bool)
    m = int(round(margin))
    region[m : n - m, m : n - m] = True
    return region


RENDERERS = {"weave": _render_weave, "wood": _render_wood, "pill": _render_pill}


# ---------------------------------------------------------------------------------------------------
# Defects. Each returns (alpha (H, W) with 0 outside the defect and >= 0.5 inside, layer (H, W, 3)).
# ---------------------------------------------------------------------------------------------------


def add_defect(
    category: str,
    defect: str,
    clean: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    s = n / 128.0
    is_object = category == "pill"
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(20):
        if defect == "scratch":
            shape = _polyline_shape(rng, region, n, length=rng.uniform(*((28, 40) if is_object else (40, 64))) * s)
            if category == "pill":
                layer = clean * 0.35 + np.array([0.10, 0.08, 0.07])  # dark crack
            elif category == "wood" or rng.random() < 0.5:
                layer = clean + (np.array([0.98, 0.93, 0.84]) - clean) * 0.75  # pale scratch / pulled thread
            else:
                layer = clean * 0.30
            alpha = _soft_alpha(shape, ramp=1.5 * s)
        elif defect == "hole":
            shape = _blob_shape(rng, region, n, area_frac=rng.uniform(0.012, 0.045), jagged=0.10)
            # A hole shows the dark backing through the fabric; in wood it is a dark knot hole.
            inside = [0.05, 0.045, 0.04] if category == "weave" else [0.16, 0.09, 0.05]
            layer = np.array(inside) + 0.02 * rng.standard_normal((n, n, 1))
            rim = ndimage.binary_dilation(shape, iterations=max(1, int(round(2 * s)))) & ~shape
            shape = shape | rim  # a thin darkened, frayed rim around the hole belongs to the defect too
            alpha = _soft_alpha(shape, ramp=2 * s)
            alpha[rim] = 0.5
        elif defect in ("stain", "colour"):
            frac = rng.uniform(0.02, 0.07) if defect == "stain" else rng.uniform(0.015, 0.04)
            shape = _blob_shape(rng, region, n, area_frac=frac, jagged=0.0)
            tints = {
                "weave": [(0.62, 0.45, 0.28), (0.55, 0.62, 0.35)],  # coffee, grease-green
                "wood": [(0.45, 0.50, 0.52), (0.75, 0.45, 0.30)],  # grey water stain, reddish
                "pill": [(1.0, 0.78, 0.30), (0.55, 0.70, 1.0), (1.0, 0.55, 0.60)],  # yellow, blue, pink
            }[category]
            tint = np.array(tints[int(rng.integers(len(tints)))]) * rng.uniform(0.9, 1.05)
            layer = clean * tint
            alpha = _soft_alpha(shape, ramp=4 * s)
        elif defect == "spot":
            shape = _blob_shape(rng, region, n, area_frac=rng.uniform(0.006, 0.016), jagged=0.15)
            texture = 0.04 * _smooth_noise(rng, n, 1.0 * s)[..., None]
            layer = np.array([0.32, 0.22, 0.14]) * rng.uniform(0.7, 1.1) + texture
            alpha = _soft_alpha(shape, ramp=1.5 * s)
        elif defect == "cut":
            alpha, layer = _cut_paste(rng, category, region, n, small=is_object)
        else:
            raise ConfigError(f"unknown defect type {defect!r}")
        mask = alpha > 0
        if not mask.any():
            continue
        blended = clean * (1 - alpha[..., None]) + layer * alpha[..., None]
        change = float(np.abs(blended - clean)[mask].mean())
        if change >= MIN_VISIBLE_CHANGE:
            return alpha, layer
        if best is None or change > best[0]:
            best = (change, alpha, layer)
    if best is None:  # pragma: no cover - the region is never empty for the built-in renderers
        raise DataError(f"could not place a {defect} defect on a {category} image")
    return best[1], best[2]


def _soft_alpha(shape: np.ndarray, ramp: float) -> np.ndarray:
    """Blend weight 0.5 on the shape's edge rising to 1 inside; 0 outside, so the mask is exactly the shape."""
    depth = ndimage.distance_transform_edt(shape)
    return np.where(shape, 0.5 + 0.5 * np.clip((depth - 1) / max(ramp, 1e-6), 0, 1), 0.0)


def _pick_centre(rng: np.random.Generator, region: np.ndarray, clearance: float) -> tuple[float, float] | None:
    """A random point of ``region`` at least ``clearance`` px from its outside, or None."""
    inner = ndimage.distance_transform_edt(region) > clearance
    points = np.argwhere(inner)
    if len(points) == 0:
        return None
    y, x = points[rng.integers(len(points))]
    return float(y), float(x)


def _blob_shape(rng: np.random.Generator, region: np.ndarray, n: int, area_frac: float, jagged: float) -> np.ndarray:
    """An irregular star-convex blob of about ``area_frac`` of the image, inside ``region``."""
    radius = math.sqrt(area_frac * n * n / math.pi)
    lobes = 1.0 + sum(
        rng.uniform(0, 0.22 / k) * np.cos(k * np.linspace(0, 2 * np.pi, 361) + rng.uniform(0, 2 * np.pi))
        for k in range(2, 6)
    )
    if jagged > 0:
        lobes += jagged * np.convolve(rng.standard_normal(361 + 6), np.ones(7) / 7, mode="valid") * 0.8
    r_max = radius * float(lobes.max())
    centre = _pick_centre(rng, region, r_max)
    while centre is None and radius > 4:
        radius *= 0.8
        r_max = radius * float(lobes.max())
        centre = _pick_centre(rng, region, r_max)
    if centre is None:
        return np.zeros((n, n), dtype=bool)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    dy, dx = y - centre[0], x - centre[1]
    theta = np.degrees(np.arctan2(dy, dx)) % 360
    limit = radius * np.interp(theta, np.arange(361), lobes)
    return (np.hypot(dx, dy) <= limit) & region


def _polyline_shape(rng: np.random.Generator, region: np.ndarray, n: int, length: float) -> np.ndarray:
    """A smooth wandering line of the given length, 5-7 px wide at 128 px, fully inside ``region``."""
    s = n / 128.0
    width = max(3, int(round(rng.integers(5, 8) * s)))
    steps = 8
    for _ in range(40):
        start = _pick_centre(rng, region, width)
        if start is None:
            break
        headings = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.2, size=steps))
        xs = start[1] + np.concatenate([[0], np.cumsum(np.cos(headings))]) * length / steps
        ys = start[0] + np.concatenate([[0], np.cumsum(np.sin(headings))]) * length / steps
        points = list(zip(xs.tolist(), ys.tolist(), strict=True))
        canvas = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(canvas)
        draw.line(points, fill=255, width=width, joint="curve")
        r = width / 2
        for px, py in (points[0], points[-1]):
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
        shape = np.asarray(canvas) > 127
        if shape.any() and not (shape & ~region).any():
            return shape
    return np.zeros((n, n), dtype=bool)


def _cut_paste(
    rng: np.random.Generator, category: str, region: np.ndarray, n: int, small: bool
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a patch of another normal image, rotated and colour-jittered, pasted as a hard-edged rectangle."""
    s = n / 128.0
    lo, hi = (12, 18) if small else (16, 30)
    h, w = (int(round(rng.uniform(lo, hi) * s)) for _ in range(2))
    donor, donor_region = RENDERERS[category](rng, n)
    diag = int(math.ceil(math.hypot(h, w))) + 2
    src = _pick_centre(rng, donor_region, diag / 2)
    dst = _pick_rect(rng, region, h, w)
    if src is None or dst is None:
        return np.zeros((n, n)), np.zeros((n, n, 3))
    sy, sx = int(src[0]) - diag // 2, int(src[1]) - diag // 2
    crop = donor[sy : sy + diag, sx : sx + diag]
    angle = rng.uniform(30, 75) * rng.choice([-1, 1])
    rotated = ndimage.rotate(crop, angle, axes=(0, 1), reshape=False, order=1, mode="reflect")
    oy, ox = (diag - h) // 2, (diag - w) // 2
    patch = rotated[oy : oy + h, ox : ox + w]
    # Brightening a near-white tablet would saturate and hide the patch, so object patches get darker.
    sign = -1 if small else rng.choice([-1, 1])
    gain = 1.0 + sign * rng.uniform(0.15, 0.28) + rng.uniform(-0.04, 0.04, size=3)
    layer = np.zeros((n, n, 3))
    alpha = np.zeros((n, n))
    ty, tx = dst
    layer[ty : ty + h, tx : tx + w] = np.clip(patch * gain, 0, 1)
    alpha[ty : ty + h, tx : tx + w] = 1.0
    return alpha, layer


def _pick_rect(rng: np.random.Generator, region: np.ndarray, h: int, w: int) -> tuple[int, int] | None:
    """Top-left corner of a random h x w rectangle lying entirely in ``region``, or None."""
    table = np.pad(region.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inside = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]  # region count per window
    corners = np.argwhere(inside == h * w)
    if len(corners) == 0:
        return None
    y, x = corners[rng.integers(len(corners))]
    return int(y), int(x)
