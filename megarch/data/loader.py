"""Deterministic batches: which samples each data-parallel rank reads at each step.

The data position of a run is one integer, the number of samples consumed so far. Global batch
t holds samples ``[t * G, (t + 1) * G)``; within it, micro-batch m of data-parallel rank r reads
the contiguous slice ``G_off + (m * dp + r) * micro`` of ``micro`` samples. The union over ranks
and micro-batches is the same global batch whatever the data-parallel size, and a resumed run
starts at ``consumed_samples`` exactly. Sample content depends only on its index, so the number
of loader workers changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MicroBatchSampler:
    """Yields the sample indices of each micro-batch of one data-parallel rank, in order."""

    def __init__(
        self,
        total_samples: int,
        micro_batch: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        if micro_batch < 1 or global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                f"data-parallel size {dp_size}: change one of them"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.total = total_samples
        self.micro, self.global_batch = micro_batch, global_batch
        self.rank, self.dp = dp_rank, dp_size
        self.consumed = consumed_samples

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per global batch."""
        return self.global_batch // (self.micro * self.dp)

    def __len__(self) -> int:
        steps = max(0, (self.total - self.consumed) // self.global_batch)
        return steps * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while start + self.global_batch <= self.total:
            for m in range(self.accumulation_steps):
                first = start + (m * self.dp + self.rank) * self.micro
                yield list(range(first, first + self.micro))
            start += self.global_batch


def make_loader(
    dataset: torch.utils.data.Dataset,
    micro_batch: int,
    global_batch: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` that yields this rank's micro-batches from
    ``consumed_samples`` on (see the module docstring)."""
    sampler = MicroBatchSampler(
        len(dataset), micro_batch, global_batch, dp_rank, dp_size, consumed_samples
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
