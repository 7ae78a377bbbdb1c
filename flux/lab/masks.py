"""What masked edits do, measured with the trained proxy on held-out scenes upscaled to photo sizes
(docs/quality.md, "Masked edits"), what crop and stitch costs against the same edit without a mask
(docs/benchmarks.md), and the README's picture.

    python scripts/eval_masks.py --edits 12 --out docs     # quality, every level against none; the picture
    python scripts/eval_masks.py --cost --out docs         # seconds and memory at 3000x2000 and 6000x4000
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from flux import masking
from flux.lab.keep import near, proxy_model, psnr, upscaled
from flux.lab.scenes import RED, make_scene
from flux.pipeline import Model, run_edit
from flux.request import EditRequest
from taylor_utils import ACCELERATION_LEVELS

SIZES = ((1000, 750), (3000, 2000))
HELD_OUT = 4321  # scenes from a seed the proxy's training never used
CIRCLE, SQUARE = "make the circle red", "make the square blue"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _distance_to_red(image: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(image[where].astype(float) - RED).mean())


def _change(image: np.ndarray, picture: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(image[where].astype(float) - picture[where]).mean())


def one_scene(model: Model, index: int, size: tuple[int, int], levels=ACCELERATION_LEVELS) -> list[dict]:
    """Every level on one held-out scene at ``size``: the circle's mask with the circle's instruction
    (full, grey 50%, strength 0.5) and with the square's; the plain edit beside them."""
    scene = make_scene(np.random.default_rng([HELD_OUT, index]))
    picture = upscaled(scene.image, size)
    circle = upscaled(scene.circle.astype(np.uint8) * 255, size)
    inside, square = circle > 0, upscaled(scene.square.astype(np.uint8), size) > 0
    photo, masks = _png(picture), {level: _png(circle // 255 * level) for level in (255, 128)}

    def run(prompt: str, level: str, mask: bytes | None, strength: float = 1.0):
        request = EditRequest(prompt, photo, seed=index, acceleration=level, mask=mask, strength=strength,
                              check_safety=False)  # fmt: skip
        result = run_edit(model, request)
        return np.asarray(result.image), result.report

    plain, _ = run(CIRCLE, "none", None)
    plain = np.asarray(Image.fromarray(plain).resize(size, Image.Resampling.LANCZOS))
    rows, outputs = [], {}
    for level in levels:
        out, report = run(CIRCLE, level, masks[255])
        outputs[level] = out
        beyond = ~near(inside, (report.mask["feather_px"] + 1) / min(size))
        grey, _ = run(CIRCLE, level, masks[128])
        half, half_report = run(CIRCLE, level, masks[255], strength=0.5)
        other, _ = run(SQUARE, level, masks[255])
        region = ~beyond
        rows.append({
            "size": list(size), "scene": index, "level": level, "calls": report.transformer_calls,
            "calls_strength_half": half_report.transformer_calls, "feather_px": report.mask["feather_px"],
            "crop": report.mask["crop"], "edit_size": report.mask["edit_size"],
            "to_red_input": _distance_to_red(picture, inside), "to_red": _distance_to_red(out, inside),
            "change_white": _change(out, picture, inside), "change_grey": _change(grey, picture, inside),
            "change_strength_half": _change(half, picture, inside),
            "beyond_feather_exact": bool(np.array_equal(out[beyond], picture[beyond])),
            "square_beyond_feather_exact_with_square_instruction": bool(
                np.array_equal(other[square & beyond], picture[square & beyond])
            ),
            "square_share_within_feather": float((square & region).sum() / square.sum()),
            "circle_change_with_square_instruction": _change(other, picture, inside),
            "psnr_vs_none_in_region": psnr(out, outputs["none"], region) if level != "none" else None,
            "plain_background_psnr": psnr(plain, picture, beyond),
        })  # fmt: skip
    return rows


def context_choice(model: Model, edits: int = 16, contexts=(0.25, 0.5, 1.0, None), sizes=SIZES) -> list[dict]:
    """How red the circle gets (mean RGB distance inside it; lower is better) with crops of each
    context around the mask (None: the whole frame), on held-out scenes other than ``one_scene``'s."""
    rows = []
    crop_box = masking.crop_box
    for context in contexts:
        chosen = (lambda mask, base, c=context: crop_box(mask, base, c)) if context is not None else (lambda *a: None)
        with mock.patch.object(masking, "crop_box", chosen):
            for size in sizes:
                distances = []
                for index in range(100, 100 + edits):
                    scene = make_scene(np.random.default_rng([HELD_OUT, index]))
                    picture = upscaled(scene.image, size)
                    circle = upscaled(scene.circle.astype(np.uint8) * 255, size)
                    request = EditRequest(CIRCLE, _png(picture), seed=index - 100, acceleration="none",
                                          mask=_png(circle), check_safety=False)  # fmt: skip
                    distances.append(_distance_to_red(np.asarray(run_edit(model, request).image), circle > 0))
                rows.append({"context": context, "size": list(size), "to_red": statistics.mean(distances),
                             "to_red_median": statistics.median(distances)})  # fmt: skip
    return rows


def evaluate(edits: int = 12, sizes=SIZES, log: Callable[[str], None] = print) -> dict:
    model = proxy_model()
    start = time.perf_counter()
    rows = []
    for size in sizes:
        for index in range(edits):
            rows += one_scene(model, index, size)
        log(f"{size[0]}x{size[1]}: {edits} scenes ({time.perf_counter() - start:.0f}s)")
    context = context_choice(model)
    return {"edits_per_size": edits, "rows": rows, "context": context, "seconds": time.perf_counter() - start}


def summary(report: dict) -> list[dict]:
    """Per size and level: means over the scenes, and the shares that must be whole."""
    groups: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        groups.setdefault((tuple(row["size"]), row["level"]), []).append(row)
    table = []
    for (size, level), rows in groups.items():
        mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float | int)
                and not isinstance(rows[0][k], bool) and k != "scene"}  # fmt: skip
        shares = {k: statistics.mean(float(r[k]) for r in rows) for k in rows[0] if isinstance(rows[0][k], bool)}
        cropped = statistics.mean(float(r["crop"] != [0, 0, *size]) for r in rows)
        vs_none = [r["psnr_vs_none_in_region"] for r in rows if r["psnr_vs_none_in_region"] is not None]
        table.append({"size": list(size), "level": level, "scenes": len(rows), **mean, **shares, "cropped": cropped,
                      "psnr_vs_none_in_region": statistics.mean(vs_none) if vs_none else None})  # fmt: skip
    return table


def markdown(report: dict) -> str:
    lines = [
        f"{report['edits_per_size']} held-out scenes per size, each level; {report['seconds'] / 60:.1f} min.",
        "",
        "| size | level | calls (strength 0.5) | circle to red, input / masked (RGB distance) | change in the circle: "
        "white / grey 50% / strength 0.5 | beyond the feather exact | square beyond the feather exact (square "
        "instruction) | square within the feather | circle change (square instruction) | in the edited region vs none "
        "(dB) | plain edit's background (dB) | feather (px) | cropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary(report):
        vs_none = "-" if r["psnr_vs_none_in_region"] is None else f"{r['psnr_vs_none_in_region']:.1f}"
        lines.append(
            f"| {r['size'][0]}x{r['size'][1]} | {r['level']} | {r['calls']:.0f} ({r['calls_strength_half']:.0f}) "
            f"| {r['to_red_input']:.1f} / {r['to_red']:.1f} | {r['change_white']:.1f} / {r['change_grey']:.1f} / "
            f"{r['change_strength_half']:.1f} | {r['beyond_feather_exact']:.0%} "
            f"| {r['square_beyond_feather_exact_with_square_instruction']:.0%} | {r['square_share_within_feather']:.1%} "
            f"| {r['circle_change_with_square_instruction']:.1f} "
            f"| {vs_none} | {r['plain_background_psnr']:.1f} | {r['feather_px']:.0f} | {r['cropped']:.0%} |"
        )
    lines += ["", "| context around the mask | size | circle to red, mean / median |", "|---|---|---|"]
    for r in report["context"]:
        context = "whole frame" if r["context"] is None else f"{r['context']:g} x the mask's longer side"
        lines.append(f"| {context} | {r['size'][0]}x{r['size'][1]} | {r['to_red']:.1f} / {r['to_red_median']:.1f} |")
    return "\n".join(lines) + "\n"


def picture(model: Model, out: Path, index: int = 6, size: tuple[int, int] = (640, 480)) -> Path:
    """The README's picture: input, mask, plain edit (resized to the input's size), masked edit."""
    scene = make_scene(np.random.default_rng([HELD_OUT, index]))
    image = upscaled(scene.image, size)
    mask = upscaled(scene.circle.astype(np.uint8) * 255, size)
    plain = run_edit(model, EditRequest(CIRCLE, _png(image), seed=0, check_safety=False)).image
    masked = run_edit(model, EditRequest(CIRCLE, _png(image), seed=0, check_safety=False, mask=_png(mask))).image
    tiles = [Image.fromarray(image), Image.fromarray(mask).convert("RGB"), plain.resize(size), masked]
    width = 240
    height = round(width * size[1] / size[0])
    sheet = Image.new("RGB", (width * 4, height), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((width, height), Image.Resampling.LANCZOS), (i * width, 0))
    path = out / "masked-edit.png"
    sheet.save(path)
    return path


# --- cost ---------------------------------------------------------------------------------------

COST_CASE = """
import json, sys, time
import numpy as np
sys.path.insert(0, ROOT)
from flux.lab.keep import proxy_model, upscaled
from flux.lab.masks import CIRCLE, HELD_OUT, _png
from flux.lab.memory import PeakResident
from flux.lab.scenes import make_scene
from flux.pipeline import run_edit
from flux.request import EditRequest

size, masked = (WIDTH, HEIGHT), MASKED
model = proxy_model()
scene = make_scene(np.random.default_rng([HELD_OUT, 0]))
photo = _png(upscaled(scene.image, size))
mask = _png(upscaled(scene.circle.astype(np.uint8) * 255, size)) if masked else None
request = EditRequest(CIRCLE, photo, seed=0, check_safety=False, mask=mask)
run_edit(model, EditRequest(CIRCLE, _png(scene.image), seed=0, check_safety=False))  # warm
seconds = []
with PeakResident() as peak:
    for _ in range(3):
        start = time.perf_counter()
        result = run_edit(model, request)
        seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": min(seconds), "extra_peak_mib": peak.added, "size": list(result.image.size),
                  "transformer_seconds": result.report.transformer_seconds, "mask": result.report.mask}))
"""


def cost(root: Path, cases: tuple = ((3000, 2000), (6000, 4000))) -> list[dict]:
    """Seconds (best of 3) and the resident memory an edit adds, with the circle's mask and without
    one, each in a fresh process with the proxy loaded and warm."""
    rows = []
    for width, height in cases:
        for masked in (False, True):
            code = (COST_CASE.replace("ROOT", repr(str(root))).replace("WIDTH", str(width))
                    .replace("HEIGHT", str(height)).replace("MASKED", str(masked)))  # fmt: skip
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append({"size": [width, height], "masked": masked} | json.loads(done.stdout.strip().splitlines()[-1]))
    return rows
