"""Cog adapter for FLUX.1 Kontext [dev]: inputs in, edited image file out.

cog 0.23 serves ``run()``; ``predict()`` is the same call under its documented name.
"""

from __future__ import annotations

import functools
import logging
import pathlib

from cog import BaseRunner, Input, Path, Secret

import taylor_utils
from flux import sizes
from flux.config import Config
from flux.errors import InputError
from flux.images import save_image
from flux.lora_sources import MAX_SOURCE_CHARS, lora_requests
from flux.outputs import new_output_path, output_dir
from flux.pipeline import Model, load_model, run_edit
from flux.request import (
    DEFAULT_ACCELERATION,
    DEFAULT_GUIDANCE,
    DEFAULT_MULTI_IMAGE_MODE,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_LORA_STRENGTH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_GUIDANCE,
    MIN_LORA_STRENGTH,
    MULTI_IMAGE_MODES,
    OUTPUT_FORMATS,
    EditRequest,
)


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

    def run(
        self,
        prompt: str = Input(
            description="Text description of what to change in the input image", max_length=MAX_PROMPT_CHARS
        ),
        input_image: Path = Input(description="Image to edit: jpeg, png, gif or webp"),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output; match_input_image keeps the input's",
            choices=list(sizes.ASPECT_RATIO_CHOICES),
            default=sizes.MATCH_INPUT,
        ),
        num_inference_steps: int = Input(
            description="Number of denoising steps",
            ge=taylor_utils.MIN_STEPS,
            le=taylor_utils.MAX_STEPS,
            default=DEFAULT_STEPS,
        ),
        guidance: float = Input(
            description="How closely to follow the prompt", ge=MIN_GUIDANCE, le=MAX_GUIDANCE, default=DEFAULT_GUIDANCE
        ),
        seed: int | None = Input(
            description=f"Random seed, 0 to {MAX_SEED}; leave blank for a random one (0 is a seed)",
            ge=0,
            le=MAX_SEED,
            default=None,
        ),
        acceleration: str = Input(
            description="Speed-up by TaylorSeer forecasting of skipped transformer steps",
            choices=list(taylor_utils.ACCELERATION_LEVELS),
            default=DEFAULT_ACCELERATION,
        ),
        output_format: str = Input(
            description="Format of the output image", choices=list(OUTPUT_FORMATS), default="webp"
        ),
        output_quality: int = Input(
            description="Quality of webp and jpg outputs, 0 to 100; ignored for png", ge=0, le=100, default=80
        ),
        disable_safety_checker: bool = Input(description="Disable the safety checker", default=False),
        lora_weights: str | None = Input(
            description="LoRA to apply: a Hugging Face repo (owner/name or owner/name/file.safetensors), a "
            "huggingface.co URL, an http(s) URL of a .safetensors file, a Replicate weights .tar, or a CivitAI URL",
            default=None,
            max_length=MAX_SOURCE_CHARS,
        ),
        lora_strength: float = Input(
            description="How strongly the LoRA applies; 0 turns it off",
            ge=MIN_LORA_STRENGTH,
            le=MAX_LORA_STRENGTH,
            default=1.0,
        ),
        extra_lora_weights: str | None = Input(
            description="A second LoRA, the same sources", default=None, max_length=MAX_SOURCE_CHARS
        ),
        extra_lora_strength: float = Input(
            description="How strongly the second LoRA applies",
            ge=MIN_LORA_STRENGTH,
            le=MAX_LORA_STRENGTH,
            default=1.0,
        ),
        reference_images: list[Path] | None = Input(
            description=f"Up to {sizes.MAX_REFERENCES} more images to combine with the input image (a person and "
            "an outfit, a product and a scene); jpeg, png, gif or webp",
            default=None,
        ),
        multi_image_mode: str = Input(
            description="How reference images join the input image: offset (placed beside or below it), "
            "stitch (joined side by side into one image), index (each in a layer of its own)",
            choices=list(MULTI_IMAGE_MODES),
            default=DEFAULT_MULTI_IMAGE_MODE,
        ),
        hf_api_token: Secret | None = Input(
            description="Your Hugging Face token, for a LoRA in a gated or private repo; sent to huggingface.co only",
            default=None,
        ),
        civitai_api_token: Secret | None = Input(
            description="Your CivitAI API token, for a CivitAI LoRA that needs one; sent to civitai.com only",
            default=None,
        ),
    ) -> Path:
        request = EditRequest(
            prompt=prompt, image=accepted_file(input_image), aspect_ratio=aspect_ratio, num_steps=num_inference_steps,
            guidance=guidance, seed=seed, acceleration=acceleration, output_format=output_format,
            output_quality=output_quality, check_safety=not disable_safety_checker,
            loras=lora_requests((lora_weights, lora_strength, "lora_weights"),
                                (extra_lora_weights, extra_lora_strength, "extra_lora_weights")),
            references=tuple(accepted_file(r, f"reference_images[{i}]") for i, r in enumerate(reference_images or [])),
            multi_image_mode=multi_image_mode, hf_api_token=_secret(hf_api_token),
            civitai_api_token=_secret(civitai_api_token),
        )  # fmt: skip
        result = run_edit(self.model, request)
        report = result.report
        print(report.summary())
        self.record_metric("seed", report.seed)
        self.record_metric("acceleration", report.acceleration)
        self.record_metric("transformer_calls", report.transformer_calls)
        for phase, seconds in report.seconds.items():
            self.record_metric(f"seconds.{phase}", round(seconds, 4))
        if report.loras:
            self.record_metric("loras", report.loras)
        path = new_output_path(request.output_format, self.outputs)
        return Path(save_image(result.image, path, request.output_format, request.output_quality))

    # The documented entry point. A partialmethod is not itself callable, so cog's inspector
    # sees run() as the one handler and starts without the predict() deprecation warning.
    predict = functools.partialmethod(run)


def _secret(value: Secret | str | None) -> str | None:
    text = value.get_secret_value() if isinstance(value, Secret) else value
    return text.strip() or None if isinstance(text, str) else None


def accepted_file(value: object, name: str = "input_image") -> pathlib.Path:
    """The input image must be a file the server received (cog.Path), never a path string.

    A plain string reaches predict() when a request sends something other than a data URI
    or http(s) URL; it is refused before anything is opened.
    """
    if isinstance(value, str) or not isinstance(value, pathlib.Path):
        raise InputError(
            f"{name} must be an uploaded file (a data URI or an http(s) URL); file paths on the server are refused"
        )
    return value
