"""Live statistics of watched neurons over all traffic, per group of requests (A/B arm).

The server watches chosen sets' neurons (``KN_STEER_WATCH=set1,set2``) or, opt-in, every neuron
(``KN_STEER_WATCH=all``). For every token the workers compute, in the same read op as read-back
(:mod:`kn_steer.serving.ops.neuron_read`), each watched neuron's value after steering is
accumulated into its request's group: how often it exceeds the threshold
(``KN_STEER_WATCH_THRESHOLD``, default 0: a gated neuron's value is positive), the sum of its
values and its maximum. A request's group is its A/B experiment and arm (``experiment/arm``);
every other request counts in ``none``. At most ``max_groups`` groups are kept
(``KN_STEER_WATCH_GROUPS``, default :data:`MAX_GROUPS`); later ones count in ``other``.

An offline engine may also label a request's prompt tokens one by one (``token_groups``: labels
and one label index per prompt position; never from an HTTP client, whose extra arguments the API
edge strips): each prompt token then counts in its own label's group, e.g. its position or its
token id (the per-position and per-token-id summaries of ``kn-steer stats --by``). The step's
token map follows the request's computed tokens, so chunked prefill and preemption count each
position in its own group.

Per step and layer the step's tokens are reduced per group first (float32: a sum over one step's
tokens, a few thousand at most; one matrix product when the step mixes groups), then added into
the float64 totals, so the cost per layer is one pass over the watched values.

Counts are per token computed: a position recomputed after a preemption counts again (rare, and
live statistics are rates). Under tensor parallelism each rank keeps its own columns; the API
server adds ranks' summaries and assembles the full table (:mod:`kn_steer.serving.stats`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

MAX_GROUPS = 64
NONE_GROUP = "none"
OTHER_GROUP = "other"


class NeuronStats:
    """This worker's running statistics (see the module docstring)."""

    def __init__(self, watched: dict[str, np.ndarray] | None, layers: Sequence[int], offset: int, local_size: int,
                 width: int, device: torch.device | str, max_tokens: int, threshold: float = 0.0,
                 max_groups: int = MAX_GROUPS):
        """``watched``: set name -> flat neuron ids (``layer * width + index``); None: every neuron."""
        self.device = torch.device(device)
        self.max_groups = int(max_groups)
        self.threshold = float(threshold)
        self.all_neurons = watched is None
        self.sets = {name: np.asarray(ids, dtype=np.int64) for name, ids in (watched or {}).items()}
        union = (np.unique(np.concatenate(list(self.sets.values()))) if self.sets else np.zeros(0, np.int64))
        # this rank's columns, per layer: (local unit tensor or None for the whole layer, flat ids)
        self.columns: dict[int, tuple[torch.Tensor | None, np.ndarray]] = {}
        for layer in layers:
            if self.all_neurons:
                self.columns[layer] = (None, layer * width + offset + np.arange(local_size))
                continue
            ids = union[(union // width == layer) & (union % width >= offset) & (union % width < offset + local_size)]
            if ids.size:
                self.columns[layer] = (torch.from_numpy(ids % width - offset).to(self.device), ids)
        shape = lambda layer: (self.max_groups, self.columns[layer][1].size)  # noqa: E731
        self.fires = {l: torch.zeros(shape(l), dtype=torch.float64, device=self.device) for l in self.columns}
        self.sums = {l: torch.zeros(shape(l), dtype=torch.float64, device=self.device) for l in self.columns}
        self.maxes = {l: torch.full(shape(l), -torch.inf, dtype=torch.float32, device=self.device) for l in self.columns}
        self.tokens = np.zeros(self.max_groups, dtype=np.int64)
        self.groups: dict[str, int] = {NONE_GROUP: 0}
        self.by_request: dict[str, int] = {}
        self.by_position: dict[str, np.ndarray] = {}  # request -> group of each prompt position
        self.token_groups = torch.zeros(max_tokens, dtype=torch.long, device=self.device)
        self._host = np.zeros(max_tokens, dtype=np.int64)
        self.n_tokens = 0
        # this step's groups: one (its index) or several (their indices and a [groups, tokens] one-hot)
        self.step_single: int | None = None
        self.step_groups = torch.zeros(0, dtype=torch.long, device=self.device)
        self.step_onehot = torch.zeros(0, 0, device=self.device)

    @property
    def width(self) -> int:
        return int(sum(ids.size for _, ids in self.columns.values()))

    def group_of(self, label: str | None) -> int:
        if not label:
            return 0
        if label not in self.groups:
            if len(self.groups) >= self.max_groups - 1:
                label = OTHER_GROUP
            self.groups.setdefault(label, len(self.groups))
        return self.groups[label]

    # ----- requests and steps -------------------------------------------------------------------
    def add(self, req_id: str, label: str | None,
            token_groups: tuple[Sequence[str], np.ndarray] | None = None) -> None:
        """``label``: the request's group; ``token_groups``: (labels, one label index per prompt
        position) where its prompt tokens count apart (positions past them count in ``label``)."""
        gid = self.group_of(label)
        if gid:
            self.by_request[req_id] = gid
        if token_groups is not None:
            labels, index = token_groups
            gids = np.fromiter((self.group_of(x) for x in labels), np.int64, len(labels))
            self.by_position[req_id] = gids[np.asarray(index, dtype=np.int64)]

    def remove(self, req_id: str) -> None:
        self.by_request.pop(req_id, None)
        self.by_position.pop(req_id, None)

    def plan(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray | None = None) -> None:
        """Each scheduled token's group, in batch order (host side, before the forward)."""
        counts = np.asarray(num_scheduled[: len(req_ids)], dtype=np.int64)
        total = int(counts.sum())
        gids = np.fromiter((self.by_request.get(r, 0) for r in req_ids), np.int64, len(req_ids))
        host = self._host[:total]
        host[:] = np.repeat(gids, counts)
        if self.by_position and num_computed is not None:
            starts = np.cumsum(counts) - counts
            for i, req_id in enumerate(req_ids):
                per_position = self.by_position.get(req_id)
                if per_position is None or not counts[i]:
                    continue
                first = int(num_computed[i])
                part = per_position[first:first + int(counts[i])]  # positions past the prompt keep the request's group
                host[starts[i]:starts[i] + part.size] = part
        self.token_groups[:total].copy_(torch.from_numpy(host), non_blocking=True)
        self.tokens += np.bincount(host, minlength=self.max_groups)
        self.n_tokens = total
        present = np.unique(host)
        self.step_single = int(present[0]) if present.size == 1 else None
        if present.size > 1:
            onehot = (host[None, :] == present[:, None]).astype(np.float32)
            self.step_groups = torch.from_numpy(present).to(self.device)
            self.step_onehot = torch.from_numpy(onehot).to(self.device)

    def record(self, layer: int, x: torch.Tensor) -> None:
        found = self.columns.get(layer)
        if found is None or not self.n_tokens:
            return
        units, _ = found
        rows = x[: self.n_tokens]
        values = (rows if units is None else rows.index_select(1, units)).float()
        fired = values > self.threshold
        g = self.step_single
        if g is not None:  # the usual step: every token in one group
            self.fires[layer][g] += fired.sum(0)
            self.sums[layer][g] += values.sum(0)
            torch.maximum(self.maxes[layer][g], values.amax(0), out=self.maxes[layer][g])
            return
        onehot = self.step_onehot
        self.fires[layer].index_add_(0, self.step_groups, (onehot @ fired.float()).double())
        self.sums[layer].index_add_(0, self.step_groups, (onehot @ values).double())
        groups = self.token_groups[: self.n_tokens]
        self.maxes[layer].scatter_reduce_(0, groups[:, None].expand_as(values), values, "amax")

    # ----- read by the API server ---------------------------------------------------------------
    def _table(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = np.concatenate([self.columns[l][1] for l in sorted(self.columns)]) if self.columns else np.zeros(0, np.int64)
        used = len(self.groups)

        def cat(d: dict[int, torch.Tensor]) -> np.ndarray:
            if not d:
                return np.zeros((used, 0))
            return torch.cat([d[l][:used] for l in sorted(d)], 1).cpu().numpy()

        return ids, {"fires": cat(self.fires), "sums": cat(self.sums), "maxes": cat(self.maxes)}

    def summary(self) -> dict[str, Any]:
        """Per watched set and group: summed fire counts and values over this rank's share of the set."""
        ids, table = self._table()
        groups = sorted(self.groups, key=self.groups.get)
        out: dict[str, Any] = {"groups": groups, "tokens": self.tokens[: len(groups)].tolist(),
                               "threshold": self.threshold, "neurons": int(ids.size), "sets": {}}
        for name, members in self.sets.items():
            mine = np.isin(ids, members)
            out["sets"][name] = {"neurons": int(mine.sum()), "fires": table["fires"][:, mine].sum(1).tolist(),
                                 "sums": table["sums"][:, mine].sum(1).tolist()}
        return out

    def reset(self) -> None:
        """Zero every count (a new measuring interval). Groups keep their labels and indices, so
        requests in flight go on counting in their own group."""
        for table in (self.fires, self.sums):
            for t in table.values():
                t.zero_()
        for t in self.maxes.values():
            t.fill_(-torch.inf)
        self.tokens[:] = 0

    def full(self) -> dict[str, Any]:
        """Every watched neuron's counts per group (this rank's columns), as little-endian bytes."""
        ids, table = self._table()
        groups = sorted(self.groups, key=self.groups.get)
        return {"groups": groups, "tokens": self.tokens[: len(groups)].tolist(), "threshold": self.threshold,
                "ids": ids.astype("<i8").tobytes(), **{k: v.astype("<f8").tobytes() for k, v in table.items()}}
