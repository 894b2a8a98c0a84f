"""The benchmark issue's targets and the printed summary of a ``clip-perception bench`` report
(the JSON object ``bench.run`` builds)."""

from __future__ import annotations

from typing import Any

import torch

# Targets from the benchmark issue (B/32 at 768, 10 queries): on the 2-core CPU, and on an
# H100/H200 (bf16, end to end; the batch-16 fraction needs --peak-tflops).
TARGETS = {
    "ours_fp32_vs_pipeline": ("<=", 0.80),
    "ours_fp32_image_path_gemm_fraction": (">=", 0.85),
    "ours_low_vs_pipeline": ("<=", 0.55),
    "low_vs_fp32_top100_agreement": (">=", 0.95),
    "queries_1000_vs_1": ("<=", 1.15),
}
GPU_TARGETS = {
    "ours_low_frames_per_s_batch1": (">=", 400.0),
    "ours_low_batch16_peak_fraction": (">=", 0.30),
}


def _check(targets: dict[str, tuple[str, float]], name: str, value: float) -> dict[str, Any]:
    sense, limit = targets[name]
    met = value <= limit if sense == "<=" else value >= limit
    return {"value": value, "limit": limit, "sense": sense, "met": bool(met)}


def targets(report: dict[str, Any], low_name: str, queries: dict[int, float],
            device: torch.device) -> dict:
    """The issue's targets for this device: the CPU set, or the GPU set on CUDA (the batch-16
    fraction only when the scaling rounds measured the low precision at batch 16 and
    ``--peak-tflops`` was given)."""
    if device.type == "cuda":
        checks = {"ours_low_frames_per_s_batch1": report["frames_per_s"][low_name]}
        fractions = report.get("batch_scaling_peak_fraction", {})
        if "16" in fractions and report["config"]["scaling_contender"].startswith(low_name):
            checks["ours_low_batch16_peak_fraction"] = fractions["16"]
        return {name: _check(GPU_TARGETS, name, value) for name, value in checks.items()}
    ratio = report["ratio_to_pipeline"]
    checks = {
        "ours_fp32_vs_pipeline": ratio["ours_fp32"],
        "ours_fp32_image_path_gemm_fraction": report["gemm_fraction"]["ours_fp32_image_path"],
        "ours_low_vs_pipeline": ratio[low_name],
        "low_vs_fp32_top100_agreement": report["agreement"]["low_vs_fp32_top100_iou0.9"],
    }
    if 1 in queries and 1000 in queries:
        checks["queries_1000_vs_1"] = queries[1000] / queries[1]
    return {name: _check(TARGETS, name, value) for name, value in checks.items()}


def summary(report: dict[str, Any]) -> str:
    m, gemm = report["machine"], report["gemm"]
    peak = report.get("peak_fraction")
    lines = [f"{m['name']} ({m['threads']} threads), torch {m['torch']}, "
             f"transformers {m['transformers']}; {gemm['dtype']} GEMM "
             f"{gemm['flops_per_s'] / 1e12:.3f} TFLOP/s, load average "
             f"{m['load_average_start']} -> {m['load_average_end']}",
             f"{'contender':28s} {'ms/frame':>9s} {'best':>9s} {'frames/s':>9s} {'x (a)':>6s} "
             f"{'GEMM frac':>9s}" + (f" {'peak frac':>9s}" if peak else "")]
    for name, seconds in report["per_frame_s"].items():
        best, rate = report["per_frame_best_s"][name], report["frames_per_s"][name]
        lines.append(f"{name:28s} {seconds * 1e3:9.3f} {best * 1e3:9.3f} {rate:9.1f} "
                     f"{report['ratio_to_pipeline'][name]:6.2f} "
                     f"{report['gemm_fraction'][name]:9.3f}"
                     + (f" {peak[name]:9.3f}" if peak else ""))
    for key in ("query_scaling_s", "batch_scaling_s"):
        lines.append(f"{key.removesuffix('_s')} (ms/frame): "
                     + ", ".join(f"{k}: {v * 1e3:.3f}" for k, v in report[key].items()))
    for batch, stages in report["stages_s"].items():
        lines.append(f"stages at batch {batch} (ms/call): "
                     + ", ".join(f"{k}: {v * 1e3:.3f}" for k, v in stages.items()))
    if "batch_scaling_peak_fraction" in report:
        lines.append("batch_scaling peak fraction: " + ", ".join(
            f"{k}: {v:.3f}" for k, v in report["batch_scaling_peak_fraction"].items()))
    lines.append("agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in report["agreement"].items()))
    for name, check in report["targets"].items():
        verdict = "met" if check["met"] else "NOT met"
        lines.append(f"target {name}: {check['value']:.3f} {check['sense']} {check['limit']} "
                     f"{verdict}")
    return "\n".join(lines)
