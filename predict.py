"""Cog adapter for FLUX.1 Kontext [dev]: inputs in, edited image file out.

cog 0.23 serves ``run()``; ``predict()`` is the same call under its documented name.
"""

from __future__ import annotations

import functools
import logging
import pathlib

from cog import BaseRunner, Input, Path, Secret

from flux.config import Config
from flux.errors import InputError
from flux.images import save_image
from flux.outputs import new_output_path, output_dir
from flux.pipeline import Model, load_model, run_edit
from flux.request import request_from

# cog build reads the inputs from this file's text (a static schema generator): every Input()
# argument is a literal or a name bound to one here, a string on one line without parentheses.
# tests/test_api_contract.py checks that what it reads equals what runs, and that the bounds equal
# flux/request.py's.
# fmt: off
ASPECT_RATIOS = ["match_input_image", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
ACCELERATION_LEVELS = ["none", "go fast", "go really fast"]
OUTPUT_FORMATS = ["webp", "jpg", "png", "jpeg"]
MULTI_IMAGE_MODES = ["offset", "stitch", "index"]
ACCELERATION_HELP = "Speed-up by TaylorSeer forecasting of skipped transformer steps: none computes every step; go fast computes 18 of 28 steps, go really fast 13 (of 8 steps: 6 and 5); from 5 steps up each level skips some"
GO_FAST_HELP = "Replicate's switch, for its callers: true is go really fast (13 of 28 steps computed), false is none; left out, acceleration decides. Refused when it disagrees with an acceleration you set"
LORA_HELP = "LoRA to apply: a Hugging Face repo (owner/name or owner/name/file.safetensors), a huggingface.co URL, an http(s) URL of a .safetensors file, a Replicate weights .tar, or a CivitAI URL; empty for none"
REFERENCES_HELP = "Up to 3 more images to combine with the input image (a person and an outfit, a product and a scene); jpeg, png, gif or webp"
MULTI_IMAGE_HELP = "How reference images join the input image: offset (placed beside or below it), stitch (joined side by side into one image), index (each in a layer of its own)"
HF_TOKEN_HELP = "Your Hugging Face token, for a LoRA in a gated or private repo; sent to huggingface.co only"
CIVITAI_TOKEN_HELP = "Your CivitAI API token, for a CivitAI LoRA that needs one; sent to civitai.com only"
KEEP_UNEDITED_HELP = "Return the input photo at its own size with only the region the edit changed replaced (found from the edit, feathered at its border); everywhere else its pixels as they were. Needs aspect_ratio match_input_image"
ONE_IMAGE_HELP = "Another host's count of output images: this model returns one image per prediction, so only 1 is accepted"
PROMPT_HELP = "Text description of what to change in the input image"
ASPECT_HELP = "Aspect ratio of the output; match_input_image keeps the input's"
SEED_HELP = "Random seed, 0 to 4294967295 (0 is a seed); -1, the default, draws a random one"
QUALITY_HELP = "Quality of webp and jpg outputs, 0 to 100; ignored for png"
LORA_STRENGTH_HELP = "How strongly the LoRA applies; 0 turns it off"
GUIDANCE_SCALE_HELP = "fal's name for guidance; send guidance"
STEPS_HELP = "Together's name for num_inference_steps; send num_inference_steps"
MASK_HELP = "Where to edit, as a data URI or an http(s) URL of an image of the input's shape (any size): white edits, black keeps, grey edits partly (transparent edits in a mask that is only transparency). The result is the input at its own size, its pixels unchanged outside the mask's feathered border. Empty: the model decides"
STRENGTH_HELP = "How much of the schedule runs: 1 starts from noise; lower starts from the input re-noised partway and keeps more of it (the last strength x steps run; 0.88 at 28 steps runs 25). 0 returns the input"
MASK_ALIAS_HELP = "diffusers' and fal's names for mask; send mask"
ENABLE_SAFETY_HELP = "fal's name for the opposite of disable_safety_checker; send disable_safety_checker"
# fmt: on


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Read the configuration, check the weights against the manifest, load them, apply the
        GPU fast path and warm it up."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        config = Config.from_env()
        print(f"settings: {config.described()}")
        self.model: Model = load_model(config)
        self.outputs = output_dir(config.output_dir)
        phases = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.model.seconds.items())
        fast_path = self.model.runtime.decided.summary() or "eager"
        print(f"setup: {phases} ({config.weights_dir} on {self.model.components.device}; fast path {fast_path})")

    def healthcheck(self) -> bool:
        """Cog's health check: False once the model cannot edit (a context-parallel worker is gone),
        so that /health-check reports UNHEALTHY and the platform replaces the container."""
        return self.model.healthy()

    # fmt: off
    def run(
        self,
        prompt: str = Input(description=PROMPT_HELP, max_length=10000),
        input_image: Path = Input(description="Image to edit: jpeg, png, gif or webp"),
        mask: str = Input(description=MASK_HELP, default=""),
        aspect_ratio: str = Input(description=ASPECT_HELP, choices=ASPECT_RATIOS, default="match_input_image"),
        num_inference_steps: int = Input(description="Number of denoising steps", ge=4, le=50, default=28),
        guidance: float = Input(description="How closely to follow the prompt", ge=0, le=10, default=2.5),
        strength: float = Input(description=STRENGTH_HELP, ge=0, le=1, default=1.0),
        seed: int = Input(description=SEED_HELP, ge=-1, le=4294967295, default=-1),
        acceleration: str = Input(description=ACCELERATION_HELP, choices=ACCELERATION_LEVELS, default="go fast"),
        go_fast: bool | str = Input(description=GO_FAST_HELP, default=""),
        output_format: str = Input(description="Format of the output image", choices=OUTPUT_FORMATS, default="webp"),
        output_quality: int = Input(description=QUALITY_HELP, ge=0, le=100, default=80),
        disable_safety_checker: bool = Input(description="Disable the safety checker", default=False),
        keep_unedited: bool = Input(description=KEEP_UNEDITED_HELP, default=False),
        lora_weights: str = Input(description=LORA_HELP, default="", max_length=2048),
        lora_strength: float = Input(description=LORA_STRENGTH_HELP, ge=-1, le=3, default=1.0),
        extra_lora_weights: str = Input(description="A second LoRA, the same sources", default="", max_length=2048),
        extra_lora_strength: float = Input(description="How strongly the second LoRA applies", ge=-1, le=3, default=1.0),
        reference_images: list[Path] = Input(description=REFERENCES_HELP, default=[]),
        multi_image_mode: str = Input(description=MULTI_IMAGE_HELP, choices=MULTI_IMAGE_MODES, default="offset"),
        hf_api_token: Secret = Input(description=HF_TOKEN_HELP, default=""),
        civitai_api_token: Secret = Input(description=CIVITAI_TOKEN_HELP, default=""),
        num_outputs: int = Input(description=ONE_IMAGE_HELP, ge=1, le=1, default=1, deprecated=True),
        num_images: int = Input(description=ONE_IMAGE_HELP, ge=1, le=1, default=1, deprecated=True),
        n: int = Input(description=ONE_IMAGE_HELP, ge=1, le=1, default=1, deprecated=True),
        guidance_scale: float = Input(description=GUIDANCE_SCALE_HELP, ge=0, le=10, default=2.5, deprecated=True),
        steps: int = Input(description=STEPS_HELP, ge=4, le=50, default=28, deprecated=True),
        enable_safety_checker: bool = Input(description=ENABLE_SAFETY_HELP, default=True, deprecated=True),
        mask_image: str = Input(description=MASK_ALIAS_HELP, default="", deprecated=True),
        mask_url: str = Input(description=MASK_ALIAS_HELP, default="", deprecated=True),
    ) -> Path:
        sent = {name: value for name, value in locals().items() if name != "self"}  # every input, by its name
        request = request_from(sent, accepted_file)
        result = run_edit(self.model, request)
        print(result.report.summary())
        for name, value in result.report.metrics().items():
            self.record_metric(name, value)
        path = new_output_path(request.output_format, self.outputs)
        return Path(save_image(result.image, path, request.output_format, request.output_quality))
    # fmt: on

    # The documented entry point. A partialmethod is not itself callable, so cog's inspector
    # sees run() as the one handler and starts without the predict() deprecation warning.
    predict = functools.partialmethod(run)


def accepted_file(value: object, name: str) -> pathlib.Path:
    """The input image must be a file the server received (cog.Path), never a path string.

    A plain string reaches predict() when a request sends something other than a data URI
    or http(s) URL; it is refused before anything is opened.
    """
    if isinstance(value, str) or not isinstance(value, pathlib.Path):
        raise InputError(
            f"{name} must be an uploaded file (a data URI or an http(s) URL); file paths on the server are refused"
        )
    return value
