"""Where the shapes land: per instruction, how many of the output's shapes sit in their place in the exact
target, in the target's colour. PSNR averages over the whole image; this counts the shapes an edit got
right (docs/quality.md, "What the numbers say")."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from flux.lab.evaluate import Method, closer_than_input, run_method
from flux.lab.scenes import CIRCLE_COLOURS, COLOUR_NAMES, EDITS, GEOMETRIC, PROMPTS, SQUARE_COLOURS, Scene, make_scene
from flux.loading import Components

# a shape is right when the output's mean colour over the shape's place in the target is within this RGB
# distance of the target's colour there
RIGHT_DISTANCE = 60.0
PALETTES = {"circle": CIRCLE_COLOURS, "square": SQUARE_COLOURS}


def shapes_right(output: np.ndarray, scene: Scene, prompt: str) -> dict[str, bool]:
    """For the circle and the square: whether ``output`` shows it in its place in the exact target, in the
    target's colour."""
    target = EDITS[prompt](scene).astype(float)
    move = GEOMETRIC.get(prompt, lambda array: array)
    right = {}
    for shape in PALETTES:
        place = move(getattr(scene, shape))
        distance = np.linalg.norm(output[place].astype(float).mean(0) - target[place].mean(0))
        right[shape] = bool(distance <= RIGHT_DISTANCE)
    return right


def _none_output(c: Components, scene: Scene, prompt: str, seed: int) -> np.ndarray:
    return run_method(c, Image.fromarray(scene.image), prompt, seed, Method("none", "none"))[0]


def count_shapes(c: Components, scenes: int = 20, seed: int = 4321, log: Callable[[str], None] = print) -> list[dict]:
    """Per instruction, over ``scenes`` fresh scenes edited at "none": shapes right and outputs closer to
    the target than the input."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in PROMPTS:
        row = {"instruction": prompt, "scenes": scenes, "circle": 0, "square": 0, "closer": 0}
        for index in range(scenes):
            scene = make_scene(rng)
            output = _none_output(c, scene, prompt, index)
            right = shapes_right(output, scene, prompt)
            row["circle"] += right["circle"]
            row["square"] += right["square"]
            row["closer"] += closer_than_input(output, scene.image, EDITS[prompt](scene))
        log(f"{prompt}: circle {row['circle']}/{scenes}, square {row['square']}/{scenes}")
        rows.append(row)
    return rows


def inversion_colours(c: Components, scenes: int = 30, seed: int = 98765) -> dict[str, dict[str, list[int]]]:
    """Inverted shapes right, by shape and input colour: ``{shape: {colour name: [right, seen]}}``."""
    counts = {shape: {COLOUR_NAMES[colour]: [0, 0] for colour in palette} for shape, palette in PALETTES.items()}
    rng = np.random.default_rng(seed)
    prompt = "invert the colours"
    for index in range(scenes):
        scene = make_scene(rng)
        right = shapes_right(_none_output(c, scene, prompt, index), scene, prompt)
        for shape in PALETTES:
            colour = tuple(int(v) for v in scene.image[getattr(scene, shape)][0])
            tally = counts[shape][COLOUR_NAMES[colour]]
            tally[0] += right[shape]
            tally[1] += 1
    return counts


def markdown(rows: list[dict], inversion: dict[str, dict[str, list[int]]] | None = None) -> str:
    lines = ["| instruction | circle right | square right | closer than the input |", "|---|---|---|---|"]
    for row in rows:
        n = row["scenes"]
        lines.append(
            f"| {row['instruction']} | {row['circle']} / {n} | {row['square']} / {n} | {row['closer']} / {n} |"
        )
    if inversion:
        lines.append("")
        for shape, colours in inversion.items():
            right, seen = (sum(tally[i] for tally in colours.values()) for i in (0, 1))
            detail = ", ".join(f"{name} {r} / {s}" for name, (r, s) in colours.items())
            lines.append(f"- inversion, {shape}s right: {right} / {seen} ({detail})")
    return "\n".join(lines)
