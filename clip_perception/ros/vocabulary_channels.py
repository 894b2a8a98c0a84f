"""The vocabulary side of a perception node: ~/set_queries, ~/queries and the vocabulary
parameters in, ~/vocabulary out.

Every channel takes one path (``change_vocabulary``): the node's size limits, then the
engine's validation (a rejection leaves the vocabulary unchanged and says why), then the
engine encodes in the background and the new version is published on ~/vocabulary once it
is active, before any frame can carry it.
"""

from __future__ import annotations

import threading
import traceback
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from rclpy.callback_groups import CallbackGroup
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from clip_perception.msg import Vocabulary as VocabularyMsg
from clip_perception.ros import params as P
from clip_perception.ros.messages import to_vocabulary
from clip_perception.srv import SetQueries
from clip_perception.vocabulary import (
    Vocabulary,
    VocabularyError,
    resolve_templates,
    validate_queries,
    validate_thresholds,
)

VOCABULARY_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
WARNINGS_SHOWN, WARNING_CHARS = 3, 200


def summary(warnings: Sequence[str]) -> str:
    """A vocabulary's warnings for a response or a log line, bounded whatever the request
    (each one quotes its query, and a request may hold thousands of long queries)."""
    parts = [w if len(w) <= WARNING_CHARS else w[:WARNING_CHARS - 3] + "..."
             for w in warnings[:WARNINGS_SHOWN]]
    if len(warnings) > WARNINGS_SHOWN:
        parts.append(f"and {len(warnings) - WARNINGS_SHOWN} more")
    return "; ".join(parts)


@dataclass(frozen=True)
class VocabularyOutcome:
    success: bool
    message: str
    version: int
    active: list[str]


class VocabularyChannels:
    """Mixin of PerceptionNode (an rclpy Node with ``settings``); call
    ``create_vocabulary_channels`` once in the constructor."""

    vocabulary_param = "queries"
    settings: dict[str, Any]

    def create_vocabulary_channels(self, group: CallbackGroup) -> None:
        self.vocabulary_rejections = 0
        self.templates_in_effect: list[str] = []
        self._vocabulary_lock = threading.Lock()  # orders ~/vocabulary publications
        self._submit_lock = threading.Lock()  # see submit_and_announce
        self.vocabulary_pub = self.create_publisher(VocabularyMsg, "~/vocabulary",
                                                    VOCABULARY_QOS)
        self.create_subscription(String, "~/queries", self._on_queries_topic, 10,
                                 callback_group=group)
        self.create_service(SetQueries, "~/set_queries", self._on_set_queries,
                            callback_group=group)

    @abstractmethod
    def submit_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: str | list[str] | None) -> Future[int]:
        """Validate (raising VocabularyError) and start encoding a text vocabulary."""

    @abstractmethod
    def active_vocabulary(self) -> Vocabulary | None:
        """The engine's active vocabulary."""

    def default_threshold(self) -> float:
        return self.settings.get("score_threshold", 0.0)

    def check_vocabulary_state(self, state: dict[str, Any]) -> str | None:
        """Why the vocabulary parameters in ``state`` are unacceptable together, or None."""
        queries = state[self.vocabulary_param]
        try:
            if queries:
                validate_queries(queries)
            thresholds = state.get("thresholds") or None
            if thresholds is not None and queries:
                validate_thresholds(list(thresholds), len(queries))
            resolve_templates(P.template_setting(state["templates"]))
        except VocabularyError as error:
            return str(error)
        return P.vocabulary_limits_problem(queries or [], state["templates"])

    def change_vocabulary(self, queries: list[str], thresholds: list[float] | None,
                          templates: Sequence[str], wait: bool) -> VocabularyOutcome:
        """The one path every vocabulary input takes. With ``wait`` the outcome of the
        encoding is returned; otherwise only validation is reported and the swap happens
        in the background (published on ~/vocabulary when done)."""
        setting = P.template_setting(templates)
        try:
            problem = P.vocabulary_limits_problem(queries, templates)
            if problem:
                raise VocabularyError(problem)
            # ~/vocabulary lists the prompt templates spelled out (empty: the query as is).
            future = self.submit_and_announce(
                lambda: self.submit_vocabulary(queries, thresholds, setting),
                list(resolve_templates(setting)) if setting else [])
        except VocabularyError as error:
            self.vocabulary_rejections += 1
            return self.outcome(False, str(error))
        if not wait:
            return self.outcome(True, "accepted; encoding in the background")
        try:
            version = future.result()
        except Exception as error:  # the worker's failure is reported to the caller
            return self.outcome(False, f"encoding the vocabulary failed: {error}")
        # The engine's normalisation (stripped text) names the queries of this version.
        return self.made(version, list(validate_queries(queries)))

    def answer_request(self, service: str, handle: Callable[[], VocabularyOutcome]
                       ) -> VocabularyOutcome:
        """``handle()``'s outcome; an unexpected exception becomes a failed outcome with its
        message (and a logged traceback): a request never kills a service."""
        try:
            return handle()
        except Exception as error:
            self.get_logger().error(f"{service} failed: {traceback.format_exc()}")
            return self.outcome(False, f"internal error: {error}")

    def outcome(self, success: bool, message: str) -> VocabularyOutcome:
        """The active vocabulary's version and labels with ``message``."""
        vocabulary = self.active_vocabulary()
        if vocabulary is None:
            return VocabularyOutcome(success, message, 0, [])
        return VocabularyOutcome(success, message, vocabulary.version, list(vocabulary.labels))

    def made(self, version: int, labels: list[str]) -> VocabularyOutcome:
        """Success for the change that made ``version``. Under concurrent changes a later one
        may be active already: the answer still describes the caller's own change."""
        vocabulary = self.active_vocabulary()
        if vocabulary is not None and vocabulary.version == version:
            notes = summary(vocabulary.warnings)
            return VocabularyOutcome(True, notes or "ok", version, list(vocabulary.labels))
        newer = vocabulary.version if vocabulary is not None else 0
        return VocabularyOutcome(True, f"ok; a later change (v{newer}) is already active",
                                 version, labels)

    def submit_and_announce(self, submit: Callable[[], Future[int]],
                            templates: list[str] | None) -> Future[int]:
        """Submit a vocabulary change to the engine and publish it on ~/vocabulary once it is
        active; ``submit``'s VocabularyError propagates.

        templates: the prompt templates of a text change; None keeps the current ones (an
        image exemplar). The engine applies changes in order and runs a future's callbacks
        right after its swap, so each version is published before the next one is built.
        A change that finishes before its callback is attached (a cache hit) runs the
        callback in this thread instead; the lock keeps any other change from being
        submitted in between, so the version then active is still this one and is published.
        """
        with self._submit_lock:
            future = submit()
            future.add_done_callback(lambda f: self._vocabulary_done(f, templates))
        return future

    def _vocabulary_done(self, future: Future[int], templates: list[str] | None) -> None:
        if future.exception() is not None:
            self.get_logger().error(f"vocabulary update failed: {future.exception()}")
            return
        with self._vocabulary_lock:
            if templates is not None:
                self.templates_in_effect = templates
            vocabulary = self.active_vocabulary()
            if vocabulary is None or vocabulary.version != future.result():
                return  # unreachable while submit_and_announce orders the callbacks
            default = self.default_threshold()
            self.vocabulary_pub.publish(to_vocabulary(
                vocabulary.version, list(vocabulary.labels),
                [default if t is None else t for t in vocabulary.thresholds],
                self.templates_in_effect))
        warnings = summary(vocabulary.warnings)
        self.get_logger().info(
            f"vocabulary v{vocabulary.version}: {len(vocabulary)} queries"
            + (f" ({warnings})" if warnings else ""))

    def _on_set_queries(self, request: SetQueries.Request,
                        response: SetQueries.Response) -> SetQueries.Response:
        outcome = self.answer_request("set_queries", lambda: self.change_vocabulary(
            list(request.queries), list(request.thresholds) or None,
            list(request.templates) or self.settings["templates"], wait=True))
        response.success = outcome.success
        response.message = outcome.message
        response.vocabulary_version = outcome.version
        response.active_queries = outcome.active
        return response

    def _on_queries_topic(self, msg: String) -> None:
        queries = P.split_queries(msg.data)
        outcome = self.change_vocabulary(queries, None, self.settings["templates"],
                                         wait=False)
        if not outcome.success:
            self.get_logger().warning(f"ignored queries on ~/queries: {outcome.message}",
                                      throttle_duration_sec=2.0)
