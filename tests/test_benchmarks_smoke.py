"""Smoke test of the benchmark suite (benchmarks/bench_cross_entropy.py): one tiny CPU shape, a few seconds.

It checks that the suite runs end to end and writes sane results, not how fast anything is, and that a request it
cannot serve (no GPU, nothing to measure) ends in one clear line and exit code 2.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cross_entropy.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cross_entropy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_suite_runs_on_one_cpu_shape(tmp_path):
    bench = _load_bench()
    # V = 257: odd, and not a multiple of any chunk or vector width.
    json_path = bench.main(["--device", "cpu", "--quick", "--no-plots", "--shapes", "2x16x257",
                            "--impls", "fastce,torch-f32", "--out", str(tmp_path)])
    result = json.loads(Path(json_path).read_text())

    header = result["header"]
    assert header["device_slug"] == "cpu"
    assert header["copy_gbps"] > 0
    assert {"torch_version", "fastce_version", "date"} <= header.keys()

    rows = result["rows"]
    fastce_rows = [row for row in rows if row["impl"].startswith("fastce-")]
    assert {row["mode"] for row in fastce_rows} == {"fwd+bwd", "fwd+bwd-inplace", "fwd"}
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert row["gbps"] > 0, row
        assert row["loss_rel_err"] < 1e-5, row
        if row["mode"] != "fwd":
            assert row["grad_rel_err"] < 1e-4, row
    for row in fastce_rows:
        if row["mode"] == "fwd+bwd-inplace":
            assert row["grad_aliases_logits"] is True, row
        else:
            assert row["logits_intact"] is True, row

    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cpu.csv", "cpu.json", "cpu.md"]
    assert "| fastce-torch | fwd+bwd |" in (tmp_path / "cpu.md").read_text()


def test_auto_backend_table_reads_suite_results(tmp_path, capsys):
    """benchmarks/auto_backend_table.py on a results JSON: one row per shape and mode that has both backends."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "auto_backend_table.py"
    spec = importlib.util.spec_from_file_location("auto_backend_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    header = {"device": "GPU", "torch_version": "t", "triton_version": "x", "date": "d", "dtype": "bfloat16",
              "validate": True}
    rows = [{"impl": impl, "mode": "fwd+bwd", "rows": 8, "vocab": 5, "status": "ok", "median_ms": ms}
            for impl, ms in [("fastce-triton", 2.0), ("fastce-cuda", 1.0), ("hf-eager", 9.0)]]
    rows.append({"impl": "fastce-triton", "mode": "fwd", "rows": 8, "vocab": 5, "status": "ok", "median_ms": 1.0})
    (tmp_path / "r.json").write_text(json.dumps({"header": header, "rows": rows}))
    table.main(str(tmp_path / "r.json"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 ")]
    assert lines == ["| 8 × 5 | fwd+bwd | 2.000 | **1.000** | 0.50 |"]


def test_cuda_device_without_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """``--device cuda`` where there is no GPU: one line on stderr and exit code 2, not torch's traceback."""
    bench = _load_bench()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # a machine without a GPU, on any machine
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--quick", "--no-plots", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("bench_cross_entropy.py: error: --device cuda: ")
    assert "no CUDA device" in captured.err or "without CUDA" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_measure_says_why(tmp_path, capsys):
    """``--impls fastce-triton`` on the CPU: exit code 2 and the reason, not a run of 0 measurements per shape."""
    bench = _load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--impls", "fastce-triton", "--no-plots", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to measure on cpu for --impls fastce-triton" in err
    assert "fastce-triton: the suite runs it on a CUDA device only" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_impl_is_a_usage_error(tmp_path, capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--impls", "fastce,hf-eagre", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--impls: unknown ['hf-eagre']" in capsys.readouterr().err
