"""The configuration: every setting parsed and checked once at setup; a bad value stops setup()
with a SetupError that names the variable, the value and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux.config import SETTINGS, Config, FastPathConfig
from flux.errors import SetupError
from tests.test_predict import make_predictor

# a value each setting refuses (settings that take any text, a path or a token have none)
BAD_VALUES = {
    "WEIGHTS_BASE_URL": "ftp://mirror/weights",
    "HF_ENDPOINT": "huggingface.co",
    "CIVITAI_ENDPOINT": "civitai",
    "FLUX_LORA_OPERATOR_TOKENS": "sometimes",
    "FLUX_DEVICE": "banana",
    "FLUX_COMPILE": "yes please",
    "FLUX_COMPILE_BACKEND": "in ductor",
    "FLUX_COMPILE_SHAPES": "bucketed",
    "FLUX_COMPILE_MODE": "fastest",
    "FLUX_FP8": "maybe",
    "FLUX_ATTENTION": "warp-speed",
    "FLUX_LORA_BRANCH_RANK": "lots",
    "FLUX_CONTEXT_PARALLEL": "two",
    "FLUX_CONTEXT_PARALLEL_TIMEOUT_S": "0",
    "FLUX_LORA_CACHE_BYTES": "lots",
    "FLUX_LORA_MAX_BYTES": "-5",
    "FLUX_FETCH_ALLOW": "10.0.0.0/8,bad host!,127.0.0.1:99999",
    "FLUX_FETCH_DEADLINE_S": "soon",
    "FLUX_FETCH_MIN_RATE": "fast",
    "FLUX_FETCH_RATE_WINDOW_S": "-1",
}
FREE_TEXT = {"WEIGHTS_DIR", "HF_TOKEN", "CIVITAI_API_TOKEN", "FLUX_OUTPUT_DIR", "FLUX_COMPILE_CACHE", "FLUX_LORA_CACHE"}


def test_every_setting_is_either_checked_or_free_text():
    assert set(BAD_VALUES) | FREE_TEXT == {s.name for s in SETTINGS}
    assert not set(BAD_VALUES) & FREE_TEXT


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_names_the_variable_the_value_and_what_it_accepts(name):
    setting = next(s for s in SETTINGS if s.name == name)
    with pytest.raises(SetupError) as info:
        Config.from_env({name: BAD_VALUES[name]})
    assert str(info.value).startswith(f"{name}={BAD_VALUES[name]!r} is not valid: it accepts {setting.accepts}")


@pytest.mark.parametrize(
    "name,value", [("FLUX_FP8", "maybe"), ("FLUX_CONTEXT_PARALLEL", "two"), ("FLUX_FETCH_MIN_RATE", "fast"),
                   ("FLUX_LORA_CACHE_BYTES", "lots")],
)  # fmt: skip
def test_a_bad_value_stops_setup_before_anything_loads(tiny_weights, monkeypatch, name, value):
    loaded = []
    monkeypatch.setattr("flux.pipeline.load_components", lambda *a, **k: loaded.append(1))
    monkeypatch.setenv(name, value)
    with pytest.raises(SetupError, match=f"^{name}='{value}' is not valid"):
        make_predictor(tiny_weights, monkeypatch)
    assert loaded == []


def test_defaults_and_what_they_mean():
    config = Config.from_env({})
    assert config.weights_dir == Path("weights") and config.weights_base_url is None and config.hf_token is None
    assert config.context_parallel == 1 and config.lora_operator_tokens is False and config.device is None
    assert config.fast == FastPathConfig()
    assert config.fetch_limits().deadline_s == 600 and config.fetch_limits(deadline=False).deadline_s is None
    assert config.fetch_policy.allowed == ()


def test_values_are_parsed_into_their_types():
    config = Config.from_env({
        "FLUX_COMPILE": "1", "FLUX_FP8": "off", "FLUX_LORA_BRANCH_RANK": "16", "FLUX_CONTEXT_PARALLEL": "4",
        "FLUX_FETCH_ALLOW": "mirror.internal, 10.0.0.0/8:8080", "HF_ENDPOINT": "http://127.0.0.1:9/",
        "FLUX_LORA_OPERATOR_TOKENS": "true", "FLUX_DEVICE": "cuda:1", "FLUX_ATTENTION": "_flash_3",
    })  # fmt: skip
    assert config.fast.compile == "on" and config.fast.compiles_on("cpu") and config.fast.fp8 == "off"
    assert config.fast.branch_rank(fp8_applied=False, auto_rank=64) == 16
    assert config.context_parallel == 4 and config.lora_operator_tokens is True and config.device == "cuda:1"
    assert config.hf_endpoint == "http://127.0.0.1:9"
    assert [(a.host, a.port) for a in config.fetch_allow] == [("mirror.internal", None), (None, 8080)]
    auto = Config.from_env({}).fast
    assert auto.compiles_on("cuda") and not auto.compiles_on("cpu")
    assert auto.branch_rank(True, 64) == 64 and auto.branch_rank(False, 64) == 0
    assert auto.wants_fp8(True) and not auto.wants_fp8(False)


def test_an_empty_value_counts_as_unset():
    assert Config.from_env({"FLUX_CONTEXT_PARALLEL": "", "HF_TOKEN": ""}) == Config.from_env({})


def test_a_worker_reads_back_the_same_configuration():
    config = Config.from_env({"FLUX_CONTEXT_PARALLEL": "2", "FLUX_COMPILE": "1"}, WEIGHTS_DIR="/models/flux")
    assert Config.from_env(config.process_environ()) == config


def test_tokens_are_masked_in_what_setup_logs():
    described = Config.from_env({"HF_TOKEN": "hf_SECRET", "CIVITAI_API_TOKEN": "civ"}).described()
    assert described["HF_TOKEN"] == "set" and described["CIVITAI_API_TOKEN"] == "set"
    assert "SECRET" not in str(described) and described["FLUX_FP8"] == "auto"
