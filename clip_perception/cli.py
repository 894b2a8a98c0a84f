"""The ``clip-perception`` command: detect, classify, replay, bench, train and eval.

A thin dispatcher: each subcommand checks its arguments, then calls the engine
(``detector``, ``classifier``, ``replay``, ``bench``, ``train``) and ``images_io``. The
training modules are imported by their handlers only, so the inference commands do not pay
for training's dependencies.

Errors a user can make print one line, ``clip-perception: error: ...``, and exit with
2 when the command line itself is wrong (checked before anything is loaded: arguments,
queries, templates, device, an existing output) or 1 when a file or model fails (missing or
invalid checkpoint, unreadable image, missing bag or topic). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from tqdm import tqdm

from clip_perception import bench
from clip_perception.annotate import draw_detections
from clip_perception.classifier import load_classifier
from clip_perception.detector import DetectorSettings, OpenVocabDetector, load_detector
from clip_perception.device import PRECISIONS, resolve_placement
from clip_perception.images_io import (
    ImageDetections,
    classification_records,
    collect_images,
    detections_record,
    format_table,
    read_rgb,
    unique_png_names,
    write_json,
    write_png,
)
from clip_perception.replay import BagReplay
from clip_perception.vocabulary import Templates, resolve_templates, validate_queries

if TYPE_CHECKING:
    from clip_perception.train.recipe import Recipe

PROG = "clip-perception"


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block too; one line keeps errors greppable in scripts.
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------- shared arguments
def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help=f"{kind} checkpoint folder (config.json, weights, tokenizer)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    # One value per flag: a multi-value flag would swallow the positional images after it.
    parser.add_argument("--templates", action="append", metavar="T",
                        help="prompt templates: clip7, clip80 or a string with one {} "
                        "(repeat for several)")


def _add_query_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--query", action="append", metavar="TEXT",
                       help="a text query (repeat for more)")
    group.add_argument("--queries", metavar="'A, B'",
                       help="comma-separated text queries")
    parser.add_argument("--threshold", type=_unit_interval, metavar="F",
                        help="score threshold in [0, 1] (default: "
                        f"{DetectorSettings.score_threshold})")


@dataclass(frozen=True)
class ModelRequest:
    """A checked model and vocabulary request: nothing is loaded yet."""

    model: Path
    device: str
    precision: str
    texts: tuple[str, ...]
    templates: Templates


def _model_request(args: argparse.Namespace, texts: Sequence[str]) -> ModelRequest:
    """Validate device, precision, vocabulary and templates before the weights are read."""
    templates = args.templates
    if templates is not None and len(templates) == 1 and "{}" not in templates[0]:
        templates = templates[0]  # a set name such as clip7 (an unknown one is reported)
    try:
        resolve_placement(args.device, args.precision)
        cleaned = validate_queries(texts)
        resolve_templates(templates)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return ModelRequest(args.model, args.device, args.precision, cleaned, templates)


def _query_texts(args: argparse.Namespace) -> list[str]:
    return args.query if args.query is not None else args.queries.split(",")


def _new_output(path: Path | None) -> Path | None:
    """Outputs are never overwritten: a rerun into the same place is refused. (An optional
    output not asked for is None.)"""
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} exists: choose a new output")
    return path


def _warn(message: str) -> None:
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)  # above a progress bar


def _open_detector(request: ModelRequest, threshold: float | None) -> OpenVocabDetector:
    settings = {} if threshold is None else {"score_threshold": threshold}
    detector = load_detector(request.model, request.device, request.precision, **settings)
    try:
        detector.set_queries(request.texts, templates=request.templates)
    except BaseException:
        detector.close()
        raise
    for warning in detector.vocabulary.warnings:
        _warn(warning)
    return detector


T = TypeVar("T")


def _progress(items: Sequence[T], unit: str) -> Iterable[T]:
    # disable=None: a bar on a terminal only, so logs and pipes get clean stderr.
    return tqdm(items, unit=unit, file=sys.stderr, disable=None)


# ----------------------------------------------------------------- subcommands
def _detect(args: argparse.Namespace) -> int:
    request = _model_request(args, _query_texts(args))
    out = _new_output(args.out)
    files = collect_images(args.images)
    for file in _progress(files, "check"):
        # Decode every input first: a corrupt file fails now, not after hours of inference
        # with a partial output folder (which a rerun would then refuse).
        read_rgb(file)
    names = unique_png_names(files)
    records = []
    with closing(_open_detector(request, args.threshold)) as detector:
        out.mkdir(parents=True, exist_ok=True)
        for file, name in _progress(list(zip(files, names, strict=True)), "image"):
            rgb = read_rgb(file)
            result = detector.detect([rgb])[0]
            write_png(out / name, draw_detections(rgb, result.boxes, result.labels,
                                                  result.scores, result.query_indices))
            records.append(detections_record(ImageDetections(file, name, result)))
        threshold = detector.settings.score_threshold
    write_json(out / "detections.json", {
        "model": str(request.model), "queries": list(request.texts),
        "templates": request.templates, "threshold": threshold, "images": records})
    total = sum(len(r["detections"]) for r in records)
    print(f"{len(files)} images, {total} detections -> {out}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    request = _model_request(args, args.label)
    _new_output(args.json)
    files = collect_images(args.images)
    with closing(load_classifier(request.model, request.device, request.precision)) as model:
        model.set_labels(request.texts, templates=request.templates)
        # One image at a time: memory stays flat for any number of images.
        results = [model.classify([read_rgb(file)]) for file in _progress(files, "image")]
    records = classification_records(files, results)
    print(format_table(["image", "label", "probability"],
                       [[r["file"], r["label"], f"{r['probability']:.4f}"] for r in records]))
    if args.json is not None:
        write_json(args.json, {"model": str(request.model), "labels": list(request.texts),
                               "templates": request.templates, "images": records})
    return 0


def _replay(args: argparse.Namespace) -> int:
    request = _model_request(args, _query_texts(args))
    if args.out.exists():
        raise UsageError(f"{args.out} exists: replay writes a new bag folder")
    replay = BagReplay(args.bag, args.topics)  # checks the bag before the model loads
    with closing(_open_detector(request, args.threshold)) as detector:
        summary = replay.run(detector, args.out, warn=_warn)
    print(f"wrote {args.out}")
    for line in summary.lines():
        print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    return bench.run(args)


def _recipe(args: argparse.Namespace) -> Recipe:
    from clip_perception.train.recipe import Recipe

    try:
        recipe = Recipe.from_json(args.recipe) if args.recipe else Recipe()
    except ValueError as error:  # bad JSON or unknown fields: name the file
        raise ValueError(f"{args.recipe}: {error}") from error
    return recipe if args.seed is None else dataclasses.replace(recipe, seed=args.seed)


def _train_data(args: argparse.Namespace) -> int:
    from clip_perception.train.coco import write_synthetic_coco

    annotations = write_synthetic_coco(_new_output(args.out), args.images,
                                       (args.width, args.height), args.seed, args.split)
    print(f"wrote {annotations}")
    return 0


def _train_clip(args: argparse.Namespace) -> int:
    from clip_perception.train.clip_stage import train_clip

    print(f"wrote {train_clip(_recipe(args), args.data, _new_output(args.out), args.init)}")
    return 0


def _train_owl(args: argparse.Namespace) -> int:
    from clip_perception.train.owl_stage import train_owl

    print(f"wrote {train_owl(_recipe(args), args.data, args.init, _new_output(args.out))}")
    return 0


def _train_embedded(args: argparse.Namespace) -> int:
    from clip_perception.train.embedded import build_embedded_models

    recipe = _recipe(args)
    build_embedded_models(args.out, recipe.seed, recipe)
    print(f"wrote the embedded models under {args.out}")
    return 0


def _eval_owl(args: argparse.Namespace) -> int:
    from clip_perception.train.evaluate import evaluate_owl

    _new_output(args.json)
    result = evaluate_owl(args.model, args.data, compare_int8=not args.no_int8)
    int8 = result.int8
    scores = [("all", result.overall), ("seen", result.seen), ("unseen", result.unseen),
              *([("int8 seen", int8.seen), ("int8 unseen", int8.unseen)] if int8 else [])]
    print(f"{result.model} on {result.data}: {result.images} images, "
          f"{result.seconds_per_image * 1000:.0f} ms per image")
    print(format_table(["categories", "AP", "AP50"],
                       [[name, f"{s.ap:.3f}", f"{s.ap50:.3f}"] for name, s in scores
                        if s is not None]))
    if int8 is not None:
        print(f"int8 reproduces {int8.agreement:.1%} of the fp32 detections")
    if args.json is not None:
        write_json(args.json, dataclasses.asdict(result))
    return 0


def _eval_clip(args: argparse.Namespace) -> int:
    from clip_perception.train.evaluate import evaluate_clip

    _new_output(args.json)
    result = evaluate_clip(args.model, args.data)
    print(f"{result.model} on {result.data}: zero-shot top-1 on {result.crops} object crops")
    print(format_table(["prompts", "all", "seen", "unseen"], [
        [r.prompts, f"{r.top1:.3f}", f"{r.seen:.3f}",
         "n/a" if r.unseen is None else f"{r.unseen:.3f}"] for r in result.results]))
    v = result.variance
    print(f"text embeddings over {v.templates} x categories: template {v.template:.2%}, "
          f"category {v.category:.2%}, interaction {v.interaction:.2%} of the variance "
          "(only the interaction lets prompt ensembling change a prediction)")
    if args.json is not None:
        write_json(args.json, dataclasses.asdict(result))
    return 0


# ----------------------------------------------------------------- parser and entry point
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Open-vocabulary detection (OWL-ViT/OWLv2) and "
                     "CLIP zero-shot classification, offline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    detect = commands.add_parser("detect", help="detect text queries in image files")
    _add_model_arguments(detect, "OWL-ViT/OWLv2")
    _add_query_arguments(detect)
    detect.add_argument("images", nargs="+", type=Path, metavar="IMAGE|FOLDER",
                        help="image files, or folders whose image files are all used")
    detect.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="new folder: annotated PNGs and detections.json")
    detect.set_defaults(handler=_detect)

    classify = commands.add_parser("classify", help="zero-shot classify image files")
    _add_model_arguments(classify, "CLIP")
    classify.add_argument("--label", action="append", required=True, metavar="TEXT",
                          help="a class label (repeat for more)")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE|FOLDER",
                          help="image files, or folders whose image files are all used")
    classify.add_argument("--json", type=Path, metavar="FILE",
                          help="also write every label's probability to this new file")
    classify.set_defaults(handler=_classify)

    replay = commands.add_parser(
        "replay", help="run a recorded rosbag2 through the detector into a new mcap bag")
    replay.add_argument("bag", type=Path, metavar="BAG", help="recorded rosbag2 folder")
    _add_model_arguments(replay, "OWL-ViT/OWLv2")
    _add_query_arguments(replay)
    replay.add_argument("--topics", nargs="+", action="extend", metavar="T",
                        help="image topics to replay (default: every image topic)")
    replay.add_argument("--out", type=Path, required=True, metavar="OUT.mcap",
                        help="new rosbag2 folder (mcap storage)")
    replay.set_defaults(handler=_replay)

    bench_parser = commands.add_parser(
        "bench", help="time the detector against transformers on the same random weights")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=_bench)
    _add_train_commands(commands)
    _add_eval_commands(commands)
    return parser


def _add_train_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="synthetic data and model training").add_subparsers(
        dest="stage", required=True, metavar="STAGE")
    data = train.add_parser("data", help="render a synthetic COCO dataset")
    data.add_argument("--out", type=Path, required=True, metavar="DIR")
    data.add_argument("--images", type=int, required=True, metavar="N")
    data.add_argument("--width", type=int, default=640)
    data.add_argument("--height", type=int, default=480)
    data.add_argument("--split", choices=["train", "val", "test"], default="train")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(handler=_train_data)
    for name, text, handler, init in [
        ("clip", "contrastive CLIP training", _train_clip,
         "CLIP checkpoint to fine-tune (default: train from scratch)"),
        ("owl", "OWL-ViT detection training", _train_owl,
         "CLIP checkpoint (new detection heads) or OWL checkpoint to fine-tune"),
    ]:
        stage = train.add_parser(name, help=text)
        stage.add_argument("--data", type=Path, required=True, metavar="COCO_DIR",
                           help="COCO dataset: annotations.json and its images")
        stage.add_argument("--init", type=Path, required=name == "owl", metavar="DIR", help=init)
        stage.add_argument("--out", type=Path, required=True, metavar="DIR",
                           help="new checkpoint folder")
        _add_recipe_arguments(stage)
        stage.set_defaults(handler=handler)
    embedded = train.add_parser("embedded", help="rebuild the shipped models: data, both "
                                "stages, evaluation and model cards")
    embedded.add_argument("--out", type=Path, default=Path("models"), metavar="DIR",
                          help="receives synthetic-clip/ and synthetic-owl/ (default: models)")
    _add_recipe_arguments(embedded)
    embedded.set_defaults(handler=_train_embedded)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, metavar="JSON",
                        help="recipe fields to change (default: the built-in recipe)")
    parser.add_argument("--seed", type=int, help="overrides the recipe's seed")


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a COCO dataset")
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, text, handler in [("owl", "COCO AP of a detector", _eval_owl),
                                ("clip", "zero-shot accuracy on object crops", _eval_clip)]:
        kind = kinds.add_parser(name, help=text)
        kind.add_argument("--model", type=Path, required=True, metavar="DIR",
                          help="checkpoint folder")
        kind.add_argument("--data", type=Path, required=True, metavar="COCO_DIR",
                          help="COCO dataset: annotations.json and its images")
        kind.add_argument("--json", type=Path, metavar="FILE",
                          help="also write the full evaluation to this new file")
        if name == "owl":
            kind.add_argument("--no-int8", action="store_true",
                              help="skip the CPU int8 comparison")
        kind.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        return _fail(str(error), 2)
    except (ValueError, OSError) as error:
        # The engine's user-facing errors: CheckpointError, VocabularyError,
        # ImageConversionError, ImageReadError and the loaders' checks are ValueErrors whose
        # text names the problem; OSError is a file that cannot be read or written.
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    line = " ".join(message.split()) or "failed"  # one line, whatever the message holds
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
