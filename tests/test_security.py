"""Secrets never leak: a token given for the gated weights appears in no log, error or metric."""

from __future__ import annotations

import json
import logging

import pytest
from cog import Path as CogPath

from flux.fetch import FetchError, WeightsRemote, fetch
from tests.conftest import fetch_policy, image_bytes, random_image
from tests.test_predict import DEFAULTS, make_predictor
from tests.weights_server import Faults, serve_tree

TOKEN = "hf_SECRETtoken0123456789"


def test_setup_and_prediction_logs_hold_no_token(tiny_weights, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "out"))
    caplog.set_level(logging.DEBUG)
    predictor = make_predictor(tiny_weights, monkeypatch)
    metrics = {}
    monkeypatch.setattr(predictor, "record_metric", lambda key, value, mode="replace": metrics.update({key: value}))
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(64, 64)))
    predictor.predict(prompt="x", input_image=CogPath(source), **DEFAULTS)
    with pytest.raises(Exception) as failure:
        predictor.predict(prompt="x", input_image="/etc/hostname", **DEFAULTS)
    out, err = capfd.readouterr()
    everything = caplog.text + out + err + json.dumps(metrics) + str(failure.value)
    assert metrics["transformer_calls"] == 4
    assert TOKEN not in everything


def test_fetch_errors_hold_no_token(tiny_weights, tmp_path, capfd):
    manifest = json.loads((tiny_weights / "weights_manifest.json").read_text())
    with serve_tree(tiny_weights, Faults(token="the-right-one")) as (url, _), pytest.raises(FetchError) as info:
        remote = WeightsRemote(base_url=url + f"/?t={TOKEN}", token=TOKEN, policy=fetch_policy())
        fetch(tmp_path / "w", manifest, remote, retries=0, progress=False)
    out, err = capfd.readouterr()
    assert TOKEN not in str(info.value) + out + err
