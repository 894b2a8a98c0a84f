"""Offline replay: run a recorded rosbag2 through the detector, write a new bag with results.

A robot's recorded bag becomes a regression test: the output (mcap) holds every input image
message exactly as recorded plus, per decodable frame, a ``clip_perception/msg/DetectionArray``
on ``<camera topic>/detections`` with the image's header and receive timestamp, as the
detector node would publish it. Frames are processed one at a time in bag order (a batch of
one each), so the result does not depend on timing or batching and is reproducible.

The detection topic follows the node's naming: ``/cam/image_raw`` and its compressed
transport ``/cam/image_raw/compressed`` both give ``/cam/image_raw/detections``.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader
from tqdm import tqdm

from clip_perception.bag_io import COMPRESSED, IMAGE, BagFrame, BagWriter, read_frames, typestore
from clip_perception.detector import OpenVocabDetector
from clip_perception.image_messages import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
)
from clip_perception.images_io import opencv_quiet

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay did.

    frames: image messages read (and copied) per input topic.
    skipped: frames per topic that could not be decoded (copied, but no detections).
    detections: detections per query label, over all frames, in vocabulary order.
    """

    frames: dict[str, int]
    skipped: dict[str, int]
    detections: dict[str, int]

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [f"{topic}: {count} frames, {self.skipped.get(topic, 0)} skipped"
               for topic, count in self.frames.items()]
        out += [f"{label!r}: {count} detections" for label, count in self.detections.items()]
        return out


def detections_topic(topic: str, msgtype: str) -> str:
    """``<camera topic>/detections``; a compressed transport topic names its camera topic."""
    if msgtype == COMPRESSED:
        topic = topic.removesuffix("/compressed")
    return f"{topic}/detections"


def decode(frame: BagFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a bag frame; ImageConversionError when malformed."""
    return compressed_to_rgb(frame.msg) if frame.msgtype == COMPRESSED else image_to_rgb(frame.msg)


class BagReplay:
    """One replay: opening it checks the bag (readable, has the topics and image messages), so
    the CLI fails on a bad bag before it loads a model; ``run`` then does the work once."""

    def __init__(self, bag: str | Path, topics: Sequence[str] | None = None) -> None:
        """Replay the image topics ``topics`` of ``bag`` (all of its image topics when None).
        Raises ValueError naming the problem."""
        self.bag = Path(bag)
        self._store = typestore()
        frames = read_frames(self.bag, topics, self._store)
        # The reader checks the bag and topics when it yields its first frame.
        first = next(frames, None)
        if first is None:
            raise ValueError(f"{self.bag}: no image messages"
                             + (f" on {', '.join(topics)}" if topics else ""))
        self._frames: Iterator[BagFrame] | None = itertools.chain([first], frames)
        self.total = _frame_count(self.bag, topics)

    def run(
        self, detector: OpenVocabDetector, out: str | Path,
        warn: Callable[[str], None] = _log.warning, progress: bool | None = None,
    ) -> ReplaySummary:
        """Write the new mcap bag folder ``out`` (ValueError if it exists) with every frame
        copied and the detections of ``detector`` (its queries already set).

        warn: gets one line per frame that cannot be decoded (copied, no detections).
        progress: tqdm bar on stderr; None shows it on a terminal only.
        """
        frames, self._frames = self._frames, None
        assert frames is not None, "a BagReplay runs once"
        vocabulary = detector.vocabulary
        assert vocabulary is not None, "set the detector's queries before replaying"
        counts = dict.fromkeys(vocabulary.labels, 0)
        seen: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        with BagWriter(out, self._store) as writer:
            disable = None if progress is None else not progress  # None: terminal only
            for frame in tqdm(frames, total=self.total, unit="frame", file=sys.stderr,
                              disable=disable):
                seen[frame.topic] += 1
                writer.write(frame.topic, frame.msgtype, frame.timestamp_ns, frame.msg)
                try:
                    with opencv_quiet():  # the warning below says it in one line
                        rgb = decode(frame)
                except ImageConversionError as error:
                    skipped[frame.topic] += 1
                    warn(f"{frame.topic} at {frame.timestamp_ns} ns: frame skipped ({error})")
                    continue
                result = detector.detect([rgb])[0]
                writer.write_detections(detections_topic(frame.topic, frame.msgtype),
                                        frame.timestamp_ns, frame.msg.header, result)
                for label in result.labels:
                    counts[label] += 1
        return ReplaySummary(frames=dict(seen), skipped=dict(skipped), detections=counts)


def _frame_count(bag: str | Path, topics: Sequence[str] | None) -> int:
    """Image messages the replay will read (for the progress bar), from the bag's metadata."""
    with Reader(Path(bag)) as reader:
        return sum(c.msgcount for c in reader.connections
                   if c.msgtype in (IMAGE, COMPRESSED) and (topics is None or c.topic in topics))
