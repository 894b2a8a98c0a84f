"""``clip-perception bench`` on a tiny random model: the JSON's structure and figures (no timing
assertions: the figures depend on the machine), the analytic FLOPs against torch's counter,
the box-agreement rule and the synthetic vocabulary the transformers contenders tokenise with."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_perception import bench, bench_report
from clip_perception import bench_contenders as bc
from clip_perception.model import load_owl, load_tokenizer

CONTENDERS = {"transformers_pipeline", "transformers_cached_text", "ours_fp32", "ours_int8",
              "ours_fp32_image_path"}


def _figures(node: object, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON tree (booleans are verdicts, strings are labels)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _figures(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _figures(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, float(node)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """(the JSON written with --output, everything printed) of one quick run."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)  # the hook the CLI registers the subcommand with
    args = parser.parse_args(["--quick", "--threads", "2", "--peak-tflops", "0.5",
                              "--output", str(out)])
    printed = io.StringIO()
    previous = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            assert bench.run(args) == 0
    finally:
        torch.set_num_threads(previous)
    return json.loads(out.read_text(encoding="utf-8")), printed.getvalue()


@pytest.fixture(scope="module")
def report(run: tuple[dict, str]) -> dict:
    return run[0]


def test_last_printed_line_is_the_json_report(run: tuple[dict, str]) -> None:
    written, printed = run
    assert json.loads(printed.strip().splitlines()[-1]) == written


def test_report_has_every_section(report: dict) -> None:
    assert set(report["per_frame_s"]) == CONTENDERS == set(report["per_frame_best_s"])
    assert set(report["ratio_to_pipeline"]) == CONTENDERS
    assert set(report["gemm_fraction"]) == CONTENDERS
    assert report["ratio_to_pipeline"]["transformers_pipeline"] == 1.0
    assert set(report["query_scaling_s"]) == {"1", "10"}
    assert set(report["batch_scaling_s"]) == {"1", "2"}
    assert set(report["agreement"]) == {
        "low_vs_fp32_top100_iou0.9", "low_vs_fp32_top100_iou0.5",
        "fp32_vs_transformers_top100_iou0.9", "boxes_compared"}
    assert report["config"]["arch"] == "tiny" and report["config"]["low_precision"] == "ours_int8"
    assert report["machine"]["device"] == "cpu" and report["machine"]["threads"] == 2
    assert set(report["targets"]) == set(bench_report.TARGETS) - {"queries_1000_vs_1"}
    for check in report["targets"].values():
        assert set(check) == {"value", "limit", "sense", "met"} and isinstance(check["met"], bool)


def test_every_figure_is_positive_and_finite(report: dict) -> None:
    figures = dict(_figures(report))
    assert len(figures) > 40
    bad = {path: value for path, value in figures.items()
           if not (math.isfinite(value) and value > 0)}
    assert not bad, bad


def test_peak_fraction_is_flops_over_seconds_over_the_stated_peak(report: dict) -> None:
    assert report["peak_flops_per_s"] == 0.5e12
    assert set(report["peak_fraction"]) == CONTENDERS
    for name, seconds in report["per_frame_s"].items():
        expected = report["flops_per_frame"][name] / seconds / 0.5e12
        assert math.isclose(report["peak_fraction"][name], expected, rel_tol=1e-9)
        assert math.isclose(report["frames_per_s"][name], 1 / seconds, rel_tol=1e-9)
    assert set(report["batch_scaling_peak_fraction"]) == {"1", "2"}


def test_gpu_targets_judge_the_low_precision_contender() -> None:
    report = {"frames_per_s": {"ours_bf16": 450.0, "ours_fp32": 90.0},
              "batch_scaling_peak_fraction": {"1": 0.05, "16": 0.25},
              "config": {"scaling_contender": "ours_bf16"}}
    targets = bench_report.targets(report, "ours_bf16", {}, torch.device("cuda"))
    assert set(targets) == set(bench_report.GPU_TARGETS)
    assert targets["ours_low_frames_per_s_batch1"]["met"]
    assert targets["ours_low_frames_per_s_batch1"]["value"] == 450.0
    assert not targets["ours_low_batch16_peak_fraction"]["met"]
    # Scaling rounds that measured fp32 say nothing about bf16 at batch 16.
    report["config"]["scaling_contender"] = "ours_fp32"
    assert set(bench_report.targets(report, "ours_bf16", {}, torch.device("cuda"))) == {
        "ours_low_frames_per_s_batch1"}


def test_same_weights_give_the_reference_boxes(report: dict) -> None:
    # Our fp32 detections are the reference's boxes (the check that both load one model).
    assert report["agreement"]["fp32_vs_transformers_top100_iou0.9"] == 1.0


def test_analytic_flops_match_torch_counter(tmp_path: Path) -> None:
    folder = bc.build_checkpoint(tmp_path, "tiny")
    owl = load_owl(folder)
    cfg = owl.config
    tokens = cfg.vision.num_patches_side**2 + 1
    attention = cfg.vision.num_layers * 4 * tokens**2 * cfg.vision.hidden_size
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        owl.image_features(pixels)
    # torch counts every GEMM; whether it counts CPU SDPA depends on the torch version.
    assert counter.get_total_flops() in (bc.image_flops(cfg), bc.image_flops(cfg) - attention)


def test_agreement_matches_one_to_one_with_labels() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    ref = bc.FrameResult(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]))
    assert bc.agreement(ref, ref) == (2, 2)
    shifted = bc.FrameResult(boxes + 2.0, ref.scores, ref.labels)  # IoU 0.47
    assert bc.agreement(ref, shifted, iou=0.9) == (0, 2)
    relabelled = bc.FrameResult(boxes, ref.scores, torch.tensor([1, 0]))
    assert bc.agreement(ref, relabelled) == (0, 2)
    one = bc.FrameResult(boxes[:1], ref.scores[:1], ref.labels[:1])
    assert bc.agreement(ref, one) == (1, 2)


def test_synthetic_vocabulary_tokenises_like_transformers(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    bc.write_vocabulary(tmp_path, 49408)
    ours = load_tokenizer(tmp_path, context_length=16)
    theirs = CLIPTokenizer.from_pretrained(tmp_path, pad_token="!")
    queries = bc.make_queries(1000)
    want = theirs(queries, padding="max_length", max_length=16, return_tensors="pt")
    assert torch.equal(ours(queries), want["input_ids"])
    assert ours.eos_id == 49407 and int(want["input_ids"].max()) == 49407
    assert len(set(bc.make_queries(1000))) == 1000
