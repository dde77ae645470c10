"""Wilson score interval: known values, edge cases and bad input."""

import pytest

from visual_opsd.stats import wilson_interval


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (5, 10, (0.2366, 0.7634)),
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (81, 100, (0.7222, 0.8749)),
    ],
)
def test_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_contains_estimate_and_is_symmetric():
    for n in (1, 7, 120):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo2, hi2 = wilson_interval(n - k, n)
            assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)


def test_wider_z_gives_wider_interval():
    narrow, wide = wilson_interval(30, 50, z=1.0), wilson_interval(30, 50, z=2.58)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_empty_and_invalid():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in ((3, 2), (-1, 4), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)
