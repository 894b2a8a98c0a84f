"""detector_node: open-vocabulary detection for many cameras with one model.

For each camera topic T: T/detections (clip_perception/DetectionArray), T/detections/image
(annotated sensor_msgs/Image, drawn only while someone subscribes) and, where vision_msgs is
installed, T/detections/vision (vision_msgs/Detection2DArray). Vocabulary: ~/set_queries,
~/set_image_query, ~/queries and the ``queries`` parameter; the active one on ~/vocabulary.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from rclpy.publisher import Publisher
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from clip_perception.annotate import draw_detections
from clip_perception.detections import Detections
from clip_perception.detector import OpenVocabDetector, load_detector
from clip_perception.image_messages import ImageConversionError, image_to_rgb
from clip_perception.model import CheckpointError
from clip_perception.msg import DetectionArray
from clip_perception.ros import messages
from clip_perception.ros import params as P
from clip_perception.ros.camera_io import Camera, Frame
from clip_perception.ros.perception_node import PerceptionNode, StartupError, model_folder, run
from clip_perception.srv import SetImageQuery
from clip_perception.vocabulary import Vocabulary, VocabularyError

ENGINE_SETTINGS = ("score_threshold", "nms_iou", "class_agnostic_nms", "max_detections",
                   "cuda_graphs")
RESULTS_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

SPECS = [
    *P.camera_node_specs(
        "queries", "text queries (string array); setting it swaps the vocabulary",
        "OWL-ViT/OWLv2 checkpoint folder; empty: the bundled models/synthetic-owl",
        templates=[]),  # queries as they are: OWL-ViT matches short object phrases
    P.ParamSpec("thresholds", float, [],
                "score threshold per query ([] = score_threshold for every query)",
                array=True),
    P.ParamSpec("score_threshold", float, 0.1, "default per-query score threshold",
                bounds=(0.0, 1.0)),
    P.ParamSpec("nms_iou", float, 0.3, "IoU above which overlapping boxes are suppressed",
                bounds=(0.0, 1.0)),
    P.ParamSpec("class_agnostic_nms", bool, False,
                "suppress overlapping boxes across queries, not only within one query"),
    P.ParamSpec("max_detections", int, 100, "most detections per image after NMS",
                bounds=(1, 10000)),
    P.ParamSpec("cuda_graphs", bool, True,
                "on CUDA, replay the vision tower from CUDA graphs (one per batch size; about "
                "2x faster at batch 1, costs the memory of each batch size's activations)"),
    P.ParamSpec("publish_annotated", bool, True,
                "publish <topic>/detections/image while it has subscribers"),
]


@dataclass
class DetectorOutputs:
    detections: Publisher
    annotated: Publisher
    vision: Publisher | None


class DetectorNode(PerceptionNode):
    def __init__(self) -> None:
        self.outputs: dict[int, DetectorOutputs] = {}
        self.engine: OpenVocabDetector | None = None
        super().__init__("clip_detector", SPECS)
        self.create_service(SetImageQuery, "~/set_image_query", self._on_set_image_query,
                            callback_group=self.control_group)

    # --------------------------------------------------------------- engine
    def load_engine(self) -> None:
        model = model_folder(self.settings["model"], "synthetic-owl")
        try:
            self.engine = load_detector(
                model, device=self.settings["device"], precision=self.settings["precision"],
                **{k: self.settings[k] for k in ENGINE_SETTINGS})
        except (CheckpointError, ValueError, OSError) as error:
            raise StartupError(f"cannot load the detector model: {error}") from error
        self.get_logger().info(
            f"model {model} on {self.engine.placement.device} ({self.engine.placement.precision})")

    def device_and_precision(self) -> tuple[str, str]:
        return str(self.engine.placement.device), self.engine.placement.precision

    def submit_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: str | list[str] | None) -> Future[int]:
        return self.engine.set_queries_async(queries, thresholds, templates)

    def active_vocabulary(self) -> Vocabulary | None:
        return self.engine.vocabulary

    def apply_settings(self, changed: dict[str, Any]) -> None:
        updates = {k: v for k, v in changed.items() if k in ENGINE_SETTINGS}
        if updates:
            self.engine.update_settings(**updates)

    def infer(self, frames: list[Frame]) -> list[Detections]:
        return self.engine.detect([f.rgb for f in frames])

    # --------------------------------------------------------------- outputs
    def create_outputs(self, camera: Camera) -> None:
        vision = None
        if messages.VISION_MSGS:
            vision = self.create_publisher(messages.Detection2DArray,
                                           camera.output("detections/vision"), RESULTS_QOS)
        self.outputs[camera.index] = DetectorOutputs(
            detections=self.create_publisher(DetectionArray, camera.output("detections"),
                                             RESULTS_QOS),
            annotated=self.create_publisher(Image, camera.output("detections/image"),
                                            RESULTS_QOS),
            vision=vision)

    def publish_result(self, frame: Frame, result: Detections) -> None:
        outputs = self.outputs[frame.camera.index]
        array = messages.to_detection_array(result, frame.header)
        outputs.detections.publish(array)
        if outputs.vision is not None:
            outputs.vision.publish(messages.to_detection2d_array(array))
        # Drawing costs milliseconds per frame: only for someone who watches.
        if self.settings["publish_annotated"] and outputs.annotated.get_subscription_count():
            drawn = draw_detections(frame.rgb, result.boxes, result.labels, result.scores,
                                    result.query_indices)
            outputs.annotated.publish(messages.to_image(drawn, frame.header))
            frame.camera.annotated += 1

    # --------------------------------------------------------------- services
    def _on_set_image_query(self, request: SetImageQuery.Request,
                            response: SetImageQuery.Response) -> SetImageQuery.Response:
        outcome = self.answer_request("set_image_query", lambda: self._add_image_query(request))
        response.success = outcome.success
        response.message = outcome.message
        response.vocabulary_version = outcome.version
        return response

    def _add_image_query(self, request: SetImageQuery.Request):
        try:
            image = image_to_rgb(request.image)
        except ImageConversionError as error:
            return self.outcome(False, f"exemplar image rejected: {error}")
        corners = (request.x_min, request.y_min, request.x_max, request.y_max)
        box = None if not any(corners) else corners
        try:
            future = self.submit_and_announce(
                lambda: self.engine.add_image_query_async(request.label, image, box=box,
                                                          append=request.append),
                None if request.append else [])
        except VocabularyError as error:
            self.vocabulary_rejections += 1
            return self.outcome(False, str(error))
        try:
            version = future.result()
        except Exception as error:  # the worker's failure is reported to the caller
            return self.outcome(False, f"embedding the exemplar failed: {error}")
        return self.made(version, [request.label.strip()])


def main(args: list[str] | None = None) -> int:
    return run(DetectorNode, "clip_detector", args)
