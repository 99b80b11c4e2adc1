"""ShapesBench metrics as pure functions of judged attributes and judge features.

Kept apart from `evaluate.py` (which generates and judges) so each formula can be checked on
hand-made inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def adheres(named: dict[str, str], judged: dict[str, str]) -> bool:
    """GenEval-style: every attribute the prompt names is what the judge reads."""
    return all(judged.get(name) == value for name, value in named.items())


def attribute_accuracy(named: Sequence[dict[str, str]], judged: Sequence[dict[str, str]]) -> dict[str, float]:
    """Per attribute, the fraction of images that draw it as the prompt names it.

    Adherence needs every named attribute at once, so it hides which one a model misses; this
    splits it, counting each attribute only over the prompts that name it.
    """
    hits: dict[str, list[bool]] = {}
    for n, j in zip(named, judged, strict=True):
        for name, value in n.items():
            hits.setdefault(name, []).append(j.get(name) == value)
    return {name: float(np.mean(h)) for name, h in sorted(hits.items())}


def confusions(
    named: Sequence[dict[str, str]], judged: Sequence[dict[str, str]], top: int = 3
) -> dict[str, list[tuple[str, str, int]]]:
    """Per named attribute, its `top` most frequent misses as (named, read, count), most frequent first.

    Attribute accuracy says how often a model misses an attribute; this says how: two models with the
    same colour accuracy differ in whether they blur neighbouring hues (orange read as yellow) or draw
    another colour outright, which calls for different fixes. Ties break by name, so the list is stable.
    """
    misses: dict[str, Counter] = {}
    for n, j in zip(named, judged, strict=True):
        for name, value in n.items():
            if j.get(name) != value:
                misses.setdefault(name, Counter())[(value, j.get(name, ""))] += 1
    return {
        name: [(a, b, c) for (a, b), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
        for name, counts in sorted(misses.items())
    }


def adherence(named: Sequence[dict[str, str]], judged: Sequence[dict[str, str]]) -> float | None:
    """Fraction of images adhering to their prompt; None when there are no images."""
    if not named:
        return None
    return float(np.mean([adheres(n, j) for n, j in zip(named, judged, strict=True)]))


def entropy(values: Sequence[str]) -> float:
    """Shannon entropy (nats) of the empirical distribution of `values`."""
    counts = np.array(list(Counter(values).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalised_entropy(generated: Sequence[str], reference: Sequence[str]) -> float | None:
    """Entropy of generated values over that of real renders of the same prompt and count.

    Using real renders with the same number of samples as the reference removes the small-sample
    bias of the entropy estimate: 1.0 means as spread as the data, 0 collapsed. None when the
    reference itself has a single value (nothing to spread).
    """
    ref = entropy(reference)
    if ref <= 1e-12:
        return None
    return entropy(generated) / ref


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FID formula; the trace of the
    matrix square root is computed from the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    symmetric, so no complex sqrtm is needed.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def negative_efficacy(negated: Sequence[dict[str, str]], judged: Sequence[dict[str, str]]) -> float | None:
    """Fraction of images in which none of the negated attribute values appears."""
    if not negated:
        return None
    return float(
        np.mean([all(j.get(k) != v for k, v in n.items()) for n, j in zip(negated, judged, strict=True)])
    )
