"""Stage 5, aggregate: slice probabilities to the patient's."""

from __future__ import annotations

import numpy as np

from ctedge.core.choices import Aggregate
from ctedge.core.errors import CtedgeError

DEFAULT_TOP_K = 5
AGGREGATES = Aggregate.values()


def aggregate(probabilities: np.ndarray, method: str = "topk", k: int = DEFAULT_TOP_K) -> float:
    """Patient probability from slice probabilities.

    topk (default): mean of the ``k`` highest. COVID-19 findings cover only part
    of the lungs, so the mean of all slices dilutes a clear finding with healthy
    slices; the single max follows one noisy slice; a few top slices together are
    both sensitive and steadier. max and mean are the two ends.
    """
    p = np.asarray(probabilities, float)
    if p.size == 0:
        raise CtedgeError("no slice probabilities to aggregate")
    if k < 1:
        raise CtedgeError(f"must be at least 1, not {k}", param="top_k")
    if method == "max":
        return float(p.max())
    if method == "mean":
        return float(p.mean())
    if method == "topk":
        return float(np.sort(p)[-min(k, len(p)):].mean())
    raise CtedgeError(f"must be one of {', '.join(AGGREGATES)}, not {method!r}", param="aggregate")


def aggregate_label(method: str, k: int, count: int) -> str:
    """How the patient's probability was formed, as shown in results."""
    return f"topk (mean of the top {min(k, count)})" if method == "topk" else method
