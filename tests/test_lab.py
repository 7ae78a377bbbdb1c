"""The quality lab: a few seconds of training, then the evaluation on a handful of edits."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flux import weights
from flux.errors import SetupError
from flux.lab.evaluate import CURVE, evaluate, even_map, ssim, write
from flux.lab.scenes import CIRCLE_COLOURS, EDITS, PROMPTS, SQUARE_COLOURS, make_scene
from flux.lab.shapes import count_shapes, inversion_colours, markdown, shapes_right
from flux.lab.train import QUICK, train_proxy
from flux.loading import load_components


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    return train_proxy(tmp_path_factory.mktemp("proxy") / "weights", QUICK, log=lambda line: None)


def test_edits_are_exact():
    scene = make_scene(np.random.default_rng(0))
    assert np.array_equal(EDITS["flip the image horizontally"](scene), scene.image[:, ::-1])
    assert np.array_equal(EDITS["invert the colours"](scene), 255 - scene.image)
    red = EDITS["make the circle red"](scene)
    assert (red[scene.circle] == (220, 30, 30)).all() and np.array_equal(red[~scene.circle], scene.image[~scene.circle])


def test_each_shape_takes_a_colour_of_its_own_palette():
    """A token's colour tells a circle from a square: the recolours depend on it (docs/quality.md)."""
    assert not set(CIRCLE_COLOURS) & set(SQUARE_COLOURS)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        scene = make_scene(rng)
        circle, square = (tuple(int(v) for v in scene.image[mask][0]) for mask in (scene.circle, scene.square))
        assert (scene.image[scene.circle] == circle).all() and (scene.image[scene.square] == square).all()
        assert circle in CIRCLE_COLOURS and square in SQUARE_COLOURS
        seen |= {circle, square}
    assert seen == set(CIRCLE_COLOURS) | set(SQUARE_COLOURS)


def test_proxy_is_in_the_real_layout(proxy):
    assert weights.problems(proxy) == []
    for entry in weights.load_manifest()["files"]:
        assert (proxy / entry["path"]).is_file()
    assert json.loads((proxy / "training.json").read_text())["config"]["steps"] == QUICK.steps


def test_training_is_deterministic_from_its_seed(proxy, tmp_path):
    """The same seed writes the same weights, byte for byte; another seed does not."""
    again = train_proxy(tmp_path / "again", QUICK, log=lambda line: None)
    other = train_proxy(tmp_path / "other", replace(QUICK, seed=1), log=lambda line: None)
    files = sorted(path.relative_to(proxy) for path in proxy.rglob("*.safetensors"))
    assert len(files) >= 4
    for file in files:
        assert (again / file).read_bytes() == (proxy / file).read_bytes(), file
    transformer = sorted(f for f in files if f.parts[0] == "transformer")
    assert any((other / f).read_bytes() != (proxy / f).read_bytes() for f in transformer)


def test_instruction_weights_need_one_per_instruction(tmp_path):
    config = replace(QUICK, instruction_weights=(1.0,) * (len(PROMPTS) - 1))
    with pytest.raises(ValueError, match="one weight per instruction"):
        train_proxy(tmp_path / "weights", config, log=lambda line: None)
    assert not (tmp_path / "weights").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_on_cuda_without_one_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_DEVICE", "cuda")
    with pytest.raises(SetupError, match="has no CUDA device"):
        train_proxy(tmp_path / "weights", QUICK, log=lambda line: None)
    assert not (tmp_path / "weights").exists()


def test_evaluation_report_structure(proxy, tmp_path):
    result = evaluate(proxy, edits=2, log=lambda line: None)
    report = result["report"]
    paths = write(result, tmp_path)
    assert paths["grid"].read_bytes()[:4] == b"\x89PNG"
    assert set(report["baselines"]) == {"identity_psnr_to_target", "none_psnr_to_target", "vae_ceiling_psnr_to_target"}
    methods = {(m["method"], m["level"]) for m in report["methods"]}
    assert ("TaylorSeer n=2, step units (product default)", "go fast") in methods
    assert ("diffusers TaylorSeer hook (lite)", "go really fast") in methods
    assert ("reuse last prediction (n=0)", "go fast") in methods
    for m in report["methods"]:
        if m["level"] != CURVE:
            assert m["transformer_calls"] == {"go fast": 18, "go really fast": 13}[m["level"]], m
        assert 0 <= m["closer_than_input"] <= 1 and -1 <= m["ssim_vs_none"] <= 1
    text = paths["markdown"].read_text()
    assert "| go fast | TaylorSeer n=2" in text and "| adaptive, tolerance 0.01 |" in text
    assert len(result["samples"]) == 2 and result["samples"][0]["prompt"] == PROMPTS[0]
    assert set(report["per_instruction"]) == set(PROMPTS[:2])
    assert report["per_instruction"][PROMPTS[0]]["edits"] == 1
    curve = {m["method"]: m for m in report["methods"] if m["level"] == CURVE}
    assert curve["fixed, 13 calls evenly spread"]["transformer_calls"] == 13
    adaptive = [m for name, m in curve.items() if name.startswith("adaptive")]
    assert all(2 * 3 <= m["transformer_calls"] <= 28 for m in adaptive)
    assert len(report["adaptive_verdict"]) == len(adaptive)
    assert paths["curve"].read_bytes()[:4] == b"\x89PNG"


def test_a_shape_is_right_where_the_target_has_it_in_the_targets_colour():
    rng = np.random.default_rng(3)
    for prompt in PROMPTS:
        scene = make_scene(rng)
        assert shapes_right(EDITS[prompt](scene), scene, prompt) == {"circle": True, "square": True}, prompt
    scene = make_scene(rng)
    # the input unedited: the circle keeps its cool colour where the target has it red, the square is kept
    assert shapes_right(scene.image, scene, "make the circle red") == {"circle": False, "square": True}
    assert shapes_right(scene.image, scene, "invert the colours") == {"circle": False, "square": False}
    # a flip moves the masks with the pixels
    flipped = EDITS["flip the image vertically"](scene)
    assert shapes_right(flipped, scene, "flip the image vertically") == {"circle": True, "square": True}


def test_shape_counts_on_a_trained_proxy(proxy):
    components = load_components(proxy, torch.device("cpu"), torch.float32)
    rows = count_shapes(components, scenes=2, log=lambda line: None)
    assert [row["instruction"] for row in rows] == PROMPTS
    assert all(0 <= row[key] <= 2 for row in rows for key in ("circle", "square", "closer"))
    inversion = inversion_colours(components, scenes=3)
    assert [sum(seen for _, seen in colours.values()) for colours in inversion.values()] == [3, 3]
    assert all(0 <= right <= seen for colours in inversion.values() for right, seen in colours.values())
    table = markdown(rows, inversion)
    assert all(prompt in table for prompt in PROMPTS) and "inversion, circles right" in table


def test_ssim_and_maps():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0.5
    m = even_map(28, 13)
    assert len(m) == 28 and sum(m) == 13 and m[0] and m[-1]


def test_a_lora_trained_on_the_proxy_goes_through_the_product_path(tmp_path):
    """A few steps of LoRA training on the committed proxy, written in the peft layout, converted by
    diffusers and merged by the product's LoRA path; the evaluation reports both sides."""
    from flux.lab.train_lora import QUICK as LORA_QUICK
    from flux.lab.train_lora import evaluate_lora, train_lora, write_grid
    from flux.lora import convert

    proxy_weights = weights.PROJECT_ROOT / "flux" / "proxy_weights"
    path = train_lora(proxy_weights, tmp_path / "l.safetensors", LORA_QUICK, log=lambda line: None)
    transformer = load_components(proxy_weights).transformer
    assert len(convert(path, "l", transformer).layers) > 20
    result = evaluate_lora(proxy_weights, path, edits=2)
    report = result["report"]
    assert set(report["psnr_to_target"]) == {"identity", "without_lora", "with_lora"}
    assert report["instruction"] == "make the background black"
    assert write_grid(result["samples"], tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_every_mutation_of_the_mutation_check_applies_to_the_tree(tmp_path):
    """The list in flux/lab/mutations.py follows the code: each change finds its text, and made in
    a copy it changes that copy only."""
    from flux.lab import mutations

    mutations.check_list()
    mutation = mutations.MUTATIONS[0]
    (tmp_path / mutation.file).parent.mkdir(parents=True)
    original = (mutations.ROOT / mutation.file).read_text()
    (tmp_path / mutation.file).write_text(original)
    for file, *_ in mutation.more:
        (tmp_path / file).write_text((mutations.ROOT / file).read_text())
    mutations.apply(mutation, tmp_path)
    assert mutation.new in (tmp_path / mutation.file).read_text()
    assert (mutations.ROOT / mutation.file).read_text() == original
