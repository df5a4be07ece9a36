"""
How much to trust a score measured on n problems: Wilson intervals for accuracies and the standard error of
a difference between two of them. Torch-free (the flow's report card and the benches use it).

    low, high = wilson_interval(passed=113, total=256)          # 95 % interval of 113/256
    gain, se = difference(0.44, 256, 0.58, 256)                  # 0.14 and its standard error
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal


def wilson_interval(passed: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of passed/total (Wilson 1927): unlike p ± z·SE it stays inside [0, 1]
    and is not empty at 0 or n successes."""
    assert 0 <= passed <= total and total > 0, f"need 0 <= passed <= total and total > 0, got {passed}/{total}"
    p = passed / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def standard_error(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n independent problems."""
    assert n > 0 and 0.0 <= p <= 1.0, f"need n > 0 and 0 <= p <= 1, got p={p}, n={n}"
    return math.sqrt(p * (1 - p) / n)


def difference(before: float, n_before: int, after: float, n_after: int) -> tuple[float, float]:
    """(after - before, its standard error), the two accuracies taken as independent samples. Evaluating
    both models on the same problems makes the true error smaller, so this is the cautious figure."""
    se = math.hypot(standard_error(before, n_before), standard_error(after, n_after))
    return after - before, se


def z_score(gain: float, se: float) -> float | None:
    """gain / se, the gain in standard errors (None where the error is 0, i.e. both scores are 0 or 1)."""
    return gain / se if se > 0 else None
