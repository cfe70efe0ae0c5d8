"""Live neuron statistics on the API server: summaries per set and arm, and the full table.

Workers keep the counts (:mod:`kn_steer.serving.ops.neuron_stats`); this module adds the ranks'
shares together. Per watched set and group (A/B arm, or ``none``): the *firing rate* (the share of
(token, neuron) pairs where the neuron exceeded the threshold) and the mean value, over the set's
neurons and the group's tokens. ``GET /v1/kn_steer/stats`` returns every watched neuron's counts
as a file (JSON, arrays base64 little-endian ``[groups, neurons]``, as read-back does)::

    {"object": "kn_steer.stats", "threshold": 0.0, "groups": ["none", "exp/arm-a"],
     "tokens": [1200, 340], "neurons": <int32 [N, 2]>, "fire_rate": <float32 [G, N]>,
     "mean": <float32 [G, N]>, "max": <float32 [G, N]>, "sets": {...summaries...}}
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kn_steer.serving.readback import _array

STATS_METHOD = "kn_steer_stats"


def summarize(summaries: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Per set and group, from every rank's ``summary()`` (None: the server watches nothing)."""
    ranks = [s for s in summaries if s]
    if not ranks:
        return None
    groups, tokens = ranks[0]["groups"], ranks[0]["tokens"]
    out: dict[str, Any] = {"threshold": ranks[0]["threshold"], "tokens": dict(zip(groups, tokens)), "sets": {}}
    for name in ranks[0]["sets"]:
        neurons = sum(r["sets"][name]["neurons"] for r in ranks)
        per_group = {}
        for k, group in enumerate(groups):
            fires = sum(r["sets"][name]["fires"][k] for r in ranks if k < len(r["sets"][name]["fires"]))
            sums = sum(r["sets"][name]["sums"][k] for r in ranks if k < len(r["sets"][name]["sums"]))
            pairs = neurons * tokens[k]
            per_group[group] = {"firing_rate": fires / pairs if pairs else None,
                                "mean_activation": sums / pairs if pairs else None}
        out["sets"][name] = {"neurons": neurons, "groups": per_group}
    return out


def tables(parts: Sequence[dict[str, Any] | None]) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """Every rank's ``full()`` put together: (groups, tokens per group, flat neuron ids sorted,
    ``{"fires", "sums", "maxes"}`` as ``[groups, neurons]`` float64); None: nothing is watched."""
    ranks = [p for p in parts if p]
    if not ranks:
        return None
    groups, tokens = ranks[0]["groups"], np.asarray(ranks[0]["tokens"], dtype=np.int64)
    ids = np.concatenate([np.frombuffer(p["ids"], "<i8") for p in ranks])
    order = np.argsort(ids, kind="stable")

    def table(key: str) -> np.ndarray:
        cols = [np.frombuffer(p[key], "<f8").reshape(len(groups), -1) for p in ranks]
        return np.concatenate(cols, 1)[:, order]

    return list(groups), tokens, ids[order], {key: table(key) for key in ("fires", "sums", "maxes")}


def assemble(parts: Sequence[dict[str, Any] | None], summary: dict[str, Any] | None, width: int) -> dict[str, Any]:
    """The full table from every rank's ``full()``: columns of all ranks, sorted by (layer, index)."""
    found = tables(parts)
    if found is None:
        return {"object": "kn_steer.stats", "enabled": False,
                "message": "this server keeps no live neuron statistics (start it with --watch SET or KN_STEER_WATCH)"}
    groups, tokens, ids, table = found
    per_token = np.where(tokens[:, None] > 0, tokens[:, None], np.nan)
    return {
        "object": "kn_steer.stats", "enabled": True, "threshold": next(p for p in parts if p)["threshold"],
        "groups": groups, "tokens": tokens.tolist(),
        "neurons": _array(np.stack([ids // width, ids % width], 1).astype(np.int32)),
        "fire_rate": _array((table["fires"] / per_token).astype(np.float32)),
        "mean": _array((table["sums"] / per_token).astype(np.float32)),
        "max": _array(table["maxes"].astype(np.float32)),
        "sets": (summary or {}).get("sets", {}),
    }
