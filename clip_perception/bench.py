"""``clip-perception bench``: our detector against transformers on the same random weights.

One run builds a randomly initialised OWL-ViT checkpoint (B/32 at 768 by default) with
transformers, loads it into every contender and times, alternating the contenders run by run
(the start of each round rotates), end to end from HxWx3 uint8 frames to boxes:

(a) ``transformers_pipeline``: processor(text, images), model(**inputs) with the text every frame,
    ``post_process_object_detection``;
(b) ``transformers_cached_text``: the same with the text embedded once;
(c) ``ours_fp32``: ``load_detector`` + ``set_queries`` once, ``detect`` per frame (NMS included);
(d) ``ours_int8`` on CPU (dynamic quantisation) or ``ours_bf16``/``ours_fp16`` on GPU;

plus our fp32 image path alone and a large fp32 GEMM, whose median throughput in the same run
is the yardstick for the achieved-throughput fractions. Then the per-frame cost against the
number of queries and the batch size (ours fp32, or (d) with ``--scaling-precision low``), and
how often (d)'s top-100 boxes agree with fp32's on the timed frames. Figures are medians;
ratios compare medians of the same run. The last line printed is one JSON object with every
figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_perception import bench_contenders as bc
from clip_perception import bench_report
from clip_perception.detector import OpenVocabDetector
from clip_perception.device import resolve_device

Step = bc.Step


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {text!r}")
    return values


def _usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``clip-perception bench`` (defaults: about 4 minutes on a 2-core CPU)."""
    parser.add_argument("--arch", choices=sorted(bc.ARCHITECTURES), default="b32",
                        help="random checkpoint to build (default b32: OWL-ViT B/32 at 768)")
    parser.add_argument("--checkpoint", type=Path,
                        help="use this folder (written by a previous run) instead of building")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--low-precision", choices=("auto", "int8", "bf16", "fp16"),
                        default="auto", help="contender (d); auto: int8 on CPU, bf16 on GPU")
    parser.add_argument("--threads", type=int, default=_usable_cores(),
                        help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--frame", default="480x640", help="frame size HxW (default 480x640)")
    parser.add_argument("--queries", type=int, default=10, help="queries for the contenders")
    parser.add_argument("--threshold", type=float, default=0.1, help="score threshold")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the contenders")
    parser.add_argument("--query-counts", type=_ints, default=[1, 10, 100, 1000])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument("--scaling-repeats", type=int, default=3,
                        help="timed rounds of each query count and batch size")
    parser.add_argument("--scaling-precision", choices=("fp32", "low", "compiled"),
                        default="fp32", help="whose cost the query/batch scaling and the stages "
                        "measure: ours fp32, (d), or the --compile contender")
    parser.add_argument("--gemm-size", type=int,
                        help="n of the n^3 GEMM yardstick (default 2048 fp32 on CPU, 8192 in "
                             "the low precision on GPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's stated peak in the low precision (dense), to report "
                             "achieved fractions of it (H100/H200 SXM bf16: 989)")
    parser.add_argument("--compile", action="store_true",
                        help="add ours with torch.compile (fp32 on CPU, the low precision on "
                             "GPU; a minute or more to compile)")
    parser.add_argument("--output", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: tiny model, few rounds and sizes")


def _quick(args: argparse.Namespace) -> None:
    args.arch, args.repeats, args.scaling_repeats = "tiny", 2, 1
    args.query_counts, args.batch_sizes, args.gemm_size = [1, 10], [1, 2], 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(steps: dict[str, Step], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per timed call: one run of every step per round, the order rotating each round
    (ABC, BCA, CAB, ...) so that drift and neighbours affect every step alike."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            setup, call = steps[name]
            if setup is not None:
                setup(r)
            _sync(device)
            start = time.perf_counter()
            call(r)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _load() -> str:
    # Other users' load skews every figure on a shared machine; text, as it may be 0.
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _machine(device: torch.device, threads: int, load_at_start: str) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": str(device), "name": name, "cpu": cpu, "cores": os.cpu_count() or 1,
            "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": load_at_start, "load_average_end": _load()}


def _gemm_step(size: int, device: torch.device, dtype: torch.dtype) -> Step:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    return None, lambda r: torch.mm(a, b)


def _frames_step(contender: bc.Contender, frames: list[np.ndarray], batch: int,
                 outputs: dict[int, list[bc.FrameResult]] | None = None) -> Step:
    """Round r runs frames r, r+1, ... (cycling): every step of a round sees the same images.
    ``outputs`` (if given) keeps each round's results."""
    def call(r: int) -> object:
        result = contender([frames[(r + i) % len(frames)] for i in range(batch)])
        if outputs is not None:
            outputs[r] = result
        return result

    return None, call


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints progress, a summary and (last) the JSON object. Returns 0."""
    if args.quick:
        _quick(args)
    if args.scaling_precision == "compiled" and not args.compile:
        raise SystemExit("--scaling-precision compiled needs --compile")
    torch.set_num_threads(max(1, args.threads))
    device = resolve_device(args.device)
    low = args.low_precision
    if low == "auto":
        low = "int8" if device.type == "cpu" else "auto"  # auto on CUDA: bf16, else fp16
    height, width = (int(v) for v in args.frame.lower().split("x"))
    queries = bc.make_queries(args.queries)
    with tempfile.TemporaryDirectory(prefix="clip_perception_bench_") as tmp:
        folder = args.checkpoint
        if folder is None:
            print(f"building a random {args.arch} checkpoint ...", flush=True)
            folder = bc.build_checkpoint(Path(tmp) / args.arch, args.arch)
        report = _measure(args, folder, device, low, queries, (height, width))
    print(bench_report.summary(report))
    line = json.dumps(report, sort_keys=True)
    if args.output is not None:
        args.output.write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)
    return 0


class _Loaded:
    """The contenders of one run; ``close`` stops our detectors' vocabulary workers."""

    def __init__(self, args: argparse.Namespace, folder: Path, device: torch.device, low: str,
                 queries: list[str]) -> None:
        self.hf = bc.TransformersContenders(folder, device, queries, args.threshold)
        self.fp32, self.fp32_detector = bc.ours_contender(
            folder, device, "fp32", queries, args.threshold)
        self.low, self.low_detector = bc.ours_contender(
            folder, device, low, queries, args.threshold)
        self.low_name = f"ours_{self.low_detector.placement.precision}"
        self.detectors = [self.fp32_detector, self.low_detector]
        # What --scaling-precision may pick: (name, contender, detector).
        self.scalable: dict[str, tuple[str, bc.Contender, OpenVocabDetector]] = {
            "fp32": ("ours_fp32", self.fp32, self.fp32_detector),
            "low": (self.low_name, self.low, self.low_detector),
        }
        self.contenders: dict[str, bc.Contender] = {
            "transformers_pipeline": self.hf.pipeline,
            "transformers_cached_text": self.hf.cached_text,
            "ours_fp32": self.fp32,
            self.low_name: self.low,
            "ours_fp32_image_path": bc.ours_image_path(self.fp32_detector),
        }
        if device.type == "cuda":  # what the CUDA graphs buy, side by side
            eager, detector = bc.ours_contender(
                folder, device, low, queries, args.threshold, cuda_graphs=False)
            self.detectors.append(detector)
            self.contenders[f"{self.low_name}_eager"] = eager
        if args.compile:
            precision = "fp32" if device.type == "cpu" else low
            compiled, detector = bc.ours_contender(
                folder, device, precision, queries, args.threshold, compiled=True)
            self.detectors.append(detector)
            self.contenders[f"ours_{detector.placement.precision}_compiled"] = compiled
            self.scalable["compiled"] = (f"ours_{detector.placement.precision}_compiled",
                                         compiled, detector)

    def close(self) -> None:
        for detector in self.detectors:
            detector.close()


def _measure(args: argparse.Namespace, folder: Path, device: torch.device, low: str,
             queries: list[str], frame_size: tuple[int, int]) -> dict[str, Any]:
    started, load_at_start = time.perf_counter(), _load()
    frames = bc.make_frames(max(8, *args.batch_sizes), *frame_size)
    print("loading contenders ...", flush=True)
    loaded = _Loaded(args, folder, device, low, queries)
    # The yardstick: fp32 on CPU; on GPU the precision the low contender runs in.
    gemm_dtype = loaded.low_detector.placement.dtype if device.type == "cuda" else torch.float32
    if args.gemm_size is None:
        args.gemm_size = 2048 if device.type == "cpu" else 8192
    try:
        outputs: dict[str, dict[int, list[bc.FrameResult]]] = {n: {} for n in loaded.contenders}
        steps = {name: _frames_step(contender, frames, 1, outputs[name])
                 for name, contender in loaded.contenders.items()}
        for name, (_, call) in steps.items():  # warm-up: first-call allocations, kernel choice
            print(f"warming up {name} ...", flush=True)
            call(0)
        steps["gemm"] = _gemm_step(args.gemm_size, device, gemm_dtype)
        print(f"timing {len(steps)} steps x {args.repeats} rounds ...", flush=True)
        times = alternate(steps, args.repeats, device)
        scaled_name, scaled, scaled_detector = loaded.scalable[args.scaling_precision]
        print("query scaling ...", flush=True)
        query_times = _query_scaling(args, scaled_detector, scaled, frames, device)
        print("batch scaling ...", flush=True)
        batch_times = _batch_scaling(args, scaled, frames, device)
        print("stages ...", flush=True)
        stage_times = {str(b): _stages(args, scaled_detector, frames, b, device)
                       for b in sorted({min(args.batch_sizes), max(args.batch_sizes)})}
    finally:
        loaded.close()

    gemm_times = times.pop("gemm")
    gemm = 2 * args.gemm_size**3 / _median(gemm_times)
    per_frame = {name: _median(t) for name, t in times.items()}
    cfg = loaded.fp32_detector.owl.config
    image = bc.image_flops(cfg)
    flops = {name: image + bc.scoring_flops_per_query(cfg) * len(queries) for name in per_frame}
    flops["transformers_pipeline"] += bc.text_flops_per_query(cfg) * len(queries)
    flops["ours_fp32_image_path"] = image
    pipeline = per_frame["transformers_pipeline"]
    report: dict[str, Any] = {
        "machine": _machine(device, torch.get_num_threads(), load_at_start),
        "config": {"arch": args.arch if args.checkpoint is None else str(args.checkpoint),
                   "image_size": cfg.image_size, "patch_size": cfg.vision.patch_size,
                   "frame_hw": list(frame_size), "queries": len(queries),
                   "repeats": args.repeats, "scaling_repeats": args.scaling_repeats,
                   "threshold": args.threshold, "low_precision": loaded.low_name,
                   "scaling_contender": scaled_name},
        "per_frame_s": per_frame,
        # Fastest run of each: what the code costs when other users leave the cores alone.
        "per_frame_best_s": {name: min(t) for name, t in times.items()},
        "ratio_to_pipeline": {name: t / pipeline for name, t in per_frame.items()},
        "flops_per_frame": flops,
        "flops": {"image_path": image, "text_per_query": bc.text_flops_per_query(cfg),
                  "scoring_per_query": bc.scoring_flops_per_query(cfg)},
        "gemm": {"n": args.gemm_size, "dtype": str(gemm_dtype).removeprefix("torch."),
                 "flops_per_s": gemm, "runs": len(gemm_times)},
        "gemm_fraction": {name: flops[name] / t / gemm for name, t in per_frame.items()},
        "frames_per_s": {name: 1.0 / t for name, t in per_frame.items()},
        "query_scaling_s": {str(q): t for q, t in query_times.items()},
        "batch_scaling_s": {str(b): t for b, t in batch_times.items()},
        "batch_scaling_frames_per_s": {str(b): 1.0 / t for b, t in batch_times.items()},
        "stages_s": stage_times,
        "agreement": bc.agreement_figures(outputs["ours_fp32"], outputs[loaded.low_name],
                                outputs["transformers_pipeline"], frame_size),
        "measure_s": time.perf_counter() - started,
    }
    scaled_flops = image + bc.scoring_flops_per_query(cfg) * len(queries)
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
        report["peak_flops_per_s"] = peak
        report["peak_fraction"] = {name: flops[name] / t / peak for name, t in per_frame.items()}
        report["batch_scaling_peak_fraction"] = {
            str(b): scaled_flops / t / peak for b, t in batch_times.items()}
    report["targets"] = bench_report.targets(report, loaded.low_name, query_times, device)
    return report


def _query_scaling(args: argparse.Namespace, detector: OpenVocabDetector, contender: bc.Contender,
                   frames: list[np.ndarray], device: torch.device) -> dict[int, float]:
    """Per-frame seconds against the vocabulary size; switching vocabularies is untimed
    (embeddings come from the detector's cache after the first switch)."""
    steps: dict[str, Step] = {}
    for count in args.query_counts:
        vocabulary = bc.make_queries(count)
        detector.set_queries(vocabulary)  # encode once, outside the timed rounds
        _, call = _frames_step(contender, frames, 1)
        steps[str(count)] = (lambda r, v=vocabulary: detector.set_queries(v), call)
    times = alternate(steps, args.scaling_repeats, device)
    detector.set_queries(bc.make_queries(args.queries))
    return {q: _median(times[str(q)]) for q in args.query_counts}


def _batch_scaling(args: argparse.Namespace, contender: bc.Contender, frames: list[np.ndarray],
                   device: torch.device) -> dict[int, float]:
    """Per-frame seconds against the batch size (one ``detect`` per batch)."""
    steps = {str(b): _frames_step(contender, frames, b) for b in args.batch_sizes}
    for _, call in steps.values():  # a new batch size may compile or capture a graph first
        call(0)
    times = alternate(steps, args.scaling_repeats, device)
    return {b: _median(times[str(b)]) / b for b in args.batch_sizes}


def _stages(args: argparse.Namespace, detector: OpenVocabDetector, frames: list[np.ndarray],
            batch: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of each stage of ``detect`` (preprocess, image path, decode)."""
    times = alternate(bc.ours_stages(detector, frames, batch), args.scaling_repeats, device)
    return {name: _median(t) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-perception bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
