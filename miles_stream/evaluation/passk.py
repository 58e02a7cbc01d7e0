"""pass@k: the chance that at least one of k samples drawn from a prompt's n is correct, averaged over prompts.

The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1): with n
samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k), computed as the product
1 - prod_{i = n - c + 1}^{n} (1 - k / i) so that large n does not overflow. Pure functions of counts.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with `n` samples, `c` of them correct (0 <= c <= n, 1 <= k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples c={c} must be within 0..n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be within 1..n={n} (pass@k needs at least k samples per prompt)")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, each with `n` samples and `correct[p]` of them correct."""
    if not correct:
        raise ValueError("pass@k over no prompts")
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)
