"""Run a batch through an inference function, splitting it when the GPU runs out of memory.

A perception node batches the newest frame of every camera. Whether a batch fits in GPU
memory depends on what else runs on the GPU, so a batch that fitted a minute ago can fail
now. Dropping the whole batch would lose frames the node could have processed one by one;
instead the batch is halved and each half retried, down to single frames. Only an
out-of-memory error on a single frame propagates: that is a real "does not fit".

ROS-free and model-free so the split logic is tested directly with an injected error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

# torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError) exists in CPU-only builds too.
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError


def infer_with_split(
    infer: Callable[[list[Item]], list[Result]], items: Sequence[Item],
    on_split: Callable[[int, BaseException], None] | None = None,
) -> list[Result]:
    """``infer(items)``, or on out-of-memory the results of its two halves, in order.

    on_split(batch_size, error) is called once per split, before the halves are retried
    (the caller logs and counts). Raises the out-of-memory error of a single item, and any
    other error unchanged.
    """
    batch = list(items)
    try:
        return infer(batch)
    except OUT_OF_MEMORY as error:
        if len(batch) <= 1:
            raise
        # The failed attempt's activations are garbage now; hand their blocks back to the
        # allocator's pool before the retry so the halves can use them.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_split is not None:
            on_split(len(batch), error)
    half = len(batch) // 2
    return (infer_with_split(infer, batch[:half], on_split)
            + infer_with_split(infer, batch[half:], on_split))
