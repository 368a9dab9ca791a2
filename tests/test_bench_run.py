"""tools/bench_run.py: `run` timed for both backends beside OpenCV's forward (one run)."""
from __future__ import annotations

from tools.bench_run import main, render, time_runs


def test_time_runs_gives_a_row_per_runtime(example_outputs):
    ex, outs = example_outputs
    rows = time_runs(outs["float32"], ex.prototxt, ex.caffemodel, runs=2)
    assert [r.figure.split()[0] for r in rows] == ["`run", "`run", "OpenCV"]
    assert "mlx" in rows[1].figure
    assert all(len(r.runs) == 2 and 0 < r.best <= r.median for r in rows)
    assert render(rows, "t").count("\n| ") == 5          # header, rule, 3 rows


def test_cli_converts_and_prints_the_table(example_outputs, capsys):
    ex, _ = example_outputs
    assert main([str(ex.prototxt), str(ex.caffemodel), "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "`run --backend mlx`" in out and "OpenCV forward" in out
