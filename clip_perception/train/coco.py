"""COCO detection datasets: write synthetic scenes as one, and read any one back.

Layout written: ``<out_dir>/images/<split>_<index>.png`` and ``<out_dir>/annotations.json``
with ``bbox`` as ``[x, y, w, h]`` of the visible pixels, ``area`` as the visible pixel count
and one category per colour-shape pair, whose ``name`` is the query text (``"red circle"``).
Every split lists the full vocabulary with the same ids, so unseen test categories keep their
ids; ``info`` records the split, seed and held-out pairs.

Reading is tolerant of files from other tools: only ``images`` (``id``, ``file_name``) and
``categories`` (``id``, ``name``) are required; ``annotations`` may be absent (image-info
files), ``width``/``height``/``area``/``iscrowd``/``id`` are optional. Crowd regions and
zero-size boxes are skipped, as detectors do not train on them. Anything malformed raises
``ValueError`` naming the file and the entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from clip_perception.train.synthetic import (
    DEFAULT_SCENE,
    DEFAULT_SPLIT,
    Scene,
    Split,
    SplitSpec,
    generate_scenes,
)

ANNOTATIONS = "annotations.json"
IMAGES = "images"


@dataclass(frozen=True)
class CocoImage:
    id: int
    path: Path
    width: int | None  # None where the file leaves it out
    height: int | None
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: list[str]  # N category names

    def read_rgb(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB."""
        bgr = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {self.path}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class CocoDataset:
    annotation_file: Path
    images: list[CocoImage]
    categories: list[str]  # names, in category-id order

    def __len__(self) -> int:
        return len(self.images)


def write_coco(out_dir: str | Path, scenes: Iterable[Scene], categories: Sequence[str],
               prefix: str = "image", info: dict[str, Any] | None = None,
               total: int | None = None) -> Path:
    """Write ``scenes`` as PNGs plus ``annotations.json``; returns the annotation file."""
    out = Path(out_dir)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}  # COCO ids start at 1
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, scene in enumerate(tqdm(scenes, total=total, desc=f"writing {out}", unit="img")):
        h, w = scene.image.shape[:2]
        name = f"{prefix}_{index:06d}.png"
        if not cv2.imwrite(str(out / IMAGES / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {out / IMAGES / name}")
        images.append({"id": index + 1, "file_name": name, "width": w, "height": h,
                       "caption": scene.caption})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1,
                "category_id": cat_ids[obj.category], "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": obj.area, "iscrowd": 0})
    coco = {"info": info or {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": n.split()[-1]}
                           for n, i in cat_ids.items()]}
    path = out / ANNOTATIONS
    path.write_text(json.dumps(coco, indent=1))
    return path


def write_synthetic_coco(out_dir: str | Path, n_images: int,
                         image_size: int | tuple[int, int] = 224, seed: int = 0,
                         split: Split = "train", spec: SplitSpec = DEFAULT_SPLIT) -> Path:
    """Render ``n_images`` scenes of ``split`` at ``image_size`` (side, or (width, height))
    into a COCO dataset under ``out_dir``; returns the path of ``annotations.json``."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    config = replace(DEFAULT_SCENE, width=width, height=height)
    info = {"description": "clip_perception synthetic shapes", "split": split, "seed": seed,
            "unseen_categories": spec.unseen_categories}
    return write_coco(out_dir, generate_scenes(n_images, seed, split, spec, config),
                      spec.categories, prefix=split, info=info, total=n_images)


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _field(path: Path, entry: Any, where: str, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(entry, dict):
        raise _fail(path, f"{where} is not an object")
    if key not in entry:
        raise _fail(path, f"{where} has no '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(path, f"{where} '{key}' is {value!r}, not {kind}")
    return value


def _list(path: Path, coco: dict[str, Any], key: str, required: bool) -> list[Any]:
    if key not in coco and not required:
        return []
    value = coco.get(key)
    if not isinstance(value, list):
        raise _fail(path, f"'{key}' must be a list" + ("" if key in coco else ", and is missing"))
    return value


def load_coco(path: str | Path, image_dir: str | Path | None = None) -> CocoDataset:
    """Read a COCO detection file, given it or the directory holding ``annotations.json``.

    Image paths resolve against ``image_dir`` if given, else ``<dir>/images`` when the first
    image is there, else the annotation file's directory.
    """
    file = Path(path)
    file = file / ANNOTATIONS if file.is_dir() else file
    try:
        coco = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise _fail(file, f"not valid JSON ({e})") from e
    if not isinstance(coco, dict):
        raise _fail(file, "top level is not a JSON object")

    categories: dict[int, str] = {}
    for i, cat in enumerate(_list(file, coco, "categories", required=True)):
        cid = _field(file, cat, f"categories[{i}]", "id", int)
        if cid in categories:
            raise _fail(file, f"categories[{i}] repeats id {cid}")
        categories[cid] = _field(file, cat, f"categories[{i}]", "name", str)

    entries = _list(file, coco, "images", required=True)
    files: dict[int, tuple[str, int | None, int | None]] = {}
    for i, im in enumerate(entries):
        iid = _field(file, im, f"images[{i}]", "id", int)
        if iid in files:
            raise _fail(file, f"images[{i}] repeats id {iid}")
        size = [_field(file, im, f"images[{i}]", k, int) if k in im else None
                for k in ("width", "height")]
        files[iid] = (_field(file, im, f"images[{i}]", "file_name", str), size[0], size[1])

    boxes: dict[int, list[list[float]]] = {iid: [] for iid in files}
    labels: dict[int, list[str]] = {iid: [] for iid in files}
    for i, ann in enumerate(_list(file, coco, "annotations", required=False)):
        where = f"annotations[{i}]"
        iid = _field(file, ann, where, "image_id", int)
        cid = _field(file, ann, where, "category_id", int)
        bbox = _field(file, ann, where, "bbox", list)
        if iid not in files:
            raise _fail(file, f"{where} refers to unknown image_id {iid}")
        if cid not in categories:
            raise _fail(file, f"{where} refers to unknown category_id {cid}")
        if len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
            raise _fail(file, f"{where} bbox {bbox!r} is not [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            raise _fail(file, f"{where} bbox {bbox!r} has a negative size")
        if ann.get("iscrowd", 0) or w == 0 or h == 0:
            continue
        boxes[iid].append([x, y, x + w, y + h])
        labels[iid].append(categories[cid])

    root = Path(image_dir) if image_dir is not None else file.parent / IMAGES
    if image_dir is None and entries and not (root / files[next(iter(files))][0]).exists():
        root = file.parent
    images = [CocoImage(iid, root / name, w, h,
                        np.array(boxes[iid], np.float32).reshape(-1, 4),  # (N, 4) even if N = 0
                        labels[iid])
              for iid, (name, w, h) in files.items()]
    return CocoDataset(file, images, [categories[c] for c in sorted(categories)])

