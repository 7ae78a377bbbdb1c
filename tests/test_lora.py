"""LoRA per request: sources, the disk cache, diffusers' conversion, exact merge and restore,
bad LoRAs, and swapping under the compiled transformer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch._dynamo

from flux import lora, lora_sources
from flux.config import FastPathConfig
from flux.edit import edit
from flux.errors import InputError
from flux.fast import compile_transformer
from flux.lab.loras import make_lora, write_lora
from flux.lab.plans import direct, lab_plan
from flux.loading import load_components
from tests.conftest import lora_store, random_image
from tests.counting import COUNTING
from tests.weights_server import Faults, serve_tree


@pytest.fixture
def lora_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def transformer(tiny_weights):
    return load_components(tiny_weights).transformer


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


def test_sources_resolve_to_files(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    assert lora_store().resolve("me/style/lora.safetensors") == (
        "https://huggingface.co/me/style/resolve/main/lora.safetensors", "file"
    )  # fmt: skip
    assert lora_store().resolve("https://huggingface.co/me/style/blob/v2/sub/x.safetensors") == (
        "https://huggingface.co/me/style/resolve/v2/sub/x.safetensors", "file"
    )  # fmt: skip
    assert lora_store().resolve("https://replicate.delivery/abc/trained_model.tar") == (
        "https://replicate.delivery/abc/trained_model.tar", "tar"
    )  # fmt: skip
    civitai = "https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor"
    assert lora_store().resolve(civitai) == (civitai, "file")
    assert lora_sources.describe("https://x.org/a.safetensors?token=secret") == "https://x.org/a.safetensors"


@pytest.mark.parametrize(
    "source,message",
    [
        ("https://example.com/lora.bin", "pickle file"),
        ("me/style/model.ckpt", "pickle file"),
        ("https://example.com/lora.pt?download=1", "pickle file"),
        ("/etc/passwd", "must be a Hugging Face repo"),
        ("ftp://example.com/x.safetensors", "must be a Hugging Face repo"),
    ],
)
def test_refused_sources_fail_before_any_download(source, message):
    with pytest.raises(InputError, match=message):
        lora_store().resolve(source)


def test_hub_repo_and_cache(lora_env, transformer, monkeypatch):
    """A repo id asks the Hub (here a local server) for its one .safetensors; the second use downloads nothing."""
    root = lora_env / "hub"
    write_lora(root / "me" / "style" / "resolve" / "main" / "lora.safetensors", make_lora(transformer, "peft"))
    api = root / "api" / "models" / "me" / "style" / "revision"
    api.mkdir(parents=True)
    (api / "main").write_text(json.dumps({"siblings": [{"rfilename": "README.md"}, {"rfilename": "lora.safetensors"}]}))
    with serve_tree(root, Faults(token="hf_secret")) as (url, log):
        monkeypatch.setenv("HF_ENDPOINT", url)
        tokens = lora_sources.LoraTokens(hf="hf_secret")
        path, downloaded = lora_store().fetch("me/style", tokens=tokens)
        assert downloaded and path.is_file()
        again, downloaded_again = lora_store().fetch("me/style", tokens=tokens)
        assert again == path and not downloaded_again
        assert [r["path"] for r in log.requests] == [
            "api/models/me/style/revision/main",
            "me/style/resolve/main/lora.safetensors",
        ]
        assert all(r["authorization"] == "Bearer hf_secret" for r in log.requests)
        with pytest.raises(InputError, match=r"access denied \(HTTP 401\).*hf_api_token") as caught:
            lora_store().fetch("me/other", tokens=lora_sources.LoraTokens(hf="wrong"))
        assert "wrong" not in str(caught.value)


def test_civitai_model_pages(lora_env, transformer, monkeypatch):
    """A CivitAI model page asks CivitAI's API (here a local server) for its SafeTensor file: the
    version the page names, else the newest; the token goes to CivitAI only; pickles are refused."""
    root = lora_env / "civitai"
    write_lora(root / "files" / "v2.safetensors", make_lora(transformer, "kohya", seed=2))
    write_lora(root / "files" / "v1.safetensors", make_lora(transformer, "kohya", seed=1))
    with serve_tree(root, Faults(token="civ_secret")) as (url, log):

        def version(number: int, files: list[dict]) -> dict:
            return {"id": number, "files": files}

        def file(name: str, fmt: str = "SafeTensor", primary: bool = False) -> dict:
            return {"downloadUrl": f"{url}/files/{name}", "metadata": {"format": fmt}, "primary": primary}

        api = root / "api" / "v1" / "models"
        api.mkdir(parents=True)
        (api / "77").write_text(json.dumps({"modelVersions": [
            version(202, [file("v2.pt", "PickleTensor"), file("v2.safetensors", primary=True)]),
            version(101, [file("v1.safetensors")]),
        ]}))  # fmt: skip
        (api / "78").write_text(json.dumps({"modelVersions": [version(303, [file("only.ckpt", "PickleTensor")])]}))
        monkeypatch.setenv("CIVITAI_ENDPOINT", url)
        tokens = lora_sources.LoraTokens(civitai="civ_secret")
        page = "https://civitai.com/models/77"
        assert lora_store().resolve(f"{page}/some-style", tokens=tokens) == (f"{url}/files/v2.safetensors", "file")
        assert lora_store().resolve(f"{page}?modelVersionId=101", tokens=tokens) == (f"{url}/files/v1.safetensors",
                                                                                    "file")  # fmt: skip
        path, downloaded = lora_store().fetch(page, tokens=tokens)
        assert downloaded and lora.convert(path, "civitai", transformer).layers
        assert all(r["authorization"] == "Bearer civ_secret" for r in log.requests)
        with pytest.raises(InputError, match="has no SafeTensor file"):
            lora_store().resolve("https://civitai.com/models/78", tokens=tokens)
        with pytest.raises(InputError, match="has no version 999"):
            lora_store().resolve(f"{page}?modelVersionId=999", tokens=tokens)
        with pytest.raises(InputError, match=r"not found \(HTTP 404\)"):
            lora_store().resolve("https://civitai.com/models/79", tokens=tokens)
        with pytest.raises(InputError, match=r"access denied \(HTTP 401\).*civitai_api_token"):
            lora_store().resolve(page, tokens=lora_sources.LoraTokens(civitai="wrong"))


def test_tar_archives(lora_env, transformer):
    good = io.BytesIO()
    write_lora(lora_env / "l.safetensors", make_lora(transformer, "peft"))
    data = (lora_env / "l.safetensors").read_bytes()
    root = lora_env / "site"
    root.mkdir()
    _tar(root / "ok.tar", {"output/config.yaml": b"x", "output/lora.safetensors": data})
    _tar(root / "two.tar", {"a.safetensors": data, "b.safetensors": data})
    _tar(root / "escape.tar", {"../../evil.safetensors": data})
    _tar(root / "link.tar", {"lora.safetensors": data}, links={"other.safetensors": "/etc/passwd"})
    del good
    with serve_tree(root) as (url, _):
        path, _ = lora_store().fetch(f"{url}/ok.tar")
        assert path.read_bytes() == data
        for name, message in [
            ("two.tar", "exactly one .safetensors"),
            ("escape.tar", "outside its folder"),
            ("link.tar", "link"),
        ]:
            with pytest.raises(InputError, match=message):
                lora_store().fetch(f"{url}/{name}")
    assert not list((lora_env / "cache").glob("*.part*")) and not (lora_env / "evil.safetensors").exists()


def test_download_failures_and_limits(lora_env, transformer, monkeypatch):
    root = lora_env / "site"
    write_lora(root / "good.safetensors", make_lora(transformer, "peft"))
    (root / "big.safetensors").write_bytes((root / "good.safetensors").read_bytes())
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    faults = Faults(drop_after={"good.safetensors": 100})
    with serve_tree(root, faults) as (url, log):
        with pytest.raises(InputError, match="could not fetch the LoRA"):
            lora_store().fetch(f"{url}/missing.safetensors")
        with pytest.raises(InputError, match="not a valid .safetensors file"):
            lora_store().fetch(f"{url}/corrupt.safetensors")
        monkeypatch.setenv("FLUX_LORA_MAX_BYTES", "1000")
        with pytest.raises(InputError, match="larger than the limit of 1000 bytes"):
            lora_store().fetch(f"{url}/big.safetensors")
        monkeypatch.delenv("FLUX_LORA_MAX_BYTES")
        # a dropped connection is resumed with a Range request
        path, downloaded = lora_store().fetch(f"{url}/good.safetensors")
        assert downloaded and path.read_bytes() == (root / "good.safetensors").read_bytes()
        assert any(r["range"] for r in log.requests)
    assert not list((lora_env / "cache").glob("*.part"))


def test_cache_evicts_the_least_recently_used(lora_env, monkeypatch):
    cache = lora_env / "cache"
    cache.mkdir()
    paths = []
    for i in range(3):
        p = cache / f"{i}.safetensors"
        p.write_bytes(b"x" * 1000)
        import os

        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    monkeypatch.setenv("FLUX_LORA_CACHE_BYTES", "2500")
    assert lora_store().evict() == [paths[0]]
    assert [p.exists() for p in paths] == [False, True, True]


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_formats_convert_through_diffusers(transformer, tmp_path, fmt):
    path = write_lora(tmp_path / "l.safetensors", make_lora(transformer, fmt))
    loaded = lora.convert(path, fmt, transformer)
    assert loaded.layers
    for name, (down, up) in loaded.layers.items():
        module = transformer.get_submodule(name)
        assert down.shape[1] == module.in_features and up.shape[0] == module.out_features


def test_fal_kontext_format_converts_onto_the_real_model_layers(tmp_path):
    """diffusers' fal Kontext converter assumes the real 19 + 38 blocks at width 3072: checked on the
    real architecture built on the meta device (no memory), with a rank-1 LoRA."""
    from diffusers import FluxTransformer2DModel

    from flux.lab import architecture

    with torch.device("meta"):
        real = FluxTransformer2DModel(**{k: v for k, v in architecture.TRANSFORMER.items() if not k.startswith("_")})
    with torch.device("cpu"):
        sd = make_lora(real, "fal", rank=1, scale=0.01)
    loaded = lora.convert(write_lora(tmp_path / "fal.safetensors", sd), "fal", real)
    assert len(loaded.layers) > 19 * 10  # every double and single block's linears


def test_loras_for_other_models_or_shapes_are_errors(transformer, tmp_path):
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}  # fmt: skip
    with pytest.raises(InputError, match="matches no layer|not one diffusers"):
        lora.convert(write_lora(tmp_path / "sdxl.safetensors", sdxl), "sdxl", transformer)
    wrong = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}  # fmt: skip
    with pytest.raises(InputError, match="do not fit the layer"):
        lora.convert(write_lora(tmp_path / "wrong.safetensors", wrong), "wrong", transformer)
    nowhere = {"transformer.not_a_layer.lora_A.weight": torch.zeros(4, 32),
               "transformer.not_a_layer.lora_B.weight": torch.zeros(32, 4)}  # fmt: skip
    with pytest.raises(InputError, match="not a linear layer of this model"):
        lora.convert(write_lora(tmp_path / "nowhere.safetensors", nowhere), "nowhere", transformer)


def test_merge_and_exact_restore(tiny_weights, tmp_path):
    t = load_components(tiny_weights).transformer
    base = {k: v.clone() for k, v in t.state_dict().items()}
    state = lora.LoraState(t)
    a = lora.convert(write_lora(tmp_path / "a.safetensors", make_lora(t, "peft", rank=4, seed=1)), "a", t)
    b = lora.convert(write_lora(tmp_path / "b.safetensors", make_lora(t, "kohya", rank=8, seed=2)), "b", t)
    for wanted in ([(a, 1.0)], [(a, 0.5), (b, 1.0)], [(b, -1.0)], [(a, 1.0)], [(a, 1.0)]):
        state.apply(wanted)
        assert not all(torch.equal(base[k], v) for k, v in t.state_dict().items())
    name = next(iter(a.layers))
    down, up = a.layers[name]
    expected = (base[f"{name}.weight"].float() + up @ down).to(base[f"{name}.weight"].dtype)
    assert torch.equal(t.get_submodule(name).weight, expected)
    state.apply([(a, 0.0)])  # strength 0: the base weights, bit for bit
    assert all(torch.equal(base[k], v) for k, v in t.state_dict().items())
    state.apply([(b, 2.0)])
    state.apply([])
    assert all(torch.equal(base[k], v) for k, v in t.state_dict().items())
    assert state.originals == {}


@pytest.mark.parametrize("how", ["merged", "side branch"])
def test_swapping_loras_and_strengths_never_compiles(tiny_weights, tmp_path, how):
    """Dynamo (counting backend): two LoRAs of different ranks and several strengths, one graph, merged
    into the weights or (as beside FP8) in a rank-16 side branch, where the pair's rank 20 is reduced."""
    c = load_components(tiny_weights)
    rank = 16 if how == "side branch" else 0
    if rank:
        lora.install_branches(c.transformer, rank, c.dtype)
    torch._dynamo.reset()
    compile_transformer(c.transformer, FastPathConfig.defaults(compile_backend="flux_test_counting"))
    state = lora.LoraState(c.transformer, branch_rank=rank)
    low = lora.convert(
        write_lora(tmp_path / "r4.safetensors", make_lora(c.transformer, "peft", rank=4)), "r4", c.transformer
    )
    high = lora.convert(
        write_lora(tmp_path / "r16.safetensors", make_lora(c.transformer, "kohya", rank=16)), "r16", c.transformer
    )
    image = random_image(32, 32)
    settings = lab_plan(c, image, "x", 32, 32, seed=1, num_steps=4, condition=(32, 32))
    base = edit(c, image, settings, transformer=direct(c)).latents  # compiles
    graphs = COUNTING.graphs
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for wanted in ([(low, 1.0)], [(high, 1.0)], [(high, 0.3)], [(low, 2.0), (high, -0.5)], []):
            state.apply(wanted)
            outputs.append(edit(c, image, settings, transformer=direct(c)).latents)
    assert COUNTING.graphs == graphs
    assert not torch.equal(outputs[0], base) and not torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[-1], base)
    torch._dynamo.reset()


def test_fp8_weights_refuse_a_merge_and_keep_the_base(tiny_weights, tmp_path):
    """Where the fast path made the weights FP8 without side branches, no LoRA is merged into them."""
    from flux.errors import EditError

    t = load_components(tiny_weights).transformer
    a = lora.convert(write_lora(tmp_path / "a.safetensors", make_lora(t, "peft", seed=3)), "a", t)
    base = {k: v.clone() for k, v in t.state_dict().items()}
    state = lora.LoraState(t, fp8=True)
    with pytest.raises(EditError, match="FP8-quantized weights"):
        state.apply([(a, 1.0)])
    assert all(torch.equal(base[k], v) for k, v in t.state_dict().items()) and state.originals == {}
    state.apply([(a, 0.0)])  # no LoRA at all is served as ever


def test_fit_rank_is_exact_within_the_rank_and_the_best_approximation_beyond():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g)) for r in (4, 8)]
    delta = sum(up @ down for down, up in factors)
    down, up = lora.fit_rank(factors, 12)
    assert down.shape == (12, 24) and up.shape == (40, 12)
    torch.testing.assert_close(up @ down, delta)
    down, up = lora.fit_rank(factors, 5)
    assert down.shape == (5, 24) and up.shape == (40, 5)
    singular = torch.linalg.svdvals(delta)
    # Eckart-Young: the best rank-5 approximation misses exactly the 6th and later singular values
    torch.testing.assert_close((delta - up @ down).norm(), singular[5:].norm(), rtol=1e-4, atol=1e-4)


def test_a_merge_into_fp8_loses_a_small_lora():
    """The reason for the side branch: per-row e4m3 rounding of W + delta keeps little of a small delta."""
    from flux.lab.loras import fp8_merge_error

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=g) * 0.02
    delta = torch.randn(256, 4, generator=g) @ torch.randn(4, 256, generator=g)
    small, large = (fp8_merge_error(weight, delta * ratio * weight.norm() / delta.norm()) for ratio in (0.01, 0.3))
    assert small[0] > 1.0 and small[1] < 0.6
    assert large[0] < 0.2 and large[1] > 0.98


def test_side_branch_applies_loras_without_touching_the_weights(tiny_weights, tmp_path):
    """Beside FP8 weights (a tensor subclass here, as torchao's are) a LoRA goes into the side branch:
    the weights never change, the edit matches the merged LoRA's, and no LoRA is the base bit for bit."""

    class QuantizedStandIn(torch.Tensor):
        pass

    merged_c, c = load_components(tiny_weights), load_components(tiny_weights)
    a = lora.convert(write_lora(tmp_path / "a.safetensors", make_lora(c.transformer, "peft", rank=4, seed=1)), "a",
                     c.transformer)  # fmt: skip
    b = lora.convert(write_lora(tmp_path / "b.safetensors", make_lora(c.transformer, "kohya", rank=8, seed=2)), "b",
                     c.transformer)  # fmt: skip
    image = random_image(32, 32)
    settings = lab_plan(c, image, "x", 32, 32, seed=1, num_steps=4)
    base = edit(c, image, settings, transformer=direct(c)).latents
    assert lora.install_branches(c.transformer, 16, c.dtype) == sum(
        isinstance(m, torch.nn.Linear) for m in c.transformer.modules()
    )
    assert torch.equal(edit(c, image, settings, transformer=direct(c)).latents, base)
    weights = {k: v.clone() for k, v in c.transformer.state_dict().items()}
    state, merged = lora.LoraState(c.transformer, branch_rank=16, fp8=True), lora.LoraState(merged_c.transformer)
    for wanted in ([(a, 1.0)], [(a, 0.5), (b, -1.0)]):
        state.apply(wanted)
        merged.apply(wanted)
        out = edit(c, image, settings, transformer=direct(c)).latents
        reference = edit(merged_c, image, settings, transformer=direct(merged_c)).latents
        assert not torch.equal(out, base)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(weights[k], v) for k, v in c.transformer.state_dict().items())
    state.apply([])
    assert torch.equal(edit(c, image, settings, transformer=direct(c)).latents, base) and state.branched == set()
    layer = c.transformer.get_submodule(sorted(a.layers)[-1])
    layer.weight = torch.nn.Parameter(
        torch.Tensor._make_subclass(QuantizedStandIn, layer.weight.data), requires_grad=False
    )
    state.apply([(a, 1.0)])  # no merge is attempted into the quantized weight
    assert torch.count_nonzero(layer.lora_up) > 0 and state.originals == {}


def test_a_predictor_with_the_side_branch_serves_loras(tiny_weights, tmp_path, monkeypatch):
    """setup() installs the branch where FLUX_LORA_BRANCH_RANK asks (on a GPU: wherever FP8 is on), and
    the LoRA state is told so."""
    from predict import Predictor
    from tests.conftest import image_bytes
    from tests.test_predict import DEFAULTS, CogPath

    transformer = load_components(tiny_weights).transformer
    write_lora(tmp_path / "site" / "peft.safetensors", make_lora(transformer, "peft", rank=4, seed=1))
    (tmp_path / "in.png").write_bytes(image_bytes(random_image(64, 48)))
    for name, value in {"WEIGHTS_DIR": str(tiny_weights), "FLUX_LORA_BRANCH_RANK": "8",
                        "FLUX_LORA_CACHE": str(tmp_path / "cache"), "FLUX_OUTPUT_DIR": str(tmp_path / "out")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    predictor = Predictor()
    predictor.setup()
    assert predictor.model.runtime.decided.summary()["lora_branch"].startswith("rank 8 on ")
    assert predictor.model.runtime.loras.branch_rank == 8
    outputs = []
    with serve_tree(tmp_path / "site") as (url, _):
        for source in ("", f"{url}/peft.safetensors", ""):
            inputs = {**DEFAULTS, "lora_weights": source}
            image = CogPath(tmp_path / "in.png")
            outputs.append(Path(predictor.predict(prompt="x", input_image=image, **inputs)).read_bytes())
    assert outputs[0] != outputs[1] and outputs[0] == outputs[2]


def test_a_bad_image_fails_before_any_lora_is_downloaded(lora_env, transformer):
    from flux.pipeline import run_edit
    from flux.request import EditRequest
    from flux.weights import PROXY_DIR
    from tests.conftest import model_of

    write_lora(lora_env / "site" / "l.safetensors", make_lora(transformer, "peft"))
    model = model_of(load_components(PROXY_DIR))
    with serve_tree(lora_env / "site") as (url, log):
        lora_file = lora_sources.LoraRequest(f"{url}/l.safetensors")
        with pytest.raises(InputError, match="input_image is not a readable image"):
            run_edit(model, EditRequest("x", b"not an image", loras=(lora_file,)))
        assert log.requests == []
