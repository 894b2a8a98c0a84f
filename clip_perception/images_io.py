"""Files for the CLI: find and read images as RGB, write PNGs, results as JSON and tables.

Every problem with an input file raises :class:`ImageReadError` (a ``ValueError``) whose text
names the file and the reason in one line, so the CLI can report it without a traceback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clip_perception.detections import Classification, Detections

# What OpenCV decodes in every build we ship with; other files in a folder are ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(ValueError):
    """An input image path that cannot be used; ``str(error)`` names the file."""


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to the image files
    directly inside them (sorted by name, not recursive). Checked before any model is loaded,
    so a typo fails in a second rather than after the weights are read."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise ImageReadError(f"{path}: no image files ({suffixes}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ImageReadError(f"{path}: no such file or folder")
    if not files:
        raise ImageReadError("no input images given")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB (grey, alpha and 16-bit files converted)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # (nbytes,); unlike imread, any path encoding
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror or error})") from error
    # IMREAD_COLOR: 3-channel 8-bit whatever the file holds; EXIF orientation is applied, as
    # image viewers do, so boxes land where the user sees the object.
    with opencv_quiet():
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@contextlib.contextmanager
def opencv_quiet() -> Iterator[None]:
    """Mute OpenCV's native log while decoding: a corrupt file makes it print several lines to
    stderr, while the caller reports the problem in one line of its own."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write (H, W, 3) uint8 RGB as a PNG; OSError when the file cannot be written."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(encoded.tobytes())


def unique_png_names(files: Sequence[Path]) -> list[str]:
    """One output PNG name per input, ``<stem>.png``; inputs from different folders that share
    a stem get ``<stem>-2.png``, ``<stem>-3.png``, ... in input order, so none overwrites
    another."""
    names: list[str] = []
    used: set[str] = set()
    for file in files:
        name, n = f"{file.stem}.png", 1
        while name in used:
            n += 1
            name = f"{file.stem}-{n}.png"
        used.add(name)
        names.append(name)
    return names


@dataclass(frozen=True)
class ImageDetections:
    """The detections of one input file and the annotated PNG written for it."""

    file: Path
    annotated: str  # file name inside the output folder
    detections: Detections


def detections_record(item: ImageDetections) -> dict[str, Any]:
    """One image of ``detections.json``: plain JSON types, boxes xyxy in source pixels."""
    result = item.detections
    height, width = result.image_size
    return {
        "file": str(item.file),
        "annotated": item.annotated,
        "width": width,
        "height": height,
        "vocabulary_version": result.vocabulary_version,
        "detections": [
            {"box": [float(v) for v in box], "score": float(score), "query": label,
             "query_index": int(index)}
            for box, score, label, index in zip(result.boxes, result.scores, result.labels,
                                                result.query_indices, strict=True)
        ],
    }


def classification_records(files: Sequence[Path],
                           results: Sequence[Classification]) -> list[dict[str, Any]]:
    """One JSON object per image, ``results[i]`` being the classification of ``files[i]``
    alone: its top label and the probability of every label."""
    records = []
    for file, result in zip(files, results, strict=True):
        [(label, probability)] = result.top1()
        records.append({"file": str(file), "label": label, "probability": probability,
                        "probabilities": dict(zip(result.labels, result.probs[0].tolist(),
                                                  strict=True))})
    return records


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned text columns, two spaces apart, for results printed to a terminal."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in [header, *rows])
