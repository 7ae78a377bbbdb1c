"""The configuration: every setting parsed and checked once at setup; a bad value stops setup()
with a SetupError that names the variable, the value and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux.config import SETTINGS, Config, FastPathConfig
from flux.errors import SetupError
from tests.test_predict import make_predictor

# values each setting refuses (at its edge and beyond), and what the message says it accepts, written
# here rather than read from SETTINGS (settings that take any text, a path or a token have none)
BAD_VALUES = {
    "WEIGHTS_BASE_URL": (["ftp://mirror/weights", "mirror/weights"], "an http(s) URL"),
    "HF_ENDPOINT": (["huggingface.co", "https://"], "an http(s) URL"),
    "CIVITAI_ENDPOINT": (["civitai"], "an http(s) URL"),
    "FLUX_LORA_OPERATOR_TOKENS": (["sometimes", "2"], "0 or 1"),
    "FLUX_DEVICE": (["banana", "cuda:x", "gpu"], "cpu, cuda or cuda:N"),
    "FLUX_COMPILE": (["yes please", "2"], "auto, 1 or 0"),
    "FLUX_COMPILE_BACKEND": (["in ductor", "1x"], "a torch.compile backend name"),
    "FLUX_COMPILE_SHAPES": (["bucketed", "Dynamic"], "dynamic or static"),
    "FLUX_COMPILE_MODE": (["fastest"], "default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
    "FLUX_FP8": (["maybe"], "auto, on or off"),
    "FLUX_ATTENTION": (["warp-speed"], "auto or a diffusers attention backend name (flash, _flash_3, native, ...)"),
    "FLUX_LORA_BRANCH_RANK": (["lots", "-1"], "auto or a whole number"),
    "FLUX_CONTEXT_PARALLEL": (["two", "0", "-1"], "a whole number, 1 or more"),
    "FLUX_CONTEXT_PARALLEL_TIMEOUT_S": (["0", "-1", "inf"], "a number of seconds above 0"),
    "FLUX_LORA_CACHE_BYTES": (["lots", "-1"], "a whole number of bytes"),
    "FLUX_LORA_MAX_BYTES": (["-5", "0"], "a whole number of bytes, 1 or more"),
    "FLUX_FETCH_ALLOW": (["10.0.0.0/8,bad host!,127.0.0.1:99999"],
                         "a comma list of hosts, addresses or networks, each with an optional :port"),
    "FLUX_FETCH_DEADLINE_S": (["soon", "0"], "a number of seconds above 0"),
    "FLUX_FETCH_MIN_RATE": (["fast", "-1", "inf"], "a number of bytes a second, 0 or more"),
    "FLUX_FETCH_RATE_WINDOW_S": (["-1", "0"], "a number of seconds above 0"),
}  # fmt: skip
FREE_TEXT = {"WEIGHTS_DIR", "HF_TOKEN", "CIVITAI_API_TOKEN", "FLUX_OUTPUT_DIR", "FLUX_COMPILE_CACHE", "FLUX_LORA_CACHE"}
# the edge each bounded setting accepts
EDGE_VALUES = {"FLUX_CONTEXT_PARALLEL": "1", "FLUX_LORA_MAX_BYTES": "1", "FLUX_LORA_CACHE_BYTES": "0",
               "FLUX_FETCH_MIN_RATE": "0", "FLUX_LORA_BRANCH_RANK": "0", "FLUX_FETCH_DEADLINE_S": "0.001"}  # fmt: skip


def test_every_setting_is_either_checked_or_free_text():
    assert set(BAD_VALUES) | FREE_TEXT == {s.name for s in SETTINGS}
    assert not set(BAD_VALUES) & FREE_TEXT


@pytest.mark.parametrize("name,value", [(name, value) for name, (values, _) in sorted(BAD_VALUES.items())
                                        for value in values])  # fmt: skip
def test_a_bad_value_names_the_variable_the_value_and_what_it_accepts(name, value):
    default = {s.name: s.default for s in SETTINGS}[name]
    with pytest.raises(SetupError) as info:
        Config.from_env({name: value})
    assert str(info.value) == f"{name}={value!r} is not valid: it accepts {BAD_VALUES[name][1]} (default {default!r})"


@pytest.mark.parametrize("name", sorted(EDGE_VALUES))
def test_a_bounded_setting_accepts_its_edge(name):
    Config.from_env({name: EDGE_VALUES[name]})


def test_what_the_caller_passes_overrides_the_environment():
    config = Config.from_env({"FLUX_FP8": "on", "FLUX_CONTEXT_PARALLEL": "4"}, FLUX_FP8="off")
    assert config.fp8 == "off" and config.context_parallel == 4


@pytest.mark.parametrize("value,read", [("ON", "on"), ("Off", "off"), ("TRUE", "on"), ("No", "off"), ("AUTO", "auto")])
def test_switches_read_any_case(value, read):
    assert Config.from_env({"FLUX_FP8": value}).fp8 == read
    if read != "auto":
        assert Config.from_env({"FLUX_LORA_OPERATOR_TOKENS": value}).lora_operator_tokens is (read == "on")


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
    assert config.fast == FastPathConfig.defaults()
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
