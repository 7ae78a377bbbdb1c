"""Command line: ``python -m flux edit --image IN --prompt "..." --out OUT`` edits an image;
``python -m flux download --out DIR`` fetches the weights.

``edit`` checks everything it can before it loads anything: the settings, the weights tree, every
bound of the request, the images, and the output path (writable, its extension a supported
format); an error names the flag and the edit never starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from flux import images, sizes, weights
from flux.config import Config
from flux.errors import EditError, InputError, SetupError
from flux.fetch import FetchError, WeightsRemote, fetch, pin
from flux.request import INPUTS, MAX_SEED, EditRequest, request_from

# the request's inputs by the flags that set them, so that an error names what the user typed
FLAGS = {
    "prompt": "--prompt", "input_image": "--image", "aspect_ratio": "--aspect-ratio", "num_inference_steps": "--steps",
    "guidance": "--guidance", "seed": "--seed", "acceleration": "--acceleration", "output_format": "--out",
    "output_quality": "--quality", "lora_weights": "--lora", "lora_strength": "--lora-strength",
    "extra_lora_weights": "--extra-lora", "extra_lora_strength": "--extra-lora-strength",
    "reference_images": "--reference", "multi_image_mode": "--multi-image-mode", "keep_unedited": "--keep-unedited",
    "disable_safety_checker": "--no-safety-checker", "mask": "--mask", "strength": "--strength",
}  # fmt: skip
EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
PROXY_BANNER = (
    "No real weights in {configured}: running the small PROXY model trained on procedural edits\n"
    "! (64x64 scenes of a circle and a square; it knows: {instructions}).\n"
    "! Fetch the real FLUX.1 Kontext [dev] weights with: {fetch}"
)


def choose_weights(config: Config, given: Path | None = None, proxy: bool = False) -> tuple[Path, bool]:
    """(weights folder, whether it is the proxy): ``given``; the committed proxy when asked; else the
    configured folder (WEIGHTS_DIR, default ./weights) when complete; the proxy when that folder is
    absent or empty. An incomplete one (a download cut short) is a SetupError listing what is
    missing and how to fetch it, never a quiet fall back to the proxy."""
    if given is not None:
        return given, False
    has_proxy = not weights.problems(weights.PROXY_DIR)
    if proxy or (_absent(config.weights_dir) and has_proxy):
        weights.require_complete(weights.PROXY_DIR)
        return weights.PROXY_DIR, True
    if config.weights_base_url or config.hf_token:
        return config.weights_dir, False  # load_model fetches what is missing
    try:
        weights.require_complete(config.weights_dir)
    except SetupError as exc:
        raise SetupError(f"{exc}\nOr edit with the small proxy model: add --proxy" if has_proxy else str(exc)) from None
    return config.weights_dir, False


def _absent(folder: Path) -> bool:
    return not folder.is_dir() or not any(folder.iterdir())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flux", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("edit", help="edit an image with a text instruction")
    e.add_argument("--image", required=True, type=Path, help="input image (jpeg, png, gif or webp)")
    e.add_argument("--prompt", required=True, help="the edit instruction")
    e.add_argument("--out", required=True, type=Path, help="output file: .png, .jpg, .jpeg or .webp picks the format")
    e.add_argument("--weights", type=Path, help="weights folder (default: WEIGHTS_DIR, ./weights)")
    e.add_argument("--proxy", action="store_true", help="edit with the small proxy model committed in the project")
    # defaults are the request's (flux.request.INPUTS): a flag left out is an input not sent
    e.add_argument("--aspect-ratio", choices=sizes.ASPECT_RATIO_CHOICES, help=_default("aspect_ratio"))
    e.add_argument("--steps", type=int, help=f"denoising steps, {_bounds('num_inference_steps')}")
    e.add_argument("--guidance", type=float, help=_bounds("guidance"))
    e.add_argument("--seed", type=int, help=f"0 to {MAX_SEED}; random when omitted (0 is a seed)")
    e.add_argument("--acceleration", choices=INPUTS["acceleration"].choices, help=_default("acceleration"))
    e.add_argument("--quality", type=int, help=f"webp/jpg quality, {_bounds('output_quality')}")
    e.add_argument("--no-safety-checker", action="store_true", default=None, help="do not check the edited image")
    e.add_argument("--keep-unedited", action="store_true", default=None,
                   help="the input at its own size with only what the edit changed replaced")  # fmt: skip
    e.add_argument(
        "--lora", help="LoRA: owner/name[/file.safetensors], or an http(s) URL (.safetensors, .tar, CivitAI)"
    )
    e.add_argument("--lora-strength", type=float, help=f"{_bounds('lora_strength')}; 0 turns it off")
    e.add_argument("--extra-lora", help="a second LoRA, the same sources")
    e.add_argument("--extra-lora-strength", type=float, help=_bounds("extra_lora_strength"))
    e.add_argument("--mask", type=Path, help="where to edit: white edits, black keeps, grey edits partly; "
                   "the result is the input at its own size")  # fmt: skip
    e.add_argument("--strength", type=float, help=f"{_bounds('strength')}: how much of the schedule runs, from the "
                   "input re-noised")  # fmt: skip
    e.add_argument("--reference", action="append", type=Path, help="a reference image (up to 3; repeat)")
    e.add_argument("--multi-image-mode", choices=INPUTS["multi_image_mode"].choices, help=_default("multi_image_mode"))
    d = sub.add_parser("download", help="fetch the weights, each file verified against the manifest")
    d.add_argument("--out", type=Path, help="weights folder (default: WEIGHTS_DIR, ./weights)")
    d.add_argument("--base-url", help="a mirror or weights CDN laid out like the tree (default: WEIGHTS_BASE_URL)")
    d.add_argument("--manifest", type=Path, default=weights.MANIFEST_PATH)
    d.add_argument("--workers", type=int, default=8)
    d.add_argument("--rehash", action="store_true", help="verify the sha256 of files already present")
    d.add_argument("--pin", action="store_true", help="after the fetch, write sizes and sha256 into --manifest")
    return parser


def _read(path: Path, flag: str) -> bytes:
    """The file's bytes, decoded once as an image to check it (an InputError naming the flag)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{flag} {path}: {exc.strerror}") from None
    images.load_image(data, f"{flag} {path}")
    return data


def _output_format(path: Path) -> str:
    """The format the extension picks, once the folder is known to be writable."""
    if path.suffix.lower() not in EXTENSIONS:
        raise InputError(f"--out {path}: the extension picks the format: .png, .jpg, .jpeg or .webp; "
                         f"got {path.suffix or 'none'}")  # fmt: skip
    if path.is_dir():
        raise InputError(f"--out {path}: is a folder; give a file name")
    folder = path.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"--out {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {path}: {folder} is not writable")
    return EXTENSIONS[path.suffix.lower()]


def _default(name: str) -> str:
    return f"default {INPUTS[name].default}"


def _bounds(name: str) -> str:
    spec = INPUTS[name]
    return f"{spec.low:g} to {spec.high:g}, default {spec.default:g}"


def edit_request(args: argparse.Namespace) -> EditRequest:
    """The request the flags ask for, every bound and file checked (nothing loaded yet)."""
    sent = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items() if name != "output_format"}
    sent = {name: value for name, value in sent.items() if value is not None}
    try:
        sent["output_format"] = _output_format(args.out)
        return request_from(sent, lambda path, name: _read(path, FLAGS[name.split("[")[0]]))
    except InputError as exc:
        raise _named_by_flag(exc) from None


def _named_by_flag(exc: InputError) -> InputError:
    message = str(exc)
    if exc.field in FLAGS and message.startswith(exc.field):
        message = FLAGS[exc.field] + message[len(exc.field) :]
    return InputError(message, exc.field)


def edit_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from flux.pipeline import load_model, run_edit

    config = Config.from_env()
    request = edit_request(args)
    weights_dir, is_proxy = choose_weights(config, args.weights, args.proxy)
    if is_proxy:
        instructions = "; ".join(
            weights.load_manifest(weights_dir / weights.TREE_MANIFEST_NAME).get("instructions", [])
        )
        text = PROXY_BANNER.format(configured=config.weights_dir, instructions=instructions,
                                   fetch=weights.fetch_command(config.weights_dir))  # fmt: skip
        print(f"{'!' * 78}\n! {text}\n! Weights: {weights_dir}\n{'!' * 78}", file=sys.stderr)
    start = time.perf_counter()
    model = load_model(dataclasses.replace(config, weights_dir=weights_dir), with_safety=request.check_safety,
                       warm=False)  # fmt: skip
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in model.seconds.items())
    print(f"load: {time.perf_counter() - start:.2f}s ({phases}; {weights_dir})", file=sys.stderr)
    bar = tqdm(total=request.num_steps, desc="denoise", unit="step", file=sys.stderr)

    def on_step(i: int, total: int, computed: bool) -> None:
        bar.set_postfix_str("computed" if computed else "forecast")
        bar.update(1)

    try:
        result = run_edit(model, request, on_step=on_step)
    finally:
        bar.close()
        model.close()
    report = result.report
    for phase, seconds in report.seconds.items():
        print(f"{phase}: {seconds:.2f}s", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    images.save_image(result.image, args.out, request.output_format, request.output_quality)
    print(f"wrote {args.out} ({result.image.width}x{result.image.height})")
    return 0


def download_command(args: argparse.Namespace) -> int:
    config = Config.from_env()
    remote = WeightsRemote.from_config(config)
    if args.base_url:
        remote = dataclasses.replace(remote, base_url=args.base_url.rstrip("/"))
    out = args.out or config.weights_dir
    report = fetch(out, json.loads(args.manifest.read_text()), remote, workers=args.workers, rehash=args.rehash)
    print(
        f"{len(report.downloaded)} files downloaded ({report.bytes_downloaded / 1e9:.2f} GB), "
        f"{len(report.skipped)} already verified, in {report.seconds:.1f}s"
    )
    if args.pin:
        pinned = pin(out, args.manifest)
        print(f"pinned {len(pinned['files'])} files, {pinned['total_size'] / 1e9:.2f} GB, into {args.manifest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return edit_command(args) if args.command == "edit" else download_command(args)
    except (InputError, EditError, SetupError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
