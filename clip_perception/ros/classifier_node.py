"""classifier_node: CLIP zero-shot scene classification for many cameras with one model.

For each camera topic T: T/classification (clip_perception/Classification) per processed
frame. Labels: ~/set_queries (labels as queries), ~/queries and the ``labels`` parameter;
the active ones on ~/vocabulary.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from rclpy.publisher import Publisher

from clip_perception.classifier import ZeroShotClassifier, load_classifier
from clip_perception.detections import Classification as EngineClassification
from clip_perception.model import CheckpointError
from clip_perception.msg import Classification
from clip_perception.ros import messages
from clip_perception.ros import params as P
from clip_perception.ros.camera_io import Camera, Frame
from clip_perception.ros.detector_node import RESULTS_QOS
from clip_perception.ros.perception_node import PerceptionNode, StartupError, model_folder, run
from clip_perception.vocabulary import Vocabulary, VocabularyError

SPECS = P.camera_node_specs(
    "labels", "class labels (string array); setting it swaps the label vocabulary",
    "CLIP checkpoint folder; empty: the bundled models/synthetic-clip",
    templates=["clip7"])  # zero-shot classification with the CLIP paper's prompt ensemble


class ClassifierNode(PerceptionNode):
    vocabulary_param = "labels"

    def __init__(self) -> None:
        self.outputs: dict[int, Publisher] = {}
        self.engine: ZeroShotClassifier | None = None
        super().__init__("clip_classifier", SPECS)

    def load_engine(self) -> None:
        model = model_folder(self.settings["model"], "synthetic-clip")
        try:
            self.engine = load_classifier(model, device=self.settings["device"],
                                          precision=self.settings["precision"])
        except (CheckpointError, ValueError, OSError) as error:
            raise StartupError(f"cannot load the classifier model: {error}") from error

    def device_and_precision(self) -> tuple[str, str]:
        return str(self.engine.placement.device), self.engine.placement.precision

    def submit_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: str | list[str] | None) -> Future[int]:
        if thresholds is not None:
            # Probabilities of a softmax over the labels: a per-label threshold means nothing.
            raise VocabularyError("the classifier takes no thresholds; leave them empty")
        return self.engine.set_labels_async(queries, templates)

    def active_vocabulary(self) -> Vocabulary | None:
        return self.engine.vocabulary

    def apply_settings(self, changed: dict[str, Any]) -> None:
        """The classifier has no runtime engine settings beside its labels."""

    def infer(self, frames: list[Frame]) -> list[tuple[EngineClassification, int]]:
        result = self.engine.classify([f.rgb for f in frames])
        return [(result, row) for row in range(len(frames))]

    def create_outputs(self, camera: Camera) -> None:
        self.outputs[camera.index] = self.create_publisher(
            Classification, camera.output("classification"), RESULTS_QOS)

    def publish_result(self, frame: Frame, result: tuple[EngineClassification, int]) -> None:
        classification, row = result
        self.outputs[frame.camera.index].publish(
            messages.to_classification(classification, row, frame.header))


def main(args: list[str] | None = None) -> int:
    return run(ClassifierNode, "clip_classifier", args)
