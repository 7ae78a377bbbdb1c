"""Command line: python -m flux edit --image IN --prompt "..." --out OUT."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flux import sizes, weights
from flux.edit import (
    DEFAULT_ACCELERATION,
    DEFAULT_GUIDANCE,
    DEFAULT_MULTI_IMAGE_MODE,
    DEFAULT_STEPS,
    MAX_SEED,
    MULTI_IMAGE_MODES,
    check_seed,
)
from flux.errors import EditError, InputError

TINY_DIR = weights.PROJECT_ROOT / ".cache" / "tiny-weights"
# the trained proxy (scripts/train_proxy.py), committed: a real edit on the CPU without the real weights
PROXY_DIR = weights.PROJECT_ROOT / "flux" / "proxy_weights"


def default_weights_dir() -> tuple[Path, str]:
    """(directory, kind): ./weights when complete ("real"), else the committed trained proxy ("proxy"),
    else the tiny random model generated on first use ("tiny")."""
    if not weights.problems(weights.DEFAULT_WEIGHTS_DIR):
        return weights.DEFAULT_WEIGHTS_DIR, "real"
    if PROXY_DIR.is_dir() and not weights.problems(PROXY_DIR):
        return PROXY_DIR, "proxy"
    if weights.problems(TINY_DIR):
        from flux.lab.tiny import make_tiny_weights

        make_tiny_weights(TINY_DIR)
    return TINY_DIR, "tiny"


BANNERS = {
    "proxy": (
        "No real weights in ./weights: running the small PROXY model trained on procedural edits\n"
        "! (64x64 scenes of a circle and a square; it knows: " + "{prompts}).\n"
        "! Fetch the real FLUX.1 Kontext [dev] weights with: python scripts/download_weights.py"
    ),
    "tiny": (
        "No real weights in ./weights: running the TINY RANDOM model (the output is noise-like).\n"
        "! Fetch the real weights with: python scripts/download_weights.py"
    ),
}


def _parser() -> argparse.ArgumentParser:
    import taylor_utils

    parser = argparse.ArgumentParser(prog="python -m flux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("edit", help="edit an image with a text instruction")
    e.add_argument("--weights", type=Path, help="weights directory (default: ./weights, else the tiny model)")
    e.add_argument("--image", required=True, type=Path, help="input image (jpeg, png, gif or webp)")
    e.add_argument("--prompt", required=True, help="the edit instruction")
    e.add_argument("--out", required=True, type=Path, help="output file; its extension picks the format")
    e.add_argument("--aspect-ratio", default=sizes.MATCH_INPUT, choices=sizes.ASPECT_RATIO_CHOICES)
    e.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps, 4 to 50")
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    e.add_argument("--seed", type=_seed, default=None, help=f"0 to {MAX_SEED}; random when omitted (0 is a seed)")
    e.add_argument("--acceleration", default=DEFAULT_ACCELERATION, choices=taylor_utils.ACCELERATION_LEVELS)
    e.add_argument("--quality", type=int, default=95, help="webp/jpg quality, 0 to 100")
    e.add_argument("--no-safety-checker", action="store_true")
    e.add_argument(
        "--lora", help="LoRA: owner/name[/file.safetensors], or an http(s) URL (.safetensors, .tar, CivitAI)"
    )
    e.add_argument("--lora-strength", type=float, default=1.0, help="-1 to 3; 0 turns it off")
    e.add_argument("--extra-lora", help="a second LoRA, the same sources")
    e.add_argument("--extra-lora-strength", type=float, default=1.0)
    e.add_argument("--reference", action="append", type=Path, default=[], help="a reference image (up to 3; repeat)")
    e.add_argument("--multi-image-mode", default=DEFAULT_MULTI_IMAGE_MODE, choices=MULTI_IMAGE_MODES)
    return parser


def _loras(args: argparse.Namespace) -> list:
    from flux.lora_sources import lora_requests

    return lora_requests(
        (args.lora, args.lora_strength, "lora_weights"),
        (args.extra_lora, args.extra_lora_strength, "extra_lora_weights"),
    )


def _seed(text: str) -> int:
    """The seed, checked by the edit's own rule before the model is loaded."""
    try:
        return check_seed(int(text))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _format_for(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(suffix, suffix) if suffix in ("png", "jpg", "jpeg", "webp") else "png"


def edit_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from flux.images import save_image
    from flux.pipeline import load_model, run_edit

    if args.weights is None:
        weights_dir, kind = default_weights_dir()
        if kind != "real":
            from flux.lab.scenes import PROMPTS

            line = "!" * 78
            text = BANNERS[kind].format(prompts="; ".join(PROMPTS))
            print(f"{line}\n! {text}\n! Weights: {weights_dir}\n{line}", file=sys.stderr)
    else:
        weights_dir = args.weights
    start = time.perf_counter()
    model = load_model(weights_dir, with_safety=not args.no_safety_checker, warm=False)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in model.seconds.items())
    print(f"load: {time.perf_counter() - start:.2f}s ({phases}; {weights_dir})", file=sys.stderr)
    bar = tqdm(total=args.steps, desc="denoise", unit="step", file=sys.stderr)

    def on_step(i: int, total: int, computed: bool) -> None:
        bar.set_postfix_str("computed" if computed else "forecast")
        bar.update(1)

    try:
        result = run_edit(
            model, args.image, args.prompt, aspect_ratio=args.aspect_ratio, num_steps=args.steps,
            guidance=args.guidance, seed=args.seed, acceleration=args.acceleration,
            check_safety=not args.no_safety_checker, on_step=on_step, loras=_loras(args),
            references=args.reference, multi_image_mode=args.multi_image_mode,
        )  # fmt: skip
    finally:
        bar.close()
    report = result.report
    for phase, seconds in report.seconds.items():
        print(f"{phase}: {seconds:.2f}s", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    save_image(result.image, args.out, _format_for(args.out), args.quality)
    print(f"wrote {args.out} ({result.image.width}x{result.image.height})")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return edit_command(args)
    except (InputError, EditError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
