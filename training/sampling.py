"""Which examples each optimizer step reads: a deterministic plan, a pure function of (sizes, weights, seed).

The plan makes three things exact: resuming (the data position is just the step number), several processes
(each takes its slice of every global batch) and "one dataset per batch" sampling.
"""

from __future__ import annotations

import math

import numpy as np

Item = tuple[int, int]  # (dataset index, record index)


class BatchPlan:
    """Global batches of ``global_batch`` items, drawn from datasets of ``sizes`` in proportion to ``weights``.

    Args:
        sizes: number of records per dataset.
        weights: relative weights per dataset.
        global_batch: items per optimizer step over all processes and accumulation steps.
        mode: ``round_robin``: every batch comes from one dataset; datasets take turns in proportion to their
            weights (smooth weighted round robin). ``mixed``: every item's dataset is drawn by weight.
        seed: the plan's seed. Each dataset is read in a fresh random order per pass over it.
    """

    def __init__(self, sizes: list[int], weights: list[float], global_batch: int, mode: str, seed: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("BatchPlan: one size and one weight per dataset")
        if any(s < 1 for s in sizes):
            raise ValueError(f"BatchPlan: every dataset needs at least one record, sizes {sizes}")
        self.sizes, self.weights = list(sizes), [float(w) for w in weights]
        self.global_batch, self.mode, self.seed = global_batch, mode, seed
        self._reset()

    def _reset(self) -> None:
        self._made = 0  # batches drawn so far
        self._last: list[Item] = []
        self._rng = np.random.default_rng(self.seed)
        self._orders: list[list[int]] = [[] for _ in self.sizes]
        self._passes = [0] * len(self.sizes)
        self._credit = [0.0] * len(self.sizes)

    def steps_per_epoch(self) -> int:
        """Optimizer steps that read as many items as the datasets hold (at least 1)."""
        return max(1, math.ceil(sum(self.sizes) / self.global_batch))

    def batch(self, step: int) -> list[Item]:
        """The global batch of optimizer step ``step`` (0-based).

        Batches are drawn in order and only the last is kept (constant memory); asking for an earlier step
        draws the plan again from the start (resuming at step N draws N batches of indices: fast).
        """
        if step < self._made - 1:
            self._reset()
        while self._made <= step:
            self._last = self._next_batch()
            self._made += 1
        return self._last

    def shard(self, step: int, rank: int, world: int, micro: int, accumulation: int) -> list[Item]:
        """The items of micro-batch ``micro`` on process ``rank``: global batch order is micro-major, rank-minor."""
        items = self.batch(step)
        per = self.global_batch // (world * accumulation)
        start = (micro * world + rank) * per
        return items[start : start + per]

    # ------------------------------------------------------------------ internals
    def _take(self, dataset: int) -> int:
        order = self._orders[dataset]
        if not order:
            perm = np.random.default_rng([self.seed, dataset, self._passes[dataset]]).permutation(self.sizes[dataset])
            order.extend(reversed(perm.tolist()))  # popped from the end
            self._passes[dataset] += 1
        return order.pop()

    def _next_batch(self) -> list[Item]:
        if self.mode == "round_robin":
            total = sum(self.weights)
            for i, w in enumerate(self.weights):
                self._credit[i] += w / total
            dataset = max(range(len(self.weights)), key=lambda i: (self._credit[i], -i))
            self._credit[dataset] -= 1.0
            return [(dataset, self._take(dataset)) for _ in range(self.global_batch)]
        if self.mode == "mixed":
            p = np.asarray(self.weights) / sum(self.weights)
            picks = self._rng.choice(len(self.sizes), size=self.global_batch, p=p)
            return [(int(d), self._take(int(d))) for d in picks]
        raise ValueError(f"unknown sampling mode {self.mode!r}: expected round_robin or mixed")
