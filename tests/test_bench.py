"""iconv.bench: the baselines compute the right thing, the timing loop interleaves, files round-trip,
the training benchmark measures the right step, the CLI writes files.

No assertion here depends on how fast anything ran.
"""
import csv
import json
import math
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, strategies as st

from iconv import bench, fourier
from iconv.core.circular import circular_conv2d, dense_conv_matrix
from tests.helpers import random_weight, relerr

shapes = st.tuples(st.integers(1, 6), st.sampled_from([1, 3, 5]), st.integers(1, 9), st.integers(1, 9))


@given(shape=shapes)
def test_paper_spectrum_is_the_full_two_sided_spectrum(shape):
    c, k, h, w = shape
    weight = torch.randn(c, c, k, k, dtype=torch.float64)
    full = bench.paper_spectrum(weight, h, w).view(h, w, c, c)
    half = fourier.spectrum(weight, h, w)  # (h, w//2+1, c, c)
    assert relerr(full[:, : w // 2 + 1], half) < 1e-12
    # the other half mirrors it: A(-f) = conj(A(f)) for a real kernel
    mirror = full[(-torch.arange(h)) % h][:, (-torch.arange(w)) % w]
    assert relerr(mirror, full.conj()) < 1e-12


@given(shape=shapes, batch=st.integers(1, 3))
def test_paper_inverse_matches_iconv_inverse(shape, batch):
    c, k, h, w = shape
    weight, bias = random_weight(c, k), torch.randn(c, dtype=torch.float64)
    y = torch.randn(batch, c, h, w, dtype=torch.float64)
    expected = fourier.inverse(y, weight, bias)
    got = bench.paper_inverse(y, weight, bias)
    assert got.shape == y.shape and got.dtype == torch.float64
    assert relerr(got, expected) < 1e-10


@given(shape=shapes)
def test_paper_logabsdet_matches_iconv(shape):
    c, k, h, w = shape
    weight = random_weight(c, k)
    expected = fourier.logabsdet(weight, h, w)
    assert abs(bench.paper_logabsdet(weight, h, w).item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))


def test_paper_inverse_in_float32_inverts_the_conv():
    weight, bias = random_weight(8, 3, dtype=torch.float32), torch.randn(8)
    x = torch.randn(4, 8, 6, 10)
    assert relerr(bench.paper_inverse(circular_conv2d(x, weight, bias), weight, bias), x) < 1e-5


@pytest.mark.parametrize("c, h, w", [(1, 3, 3), (2, 4, 5), (3, 5, 4)])
def test_dense_route_matches_iconv(c, h, w):
    weight, bias = random_weight(c, 3), torch.randn(c, dtype=torch.float64)
    matrix = dense_conv_matrix(weight, h, w)
    expected = fourier.logabsdet(weight, h, w)
    assert abs(bench.dense_logabsdet(matrix).item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    y = torch.randn(3, c, h, w, dtype=torch.float64)
    assert relerr(bench.dense_inverse(y, matrix, bias), fourier.inverse(y, weight, bias)) < 1e-10


def test_time_interleaved_runs_round_robin_with_rotating_order():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = bench.time_interleaved(contenders, repeats=4, warmup=2)
    assert calls[:6] == list("aabbcc")  # warm-up, contender by contender
    timed = calls[6:]
    assert timed == list("abc" "bca" "cab" "abc")
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for s in samples.values() for t in s)


def test_time_interleaved_budget_caps_a_slow_contender():
    contenders = {"fast": lambda: None, "slow": lambda: time.sleep(0.02)}
    samples = bench.time_interleaved(contenders, repeats=20, warmup=1, budget_s=0.03, min_repeats=3)
    assert len(samples["slow"]) == 3
    assert len(samples["fast"]) == 20


def test_time_interleaved_rejects_bad_settings():
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench.time_interleaved({"a": lambda: None}, repeats=0)


def test_measure_point_row_has_every_column_and_small_roundtrip_errors():
    row = bench.measure_point(bench.Point("point", 4, 6), batch=3, repeats=2, warmup=1)
    assert set(row) == set(bench.columns())
    assert row["dense_note"] == ""
    for name in bench.CONTENDERS:
        assert row[f"{name}_repeats"] == 2
        assert row[f"{name}_ms"] > 0
    for name in bench.INVERSES:
        assert row[f"{name}_roundtrip"] < 1e-5, name  # float32, well-conditioned layer
    assert row["blocks_full"] == 36 and row["blocks_half"] == 24
    assert row["conv_fourier_per_conv"] == pytest.approx(row["conv_fourier_ms"] / row["conv_spatial_ms"])
    assert row["speedup_caching"] == pytest.approx(row["inverse_fresh_ms"] / row["inverse_cached_ms"])


def test_measure_point_skips_the_dense_route_above_the_limit_and_says_so():
    row = bench.measure_point(bench.Point("point", 4, 6), batch=2, repeats=1, warmup=0, dense_limit=100,
                              contenders=["inverse_cached", "dense_logdet"])
    assert row["dense_note"] == "skipped: chw = 144 > 100"
    assert math.isnan(row["dense_logdet_ms"]) and row["dense_logdet_repeats"] == 0
    assert math.isnan(row["speedup_logdet_vs_dense"])
    assert row["conv_spatial_repeats"] == 1  # the reference is always timed
    assert math.isnan(row["paper_inverse_ms"])  # not asked for
    assert "dense route skipped" in bench.format_table([row])


def test_measure_point_in_float64():
    row = bench.measure_point(bench.Point("point", 3, 4), batch=2, repeats=1, warmup=0, dtype="float64",
                              contenders=["inverse_fresh", "paper_inverse", "dense_inverse"])
    assert row["dtype"] == "float64"
    for name in ("inverse_fresh", "paper_inverse", "dense_inverse"):
        assert row[f"{name}_roundtrip"] < 1e-12


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown contender"):
        bench.measure_point(bench.Point("point", 2, 4), contenders=["inverse_slow"])
    with pytest.raises(ValueError, match="float32 or float64"):
        bench.measure_point(bench.Point("point", 2, 4), dtype="float16")
    with pytest.raises(ValueError, match="unknown sweep"):
        bench.sweep_points("huge")
    with pytest.raises(ValueError, match="CxM"):
        bench.parse_point("64-32")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            bench.measure_point(bench.Point("point", 2, 4), device="cuda")


def test_cli_bad_point_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--point", "big"])
    assert exit_info.value.code == 2
    assert "CxM" in capsys.readouterr().err


def test_run_measures_a_point_shared_by_two_sweeps_once():
    points = [bench.Point("channels", 2, 4), bench.Point("spatial", 2, 4)]
    rows = bench.run(points, batch=2, repeats=1, warmup=0, contenders=["logdet_complex"])
    assert [r["sweep"] for r in rows] == ["channels", "spatial"]
    assert rows[0]["logdet_complex_ms"] == rows[1]["logdet_complex_ms"]


def test_run_reports_partial_results_after_every_point():
    seen = []
    points = [bench.Point("channels", 2, 4), bench.Point("channels", 3, 4)]
    bench.run(points, on_row=lambda rows: seen.append([r["c"] for r in rows]),
              batch=2, repeats=1, warmup=0, contenders=["logdet_complex"])
    assert seen == [[2], [2, 3]]


def test_cli_tiny_sweep_writes_csv_and_json(tmp_path):
    csv_path, json_path = tmp_path / "out" / "runtime.csv", tmp_path / "runtime.json"
    result = subprocess.run(
        [sys.executable, "-m", "iconv.bench", "--sweep", "tiny", "--batch", "2", "--repeats", "2",
         "--warmup", "1", "--device", "cpu", "--threads", "1", "--quiet",
         "--csv", str(csv_path), "--json", str(json_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "conv ms" in result.stdout and "paper inv" in result.stdout
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(bench.sweep_points("tiny"))
    assert list(rows[0]) == bench.columns()
    for row in rows:
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["threads"] == "1"
        for name in bench.INVERSES:
            assert float(row[f"{name}_roundtrip"]) < 1e-5
        assert float(row["inverse_cached_per_conv"]) > 0
    data = json.loads(json_path.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["threads"] == 1
    assert data["meta"]["torch"] == torch.__version__
    assert [(r["c"], r["h"]) for r in data["rows"]] == [(p.c, p.m) for p in bench.sweep_points("tiny")]


# ---------------------------------------------------------------- files: atomic, 0644, read back typed


def _same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key in ra:
            va, vb = ra[key], rb[key]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), key
            else:
                assert va == vb and type(va) is type(vb), (key, va, vb)


def test_read_csv_reverses_write_csv(tmp_path):
    rows = [bench.measure_point(bench.Point("point", 3, 4), batch=2, repeats=1, warmup=0, dense_limit=10,
                                contenders=["logdet_complex", "inverse_cached"]),
            bench.measure_point(bench.Point("spatial", 2, 5), batch=2, repeats=1, warmup=0,
                                contenders=["dense_logdet"])]
    assert rows[0]["dense_note"] and not rows[1]["dense_note"]  # a string column with an empty value
    path = tmp_path / "runtime.csv"
    bench.write_csv(rows, path)
    back = bench.read_csv(path)
    _same_rows(rows, back)
    assert isinstance(back[0]["c"], int) and isinstance(back[0]["conv_spatial_ms"], float)
    assert math.isnan(back[0]["paper_inverse_ms"])  # not run: NaN, as in the rows


def test_read_csv_on_handwritten_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,n,x,note\na,1,2.5,\nb,-3,nan,hi\n")
    assert bench.read_csv(path)[1] == {"name": "b", "n": -3, "x": pytest.approx(float("nan"), nan_ok=True), "note": "hi"}
    assert bench.read_csv(path)[0]["note"] == "" and bench.read_csv(path)[0]["x"] == 2.5


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_are_0644_and_a_failed_write_keeps_the_old_file(tmp_path, umask_022):
    row = bench.measure_point(bench.Point("point", 2, 4), batch=2, repeats=1, warmup=0, contenders=["logdet_complex"])
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    bench.write_csv([row], csv_path)
    bench.write_json([row], json_path, {"torch": torch.__version__})
    for path in (csv_path, json_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, oct(os.stat(path).st_mode)
    assert json.loads(json_path.read_text())["rows"][0]["paper_inverse_ms"] is None  # NaN -> null
    before = csv_path.read_bytes()
    with pytest.raises(ValueError):  # a row with a column the header lacks: nothing is written
        bench.write_csv([{**row, "unexpected": 1}], csv_path)
    assert csv_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary file left


# ---------------------------------------------------------------- timing statistics


def test_spread_and_paired_ratios():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    s = bench.spread(values)
    assert (s["median"], s["q1"], s["q3"]) == (3.0, 2.0, 4.0)  # inclusive quartiles
    assert s["rel_iqr"] == pytest.approx(2.0 / 3.0)
    one = bench.spread([2.0])
    assert one["median"] == one["q1"] == one["q3"] == 2.0 and math.isnan(one["rel_iqr"])
    assert bench.paired_ratios([2.0, 9.0, 4.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="at least one"):
        bench.spread([])


# ---------------------------------------------------------------- training throughput


def test_peak_memory_on_the_cpu_replays_allocations_in_order():
    """Two 4 MB buffers alive together peak at 8 MB; three made and dropped one by one peak at 4 MB."""
    n = 1_000_000  # float32: 4,000,000 bytes

    def together():
        a = torch.ones(n)
        b = torch.ones(n)
        return a, b

    def one_at_a_time():
        for _ in range(3):
            torch.ones(n)

    peak, method = bench.peak_memory(together)
    assert method == "torch.profiler" and 8_000_000 <= peak < 8_000_000 + 100_000
    peak, _ = bench.peak_memory(one_at_a_time)
    assert 4_000_000 <= peak < 4_000_000 + 100_000


def test_build_models_match_parameter_counts():
    from iconv.models.glow import matching_hidden_width

    models = bench.build_models((1, 8, 8), depth=2)
    conv, glow = models["convflow"], models["glow"]
    assert type(conv).__name__ == "ConvFlow" and type(glow).__name__ == "GlowBaseline"
    assert glow.arguments["hidden"] == matching_hidden_width((1, 8, 8), conv.num_parameters(), 1)
    assert abs(glow.num_parameters() - conv.num_parameters()) <= 0.1 * conv.num_parameters()
    with pytest.raises(ValueError, match="unknown model"):
        bench.build_models((1, 8, 8), models=["realnvp"])
    large = bench.build_models((1, 8, 8), depth=2, kernel_size=5)  # the study's large pair, at a small size
    assert large["convflow"].arguments["kernel_size"] == 5
    assert large["glow"].arguments["hidden"] == matching_hidden_width((1, 8, 8), large["convflow"].num_parameters(), 1)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 4"):
        bench.build_models((1, 8, 8), kernel_size=4)


def test_training_step_is_forward_and_backward_of_the_mean_nll():
    model = bench.build_models((1, 4, 4), depth=1, models=["convflow"])["convflow"].double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    loss = bench.training_step(model, x)()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = -model.log_prob(x).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    reference = torch.autograd.grad(expected, list(model.parameters()))
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    bench.training_step(model, x)()  # gradients are cleared, not accumulated
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_measure_training_rows_and_ratios():
    threads_before = torch.get_num_threads()
    rows = bench.measure_training((1, 4, 4), depth=2, batch=2, threads=(1,), repeats=3, warmup=1)
    assert torch.get_num_threads() == threads_before
    assert [r["model"] for r in rows] == ["convflow", "glow"]
    conv, glow = rows
    for r in rows:
        assert list(r) == bench.training_columns()
        assert r["threads"] == 1 and r["repeats"] == 3 and r["batch"] == 2 and r["image"] == "1x4x4"
        assert r["step_ms_q1"] <= r["step_ms"] <= r["step_ms_q3"] and r["steps_per_s"] == pytest.approx(1e3 / r["step_ms"])
        assert r["peak_mib"] > 0 and r["memory_method"] == "torch.profiler"
    assert conv["depth"] == "2/2" and conv["hidden"] == 0 and glow["depth"] == "1/1" and glow["hidden"] > 0
    assert glow["time_vs_baseline"] == 1.0 and glow["memory_vs_baseline"] == 1.0
    assert glow["time_vs_baseline_paired"] == glow["time_vs_baseline_q1"] == glow["time_vs_baseline_q3"] == 1.0
    assert conv["time_vs_baseline_q1"] <= conv["time_vs_baseline_paired"] <= conv["time_vs_baseline_q3"]
    assert conv["time_vs_baseline"] == pytest.approx(conv["step_ms"] / glow["step_ms"])
    assert conv["memory_vs_baseline"] == pytest.approx(conv["peak_mib"] / glow["peak_mib"])
    table = bench.format_training_table(rows)
    assert "ConvFlow" in table and "Glow baseline" in table and "torch.profiler" in table
    with pytest.raises(ValueError, match="threads must be positive"):
        bench.measure_training((1, 4, 4), depth=1, threads=(0,))


def test_cli_training_writes_a_csv_that_reads_back(tmp_path):
    path = tmp_path / "training.csv"
    result = subprocess.run(
        [sys.executable, "-m", "iconv.bench", "--training", "--image", "1x4x4", "--depth", "1", "--batch", "2",
         "--threads", "1", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--csv", str(path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "steps/s" in result.stdout and "ConvFlow" in result.stdout
    rows = bench.read_csv(path)
    assert [r["model"] for r in rows] == ["convflow", "glow"] and list(rows[0]) == bench.training_columns()
    assert rows[1]["time_vs_baseline"] == 1.0 and rows[0]["threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--training", "--image", "1x28"], "CxHxW"),
    (["--training", "--threads", "0"], "positive thread counts"),
    (["--point", "4x4", "--threads", "1,2"], "one count"),
    (["--training", "--kernel-size", "2"], "--kernel-size must be a positive odd number, got 2"),
])
def test_cli_bad_training_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_peak_memory_keeps_the_profilers_tracing_lines_out_of_stderr_and_restores_it(capfd):
    import os

    x = torch.randn(50, 50, requires_grad=True)
    peak, method = bench.peak_memory(lambda: (x * 2).sum().backward())
    assert peak > 0 and method == "torch.profiler"
    os.write(2, b"stderr still works\n")
    err = capfd.readouterr().err
    assert "stderr still works" in err and "profiler_start" not in err
