"""predict.py called directly: the Cog adapter without the server."""

from __future__ import annotations

import shutil

import pytest
from cog import Path as CogPath
from PIL import Image

from flux import sizes
from flux.errors import EditError, InputError, SetupError
from flux.lab.tiny import TINY_SIDE
from flux.request import INPUTS
from predict import Predictor
from tests.conftest import image_bytes, random_image

# every input but the prompt and the image, as a caller leaving it out gets it (a test calling
# predict() must pass them all: cog hands its own FieldInfo objects for those left out), with a
# short schedule, a fixed seed and png
DEFAULTS = {name: spec.default for name, spec in INPUTS.items() if name not in ("prompt", "input_image")} | dict(
    num_inference_steps=4, seed=1, output_format="png", reference_images=[]
)


def make_predictor(weights_dir, monkeypatch) -> Predictor:
    monkeypatch.setenv("WEIGHTS_DIR", str(weights_dir))
    predictor = Predictor()
    predictor.setup()
    return predictor


@pytest.fixture(scope="module")
def predictor(tiny_weights, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUX_OUTPUT_DIR", str(tmp_path_factory.mktemp("outputs")))
    p = make_predictor(tiny_weights, mp)
    yield p
    mp.undo()


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(image_bytes(random_image(320, 240)))
    return CogPath(path)


def test_predict_returns_an_image_of_the_expected_size(predictor, input_file):
    out = predictor.predict(prompt="make it red", input_image=input_file, **{**DEFAULTS, "aspect_ratio": "16:9"})
    with Image.open(out) as image:
        assert image.size == sizes.output_size("16:9", 320, 240, TINY_SIDE) == (336, 192)
        assert image.format == "PNG"


@pytest.mark.parametrize("path", ["/etc/hostname", "../weights/model_index.json"])
def test_path_strings_are_refused_before_anything_is_opened(predictor, path, monkeypatch):
    opened = []
    import flux.images

    monkeypatch.setattr(flux.images.Path, "read_bytes", lambda self: opened.append(self) or b"")
    with pytest.raises(InputError, match="uploaded file"):
        predictor.predict(prompt="x", input_image=path, **DEFAULTS)
    assert opened == []


def test_setup_hides_the_model_from_the_collector_and_requests_garbage_is_still_freed(
    predictor, input_file, tmp_path, monkeypatch
):
    """setup() freezes what loading made (gc.freeze), so the full collection after each prediction
    walks only the request's objects; a reference cycle left after setup is still freed by it."""
    import gc
    import weakref

    transformer = predictor.model.components.transformer
    assert gc.get_freeze_count() > 0 and not any(o is transformer for o in gc.get_objects())

    class Cycle:
        pass

    cycle = Cycle()
    cycle.me = cycle
    alive = weakref.ref(cycle)
    del cycle
    monkeypatch.setattr("flux.pipeline.edit", _fake_edit)
    predictor.predict(prompt="x", input_image=input_file, **DEFAULTS)
    assert alive() is None


def test_thirty_predictions_leave_a_bounded_number_of_outputs(predictor, input_file, tmp_path, monkeypatch):
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    monkeypatch.setattr(predictor, "outputs", out_dir)
    monkeypatch.setattr("flux.pipeline.edit", _fake_edit)
    outputs = {predictor.predict(prompt="x", input_image=input_file, **DEFAULTS) for _ in range(30)}
    assert len(outputs) == 30  # unique names: no prediction overwrites another
    assert len(list(out_dir.iterdir())) <= 8


def _fake_edit(components, image, plan, *, transformer, on_step=None, references=None, mask=None):
    """The edit itself is tested elsewhere; here only the adapter's file handling is."""
    import torch

    from flux.report import EditReport, EditResult

    report = EditReport(seed=plan.seed, acceleration=plan.sampling.acceleration, num_steps=plan.sampling.num_steps)
    return EditResult(image=Image.new("RGB", (16, 16)), latents=torch.zeros(1), report=report)


def test_flagged_image_is_never_returned(flagging_weights, input_file, monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "out"))
    predictor = make_predictor(flagging_weights, monkeypatch)
    with pytest.raises(EditError, match="safety checker flagged"):
        predictor.predict(prompt="x", input_image=input_file, **DEFAULTS)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    out = predictor.predict(prompt="x", input_image=input_file, **{**DEFAULTS, "disable_safety_checker": True})
    assert out.exists()


def test_setup_lists_missing_files_and_the_fetch_command(tiny_weights, tmp_path, monkeypatch):
    broken = tmp_path / "weights"
    shutil.copytree(tiny_weights, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "tokenizer_2" / "spiece.model").unlink()
    with pytest.raises(SetupError) as info:
        make_predictor(broken, monkeypatch)
    message = str(info.value)
    assert "missing: vae/diffusion_pytorch_model.safetensors" in message
    assert "missing: tokenizer_2/spiece.model" in message
    assert "python -m flux download" in message


def test_setup_on_an_empty_directory_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(SetupError, match="missing: transformer/config.json"):
        make_predictor(tmp_path, monkeypatch)


def test_server_starts_without_deprecation_warnings():
    import warnings

    from cog._inspector import create_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = create_predictor("predict", "Predictor")
    assert "prompt" in info.inputs


class _SettingsTripwire(dict):
    """os.environ's stand-in that records every read of one of the product's settings."""

    def __init__(self, values: dict, names: set[str]):
        super().__init__(values)
        self.names, self.read = names, []

    def _saw(self, key: object) -> None:
        if key in self.names:
            self.read.append(key)

    def __getitem__(self, key):
        self._saw(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._saw(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._saw(key)
        return super().__contains__(key)


def test_a_request_reads_no_setting(tiny_weights, input_file, tmp_path, monkeypatch):
    """The configuration is read once, in setup(): a whole prediction with a LoRA fetched from a
    server and a reference image reads none of the settings from the environment."""
    import os

    from flux.config import SETTINGS
    from flux.lab.loras import make_lora, write_lora
    from tests.weights_server import serve_tree

    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "out"))
    predictor = make_predictor(tiny_weights, monkeypatch)
    write_lora(tmp_path / "site" / "l.safetensors", make_lora(predictor.model.components.transformer, "peft", seed=3))
    tripwire = _SettingsTripwire(dict(os.environ), {s.name for s in SETTINGS})
    monkeypatch.setattr(os, "environ", tripwire)
    with serve_tree(tmp_path / "site") as (url, _):
        out = predictor.predict(prompt="x", input_image=input_file, **{
            **DEFAULTS, "lora_weights": f"{url}/l.safetensors", "reference_images": [input_file]})  # fmt: skip
    assert out.exists() and tripwire.read == []
