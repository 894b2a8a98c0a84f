"""The clip-perception command on tiny random checkpoints: detect and classify end to end in a
real process (results equal the engine run in-process), templates, train and eval on a tiny
recipe, bench delegation, and every user mistake as one ``clip-perception: error:`` line with
exit code 2 (command line) or 1 (files, models). Replay is tested in test_replay.py."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from engine_fixtures import random_image, tiny_checkpoint

from clip_perception import bench
from clip_perception.classifier import load_classifier
from clip_perception.cli import main
from clip_perception.detector import load_detector
from clip_perception.images_io import unique_png_names

REPO = Path(__file__).resolve().parents[1]
BAG = REPO / "test" / "data" / "cameras_bag"
SIZES = [(48, 80), (100, 60), (64, 64)]  # (H, W): wide, tall, square
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Workspace:
    owl: Path  # tiny OWL-ViT checkpoint
    clip: Path  # tiny CLIP checkpoint
    folder: Path  # PNGs of SIZES[:-1]
    single: Path  # one more PNG, named on the command line next to the folder
    corrupt: Path  # a .png file that is not an image
    root: Path

    @property
    def inputs(self) -> list[Path]:
        return [*sorted(self.folder.glob("*.png")), self.single]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    owl = tiny_checkpoint(root / "owl", "v1").path
    clip = tiny_checkpoint(root / "clip", "clip").path
    folder, other = root / "images", root / "other"
    folder.mkdir()
    other.mkdir()
    paths = [folder / "a.png", folder / "b.png", other / "c.png"]
    for i, (path, (h, w)) in enumerate(zip(paths, SIZES, strict=True)):
        cv2.imwrite(str(path), cv2.cvtColor(random_image(h, w, i), cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image, ignored in folders")
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "recipe.json").write_text(json.dumps({"steps": 10}))  # belongs in clip.optim
    return Workspace(owl, clip, folder, paths[2], corrupt, root)


def run_cli(args: Sequence[object], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m clip_perception.cli`` as a user runs it. cwd outside the checkout, so the
    built package is imported, not the source tree."""
    return subprocess.run([sys.executable, "-m", "clip_perception.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def call_main(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main() in this process (fast, for the many error cases): exit code and stderr. An
    exception main() lets through (what a user would see as a traceback) fails the test."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_setup_py_installs_main_as_the_console_script() -> None:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    entry_points = ast.literal_eval(next(k.value for k in call.keywords
                                         if k.arg == "entry_points"))
    assert entry_points["console_scripts"] == ["clip-perception=clip_perception.cli:main"]
    assert callable(main)


def test_detect_end_to_end_matches_the_engine(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(["detect", "--model", ws.owl, "--device", "cpu", "--query", "cat",
                    "--query", "red car", "--threshold", "0.3", ws.folder, ws.single,
                    "--out", out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "detections.json").read_text())
    assert report["queries"] == ["cat", "red car"] and report["threshold"] == 0.3

    detector = load_detector(ws.owl, device="cpu", score_threshold=0.3)
    detector.set_queries(["cat", "red car"])
    assert [Path(r["file"]) for r in report["images"]] == ws.inputs
    total = 0
    for record, path in zip(report["images"], ws.inputs, strict=True):
        image = rgb(path)
        expected = detector.detect([image])[0]
        assert (record["height"], record["width"]) == image.shape[:2]
        assert record["vocabulary_version"] == expected.vocabulary_version
        found = record["detections"]
        assert [d["query"] for d in found] == expected.labels
        assert [d["query_index"] for d in found] == expected.query_indices.tolist()
        np.testing.assert_allclose([d["score"] for d in found], expected.scores,
                                   atol=TOLERANCE)
        np.testing.assert_allclose(np.reshape([d["box"] for d in found], (-1, 4)),
                                   expected.boxes, atol=TOLERANCE)
        annotated = rgb(out / record["annotated"])
        assert annotated.shape == image.shape and not np.array_equal(annotated, image)
        total += len(found)
    detector.close()
    assert total > 0, "threshold too high to test anything"
    assert proc.stdout.strip() == f"3 images, {total} detections -> {out}"


@pytest.mark.parametrize(("flags", "templates"), [
    (["--templates", "clip7"], "clip7"),
    (["--templates", "a {}.", "--templates", "the {}"], ["a {}.", "the {}"]),
])
def test_detect_templates_and_comma_separated_queries(
    ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
    templates: str | list[str],
) -> None:
    code, err = call_main(["detect", "--model", ws.owl, "--device", "cpu", "--queries",
                           "cat, red car", *flags, ws.single, "--out", tmp_path], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "detections.json").read_text())["images"][0]
    detector = load_detector(ws.owl, device="cpu")
    detector.set_queries(["cat", "red car"], templates=templates)
    expected = detector.detect([rgb(ws.single)])[0]
    detector.close()
    assert [d["query"] for d in record["detections"]] == expected.labels
    np.testing.assert_allclose([d["score"] for d in record["detections"]], expected.scores,
                               atol=TOLERANCE)


def test_classify_end_to_end_matches_the_engine(ws: Workspace, tmp_path: Path) -> None:
    labels = ["cat", "dog", "red car"]
    report_file = tmp_path / "classes.json"
    proc = run_cli(["classify", "--model", ws.clip, "--device", "cpu",
                    *[arg for label in labels for arg in ("--label", label)],
                    "--templates", "a photo of a {}.", ws.folder, ws.single,
                    "--json", report_file], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    classifier = load_classifier(ws.clip, device="cpu")
    classifier.set_labels(labels, templates=["a photo of a {}."])
    expected = classifier.classify([rgb(p) for p in ws.inputs])
    classifier.close()

    records = json.loads(report_file.read_text())["images"]
    probs = [[r["probabilities"][label] for label in labels] for r in records]
    np.testing.assert_allclose(probs, expected.probs, atol=TOLERANCE)
    table = proc.stdout.strip().splitlines()
    assert table[0].split() == ["image", "label", "probability"]
    for line, path, (label, probability) in zip(table[1:], ws.inputs, expected.top1(),
                                                strict=True):
        assert line.startswith(str(path)) and line.split()[-2] == label
        assert abs(float(line.split()[-1]) - probability) < 1e-3


# Seconds, not minutes: a two-step run of a one-layer model on a handful of small frames.
TINY_RECIPE = {
    "shape": {"clip_image_size": 32, "image_size": 64, "vision_width": 32, "vision_layers": 1,
              "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2},
    "clip": {"optim": {"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1},
             "bpe_merges": 50},
    "owl": {"optim": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1}},
}


def test_train_and_eval_subcommands_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    size = ["--width", "128", "--height", "96"]
    steps = [
        ["train", "data", "--out", tmp_path / "train", "--images", "6", *size],
        ["train", "data", "--out", tmp_path / "test", "--images", "4", "--split", "test", *size],
        ["train", "clip", "--data", tmp_path / "train", "--out", tmp_path / "clip",
         "--recipe", recipe, "--seed", "3"],
        ["train", "owl", "--data", tmp_path / "train", "--init", tmp_path / "clip",
         "--out", tmp_path / "owl", "--recipe", recipe],
        ["eval", "clip", "--model", tmp_path / "clip", "--data", tmp_path / "test",
         "--json", tmp_path / "clip.json"],
        ["eval", "owl", "--model", tmp_path / "owl", "--data", tmp_path / "test", "--no-int8",
         "--json", tmp_path / "owl.json"],
    ]
    for args in steps:
        code, err = call_main(args, capsys)
        assert code == 0, (args, err)
    summary = json.loads((tmp_path / "clip" / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["recipe"]["seed"] == 3
    assert (tmp_path / "owl" / "config.json").is_file()
    prompts = [r["prompts"] for r in json.loads((tmp_path / "clip.json").read_text())["results"]]
    assert prompts == ["name", "single", "clip7", "clip80"]
    owl = json.loads((tmp_path / "owl.json").read_text())
    assert owl["images"] == 4 and owl["int8"] is None and 0 <= owl["overall"]["ap50"] <= 1


def test_bench_is_delegated_to_the_bench_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    received = []
    monkeypatch.setattr(bench, "run", lambda args: received.append(args) or 0)
    assert call_main(["bench", "--quick", "--queries", "3"], capsys) == (0, "")
    assert received[0].quick and received[0].queries == 3  # bench's own options


def test_unique_png_names_keep_same_stems_apart() -> None:
    files = [Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png"), Path("d/x.bmp")]
    assert unique_png_names(files) == ["x.png", "x-2.png", "y.png", "x-3.png"]


Args = Callable[[Workspace, Path], list[object]]


def _detect_with(*extra: object) -> Args:
    """A detect command line that is fine but for ``extra``."""
    return lambda ws, tmp: ["detect", "--model", ws.owl, "--query", "cat", *extra, ws.single,
                            "--out", tmp / "out"]


ERRORS: list[tuple[str, Args, int, str]] = [
    ("no command", lambda ws, tmp: [], 2, "required: COMMAND"),
    ("no query", lambda ws, tmp: ["detect", "--model", ws.owl, ws.single, "--out", tmp], 2,
     "--query"),
    ("empty query", lambda ws, tmp: ["detect", "--model", ws.owl, "--query", " ", ws.single,
                                     "--out", tmp / "out"], 2, "query 0 must be a non-empty"),
    ("duplicate query", lambda ws, tmp: ["detect", "--model", ws.owl, "--queries", "cat, Cat",
                                         ws.single, "--out", tmp / "out"], 2, "duplicate query"),
    ("bad template", _detect_with("--templates", "a photo"), 2, "unknown template set"),
    ("template without {}", _detect_with("--templates", "{} and {}", "--templates", "x"), 2,
     "exactly one '{}'"),
    ("threshold", _detect_with("--threshold", "1.5"), 2, "1.5 is not in [0, 1]"),
    ("device", _detect_with("--device", "quantum"), 2, "unknown device 'quantum'"),
    ("precision", _detect_with("--precision", "fp8"), 2, "invalid choice: 'fp8'"),
    ("output exists", lambda ws, tmp: ["detect", "--model", ws.owl, "--query", "cat",
                                       ws.single, "--out", ws.folder], 2, "exists"),
    ("missing model", lambda ws, tmp: ["detect", "--model", tmp / "nope", "--query", "cat",
                                       ws.single, "--out", tmp / "out"], 1, "does not exist"),
    ("not a checkpoint", lambda ws, tmp: ["detect", "--model", ws.folder, "--query", "cat",
                                          ws.single, "--out", tmp / "out"], 1, "no config.json"),
    ("wrong model kind", lambda ws, tmp: ["classify", "--model", ws.owl, "--label", "cat",
                                          ws.single], 1, "expected one of ['CLIPModel']"),
    ("missing image", lambda ws, tmp: ["detect", "--model", ws.owl, "--query", "cat",
                                       tmp / "x.png", "--out", tmp / "out"], 1, "no such file"),
    ("corrupt image", lambda ws, tmp: ["classify", "--model", ws.clip, "--label", "cat",
                                       ws.corrupt], 1, "not a readable image"),
    ("empty folder", lambda ws, tmp: ["detect", "--model", ws.owl, "--query", "cat", tmp,
                                      "--out", tmp / "out"], 1, "no image files"),
    ("json exists", lambda ws, tmp: ["classify", "--model", ws.clip, "--label", "cat",
                                     ws.single, "--json", ws.single], 2, "exists"),
    ("missing bag", lambda ws, tmp: ["replay", tmp / "nope", "--model", ws.owl, "--query",
                                     "cat", "--out", tmp / "o.mcap"], 1, "no such bag"),
    ("unknown topic", lambda ws, tmp: ["replay", BAG, "--topics", "/rear/image_raw",
                                       "--model", ws.owl, "--query", "cat",
                                       "--out", tmp / "o.mcap"], 1, "no image topic(s) /rear"),
    ("recipe field", lambda ws, tmp: ["train", "clip", "--data", tmp, "--out", tmp / "out",
                                      "--recipe", ws.root / "recipe.json"], 1,
     "unknown Recipe fields: ['steps']"),
    ("no dataset", lambda ws, tmp: ["eval", "clip", "--model", ws.clip, "--data", tmp], 1,
     "annotations.json"),
    ("bag output exists", lambda ws, tmp: ["replay", BAG, "--model", ws.owl, "--query", "cat",
                                           "--out", BAG], 2, "exists"),
]


@pytest.mark.parametrize(("args", "code", "message"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_user_mistakes_are_one_line_errors(
    ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: Args, code: int,
    message: str,
) -> None:
    exit_code, err = call_main(args(ws, tmp_path), capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-perception: error: "), err
    assert message in lines[0]
    assert exit_code == code
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.mcap").exists()


def test_runtime_error_in_a_real_process_has_no_traceback(ws: Workspace,
                                                          tmp_path: Path) -> None:
    proc = run_cli(["detect", "--model", ws.owl, "--query", "cat", ws.single, ws.corrupt,
                    "--out", tmp_path / "out"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"clip-perception: error: {ws.corrupt}: not a readable image " \
        "(corrupt or unsupported format)"
    assert not (tmp_path / "out").exists()  # every input is decoded before anything is written
