"""Procedural scenes (a circle and a square on a background) and edits whose exact result is computable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SIDE = 64
BACKGROUNDS = [(235, 225, 200), (200, 220, 235), (215, 235, 205), (60, 60, 70), (240, 240, 240), (120, 90, 70)]
# Circles are cool colours (green, cyan, purple) and squares warm ones (orange, yellow, pink). A token of
# the proxy's latent covers 16x16 pixels, a piece of a shape whose outline alone tells a circle from a
# square in 85% of tokens: with one palette per shape the colour tells them apart, and the recolours
# learn which shape to repaint within the training budget (docs/quality.md, eighth session).
CIRCLE_COLOURS = [(40, 170, 80), (30, 180, 200), (150, 60, 190)]
SQUARE_COLOURS = [(230, 160, 30), (240, 230, 60), (240, 120, 170)]
COLOUR_NAMES = dict(
    zip(CIRCLE_COLOURS + SQUARE_COLOURS, ("green", "cyan", "purple", "orange", "yellow", "pink"), strict=True)
)
RED = (220, 30, 30)
BLUE = (30, 60, 220)


@dataclass
class Scene:
    image: np.ndarray  # (SIDE, SIDE, 3) uint8
    circle: np.ndarray  # bool mask
    square: np.ndarray  # bool mask


def make_scene(rng: np.random.Generator, side: int = SIDE) -> Scene:
    image = np.empty((side, side, 3), np.uint8)
    image[:] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    y, x = np.mgrid[0:side, 0:side]
    while True:
        r = int(rng.integers(side // 9, side // 5))
        cx, cy = (int(v) for v in rng.integers(r + 1, side - r - 1, 2))
        s = int(rng.integers(side // 5, side // 3))
        sx, sy = (int(v) for v in rng.integers(1, side - s - 1, 2))
        circle = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        square = (x >= sx) & (x < sx + s) & (y >= sy) & (y < sy + s)
        if not (circle & square).any():
            break
    image[circle] = CIRCLE_COLOURS[rng.integers(len(CIRCLE_COLOURS))]
    image[square] = SQUARE_COLOURS[rng.integers(len(SQUARE_COLOURS))]
    return Scene(image, circle, square)


def _recolour(mask_name: str, colour: tuple[int, int, int]) -> Callable[[Scene], np.ndarray]:
    def apply(scene: Scene) -> np.ndarray:
        out = scene.image.copy()
        out[getattr(scene, mask_name)] = colour
        return out

    return apply


# the edits that move pixels, as functions of an (H, W, ...) array: they move the shapes' masks too
GEOMETRIC: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "flip the image horizontally": lambda a: a[:, ::-1].copy(),
    "flip the image vertically": lambda a: a[::-1].copy(),
    "rotate the image 90 degrees": lambda a: np.rot90(a).copy(),
}

EDITS: dict[str, Callable[[Scene], np.ndarray]] = {
    "flip the image horizontally": lambda s: GEOMETRIC["flip the image horizontally"](s.image),
    "flip the image vertically": lambda s: GEOMETRIC["flip the image vertically"](s.image),
    "invert the colours": lambda s: 255 - s.image,
    "rotate the image 90 degrees": lambda s: GEOMETRIC["rotate the image 90 degrees"](s.image),
    "make the circle red": _recolour("circle", RED),
    "make the square blue": _recolour("square", BLUE),
}
PROMPTS = list(EDITS)


def make_example(rng: np.random.Generator, prompt: str | None = None) -> tuple[np.ndarray, str, np.ndarray]:
    """(input image, instruction, exact target image)."""
    scene = make_scene(rng)
    prompt = prompt or PROMPTS[rng.integers(len(PROMPTS))]
    return scene.image, prompt, EDITS[prompt](scene)


def _black_background(scene: Scene) -> np.ndarray:
    out = scene.image.copy()
    out[~(scene.circle | scene.square)] = (0, 0, 0)
    return out


# An instruction the proxy was never trained on: a LoRA trained by flux.lab.train_lora teaches it.
LORA_EDITS: dict[str, Callable[[Scene], np.ndarray]] = {"make the background black": _black_background}
