"""What the detector and classifier nodes share: cameras in, one inference worker, results
out, a vocabulary fed by a service, a topic and a parameter, and diagnostics.

Threads: subscription callbacks only store frames (``FrameSlots``); one worker thread takes
the newest frame of every camera, batches them through the engine and publishes; services,
parameters and diagnostics run on a MultiThreadedExecutor in callback groups of their own,
so they answer while the worker infers. Vocabulary changes are validated at once and encoded
by the engine in the background; frames keep using the previous vocabulary until the atomic
swap, and every result carries the version it was computed with.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from std_msgs.msg import Header, String

from clip_perception.image_messages import ImageConversionError
from clip_perception.msg import Vocabulary as VocabularyMsg
from clip_perception.ros import params as P
from clip_perception.ros.camera_io import Camera, decode, subscribe_cameras
from clip_perception.ros.diagnostics import EngineFigures, diagnostic_array
from clip_perception.ros.frame_slots import FrameSlots, TakenFrame
from clip_perception.ros.stats import RollingWindow
from clip_perception.srv import SetQueries
from clip_perception.vocabulary import (
    NoVocabularyError,
    Vocabulary,
    VocabularyError,
    resolve_templates,
    validate_queries,
    validate_thresholds,
)

VOCABULARY_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
VOCABULARY_PARAMS = ("thresholds", "templates")  # with the node's vocabulary_param


class StartupError(RuntimeError):
    """The node cannot start (bad parameters, missing or broken model): one clear line."""


@dataclass(frozen=True)
class VocabularyOutcome:
    success: bool
    message: str
    version: int
    active: list[str]


@dataclass(frozen=True)
class Frame:
    """A decoded frame ready for the engine."""

    camera: Camera
    header: Header
    rgb: np.ndarray  # (H, W, 3) uint8
    received_at: float


def bundled_model(name: str) -> str:
    """Folder of a model shipped with the package (share/clip_perception/models/<name>)."""
    try:
        share = get_package_share_directory("clip_perception")
    except PackageNotFoundError as error:
        raise StartupError("the package is not installed: source install/setup.bash") from error
    path = os.path.join(share, "models", name)
    if not os.path.isdir(path):
        raise StartupError(f"no model given and the bundled model {path} is missing: "
                           "set the model parameter to a checkpoint folder")
    return path


def split_queries(text: str) -> list[str]:
    """``"a mug, a person"`` or one query per line -> ["a mug", "a person"]."""
    return [q.strip() for q in text.replace("\n", ",").split(",") if q.strip()]


def template_setting(templates: Sequence[str]) -> str | list[str] | None:
    """Parameter/request form -> engine form: [] = query as is, ["clip7"] = a named set."""
    if not templates:
        return None
    if len(templates) == 1 and "{}" not in templates[0]:
        return templates[0]
    return list(templates)


class PerceptionNode(Node):
    """Base of the detector and classifier nodes; subclasses supply the engine calls."""

    vocabulary_param = "queries"

    def __init__(self, name: str, specs: Sequence[P.ParamSpec]) -> None:
        super().__init__(name)
        self.specs = list(specs)
        try:
            self.settings: dict[str, Any] = P.declare(self, self.specs)
        except ValueError as error:
            raise StartupError(f"invalid parameter: {error}") from error
        problem = self.check_whole_state(self.settings)
        if problem:
            raise StartupError(f"invalid parameters: {problem}")
        self.load_engine()
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.inference_ms = RollingWindow()
        self.failed_batches = 0
        self.vocabulary_rejections = 0
        self.note = ""
        self.templates_in_effect: list[str] = []
        self._vocabulary_lock = threading.Lock()  # orders ~/vocabulary publications

        self.control_group = ReentrantCallbackGroup()
        topics = self.settings["image_topics"]
        self.slots: FrameSlots[Any] = FrameSlots(len(topics))
        self.cameras = subscribe_cameras(
            self, topics, self.settings["image_transport"] == "compressed",
            self.settings["qos_reliability"], self.slots, ReentrantCallbackGroup())
        for camera in self.cameras:
            self.create_outputs(camera)

        self.vocabulary_pub = self.create_publisher(VocabularyMsg, "~/vocabulary",
                                                    VOCABULARY_QOS)
        self.create_subscription(String, "~/queries", self._on_queries_topic, 10,
                                 callback_group=self.control_group)
        self.create_service(SetQueries, "~/set_queries", self._on_set_queries,
                            callback_group=self.control_group)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())

        if self.settings[self.vocabulary_param]:
            outcome = self.change_vocabulary(
                self.settings[self.vocabulary_param], self.settings.get("thresholds") or None,
                self.settings["templates"], wait=True)
            if not outcome.success:
                raise StartupError(f"start-up vocabulary rejected: {outcome.message}")
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="inference", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- subclass hooks
    @abstractmethod
    def load_engine(self) -> None:
        """Load the model named by the parameters; StartupError with the reason if not."""

    @abstractmethod
    def create_outputs(self, camera: Camera) -> None:
        """Create the publishers of one camera."""

    @abstractmethod
    def submit_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: str | list[str] | None) -> Future[int]:
        """Validate (raising VocabularyError) and start encoding a text vocabulary."""

    @abstractmethod
    def active_vocabulary(self) -> Vocabulary | None:
        """The engine's active vocabulary."""

    @abstractmethod
    def infer(self, frames: list[Frame]) -> list[Any]:
        """One engine result per frame (raises NoVocabularyError before any vocabulary)."""

    @abstractmethod
    def publish_result(self, frame: Frame, result: Any) -> None:
        """Publish one frame's result on its camera's outputs."""

    @abstractmethod
    def apply_settings(self, changed: dict[str, Any]) -> None:
        """Apply changed engine settings (thresholds, NMS, ...) to the engine."""

    def check_whole_state(self, state: dict[str, Any]) -> str | None:
        """Cross-parameter checks; the reason a state is invalid, or None."""
        try:
            queries = state[self.vocabulary_param]
            if queries:
                validate_queries(queries)
            thresholds = state.get("thresholds") or None
            if thresholds is not None and queries:
                validate_thresholds(list(thresholds), len(queries))
            resolve_templates(template_setting(state["templates"]))
        except VocabularyError as error:
            return str(error)
        return None

    def device_and_precision(self) -> tuple[str, str]:
        return self.settings["device"], self.settings["precision"]

    def default_threshold(self) -> float:
        return self.settings.get("score_threshold", 0.0)

    # ---------------------------------------------------------------- vocabulary
    def change_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: Sequence[str], wait: bool) -> VocabularyOutcome:
        """The one path every vocabulary input takes. With ``wait`` the outcome of the
        encoding is returned; otherwise only validation is reported and the swap happens
        in the background (published on ~/vocabulary when done)."""
        try:
            future = self.submit_vocabulary(queries, thresholds, template_setting(templates))
        except VocabularyError as error:
            self.vocabulary_rejections += 1
            return self._outcome(False, str(error))
        # ~/vocabulary lists the prompt templates spelled out (empty: the query as is).
        setting = template_setting(templates)
        self.publish_when_done(future, list(resolve_templates(setting)) if setting else [])
        if not wait:
            return self._outcome(True, "accepted; encoding in the background")
        try:
            future.result()
        except Exception as error:  # the worker's failure is reported to the caller
            return self._outcome(False, f"encoding the vocabulary failed: {error}")
        vocabulary = self.active_vocabulary()
        notes = "; ".join(vocabulary.warnings) if vocabulary is not None else ""
        return self._outcome(True, notes or "ok")

    def _outcome(self, success: bool, message: str) -> VocabularyOutcome:
        vocabulary = self.active_vocabulary()
        if vocabulary is None:
            return VocabularyOutcome(success, message, 0, [])
        return VocabularyOutcome(success, message, vocabulary.version, list(vocabulary.labels))

    def publish_when_done(self, future: Future[int], templates: list[str] | None) -> None:
        """Publish the vocabulary on ~/vocabulary once ``future``'s change is active.

        templates: the prompt templates of a text change; None keeps the current ones (an
        image exemplar). The engine applies changes in order, so callbacks arrive in order.
        """
        future.add_done_callback(lambda f: self._vocabulary_done(f, templates))

    def _vocabulary_done(self, future: Future[int], templates: list[str] | None) -> None:
        if future.exception() is not None:
            self.get_logger().error(f"vocabulary update failed: {future.exception()}")
            return
        with self._vocabulary_lock:
            if templates is not None:
                self.templates_in_effect = templates
            vocabulary = self.active_vocabulary()
            if vocabulary is None or vocabulary.version != future.result():
                return  # a newer change is already active and publishes itself
            default = self.default_threshold()
            self.vocabulary_pub.publish(VocabularyMsg(
                version=vocabulary.version, queries=list(vocabulary.labels),
                thresholds=[default if t is None else t for t in vocabulary.thresholds],
                templates=self.templates_in_effect))
        warnings = "; ".join(vocabulary.warnings)
        self.get_logger().info(
            f"vocabulary v{vocabulary.version}: {len(vocabulary)} queries"
            + (f" ({warnings})" if warnings else ""))

    def _on_set_queries(self, request: SetQueries.Request,
                        response: SetQueries.Response) -> SetQueries.Response:
        try:
            outcome = self.change_vocabulary(
                list(request.queries), list(request.thresholds) or None,
                list(request.templates) or self.settings["templates"], wait=True)
        except Exception as error:  # never let a request kill the service; report it
            self.get_logger().error(f"set_queries failed: {traceback.format_exc()}")
            outcome = self._outcome(False, f"internal error: {error}")
        response.success = outcome.success
        response.message = outcome.message
        response.vocabulary_version = outcome.version
        response.active_queries = outcome.active
        return response

    def _on_queries_topic(self, msg: String) -> None:
        queries = split_queries(msg.data)
        outcome = self.change_vocabulary(queries, None, self.settings["templates"],
                                         wait=False)
        if not outcome.success:
            self.get_logger().warning(f"ignored queries on ~/queries: {outcome.message}",
                                      throttle_duration_sec=2.0)

    # ---------------------------------------------------------------- parameters
    def _validate_parameters(self, parameters: list) -> Any:
        return P.as_result(P.validate(self.specs, self.settings, P.values_of(parameters),
                                      self.check_whole_state))

    def _apply_parameters(self, parameters: list) -> None:
        changed = P.values_of(parameters)
        self.settings.update(changed)
        self.apply_settings(changed)
        if any(n in changed for n in (self.vocabulary_param, *VOCABULARY_PARAMS)):
            queries = self.settings[self.vocabulary_param]
            if queries:
                self.change_vocabulary(queries, self.settings.get("thresholds") or None,
                                       self.settings["templates"], wait=False)

    # ---------------------------------------------------------------- frames
    def _work(self) -> None:
        while not self._stop.is_set():
            taken = self.slots.take(self.settings["max_batch"], timeout=0.1)
            frames = [f for f in (self._decode(t) for t in taken) if f is not None]
            if frames:
                self._process(frames)

    def _decode(self, taken: TakenFrame) -> Frame | None:
        camera = self.cameras[taken.camera]
        try:
            rgb = decode(taken.frame)
        except ImageConversionError as error:
            camera.bad_frames += 1
            self.get_logger().warning(
                f"dropped a malformed frame from {camera.input_topic} "
                f"({camera.bad_frames} so far): {error}", throttle_duration_sec=5.0)
            return None
        return Frame(camera, taken.frame.header, rgb, taken.received_at)

    def _process(self, frames: list[Frame]) -> None:
        start = time.perf_counter()
        try:
            results = self.infer(frames)
        except NoVocabularyError:
            self.note = "waiting for a vocabulary (~/set_queries, ~/queries or parameter)"
            self.get_logger().info(self.note, throttle_duration_sec=10.0)
            return
        except Exception as error:  # keep serving; the failure is logged and counted
            self.failed_batches += 1
            self.note = f"inference failed: {error}"
            self.get_logger().error(
                f"inference failed ({self.failed_batches} batches so far): {error}\n"
                + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        self.note = ""
        self.inference_ms.add((time.perf_counter() - start) * 1e3)
        for frame, result in zip(frames, results, strict=True):
            self.publish_result(frame, result)
            now = self.get_clock().now()
            latency = (now - Time.from_msg(frame.header.stamp)).nanoseconds / 1e6
            frame.camera.processed.add()
            frame.camera.latency_ms.add(latency)

    def _publish_diagnostics(self) -> None:
        vocabulary = self.active_vocabulary()
        device, precision = self.device_and_precision()
        figures = EngineFigures(
            device=device, precision=precision,
            vocabulary_version=vocabulary.version if vocabulary else 0,
            vocabulary_size=len(vocabulary) if vocabulary else 0,
            inference_ms=self.inference_ms, failed_batches=self.failed_batches,
            vocabulary_rejections=self.vocabulary_rejections, note=self.note)
        self.diagnostics_pub.publish(diagnostic_array(
            self.get_name(), self.get_clock().now().to_msg(), self.cameras, self.slots,
            figures))

    def close(self) -> None:
        """Stop the worker (it finishes the batch in flight) and the engine's vocabulary
        worker before the node is destroyed."""
        self._stop.set()
        self.slots.close()
        self._worker.join(timeout=5.0)
        self.engine.close()


def run(make_node: Callable[[], PerceptionNode], name: str, args: list[str] | None = None) -> int:
    """Entry point shared by the executables: one clear line and exit 1 on start-up errors."""
    rclpy.init(args=args)
    try:
        node = make_node()
    except StartupError as error:
        print(f"[{name}] error: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
