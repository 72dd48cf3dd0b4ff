"""``benchmarks/backtest.py``: every run of the whole pipeline it makes, the split by
service too, is on the partitions asked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace


def _benchmark_module():
    path = Path(__file__).parents[1] / "benchmarks" / "backtest.py"
    spec = importlib.util.spec_from_file_location("backtest_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_split_by_service_runs_on_the_partitions_asked(monkeypatch, capsys):
    benchmark = _benchmark_module()
    partitions_run = []

    async def run_backtest(frames, config, *, name, partitions=benchmark.PARTITIONS):
        partitions_run.append(partitions)
        return SimpleNamespace(cpu_s=1.0, seconds=1.0, predictions=0, entries=0)

    monkeypatch.setattr(benchmark, "run_backtest", run_backtest)
    monkeypatch.setattr(benchmark, "simulated_frames", lambda seed, minutes: [(0.0, b"")])
    monkeypatch.setattr(
        benchmark,
        "batch_path",
        lambda frames, min_score: {"cpu_s": 1.0, "wall_s": 1.0, "predictions": 0, "entries": 0},
    )
    asked = benchmark.PARTITIONS + 3
    monkeypatch.setattr(sys, "argv", ["backtest.py", "--partitions", str(asked), "--by-service"])
    benchmark.main()
    assert partitions_run == [asked, asked]
    assert "whole pipeline by service" in capsys.readouterr().out
