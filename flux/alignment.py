"""What a model did to the whole frame, besides the edit: where it drew the photo (a shift and a
scale, ``Transform``) and what it did to its colours (``ColourMap``), each estimated robustly on
the area it did not edit.

Images here are float tensors (3, H, W) in 0-255 at the working resolution (the edit's output).
A point ``p`` of the photo (x, y in pixels) lies at ``transform.apply(p)`` in the output; the
output seen in the photo's geometry is ``warp(output, transform)``. The colour map takes the
photo's colours to the output's (``forward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# what a model may do to the frame and still be taken as drawing the same photo: a shift up to this
# share of each side, a scale within this much of 1 (both beyond what Kontext's outputs show)
MAX_SHIFT = 0.02
MAX_SCALE = 0.025
# the share of the frame that must agree with the photo once aligned (the rest may be the edit), and
# how closely: luminance levels at a quarter of the working size
MIN_AGREEING = 0.5
AGREE_WITHIN = 10.0
# below this displacement anywhere in the frame (pixels) the transform is the identity: no resampling
IDENTITY_BELOW = 0.05
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Transform:
    """Output position = centre + scale * (photo position - centre) + shift, per axis (x, y), in
    pixels of the working resolution."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == Transform()

    def largest_displacement(self, width: int, height: int) -> float:
        """The farthest any pixel of a width x height frame moves (at a corner)."""
        dx = abs(self.shift_x) + abs(self.scale_x - 1) * (width - 1) / 2
        dy = abs(self.shift_y) + abs(self.scale_y - 1) * (height - 1) / 2
        return math.hypot(dx, dy)

    def within_bounds(self, width: int, height: int) -> bool:
        return (
            abs(self.shift_x) <= MAX_SHIFT * width
            and abs(self.shift_y) <= MAX_SHIFT * height
            and abs(self.scale_x - 1) <= MAX_SCALE
            and abs(self.scale_y - 1) <= MAX_SCALE
        )

    def scaled(self, factor_x: float, factor_y: float) -> Transform:
        """The same transform in a frame ``factor`` times as large (shifts scale, scales do not)."""
        return Transform(self.scale_x, self.scale_y, self.shift_x * factor_x, self.shift_y * factor_y)


def _grid(transform: Transform, width: int, height: int, out_width: int, out_height: int) -> torch.Tensor:
    """grid_sample's grid (1, H, W, 2) that reads, at each photo pixel of a width x height frame,
    the output (out_width x out_height) where the transform puts it."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    xs = cx + transform.scale_x * (torch.arange(width, dtype=torch.float32) - cx) + transform.shift_x
    ys = cy + transform.scale_y * (torch.arange(height, dtype=torch.float32) - cy) + transform.shift_y
    gx = (2 * xs + 1) / out_width - 1  # align_corners=False: pixel centres at (2i + 1) / n - 1
    gy = (2 * ys + 1) / out_height - 1
    return torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]


def warp(output: torch.Tensor, transform: Transform, mode: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """(the output seen in the photo's geometry, a (H, W) mask of where it has picture): each photo
    pixel reads the output where the transform put it; beyond the output's frame, its nearest edge."""
    _, height, width = output.shape
    if transform.is_identity:
        return output, torch.ones(height, width, dtype=torch.bool)
    grid = _grid(transform, width, height, width, height)
    moved = F.grid_sample(output[None], grid, mode=mode, padding_mode="border", align_corners=False)[0]
    inside = (grid[0].abs() <= 1).all(dim=-1)
    return moved.clamp(0, 255), inside


# --- pyramids ------------------------------------------------------------------------------------

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def reduce(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) blurred by a 5-tap binomial filter and halved (odd sides round up)."""
    channels = x.shape[0]
    taps = _BINOMIAL.to(x.dtype)
    x = F.pad(x[None], (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, 5).expand(channels, 1, 1, 5), groups=channels, stride=(1, 2))
    return F.conv2d(x, taps.view(1, 1, 5, 1).expand(channels, 1, 5, 1), groups=channels, stride=(2, 1))[0]


def pyramid(x: torch.Tensor, smallest_side: int) -> list[torch.Tensor]:
    """[x, x halved, ...] while the shorter side stays at least ``smallest_side``."""
    levels = [x]
    while min(levels[-1].shape[1:]) // 2 >= smallest_side:
        levels.append(reduce(levels[-1]))
    return levels


def luminance(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor(LUMA, dtype=x.dtype).view(3, 1, 1)).sum(dim=0, keepdim=True)


# --- robust statistics ---------------------------------------------------------------------------


def robust_scale(values: torch.Tensor) -> float:
    """The standard deviation a normal distribution would have with this median absolute deviation."""
    values = values.flatten()
    if values.numel() == 0:
        return 0.0
    values = values[:: max(1, values.numel() // 20000)]  # twenty thousand tell the median
    return 1.4826 * float((values - values.median()).abs().median())


def tukey_weights(residual: torch.Tensor, scale: float) -> torch.Tensor:
    """Tukey's biweight: 1 near zero, 0 beyond 4.685 scales (an outlier has no say)."""
    u = residual / max(4.685 * scale, 1e-6)
    return ((1 - u**2).clamp(min=0)) ** 2


# --- the transform -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    transform: Transform
    agreeing: float  # the share of the frame that agrees with the photo once aligned (AGREE_WITHIN)
    residual: float  # the robust scale of what is left, luminance levels


def _integer_search(reference: torch.Tensor, output: torch.Tensor, radius: int) -> tuple[int, int]:
    """The whole-pixel shift within ``radius`` that matches best (a trimmed mean difference)."""
    _, height, width = output.shape
    best, best_score = (0, 0), math.inf
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            rows = (torch.arange(height) + dy).clamp(0, height - 1)
            columns = (torch.arange(width) + dx).clamp(0, width - 1)
            difference = (output[:, rows][:, :, columns] - reference).abs().flatten()
            kept = difference.kthvalue(max(1, int(0.6 * difference.numel()))).values
            score = float(difference[difference <= kept].mean()) * (1 + 0.01 * (abs(dx) + abs(dy)))
            if score < best_score:
                best, best_score = (dx, dy), score
    return best


def _gauss_newton(
    reference: torch.Tensor, output: torch.Tensor, transform: Transform, iterations: int, stride: int
) -> tuple[Transform, float]:
    """Refine ``transform`` on one pyramid level (luminance images (1, H, W)) by robust Gauss-Newton
    over (scale_x, scale_y, shift_x, shift_y, gain, bias): output(T(p)) ~ gain * reference(p) + bias.
    Compared on every ``stride``-th pixel. Returns the transform and the residual's robust scale."""
    _, height, width = output.shape
    gy_img, gx_img = torch.gradient(output[0])
    stack = torch.stack([output[0], gx_img, gy_img])[None]
    ys = torch.arange(0, height, stride, dtype=torch.float32)
    xs = torch.arange(0, width, stride, dtype=torch.float32)
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = (width - 1) / 2, (height - 1) / 2
    ref = reference[0][::stride, ::stride].flatten()
    ux, uy = (px - cx).flatten(), (py - cy).flatten()
    theta = torch.tensor([transform.scale_x, transform.scale_y, transform.shift_x, transform.shift_y, 1.0, 0.0],
                         dtype=torch.float64)  # fmt: skip
    scale = 0.0
    for iteration in range(iterations):
        qx = cx + float(theta[0]) * ux + float(theta[2])
        qy = cy + float(theta[1]) * uy + float(theta[3])
        grid = torch.stack([(2 * qx + 1) / width - 1, (2 * qy + 1) / height - 1], dim=-1).view(1, 1, -1, 2)
        sampled = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
        value, gx, gy = sampled
        inside = (qx >= 0) & (qx <= width - 1) & (qy >= 0) & (qy <= height - 1)
        residual = value - (float(theta[4]) * ref + float(theta[5]))
        scale = max(robust_scale(residual[inside]), 0.5)
        weights = tukey_weights(residual, scale) * inside
        jacobian = torch.stack([gx * ux, gy * uy, gx, gy, -ref, -torch.ones_like(ref)], dim=1).double()
        weighted = jacobian * weights.double()[:, None]
        normal = weighted.T @ jacobian + 1e-6 * torch.eye(6, dtype=torch.float64)
        step = torch.linalg.solve(normal, -(weighted.T @ residual.double()))
        theta = theta + step
        if iteration and float(step[2:4].abs().max()) < 0.01 and float(step[:2].abs().max()) < 1e-5:
            break
    found = Transform(float(theta[0]), float(theta[1]), float(theta[2]), float(theta[3]))
    return found, scale


def _agreement(reference: torch.Tensor, output: torch.Tensor, transform: Transform) -> tuple[float, float]:
    """How well a transform explains the frame (luminance images (1, H, W)), once the output is
    brought into the photo's geometry and a robust gain and offset taken out: (the share within
    AGREE_WITHIN levels, the mean difference over the best-matching three quarters)."""
    moved, inside = warp(output, transform, mode="bilinear")
    photo, seen = reference[0][inside].double(), moved[0][inside].double()
    design = torch.stack([photo, torch.ones_like(photo)], dim=1)
    gain, bias = 1.0, 0.0  # from the identity: the part that agrees is weighted in from the start
    for _ in range(4):
        residual = (seen - gain * photo - bias).float()
        weights = tukey_weights(residual, max(robust_scale(residual), 1.0)).double()
        gain, bias = torch.linalg.lstsq(design * weights[:, None], seen * weights).solution.tolist()
    residual = (seen - gain * photo - bias).float().abs()
    kept = residual.kthvalue(max(1, int(0.75 * residual.numel()))).values
    return float((residual < AGREE_WITHIN).float().mean()), float(residual[residual <= kept].mean())


def align(reference: torch.Tensor, output: torch.Tensor) -> Alignment:
    """The transform that takes the photo (``reference``, at the output's size) to the output, found
    coarse to fine on luminance: a whole-pixel search on the coarsest level, then robust
    Gauss-Newton on each finer one (the edit, a minority of the frame, is weighted out). It is
    kept only where it explains the frame clearly better than none (a flat picture matches at any
    shift); how much of the frame it explains is measured at a quarter of the size, where redrawn
    texture has averaged out."""
    references = pyramid(luminance(reference), 24)
    outputs = pyramid(luminance(output), 24)
    coarsest = len(references) - 1
    dx, dy = _integer_search(references[-1], outputs[-1], 2)
    transform = Transform(shift_x=float(dx), shift_y=float(dy))
    scale = 0.0
    for level in range(coarsest, -1, -1):
        ref, out = references[level], outputs[level]
        stride = max(1, int(math.sqrt(ref.shape[1] * ref.shape[2] / 65536)))  # about 65,000 pixels compared
        transform, scale = _gauss_newton(ref, out, transform, 12 if level == coarsest else 4, stride)
        if level:
            transform = transform.scaled(2.0, 2.0)
    check = min(2, coarsest)
    agreeing, cost = _agreement(references[check], outputs[check], transform.scaled(2.0**-check, 2.0**-check))
    still, still_cost = _agreement(references[check], outputs[check], Transform())
    # taken only where it explains the frame clearly better than none: a lower cost, and no less of
    # the frame agreeing (on a frame of a few flat shapes, a transform can match part of the edit
    # itself and lower the cost while agreeing with less of the frame)
    explains = cost <= 0.9 * still_cost and agreeing >= still
    if not transform.within_bounds(output.shape[2], output.shape[1]) and still >= MIN_AGREEING:
        explains = False  # beyond what a model does, where the frame as it is agrees: a fit gone astray
    if transform.largest_displacement(output.shape[2], output.shape[1]) < IDENTITY_BELOW or not explains:
        return Alignment(Transform(), still, scale)
    return Alignment(transform, agreeing, scale)


# --- the colour map ------------------------------------------------------------------------------


def _features(colours: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, 3) colours in 0-1 and (N, 2) positions in -1..1 -> (N, 3, 13): for each output channel c,
    1, R, G, B, the six second-order products, c^3, x, y (channels mixed after a tone curve per
    channel, a saturation change, a colour offset that varies across the frame)."""
    n = colours.shape[0]
    r, g, b = colours.unbind(dim=1)
    shared = torch.stack([torch.ones(n), r, g, b, r * r, g * g, b * b, r * g, r * b, g * b], dim=1)
    return torch.cat([shared[:, None].expand(n, 3, 10), (colours**3)[:, :, None], positions[:, None].expand(n, 3, 2)],
                     dim=2)  # fmt: skip


@dataclass(frozen=True)
class ColourMap:
    """What the model did to the photo's colours: coefficients (3, 13) over ``_features``, and how
    far the map moves the photo's colours (mean RGB distance over the frame it was fitted on)."""

    coefficients: torch.Tensor
    change: float

    def forward(self, image: torch.Tensor, frame: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The photo's colours in the output's terms: of a whole frame (3, H, W, at any size), or of
        a crop of it at ``frame`` (top, left, the frame's height and width)."""
        return _apply(self.coefficients, image, frame or (0, 0, *image.shape[1:]))


def _apply(coefficients: torch.Tensor, image: torch.Tensor, frame: tuple[int, int, int, int],
           rows: int = 64) -> torch.Tensor:  # fmt: skip
    """The map applied to a (3, h, w) image lying at (top, left) of a frame of (height, width)
    pixels (positions are the frame's, -1 to 1), a band of rows at a time."""
    top, left, height, width = frame
    _, h, w = image.shape
    ys = (top + torch.arange(h, dtype=torch.float32)) / max(height - 1, 1) * 2 - 1
    xs = (left + torch.arange(w, dtype=torch.float32)) / max(width - 1, 1) * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    positions = torch.stack([x, y], dim=-1)
    out = torch.empty_like(image)
    for start in range(0, h, rows):
        band = image[:, start : start + rows]
        features = _features(band.permute(1, 2, 0).reshape(-1, 3) / 255, positions[start : start + rows].reshape(-1, 2))
        out[:, start : start + rows] = ((features * coefficients[None]).sum(dim=2) * 255).T.reshape(3, band.shape[1], w)
    return out


def _fit(
    source: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust least squares of target (N, 3) on _features(source), starting from the identity (what
    a model mostly does to colours), so that the edit is weighted out from the first step:
    (coefficients (3, 13), the last weights)."""
    features = _features(source / 255, positions).double()  # (N, 3, 13)
    goal = (target / 255).double()
    identity = torch.zeros(3, features.shape[2], dtype=torch.float64)
    identity[[0, 1, 2], [1, 2, 3]] = 1.0
    coefficients = identity.clone()
    for _ in range(iterations):
        residual = ((features * coefficients[None]).sum(dim=2) - goal).norm(dim=1).float() * 255
        # the scale of the distances themselves (not about their median): a frame the model moved
        # as a whole is all inliers, not all outliers
        weights = tukey_weights(residual, max(1.4826 * float(residual.median()), 0.5)).double()
        # held lightly to the identity: where the frame shows few colours (a flat scene), what it
        # does not determine stays as it was instead of taking any value
        ridge = (1e-4 * float(weights.sum()) + 1e-6) * torch.eye(features.shape[2], dtype=torch.float64)
        for c in range(3):
            a = features[:, c] * weights[:, None]
            coefficients[c] = torch.linalg.solve(a.T @ features[:, c] + ridge, a.T @ goal[:, c] + ridge @ identity[c])
    residual = ((features * coefficients[None]).sum(dim=2) - goal).norm(dim=1).float() * 255
    return coefficients.float(), tukey_weights(residual, max(1.4826 * float(residual.median()), 0.5))


def _samples(image: torch.Tensor, step: int) -> torch.Tensor:
    """(3, H, W) -> (3, H / step, W / step): the mean of each step x step block (texture a model
    redraws averages out), or a light blur where the image is too small to take blocks of."""
    return F.avg_pool2d(image[None], step)[0] if step > 1 else reduce_same(image)


# below this shorter side (pixels) a frame has too few colours for a colour mix and a tone curve to
# be told apart from the edit (recolouring one flat shape of three is itself a colour mapping): the
# map is an offset per channel, the median difference, at most SMALL_FRAME_OFFSET levels (what is
# left of a larger change is found as a region, and a change of most of the frame comes back whole)
SMALL_FRAME = 256
SMALL_FRAME_OFFSET = 16.0


def _offsets(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity map plus each channel's median difference (N, 3 samples, 0-255), held within
    SMALL_FRAME_OFFSET levels: (coefficients, weights)."""
    offset = (target - source).median(dim=0).values.double().clamp(-SMALL_FRAME_OFFSET, SMALL_FRAME_OFFSET)
    coefficients = torch.zeros(3, 13, dtype=torch.float64)
    coefficients[[0, 1, 2], [1, 2, 3]] = 1.0
    coefficients[:, 0] = offset / 255
    residual = (target - source - offset.float()).norm(dim=1)
    weights = tukey_weights(residual, max(1.4826 * float(residual.median()), 1.0))
    return coefficients, weights


def fit_colours(reference: torch.Tensor, output: torch.Tensor, valid: torch.Tensor, samples: int = 40000) -> ColourMap:
    """The colour map from the photo to the aligned output, fitted on about ``samples`` blocks of
    pixels, robustly (the edit is weighted out)."""
    _, height, width = output.shape
    step = max(1, int(math.sqrt(height * width / samples)))
    ref, out = _samples(reference, step), _samples(output, step)
    rows, columns = ref.shape[1:]
    keep = (-F.max_pool2d(-valid[None, None].float(), step)[0, 0] > 0 if step > 1 else valid).flatten()
    ys = (torch.arange(rows, dtype=torch.float32) * step + (step - 1) / 2) / max(height - 1, 1) * 2 - 1
    xs = (torch.arange(columns, dtype=torch.float32) * step + (step - 1) / 2) / max(width - 1, 1) * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    positions = torch.stack([x.flatten(), y.flatten()], dim=1)[keep]
    source, target = ref.flatten(1).T[keep], out.flatten(1).T[keep]
    if min(height, width) < SMALL_FRAME:
        coefficients, weights = _offsets(source, target)
    else:
        coefficients, weights = _fit(source, target, positions, 5)
    inliers = weights > 0.5
    if not inliers.any():
        return ColourMap(coefficients, math.inf)
    source, positions = source[inliers], positions[inliers]
    moved = (_features(source / 255, positions) * coefficients[None]).sum(dim=2) * 255
    return ColourMap(coefficients, float((moved - source).norm(dim=1).mean()))


def reduce_same(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) blurred by the 5-tap binomial filter, at the same size."""
    channels = x.shape[0]
    taps = _BINOMIAL.to(x.dtype)
    x = F.pad(x[None], (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, 5).expand(channels, 1, 1, 5), groups=channels)
    return F.conv2d(x, taps.view(1, 1, 5, 1).expand(channels, 1, 5, 1), groups=channels)[0]
