"""Smoke test of the benchmark at tiny size: the report's structure and the call counts."""

from __future__ import annotations

import json

import torch

from flux.lab.benchmark import components_for, run_benchmark, write_report


def test_tiny_benchmark_report(tmp_path):
    components = components_for("tiny", torch.device("cpu"), torch.float32)
    lines = []
    report = run_benchmark(components, "tiny", steps=28, repeats=2, log=lines.append)
    # the second repeat runs the methods in the opposite order: none always runs first
    order = [[line.split(": ", 1)[1].split(":")[0] for line in lines if line.startswith(f"  repeat {r}:")]
             for r in (1, 2)]  # fmt: skip
    assert len(order[0]) >= 6 and order[1] == order[0][::-1]
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| project | go fast | 18 |" in paths["markdown"].read_text()
    calls = {(r["method"], r["level"]): r["transformer_calls"] for r in data["results"]}
    assert calls[("project", "none")] == 28
    assert calls[("project", "go fast")] == 18
    assert calls[("project", "go really fast")] == 13
    assert calls[("diffusers pipeline", "none")] == 28
    assert calls[("diffusers TaylorSeer hook", "go fast")] == 18
    assert calls[("diffusers TaylorSeer hook (lite)", "go really fast")] == 13
    for r in data["results"]:
        assert r["note"] == "", r["note"]
        for key in ("denoise_seconds", "end_to_end_seconds", "speedup_denoise", "psnr_vs_none", "peak_memory_bytes"):
            assert r[key] is not None
    none = next(r for r in data["results"] if r["method"] == "project" and r["level"] == "none")
    assert none["latent_rel_error_vs_none"] == 0.0
    fast = next(r for r in data["results"] if r["method"] == "project" and r["level"] == "go fast")
    assert 0 < fast["latent_rel_error_vs_none"] < 1
    assert fast["cache_bytes"] > 0 and fast["forecast_cost_ratio"] is not None
    assert data["ideal_speedup"]["go really fast"] == 28 / 13


def test_reference_costs_report_each_count():
    from flux.lab.benchmark import reference_costs

    components = components_for("tiny", torch.device("cpu"), torch.float32)
    rows = reference_costs(components, "tiny", steps=4, log=lambda line: None)
    assert [r["references"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["conditioning_tokens"] == 256 and all(r["conditioning_tokens"] <= 2 * 256 for r in rows)
    assert all(r["seconds_per_edit"] > 0 for r in rows) and rows[0]["ratio_to_no_reference"] == 1.0
