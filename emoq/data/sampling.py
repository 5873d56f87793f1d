"""Samplers: length-grouped batches (less padding) and class-balanced sampling, distributed-aware.

Both are deterministic given ``seed`` and the epoch (:meth:`set_epoch`, as with
``DistributedSampler``), and shard evenly over ``num_replicas`` ranks: every rank gets the same
number of batches / samples, so no rank waits forever at a collective.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedBatchSampler", "ClassBalancedSampler"]


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices (use as ``DataLoader(batch_sampler=...)``).

    Each epoch: shuffle the indices (``shuffle=True``), cut them into mega-batches of
    ``mega_batch_mult`` (~50) global batches, sort each mega-batch by length (longest first) and cut
    it into batches, so a batch holds clips of similar length; then shuffle the order of the
    batches, keeping the very longest batch first (an out-of-memory shows up at step 1, not at
    hour 3). With ``shuffle=False`` the order is the dataset order grouped the same way.

    ``group_by_length=False``: no sorting, batches are consecutive runs of the shuffled order. For corpora
    whose clip length follows the class (slow, sad speech is long), length groups are class groups, and a
    batch of one class gives the contrastive loss no negatives; short clips waste little on padding anyway.

    Distributed: batches are dealt round-robin to ``num_replicas`` ranks; the tail is padded with
    batches from the start (or dropped with ``drop_last``) so every rank gets ``len(self)``
    batches. ``drop_last`` also drops a final incomplete batch.
    """

    def __init__(
        self,
        lengths: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        group_by_length: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_rank(num_replicas, rank)
        self.lengths = [float(x) for x in lengths]
        # not named `batch_size`: accelerate's sharding would take the batches for fixed-size ones and hold back a
        # short last batch, yielding fewer batches per rank than its own length says (ranks then disagree on steps)
        self.max_batch_size = int(batch_size)
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = int(seed)
        self.drop_last = drop_last
        self.mega_batch_mult = max(1, int(mega_batch_mult))
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if n == 0:
            return []
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        mega = self.max_batch_size * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            if self.group_by_length:
                chunk = sorted(chunk, key=lambda i: (-self.lengths[i], i))
            batches.extend(chunk[j : j + self.max_batch_size] for j in range(0, len(chunk), self.max_batch_size))
        # Mega-batches are whole multiples of batch_size: only the very last batch can be short.
        if self.drop_last and batches and len(batches[-1]) < self.max_batch_size:
            batches.pop()
        if self.shuffle and self.group_by_length and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda k: (max(self.lengths[i] for i in batches[k]), -k))
            rest = [b for k, b in enumerate(batches) if k != longest]
            perm = torch.randperm(len(rest), generator=g).tolist()
            batches = [batches[longest]] + [rest[k] for k in perm]
        return batches

    def _per_rank(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = self._per_rank(len(batches))
        needed = per_rank * self.num_replicas
        if needed > len(batches) and batches:
            batches = batches + [batches[k % len(batches)] for k in range(needed - len(batches))]
        batches = batches[:needed]
        yield from batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        n, b = len(self.lengths), self.max_batch_size
        total = n // b if self.drop_last else math.ceil(n / b)
        return self._per_rank(total)


class ClassBalancedSampler(Sampler[int]):
    """Samples indices with replacement, each with weight 1 / (count of its class).

    ``labels``: one label per item (any hashable; ``None`` = unlabeled, never sampled).
    ``num_samples``: draws per epoch over all ranks (default: ``len(labels)``); each rank gets
    ``ceil(num_samples / num_replicas)``.
    """

    def __init__(
        self,
        labels: Sequence,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        _check_rank(num_replicas, rank)
        self.labels = list(labels)
        counts = Counter(label for label in self.labels if label is not None)
        if not counts:
            raise ValueError("ClassBalancedSampler needs at least one labeled item")
        self.class_counts = dict(counts)
        self.weights = torch.tensor(
            [0.0 if label is None else 1.0 / counts[label] for label in self.labels], dtype=torch.double
        )
        self.num_samples = int(num_samples) if num_samples is not None else len(self.labels)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = len(self) * self.num_replicas
        draws = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        yield from draws[self.rank :: self.num_replicas]
