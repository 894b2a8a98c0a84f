"""Post-processing on hand-built tensors: best query, thresholds, NMS, cap."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from clip_perception.postprocess import (
    GroupSizes,
    PatchScores,
    best_query_per_patch,
    padded_group_nms,
    select_detections,
)


def _patches(scores: list[float], queries: list[int]) -> PatchScores:
    return PatchScores(
        scores=torch.tensor([scores]), query_indices=torch.tensor([queries])
    )  # (1, P) each


# Boxes 0 and 1 overlap with IoU 0.81; box 2 is far away.
BOXES = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])


def test_best_query_is_max_sigmoid_over_queries() -> None:
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    out = best_query_per_patch(logits)
    assert torch.equal(out.query_indices, logits.argmax(-1))
    assert torch.allclose(out.scores, logits.sigmoid().max(-1).values)


def test_objectness_multiplies_probabilities() -> None:
    logits = torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(1))
    objectness = torch.randn(1, 4, generator=torch.Generator().manual_seed(2))
    out = best_query_per_patch(logits, objectness)
    expected = logits.sigmoid().max(-1).values * objectness.sigmoid()
    assert torch.allclose(out.scores, expected)
    assert torch.equal(out.query_indices, logits.argmax(-1))


def test_class_aware_nms_keeps_overlapping_boxes_of_different_queries() -> None:
    patches = _patches([0.9, 0.8, 0.7], [0, 1, 0])
    (kept,) = select_detections(BOXES, patches, torch.tensor([0.1, 0.1]), 0.3, False, 100)
    assert kept.query_indices.tolist() == [0, 1, 0]
    assert torch.allclose(kept.scores, torch.tensor([0.9, 0.8, 0.7]))


def test_class_agnostic_nms_suppresses_across_queries() -> None:
    patches = _patches([0.9, 0.8, 0.7], [0, 1, 0])
    (kept,) = select_detections(BOXES, patches, torch.tensor([0.1, 0.1]), 0.3, True, 100)
    assert kept.query_indices.tolist() == [0, 0]
    assert torch.equal(kept.boxes, BOXES[0, [0, 2]])


def test_same_query_overlaps_are_suppressed_and_iou_threshold_applies() -> None:
    patches = _patches([0.9, 0.8, 0.7], [0, 0, 0])
    (kept,) = select_detections(BOXES, patches, torch.tensor([0.1]), 0.3, False, 100)
    assert torch.allclose(kept.scores, torch.tensor([0.9, 0.7]))
    (loose,) = select_detections(BOXES, patches, torch.tensor([0.1]), 0.9, False, 100)
    assert len(loose.scores) == 3  # IoU 0.81 is not above 0.9


def test_per_query_thresholds() -> None:
    patches = _patches([0.9, 0.5, 0.4], [0, 1, 1])
    boxes = torch.tensor([[[0.0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21]]])
    (kept,) = select_detections(boxes, patches, torch.tensor([0.95, 0.45]), 0.3, False, 100)
    assert kept.query_indices.tolist() == [1]  # 0.9 < 0.95 for query 0; 0.4 < 0.45
    (kept,) = select_detections(boxes, patches, torch.tensor([0.0, 1.0]), 0.3, False, 100)
    assert kept.query_indices.tolist() == [0]


def test_max_detections_keeps_best_scores_per_image() -> None:
    gen = torch.Generator().manual_seed(3)
    corners = torch.rand(2, 20, 2, generator=gen) * 100  # (B, P, 2)
    boxes = torch.cat([corners, corners + 1], dim=-1)  # (B, P, 4) unit boxes, no overlaps
    scores = torch.rand(2, 20, generator=gen)
    patches = PatchScores(scores, torch.zeros(2, 20, dtype=torch.long))
    kept = select_detections(boxes, patches, torch.tensor([0.0]), 0.3, False, 5)
    for image, selection in enumerate(kept):
        assert torch.equal(selection.scores, scores[image].sort(descending=True).values[:5])


def test_zero_area_boxes_are_dropped() -> None:
    boxes = torch.tensor([[[0.0, 5.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]]])  # first is flat
    (kept,) = select_detections(boxes, _patches([0.9, 0.5], [0, 0]), torch.tensor([0.1]),
                                0.3, False, 100)
    assert kept.scores.tolist() == [pytest.approx(0.5)]


def test_nms_groups_stay_exact_for_many_queries_and_large_images() -> None:
    # With 100k groups and 4000 px coordinates batched_nms offsets boxes by ~4e8, where
    # float32 resolves only 32 px; the float64 path must still suppress exactly as per group.
    boxes = torch.tensor([[[3000.0, 3000.0, 3010.0, 3010.0], [3001.0, 3001.0, 3011.0, 3011.0],
                           [3002.5, 3000.0, 3012.5, 3010.0]]])
    patches = _patches([0.9, 0.8, 0.7], [99_999, 99_999, 99_999])
    thresholds = torch.zeros(100_000)
    (kept,) = select_detections(boxes, patches, thresholds, 0.7, False, 100)
    # IoU(0, 1) = 81/119 = 0.68 and IoU(0, 2) = 75/125 = 0.6: nothing is above 0.7.
    assert len(kept.scores) == 3
    (kept,) = select_detections(boxes, patches, thresholds, 0.65, False, 100)
    assert torch.allclose(kept.scores, torch.tensor([0.9, 0.7]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou", [0.1, 0.3, 0.7])
def test_padded_group_nms_is_batched_nms(seed: int, iou: float) -> None:
    # The CUDA path's NMS, run on the CPU against torchvision: clustered boxes (long chains
    # of suppression), uneven groups, one group (class-agnostic) and many.
    gen = torch.Generator().manual_seed(seed)
    count = 400
    centres = torch.rand(count, 2, generator=gen) * 200  # (C, 2)
    sizes = torch.rand(count, 2, generator=gen) * 60 + 5  # (C, 2)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1).double()  # (C, 4)
    scores = torch.rand(count, generator=gen, dtype=torch.float64)
    for num_groups in (1, 3, 37):
        groups = torch.randint(0, num_groups, (count,), generator=gen)
        expected = batched_nms(boxes, scores, groups, iou)
        assert torch.equal(padded_group_nms(boxes, scores, groups, iou), expected)
        counted = GroupSizes.count(groups)  # the caller's count, as _grouped_nms passes it
        assert torch.equal(padded_group_nms(boxes, scores, groups, iou, counted), expected)
