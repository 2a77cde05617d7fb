"""Work on items 0..count-1 in DataLoader worker processes, handed back in order, a chunk at a time.

Decoding images for a GPU needs several processes (one decodes hundreds per second, the model
embeds thousands), and sending each image as its own message costs the main process more than
the decode: a chunk of images travels as one stacked tensor in one piece of shared memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

CHUNK = 16  # items per message


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, work: Callable[[int, int], Any], count: int, chunk: int):
        self.work, self.count, self.chunk = work, count, chunk

    def __len__(self) -> int:
        return -(-self.count // self.chunk)

    def __getitem__(self, index: int):
        start = index * self.chunk
        return self.work(start, min(start + self.chunk, self.count))


def ordered_chunks(work: Callable[[int, int], Any], count: int, workers: int = 0, chunk: int = CHUNK) -> Iterator[Any]:
    """``work(start, stop)`` for consecutive ranges covering 0..count-1, results in range order.

    ``workers=0`` runs here; otherwise ``work`` runs in that many worker processes (it must be
    picklable where processes are spawned, and should catch its items' own errors: one raised
    stops the whole iteration, as it would here).
    """
    chunks = _Chunks(work, count, max(1, chunk))
    if workers <= 0:
        return (chunks[i] for i in range(len(chunks)))
    # batch_size=None hands each chunk over as work made it; 4 chunks per worker in flight.
    return iter(torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=workers, prefetch_factor=4))
