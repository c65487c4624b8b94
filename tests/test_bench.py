"""iconv.bench: the baselines compute the right thing, the timing loop interleaves, the CLI writes files.

No assertion here depends on how fast anything ran.
"""
import csv
import json
import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, strategies as st

from iconv import bench, fourier
from iconv.circular import circular_conv2d, dense_conv_matrix
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
