"""Small statistics helpers for reporting accuracies with honest error bars."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n (default z = 1.96: 95%).

    Preferred over the normal approximation because it stays inside [0, 1] and behaves at k = 0,
    k = n and small n, which is where benchmark subsets (100 maps per VSP level) live.
    With n = 0 nothing is known and the interval is (0.0, 1.0).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Clamp rounding noise so k = 0 gives exactly 0 and k = n exactly 1.
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_proportion_interval(counts: list[tuple[int, int]], z: float = 1.96) -> tuple[float, float]:
    """Interval for the unweighted mean of several independent proportions k_i / n_i (a benchmark that
    averages its parts, as CV-Bench-2D averages its two sources): a normal interval whose variance
    uses the Agresti-Coull estimate (k + 2) / (n + 4) of each part, so a part at 0 or n still counts
    its uncertainty; clipped to [0, 1]."""
    if not counts or any(n <= 0 or not 0 <= k <= n for k, n in counts):
        raise ValueError(f"need parts with 0 <= k <= n and n > 0, got {counts}")
    m = len(counts)
    mean = sum(k / n for k, n in counts) / m
    var = sum((k + 2) / (n + 4) * (1 - (k + 2) / (n + 4)) / (n + 4) for k, n in counts) / (m * m)
    half = z * math.sqrt(var)
    return (max(0.0, mean - half), min(1.0, mean + half))
