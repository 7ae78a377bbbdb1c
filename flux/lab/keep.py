"""What keep_unedited does, measured: on the trained proxy's local and global edits of upscaled
scenes (with the option and without), along a chain of edits, against synthetic outputs with what a
model does to untouched areas (noise at the VAE's level, a shift, a colour shift), and its time and
memory at 12 and 64 megapixels.

    python scripts/eval_keep_unedited.py --out docs            # quality (docs/quality.md)
    python scripts/eval_keep_unedited.py --cost                # seconds and memory (docs/benchmarks.md)
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux.composite import find_changes
from flux.config import Config
from flux.lab import photos
from flux.lab.scenes import EDITS, make_scene
from flux.pipeline import Model, load_model, run_edit
from flux.request import EditRequest
from flux.weights import PROXY_DIR

SIZES = ((640, 640), (1000, 750))
LOCAL = ("make the circle red", "make the square blue")
GLOBAL = (
    "flip the image horizontally",
    "flip the image vertically",
    "rotate the image 90 degrees",
    "invert the colours",
)
# the background beyond this share of the shorter side from the shapes is exactly the input's
MARGIN = 0.2
# the proxy VAE's reconstruction of held-out scenes (29.8 dB PSNR): the noise of an untouched area
VAE_NOISE = 255 / 10 ** (29.8 / 20)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    squared = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(squared[where].mean() if where is not None else squared.mean())
    return 100.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def upscaled(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.NEAREST))


def near(mask: np.ndarray, share: float) -> np.ndarray:
    """``mask`` widened by ``share`` of its shorter side (square neighbourhood)."""
    radius = max(1, int(share * min(mask.shape)))
    widened = torch.from_numpy(mask.astype(np.float32))[None, None]
    widened = F.max_pool2d(widened, (2 * radius + 1, 1), 1, (radius, 0))  # a square, one axis at a time
    widened = F.max_pool2d(widened, (1, 2 * radius + 1), 1, (0, radius))
    return widened[0, 0].numpy() > 0


def proxy_model() -> Model:
    return load_model(Config.from_env(WEIGHTS_DIR=str(PROXY_DIR)), with_safety=False)


def edit_both_ways(model: Model, image: np.ndarray, prompt: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(the plain edit resized to the input's size, the edit with keep_unedited, what it reported)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    request = EditRequest(prompt, buffer.getvalue(), seed=seed, check_safety=False)
    plain = run_edit(model, request).image.resize((image.shape[1], image.shape[0]), Image.Resampling.LANCZOS)
    kept = run_edit(model, EditRequest(prompt, buffer.getvalue(), seed=seed, check_safety=False, keep_unedited=True))
    return np.asarray(plain), np.asarray(kept.image), kept.report.keep_unedited


def local_and_global(model: Model, edits: int, seed: int, log: Callable[[str], None]) -> list[dict]:
    """Per size and instruction: PSNR to the exact target of the edited area (where the target
    differs from the input) and of the untouched area, with and without the option; the share of
    edits whose background beyond MARGIN from the shapes is exactly the input's; for the global
    edits, how often the whole edit came back and the PSNR difference to the plain edit."""
    rows = []
    rng = np.random.default_rng(seed)
    for size in SIZES:
        for prompt in LOCAL + GLOBAL:
            figures: dict[str, list[float]] = {}
            for index in range(edits):
                scene = make_scene(rng)
                image, target = upscaled(scene.image, size), upscaled(EDITS[prompt](scene), size)
                plain, kept, report = edit_both_ways(model, image, prompt, index)
                edited = (target != image).any(axis=2)
                shapes = scene.circle | scene.square
                background = ~near(upscaled(shapes.astype(np.uint8) * 255, size) > 0, MARGIN)
                for name, value in {
                    "changed_share": report["changed_share"],
                    "whole_edit": float(report["whole_edit"]),
                    "edited_psnr_plain": psnr(plain, target, edited),
                    "edited_psnr_kept": psnr(kept, target, edited),
                    "untouched_psnr_plain": psnr(plain, target, ~edited) if (~edited).any() else None,
                    "untouched_psnr_kept": psnr(kept, target, ~edited) if (~edited).any() else None,
                    "psnr_plain": psnr(plain, target),
                    "psnr_kept": psnr(kept, target),
                    "background_exact": float((kept[background] == image[background]).all()),
                }.items():
                    if value is not None:
                        figures.setdefault(name, []).append(value)
            rows.append({"size": list(size), "instruction": prompt, "edits": edits} |
                        {k: statistics.mean(v) for k, v in figures.items()})  # fmt: skip
            log(f"{size} {prompt}: {rows[-1]}")
    return rows


def chain(model: Model, steps: int = 5, chains: int = 4, seed: int = 7) -> list[dict]:
    """Chains of five local edits, each on the previous result (one instruction repeated, the
    circle's chains and the square's): the untouched background's PSNR to the first input after
    each step, with and without the option, and whether it stayed bit-identical with it."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in LOCAL:
        for _ in range(chains):
            scene = make_scene(rng)
            first = upscaled(scene.image, SIZES[0])
            background = ~near(upscaled((scene.circle | scene.square).astype(np.uint8) * 255, SIZES[0]) > 0, MARGIN)
            with_option, without = first, first
            for step in range(steps):
                without = edit_both_ways(model, without, prompt, step)[0]
                with_option = edit_both_ways(model, with_option, prompt, step)[1]
                rows.append({"step": step + 1, "psnr_without": psnr(without, first, background),
                             "psnr_with": psnr(with_option, first, background),
                             "identical_with": bool((with_option[background] == first[background]).all())})  # fmt: skip
    return [
        {"step": step, "untouched_psnr_without": statistics.mean(r["psnr_without"] for r in rows if r["step"] == step),
         "untouched_psnr_with": statistics.mean(r["psnr_with"] for r in rows if r["step"] == step),
         "identical_with": all(r["identical_with"] for r in rows if r["step"] == step),
         "chains": chains * len(LOCAL)}
        for step in range(1, steps + 1)
    ]  # fmt: skip


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photograph-like test picture: smooth gradients, soft shapes, fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    picture = np.stack([120 + 80 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in (0.0, 1.3, 2.6)], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.random(), rng.random() * height / width, 0.03 + 0.1 * rng.random()
        blob = np.exp(-((((x - cx) ** 2 + (y - cy) ** 2) / r**2) ** 2))
        picture += blob[..., None] * rng.uniform(-70, 70, 3)
    picture += rng.normal(0, 6, picture.shape)  # texture
    return np.clip(picture, 0, 255).astype(np.uint8)


def synthetic_case(picture: np.ndarray, disturbance: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(an edited output, the true edited region in the photo's geometry): a disk recoloured, then
    the disturbance applied to the whole frame."""
    rng = np.random.default_rng(seed)
    height, width = picture.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    r = min(width, height) * rng.uniform(0.08, 0.15)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    region = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    edited = picture.astype(np.float64)
    edited[region] = rng.uniform(0, 255, 3)
    if "noise" in disturbance:
        edited += rng.normal(0, VAE_NOISE, edited.shape)
    if "shift" in disturbance:
        dy, dx = int(rng.integers(1, 4)) * rng.choice([-1, 1]), int(rng.integers(1, 4)) * rng.choice([-1, 1])
        rows = np.clip(np.arange(height) - dy, 0, height - 1)
        columns = np.clip(np.arange(width) - dx, 0, width - 1)
        edited = edited[rows][:, columns]  # moved, the edge repeated
    if "colour" in disturbance:
        edited += rng.uniform(-8, 8, 3)
    return np.clip(edited, 0, 255).astype(np.uint8), region


DISTURBANCES = ("none", "noise", "shift", "colour", "noise+shift+colour")


def robustness(size: tuple[int, int] = (1024, 768), cases: int = 10) -> list[dict]:
    """For each disturbance: the found region (alpha above one half) against the true one (IoU), the
    share of the true region it covers, and the share of the frame outside the true region widened
    by a tenth of the shorter side that it wrongly takes from the edit."""
    rows = []
    for disturbance in DISTURBANCES:
        figures: dict[str, list[float]] = {}
        for case in range(cases):
            picture = photo(*size, seed=case)
            edited, region = synthetic_case(picture, disturbance, seed=100 + case)
            found = find_changes(picture, edited)
            alpha = np.ones(picture.shape[:2]) if found.whole_because else found.alpha.numpy()
            found = alpha > 0.5
            outside = ~near(region, 0.1)
            figures.setdefault("iou", []).append(float((found & region).sum() / (found | region).sum()))
            figures.setdefault("recall", []).append(float((found & region).sum() / region.sum()))
            figures.setdefault("outside_taken", []).append(float((alpha[outside] > 0).mean()))
        rows.append({"disturbance": disturbance, "cases": cases} | {k: statistics.mean(v) for k, v in figures.items()})
    return rows


def picture(model: Model, out: Path, seed: int = 21) -> Path:
    """The README's before/after: input, plain edit (resized), keep_unedited, and where the two differ
    from the input (white: changed)."""
    scene = make_scene(np.random.default_rng(seed))
    image = upscaled(scene.image, SIZES[0])
    plain, kept, _ = edit_both_ways(model, image, "make the circle red", 0)
    changed = [((np.abs(o.astype(int) - image).max(axis=2) > 0) * 255).astype(np.uint8) for o in (plain, kept)]
    tiles = [image, plain, kept] + [np.repeat(c[..., None], 3, axis=2) for c in changed]
    side = 240
    sheet = Image.new("RGB", (side * 5, side), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(tile).resize((side, side), Image.Resampling.LANCZOS), (i * side, 0))
    path = out / "keep-unedited.png"
    sheet.save(path)
    return path


def evaluate(edits: int = 10, log: Callable[[str], None] = print) -> dict:
    model = proxy_model()
    start = time.perf_counter()
    report = {"edits_per_row": edits, "margin": MARGIN, "rows": local_and_global(model, edits, 1234, log)}
    report["chain"] = chain(model)
    report["robustness"] = robustness()
    report["seconds"] = time.perf_counter() - start
    return report


# --- cost at full size ---------------------------------------------------------------------------

COST_CASE = """
import ctypes, gc, json, sys, time
import numpy as np
from PIL import Image
sys.path.insert(0, ROOT)
from flux.composite import keep_unedited
from flux.lab.keep import photo
from flux.lab.memory import PeakResident

width, height, share = WIDTH, HEIGHT, SHARE
# the photo at a quarter of its sides, upscaled: no full-size float arrays before the measurement
original = Image.fromarray(photo(width // 4, height // 4, seed=1)).resize((width, height), Image.Resampling.BICUBIC)
edited = np.asarray(original.resize((1184, 880) if width > height else (1024, 1024), Image.Resampling.LANCZOS)).copy()
h, w = edited.shape[:2]
if share >= 1:
    edited = 255 - edited
else:
    side = int((share * h * w) ** 0.5)
    edited[h // 3 : h // 3 + side, w // 3 : w // 3 + side] = (200, 30, 30)
edited = Image.fromarray(edited)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with PeakResident() as peak:
    start = time.perf_counter()
    result, kept = keep_unedited(original, edited)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "resident_before_mib": peak.before, "extra_peak_mib": peak.added,
                  "original_mib": width * height * 3 / 2**20, "changed_share": kept.changed_share,
                  "whole": kept.whole, "size": list(result.size)}))
"""


def cost(root: Path, cases: tuple = ((4000, 3000), (8000, 8000)), shares: tuple = (0.05, 0.3, 1.0)) -> list[dict]:
    """Seconds and memory of keep_unedited at 12 and 64 megapixels, each case in a fresh process: the
    resident memory before it (the original decoded and the edit) and the most it adds on top
    (sampled every 2 ms), beside the size of the original's pixels (the result is one more copy)."""
    rows = []
    for width, height in cases:
        for share in shares:
            code = (COST_CASE.replace("ROOT", repr(str(root))).replace("WIDTH", str(width)).replace("HEIGHT", str(height))
                    .replace("SHARE", str(share)))  # fmt: skip
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append({"megapixels": width * height / 1e6, "size": [width, height], "edited_share": share}
                        | json.loads(done.stdout.strip().splitlines()[-1]))  # fmt: skip
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"{report['edits_per_row']} held-out edits per row, {report['seconds'] / 60:.1f} min; background beyond "
        f"{report['margin']:.0%} of the shorter side from the shapes.",
        "",
        "| size | instruction | changed share | whole edit | edited area to target, plain / kept (dB) | "
        "untouched area to target, plain / kept (dB) | whole image, plain / kept (dB) | background exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        untouched = (f"{r['untouched_psnr_plain']:.2f} / {r['untouched_psnr_kept']:.2f}"
                     if "untouched_psnr_plain" in r else "-")  # fmt: skip
        lines.append(
            f"| {r['size'][0]}x{r['size'][1]} | {r['instruction']} | {r['changed_share']:.2f} | {r['whole_edit']:.0%} "
            f"| {r['edited_psnr_plain']:.2f} / {r['edited_psnr_kept']:.2f} | {untouched} "
            f"| {r['psnr_plain']:.2f} / {r['psnr_kept']:.2f} | {r['background_exact']:.0%} |"
        )
    lines += ["", "| step | untouched background to the first input, without / with (dB) | bit-identical with |",
              "|---|---|---|"]  # fmt: skip
    for r in report["chain"]:
        lines.append(f"| {r['step']} | {r['untouched_psnr_without']:.2f} / {r['untouched_psnr_with']:.2f} "
                     f"| {'yes' if r['identical_with'] else 'no'} |")  # fmt: skip
    lines += ["", "| disturbance | IoU | true region covered | frame outside taken |", "|---|---|---|---|"]
    for r in report["robustness"]:
        lines.append(f"| {r['disturbance']} | {r['iou']:.3f} | {r['recall']:.1%} | {r['outside_taken']:.2%} |")
    return "\n".join(lines) + "\n"


# --- real photographs, with simulated regeneration (flux/lab/photos.py) --------------------------


def finder_at(root: Path, revision: str) -> photos.Finder:
    """keep_unedited as it was at a git ``revision`` of this project (its flux/composite.py, which
    offered ``keep_unedited`` and ``changed_alpha``): the "before" of docs/quality.md."""
    source = subprocess.run(["git", "show", f"{revision}:flux/composite.py"], cwd=root, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    module = types.ModuleType(f"composite_at_{revision}")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{revision}:flux/composite.py", "exec"), module.__dict__)

    def find(original: np.ndarray, output: np.ndarray) -> photos.Outcome:
        result, kept = module.keep_unedited(Image.fromarray(original), Image.fromarray(output))
        alpha = np.ones(original.shape[:2], np.float32) if kept.whole else module.changed_alpha(original, output)
        return photos.Outcome(np.asarray(result), alpha, kept.whole)

    return find


def photographs(root: Path, before: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Every case of flux/lab/photos.py with the product's region finder (and with the one at
    ``before``): the rows and their summaries by edit and by regeneration."""
    chosen = photos.cases()
    report = {"photos": {name: source for name, (_, source) in photos.PHOTOS.items()}, "margin": photos.MARGIN}
    finders = {"after": photos.product_finder} | ({"before": finder_at(root, before)} if before else {})
    for label, finder in finders.items():
        start = time.perf_counter()
        rows = photos.evaluate(finder, chosen, log)
        report[label] = {"seconds": time.perf_counter() - start, "rows": rows,
                         "by_edit": photos.summary(rows, "edit"),
                         "by_regeneration": photos.summary(rows, "regeneration")}  # fmt: skip
    report["before_revision"] = before
    return report


def _figure(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def photographs_markdown(report: dict) -> str:
    lines = []
    for by in ("edit", "regeneration"):
        lines += [f"| {by} | cases | lost | at least 95% back | whole edit | background exact, lowest | "
                  "placement, lowest (dB) | seam step / the output's (levels) | no edit: the input back |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        labels = [label for label in ("before", "after") if label in report]
        for index in range(len(report["after"][f"by_{by}"])):
            for label in labels:
                r = report[label][f"by_{by}"][index]
                seam = f"{_figure(r['seam_step'], '.2f')} / {_figure(r['seam_step_output'], '.2f')}"
                name = f"{r[by]} ({label})" if len(labels) > 1 else r[by]
                lines.append(
                    f"| {name} | {r['cases']} | {r['lost']} | {_figure(r['recall_95'], '.0%')} | {_figure(r['whole'], '.0%')} "
                    f"| {_figure(r['background_exact_min'], '.2%')} | {_figure(r['placement_min'], '.1f')} | {seam} "
                    f"| {_figure(r['input_back'], '.0%')} |"
                )
        lines.append("")
    return "\n".join(lines)
