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
