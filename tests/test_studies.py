"""iconv.studies: mean ± std over seeds, the noise rule and seed bands, against direct computations."""
import math
from fractions import Fraction

import pytest

from iconv.studies import NOISE_FACTOR, compare, curve_band, mean_std


def exact_std(values):
    """The sample standard deviation in exact rational arithmetic, then one square root."""
    v = [Fraction(x) for x in values]
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@pytest.mark.parametrize("values", [[0.9, 0.91, 0.93], [4.05, 4.07], [1e9 + 1, 1e9 + 2, 1e9 + 4]])
def test_mean_std_matches_exact_arithmetic(values):
    mean, std = mean_std(values)
    assert mean == pytest.approx(float(sum(Fraction(x) for x in values) / len(values)), rel=1e-15)
    assert std == pytest.approx(exact_std(values), rel=1e-9)


def test_one_seed_has_no_spread_and_no_verdict():
    assert mean_std([3.0]) == (3.0, None)
    d = compare([3.0], [2.0, 2.5])
    assert d.difference == pytest.approx(0.75) and d.standard_error is None and d.within_noise is None


def test_the_noise_rule_at_its_boundary():
    a, b = [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]  # both std 1, n 3: se = sqrt(2/3)
    se = math.sqrt(2 / 3)
    d = compare(a, b)
    assert d.difference == pytest.approx(1.0) and d.standard_error == pytest.approx(se, rel=1e-15)
    assert d.within_noise is (1.0 < NOISE_FACTOR * se)  # 1.0 < 1.63: noise
    far = compare([x + NOISE_FACTOR * se + 1e-9 - 1.0 for x in a], b)  # just past 2 se apart
    assert far.within_noise is False
    near = compare([x + NOISE_FACTOR * se - 1e-9 - 1.0 for x in a], b)  # just inside
    assert near.within_noise is True
    assert compare(b, a).difference == pytest.approx(-1.0)


def test_identical_seeds_make_any_difference_real():
    d = compare([0.5, 0.5, 0.5], [0.4, 0.4, 0.4])
    assert d.standard_error == 0.0 and d.within_noise is False


@pytest.mark.parametrize("bad, match", [([], "at least one value"), ([1.0, float("nan")], "finite"),
                                        ([float("inf")], "finite")])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        mean_std(bad)
    with pytest.raises(ValueError, match=match):
        compare([1.0, 2.0], bad)


def test_curve_band_interpolates_and_never_extrapolates():
    c1 = [(0, 10.0), (10, 0.0)]
    c2 = [(0, 20.0), (5, 10.0), (20, 10.0)]
    mean, low, high = curve_band([c1, c2], [0, 5, 7.5, 10, 15])
    assert mean[:4] == [15.0, 7.5, (2.5 + 10.0) / 2, 5.0]
    assert low[1] == 5.0 and high[1] == 10.0
    assert mean[4] is None and low[4] is None and high[4] is None  # beyond c1's last step


def test_curve_band_refuses_unsorted_or_empty_curves():
    with pytest.raises(ValueError, match="increasing x"):
        curve_band([[(0, 1.0), (0, 2.0)]], [0])
    with pytest.raises(ValueError, match="one curve per seed"):
        curve_band([], [0])


def test_code_version_names_the_commit_and_only_code_changes_make_it_uncommitted(tmp_path):
    import shutil
    import subprocess

    from iconv.studies import code_version

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert code_version(tmp_path) == "unknown"  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "iconv").mkdir()
    (tmp_path / "iconv" / "a.py").write_text("x = 1\n")
    (tmp_path / "results.json").write_text("{}\n")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "one"], cwd=tmp_path, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == sha
    (tmp_path / "results.json").write_text('{"new": 1}\n')  # results are not code
    assert code_version(tmp_path) == sha
    (tmp_path / "iconv" / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == sha + "+uncommitted"
    assert code_version(tmp_path, paths=("tools",)) == sha
