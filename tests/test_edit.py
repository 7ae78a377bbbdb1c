"""The Kontext edit on the tiny model: parity with diffusers, determinism, layout."""

from __future__ import annotations

import json

import torch

import taylor_utils
from flux import weights
from flux.edit import EditPlan, edit
from flux.lab import architecture
from flux.lab.plans import direct, lab_plan
from flux.lab.tiny import make_tiny_weights
from tests.conftest import random_image


def small(components, image, **kw) -> EditPlan:
    base = dict(prompt="make the circle red", width=96, height=64, seed=42, num_steps=8, acceleration="none")
    base.update(kw)
    return lab_plan(components, image, **base)


def test_tiny_weights_have_the_real_layout(tiny_weights):
    manifest = weights.load_manifest()
    for entry in manifest["files"]:
        assert (tiny_weights / entry["path"]).is_file(), entry["path"]
    assert weights.problems(tiny_weights) == []
    for sub, real in [("transformer", architecture.TRANSFORMER), ("vae", architecture.VAE)]:
        config = json.loads((tiny_weights / sub / "config.json").read_text())
        assert set(real) <= set(config)
    assert json.loads((tiny_weights / "model_index.json").read_text()) == architecture.MODEL_INDEX
    total = sum(f.stat().st_size for f in tiny_weights.rglob("*") if f.is_file())
    assert total < 5_000_000


def test_tiny_weights_are_deterministic(tiny_weights, tmp_path):
    again = make_tiny_weights(tmp_path / "again")
    first = json.loads((tiny_weights / weights.TREE_MANIFEST_NAME).read_text())["files"]
    second = json.loads((again / weights.TREE_MANIFEST_NAME).read_text())["files"]
    assert [(f["path"], f["sha256"]) for f in first] == [(f["path"], f["sha256"]) for f in second]


def test_parity_with_diffusers_pipeline(components):
    """Same weights, inputs, sizes and seed: final latents within 1e-4 of FluxKontextPipeline (fp32, CPU).

    diffusers always rescales to max_area and snaps the conditioning image to a preferred
    resolution; both are pinned here to the same small sizes on both sides.
    """
    from diffusers import FluxKontextPipeline

    c = components
    image = random_image(96, 64, seed=3)
    ours = edit(c, image, small(c, image, condition=(96, 64)), transformer=direct(c)).latents
    pipe = FluxKontextPipeline(
        scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, transformer=c.transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        image=image, prompt="make the circle red", height=64, width=96, num_inference_steps=8, guidance_scale=2.5,
        generator=torch.Generator("cpu").manual_seed(42), output_type="latent", max_area=96 * 64, _auto_resize=False,
    ).images  # fmt: skip
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_same_seed_same_bytes_and_different_seeds_differ(components):
    image = random_image(80, 80, seed=1)
    a = edit(components, image, small(components, image, seed=7, width=64, height=64), transformer=direct(components))
    b = edit(components, image, small(components, image, seed=7, width=64, height=64), transformer=direct(components))
    c = edit(components, image, small(components, image, seed=8, width=64, height=64), transformer=direct(components))
    assert a.image.tobytes() == b.image.tobytes()
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_seed_zero_is_a_real_seed(components):
    image = random_image(64, 64)
    zero = edit(
        components, image, small(components, image, seed=0, width=64, height=64), transformer=direct(components)
    )
    again = edit(
        components, image, small(components, image, seed=0, width=64, height=64), transformer=direct(components)
    )
    assert torch.equal(zero.latents, again.latents)
    assert zero.report.seed == 0


def test_conditioning_tokens_are_appended_with_first_coordinate_one(components):
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"].shape
        seen["ids"] = kwargs["img_ids"].clone()

    handle = components.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        image = random_image(64, 64)
        plan = small(components, image, width=96, height=64, num_steps=4, condition=(64, 48))
        edit(components, image, plan, transformer=direct(components))
    finally:
        handle.remove()
    target = (64 // 16) * (96 // 16)
    cond = (48 // 16) * (64 // 16)
    assert seen["hidden"][1] == target + cond
    assert torch.all(seen["ids"][:target, 0] == 0)
    assert torch.all(seen["ids"][target:, 0] == 1)


def test_the_hook_after_each_step_sees_the_state_and_may_replace_it(components):
    """Without a hook, or with one that returns None, the edit is the same bit for bit; the hook
    sees every step's latents and the sigma they are at; what it returns is what the loop goes on
    from (here: the latents set back to the start's after the first step)."""
    import math

    from flux.edit import denoise
    from flux.report import EditReport

    image = random_image(64, 64, seed=3)
    plan = small(components, image, width=64, height=64, num_steps=6, acceleration="go fast")
    plain = edit(components, image, plan, transformer=direct(components))
    seen = []
    watched = edit(components, image, plan, transformer=direct(components),
                   after_step=lambda i, latents, sigma: seen.append((i, sigma)))  # fmt: skip
    assert torch.equal(plain.latents, watched.latents) and plain.image.tobytes() == watched.image.tobytes()
    assert [i for i, _ in seen] == list(range(6)) and seen[-1][1] == 0.0
    assert all(a > b for (_, a), (_, b) in zip(seen, seen[1:], strict=False))  # the sigmas fall step by step

    # the loop itself, on a prediction that records what it was given
    start = torch.zeros(1, 4, 2)
    given = []

    def predict(latents, i):
        given.append(latents.clone())
        return torch.ones_like(latents)

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    cache = taylor_utils.TaylorCache(n_derivatives=1)
    reset = denoise(predict, start, sigmas, [True] * 4, cache, EditReport(0, "none", 4),
                    after_step=lambda i, latents, sigma: start.clone() if i == 0 else None)  # fmt: skip
    assert torch.equal(given[1], start)  # the second step began from what the hook returned
    assert math.isclose(float(reset[0, 0, 0]), -0.75)  # three steps of -0.25 after the reset
