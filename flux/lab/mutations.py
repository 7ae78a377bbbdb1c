"""The mutation check: behaviour-level changes to the product, each paired with the tests that
must fail when it is made. A test weakened later, so that it no longer notices the change it was
written for, shows up here as a mutation that survives.

Each mutation is applied to a copy of the tree (git's tracked and unignored files), never to the
tree itself; its tests run there with this interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # text that occurs in ``file`` exactly once (or ``count`` times)
    new: str
    tests: tuple[str, ...]  # pytest node ids or files; at least one test among them must fail
    count: int = 1
    more: tuple[tuple[str, str, str], ...] = ()  # further (file, old, new) changes made with it


KEEP = "tests/test_keep_unedited.py"
MASKS = "tests/test_masks.py"
_ALIGNMENT_OFF = ("flux/composite.py", "aligned = alignment.align(ref, out)",
                  "aligned = alignment.Alignment(alignment.Transform(), 1.0, 0.0)")  # fmt: skip
_COLOURS_OFF = ("flux/composite.py", "colours = alignment.fit_colours(ref, moved, valid)",
                "colours = alignment.ColourMap(torch.eye(3, 13, dtype=torch.float64).roll(1, 1), 0.0)")  # fmt: skip
_SPECKS_KEPT = ("flux/composite.py", "seeds=seeds & (neighbours > 1.5)", "seeds=seeds & (neighbours > 0.5)")
MUTATIONS = (
    Mutation(
        "keep_unedited: alignment off",
        *_ALIGNMENT_OFF,
        (f"{KEEP}::test_the_edit_lands_in_the_photos_geometry",),
    ),
    Mutation(
        "keep_unedited: alignment applied the wrong way round",
        "flux/alignment.py",
        "transform.scale_x * (torch.arange(width, dtype=torch.float32) - cx) + transform.shift_x",
        "transform.scale_x * (torch.arange(width, dtype=torch.float32) - cx) - transform.shift_x",
        (f"{KEEP}::test_the_edit_lands_in_the_photos_geometry",),
    ),
    Mutation(
        "keep_unedited: colour correction off",
        *_COLOURS_OFF,
        (f"{KEEP}::test_what_the_model_did_to_the_colours_is_taken_out_inside_the_edit_too",),
    ),
    Mutation(
        "keep_unedited: specks kept",
        *_SPECKS_KEPT,
        (f"{KEEP}::test_specks_and_a_moved_highlight_are_not_edits",),
    ),
    Mutation(
        "keep_unedited: alignment, colour correction and speck removal all off",
        *_ALIGNMENT_OFF,
        (KEEP,),
        more=(_COLOURS_OFF, _SPECKS_KEPT),
    ),
    Mutation(
        "keep_unedited: no region, whole edit never returned",
        "flux/composite.py",
        "if _unexplained(levels, alpha) > max(4, 1e-4 * alpha.numel()):",
        "if False:",
        (f"{KEEP}::test_a_change_no_region_covers_returns_the_whole_edit",),
    ),
    Mutation(
        "keep_unedited: input decoded reduced",
        "flux/pipeline.py",
        "reduce=not request.at_photo_size",
        "reduce=True",
        (f"{KEEP}::test_the_photo_is_read_as_its_exif_says_and_decoded_at_full_size",),
    ),
    Mutation(
        "64-megapixel input limit raised",
        "flux/images.py",
        "MAX_INPUT_PIXELS = 64_000_000",
        "MAX_INPUT_PIXELS = 10**12",
        ("tests/test_images.py::test_inputs_past_the_projects_own_limit_are_refused",),
    ),
    Mutation(
        "EXIF orientations 6 and 8 turned the wrong way",
        "flux/images.py",
        "return ImageOps.exif_transpose(image)",
        "turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}.get(image.getexif().get(274))\n"
        "    return image.transpose(turn) if turn is not None else ImageOps.exif_transpose(image)",
        (
            "tests/test_images.py::test_exif_orientation_is_applied_pixel_for_pixel",
            "tests/test_masks.py::test_the_mask_is_read_as_its_exif_says",
        ),
    ),
    Mutation(
        "fal's enable_safety_checker ignored",
        "flux/request.py",
        '"enable_safety_checker": ("disable_safety_checker", lambda enable: not enable)',
        '"enable_safety_checker": ("disable_safety_checker", lambda enable: False)',
        ("tests/test_server.py::test_flagged_image_fails_over_http",),
    ),
    Mutation(
        "lengths off by one (prompt, LoRA sources)",
        "flux/request.py",
        "len(value) > spec.max_length:",
        "len(value) >= spec.max_length:",
        ("tests/test_request.py",),
    ),
    Mutation(
        "lower bounds exclusive",
        "flux/request.py",
        "not spec.low <= value <= spec.high:",
        "not spec.low < value <= spec.high:",
        ("tests/test_request.py",),
    ),
    Mutation(
        "FLUX_LORA_MAX_BYTES=0 accepted",
        "flux/config.py",
        '"the largest LoRA download", _whole(1)',
        '"the largest LoRA download", _whole(0)',
        ("tests/test_config.py",),
    ),
    Mutation(
        "settings: the environment overrides what the caller passes",
        "flux/config.py",
        "overrides.get(setting.name) or environ.get(setting.name)",
        "environ.get(setting.name) or overrides.get(setting.name)",
        ("tests/test_config.py",),
    ),
    Mutation(
        "settings: switches case-sensitive",
        "flux/config.py",
        "if raw.lower() in _ON:",
        "if raw in _ON:",
        ("tests/test_config.py",),
    ),
    Mutation(
        "settings: what a setting accepts left out of its error",
        "flux/config.py",
        "it accepts {setting.accepts}",
        "it is refused",
        ("tests/test_config.py",),
    ),
    Mutation(
        "an input that may be null",
        "predict.py",
        "seed: int = Input(",
        "seed: int | None = Input(",
        # cog's server itself refuses null for a nullable integer (its validator reads the JSON
        # schema's type); the schema test sees the declaration, the HTTP test guards the promise
        (
            "tests/test_api_contract.py::test_no_input_claims_null_and_every_optional_one_has_a_default",
            "tests/test_server.py::test_null_for_any_optional_input_is_refused_naming_it",
        ),
    ),
    Mutation(
        "mask: the source not kept outside it in the loop",
        "flux/edit.py",
        "return torch.where(follows, latents, renoised(source, noise, sigma))",
        "return latents",
        (
            f"{MASKS}::test_the_loop_keeps_the_source_outside_the_mask_and_grey_from_partway",
            f"{MASKS}::test_a_masked_edit_changes_the_circle_and_leaves_the_rest_exact",
        ),
    ),
    Mutation(
        "mask: grey read as white (thresholded)",
        "flux/edit.py",
        "follows = packed > 1.0 - (k + 1) / steps",
        "follows = packed > 0",
        (
            f"{MASKS}::test_the_loop_keeps_the_source_outside_the_mask_and_grey_from_partway",
            f"{MASKS}::test_a_grey_mask_changes_less_than_white_and_more_than_none",
        ),
    ),
    Mutation(
        "mask: the feather wider than reported",
        "flux/masking.py",
        "alpha = _box_blur(torch.from_numpy(weights / 255.0), radius).numpy()",
        "alpha = _box_blur(torch.from_numpy(weights / 255.0), 2 * radius).numpy()",
        (
            f"{MASKS}::test_a_masked_edit_changes_the_circle_and_leaves_the_rest_exact",
            f"{MASKS}::test_crop_and_stitch_on_a_large_photo",
        ),
    ),
    Mutation(
        "mask: binarised at the latent grid (nearest, as diffusers)",
        "flux/images.py",
        "return mask.resize(size, Image.Resampling.BOX if shrinks else Image.Resampling.BILINEAR)",
        "return mask.resize(size, Image.Resampling.NEAREST)",
        (
            f"{MASKS}::test_any_size_of_the_same_shape_is_resized_by_area_and_another_shape_is_refused",
            f"{MASKS}::test_the_mask_reaches_the_latent_grid_by_area_widened_for_the_decoder",
        ),
    ),
    Mutation(
        "strength: the level's map over all the steps, not those run",
        "flux/edit.py",
        "step_map = lab.step_map or taylor_utils.compute_step_map(sampling.acceleration, steps)",
        "step_map = (lab.step_map or taylor_utils.compute_step_map(sampling.acceleration, sampling.num_steps))[-steps:]",
        (f"{MASKS}::test_strength_half_changes_less_with_fewer_calls",),
    ),
)


@dataclass(frozen=True)
class Outcome:
    mutation: Mutation
    caught: bool
    seconds: float
    detail: str


def _copy_tree(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(mutation: Mutation, tree: Path) -> None:
    """Make the change in ``tree``; an ``old`` text not found as often as expected is an error in
    the list (the product moved on), not a surviving mutation."""
    for file, old, new in _changes(mutation):
        path = tree / file
        path.write_text(_checked_text(mutation, path, file, old).replace(old, new))


def _checked_text(mutation: Mutation, path: Path, file: str, old: str) -> str:
    """The text of ``path``, where ``old`` occurs as often as the mutation says (a ValueError otherwise)."""
    text = path.read_text()
    found = text.count(old)
    if found != mutation.count:
        raise ValueError(f"{mutation.name}: {old!r} occurs {found} times in {file}, not {mutation.count}")
    return text


def _changes(mutation: Mutation) -> tuple[tuple[str, str, str], ...]:
    return ((mutation.file, mutation.old, mutation.new), *mutation.more)


def run(mutation: Mutation, timeout_s: float = 900) -> Outcome:
    """Apply one mutation to a fresh copy of the tree and run its tests there."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        apply(mutation, tree)
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=tree, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        seconds = time.monotonic() - start
    last = (done.stdout.strip().splitlines() or [""])[-1]
    # pytest's exit status 1 is "tests failed"; anything else (no tests collected, an error) is
    # not a catch
    return Outcome(mutation, done.returncode == 1, seconds, last)


def check_list() -> None:
    """Every mutation applies to the tree as it is."""
    for mutation in MUTATIONS:
        for file, old, _ in _changes(mutation):
            _checked_text(mutation, ROOT / file, file, old)


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| mutation | file | caught by | result | seconds |", "|---|---|---|---|---:|"]
    for o in outcomes:
        tests = ", ".join(t.split("::")[-1] for t in o.mutation.tests)
        result = "caught" if o.caught else f"**survived** ({o.detail})"
        lines.append(f"| {o.mutation.name} | {o.mutation.file} | {tests} | {result} | {o.seconds:.0f} |")
    return "\n".join(lines)
