"""What the detector and classifier nodes share: cameras in, one inference worker, results
out, a vocabulary fed by a service, a topic and a parameter, and diagnostics.

Threads: subscription callbacks only store frames (``FrameSlots``); one worker thread takes
the newest frame of every camera, batches them through the engine and publishes; services,
parameters and diagnostics run on a multi-threaded executor (``executor.HandOffExecutor``)
in callback groups of their own, so they answer while the worker infers. Vocabulary changes
are validated at once and encoded by the engine in the background; frames keep using the
previous vocabulary until the atomic swap, and every result carries the version it was
computed with.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import rclpy
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.time import Time

from clip_perception.batching import infer_with_split
from clip_perception.image_messages import ImageConversionError
from clip_perception.ros import params as P
from clip_perception.ros.camera_io import Camera, Frame, decode, subscribe_cameras
from clip_perception.ros.diagnostics import EngineFigures, diagnostic_array
from clip_perception.ros.executor import HandOffExecutor
from clip_perception.ros.frame_slots import FrameSlots, TakenFrame
from clip_perception.ros.stats import RollingWindow
from clip_perception.ros.vocabulary_channels import VocabularyChannels
from clip_perception.vocabulary import NoVocabularyError

VOCABULARY_PARAMS = ("thresholds", "templates")  # with the node's vocabulary_param
# A stop (SIGINT, SIGTERM) never waits longer than this for a batch or a vocabulary encode in
# flight (seconds each on a CPU): what still runs then is abandoned.
SHUTDOWN_BUDGET_S = 1.5


class StartupError(RuntimeError):
    """The node cannot start (bad parameters, missing or broken model): one clear line."""


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


def model_folder(setting: str, bundled: str) -> str:
    """The checkpoint folder to load: the ``model`` parameter, or the bundled model when it
    is empty. Never a download: anything that is not a folder (a hub id such as
    google/owlvit-base-patch32 included) is a start-up error naming it."""
    if not setting:
        return bundled_model(bundled)
    path = os.path.expanduser(setting)
    if not os.path.isdir(path):
        raise StartupError(f"model {setting}: no such checkpoint folder (this node loads local "
                           "folders only and never downloads; see docs/model.md to fetch one)")
    return path


class PerceptionNode(VocabularyChannels, Node):
    """Base of the detector and classifier nodes; subclasses supply the engine calls."""

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
        self.inference_batches = 0  # since start, with their total time (load, benchmarks)
        self.inference_ms_total = 0.0
        self.failed_batches = 0
        self.oom_splits = 0
        self.note = ""

        self.control_group = ReentrantCallbackGroup()
        topics = self.settings["image_topics"]
        self.slots: FrameSlots[Any] = FrameSlots(len(topics))
        self.cameras = subscribe_cameras(
            self, topics, self.settings["image_transport"] == "compressed",
            self.settings["qos_reliability"], self.slots, ReentrantCallbackGroup())
        for camera in self.cameras:
            self.create_outputs(camera)

        self.create_vocabulary_channels(self.control_group)
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
        return self.check_vocabulary_state(state)

    def device_and_precision(self) -> tuple[str, str]:
        return self.settings["device"], self.settings["precision"]

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
            if not frames:
                continue
            try:
                self._process(frames)
            except Exception:  # a publishing failure must not end the worker (and the node)
                if self._stop.is_set():
                    return  # the context went away under a stop: nothing left to publish to
                self.get_logger().error(f"publishing results failed: {traceback.format_exc()}",
                                        throttle_duration_sec=5.0)

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
        splits = self.oom_splits
        try:
            results = infer_with_split(self.infer, frames, self._on_out_of_memory)
        except Exception as error:  # keep serving; the loss is logged and counted per camera
            for frame in frames:
                frame.camera.failed += 1
            if isinstance(error, NoVocabularyError):
                self.note = "waiting for a vocabulary (~/set_queries, ~/queries or parameter)"
                self.get_logger().info(self.note, throttle_duration_sec=10.0)
                return
            self.failed_batches += 1
            self.note = f"inference failed: {error}"
            self.get_logger().error(
                f"inference failed ({self.failed_batches} batches so far): {error}\n"
                + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        self.note = ("" if self.oom_splits == splits else
                     f"GPU out of memory: a batch of {len(frames)} was split and retried "
                     f"({self.oom_splits} splits so far)")
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self.inference_ms.add(elapsed_ms)
        self.inference_batches += 1
        self.inference_ms_total += elapsed_ms
        for frame, result in zip(frames, results, strict=True):
            self.publish_result(frame, result)
            now = self.get_clock().now()
            latency = (now - Time.from_msg(frame.header.stamp)).nanoseconds / 1e6
            frame.camera.published += 1
            frame.camera.processed.add()
            frame.camera.latency_ms.add(latency)

    def _on_out_of_memory(self, batch_size: int, error: BaseException) -> None:
        self.oom_splits += 1
        # Once: under memory pressure every batch may split, and the count is in diagnostics.
        self.get_logger().warning(
            f"GPU out of memory on a batch of {batch_size}; splitting batches and retrying "
            f"(counted as oom_batch_splits in /diagnostics): {error}", once=True)

    def engine_figures(self) -> EngineFigures:
        vocabulary = self.active_vocabulary()
        device, precision = self.device_and_precision()
        return EngineFigures(
            device=device, precision=precision,
            vocabulary_version=vocabulary.version if vocabulary else 0,
            vocabulary_size=len(vocabulary) if vocabulary else 0,
            inference_ms=self.inference_ms, inference_batches=self.inference_batches,
            inference_ms_total=self.inference_ms_total, failed_batches=self.failed_batches,
            oom_splits=self.oom_splits, vocabulary_rejections=self.vocabulary_rejections,
            note=self.note)

    def _publish_diagnostics(self) -> None:
        self.diagnostics_pub.publish(diagnostic_array(
            self.get_name(), self.get_clock().now().to_msg(), self.cameras, self.slots,
            self.engine_figures()))

    def close(self, timeout: float) -> bool:
        """Stop the frame worker and the engine's vocabulary worker; True when both finished
        within ``timeout`` s, False when a batch or an encode is still running (abandoned)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.slots.close()
        self._worker.join(max(deadline - time.monotonic(), 0.0))
        # engine.close() waits for the encode in flight: wait for it in a thread of its own.
        closer = threading.Thread(target=self.engine.close, name="engine-close", daemon=True)
        closer.start()
        closer.join(max(deadline - time.monotonic(), 0.0))
        return not (self._worker.is_alive() or closer.is_alive())


def run(make_node: Callable[[], PerceptionNode], name: str, args: list[str] | None = None) -> int:
    """Entry point shared by the executables: one clear line and exit 1 on start-up errors."""
    rclpy.init(args=args)
    try:
        node = make_node()
    except StartupError as error:
        print(f"[{name}] error: {one_line(str(error))}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    executor = HandOffExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop(node, executor, name)
    return 0


def one_line(text: str) -> str:
    """A library's message as one plain line: some span paragraphs (torch.load's refusal of
    a pickle does) and carry terminal colour codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def stop(node: PerceptionNode, executor: HandOffExecutor, name: str) -> None:
    """Stop within SHUTDOWN_BUDGET_S. A batch or an encode still running by then is
    abandoned with os._exit: the interpreter would otherwise join the worker threads at exit
    and wait for it. A watchdog covers a clean-up step that blocks."""
    watchdog = threading.Timer(SHUTDOWN_BUDGET_S, _exit_now, (name, "clean-up timed out"))
    watchdog.daemon = True
    watchdog.start()
    finished = node.close(timeout=SHUTDOWN_BUDGET_S * 0.6)
    executor.shutdown(timeout_sec=0.1)
    node.destroy_node()
    rclpy.try_shutdown()
    if not finished:
        _exit_now(name, "abandoned the inference or vocabulary encode in flight")
    watchdog.cancel()


def _exit_now(name: str, why: str) -> None:
    print(f"[{name}] stopped: {why}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
