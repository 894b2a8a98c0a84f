"""The per-frame image path replayed from CUDA graphs.

At batch 1 the vision tower's GPU work is small (a graphed call took 0.89 ms on an H200), while
launching its few hundred kernels one by one from Python took about 3 ms more per frame: the
GPU waits on the CPU (docs/benchmarks.md, "GPU"). A CUDA graph records those launches once per
input shape and replays them with one call.
The image path (``OwlModel.image_features``) has static shapes for a given batch size, so it
is captured per batch size on first use; preprocessing (frame sizes vary) and post-processing
(data-dependent NMS) stay eager.

A replay reads one fixed input buffer and writes fixed output buffers, so a call copies its
input in, replays and clones the outputs under a lock: concurrent callers can neither feed
each other's frames nor overwrite each other's results.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass

import torch

from clip_perception.model import OwlModel
from clip_perception.model.owl import OwlImageFeatures

# Eager runs before capture: the first picks kernels and allocates cuBLAS workspaces, which
# must not happen inside a capture.
_WARMUP_RUNS = 2


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # (B, 3, S, S) the input buffer the graph reads
    features: OwlImageFeatures  # the output buffers the graph writes


class GraphedImageFeatures:
    """``owl.image_features`` on CUDA, captured per input shape and replayed.

    Falls back to eager (with one warning naming the cause) if capture fails, e.g. on a driver
    without graph support: slower, never wrong. Out of memory is re-raised instead, for the
    node's split-and-retry (``batching.infer_with_split``) to run smaller batches, each of
    which then gets its own graph. Each graph keeps the memory of its batch size's activations
    (its own pool), so memory grows with the number of distinct batch sizes seen: at most the
    node's cameras per batch.
    """

    def __init__(self, owl: OwlModel) -> None:
        self._owl = owl
        self._captured: dict[tuple[tuple[int, ...], torch.dtype], _Captured] = {}
        self._lock = threading.Lock()
        self._failed = False

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes with a graph, in capture order."""
        return [shape for shape, _ in self._captured]

    def __call__(self, pixel_values: torch.Tensor) -> OwlImageFeatures:
        assert pixel_values.is_cuda, "CUDA graphs need CUDA input"
        if self._failed:
            return self._owl.image_features(pixel_values)
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        with self._lock:
            captured = self._captured.get(key)
            if captured is None:
                captured = self._capture(pixel_values)
                if captured is None:
                    return self._owl.image_features(pixel_values)
                self._captured[key] = captured
            captured.pixels.copy_(pixel_values)
            captured.graph.replay()
            # Clone inside the lock: the next replay overwrites the output buffers.
            return _clone(captured.features)

    def _capture(self, pixel_values: torch.Tensor) -> _Captured | None:
        pixels = pixel_values.clone()
        device = pixels.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_RUNS):
                    self._owl.image_features(pixels)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the vocabulary worker may encode text on its own stream meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                features = self._owl.image_features(pixels)
        except torch.cuda.OutOfMemoryError:
            raise  # not a capture problem: the caller's split-and-retry handles it
        except RuntimeError as err:
            self._failed = True
            warnings.warn(f"CUDA graph capture failed, running the image path eagerly: {err}",
                          RuntimeWarning, stacklevel=3)
            return None
        return _Captured(graph=graph, pixels=pixels, features=features)


def _clone(features: OwlImageFeatures) -> OwlImageFeatures:
    values = {field.name: getattr(features, field.name) for field in dataclasses.fields(features)}
    return OwlImageFeatures(**{name: None if value is None else value.clone()
                               for name, value in values.items()})
