"""HandOffExecutor keeps what a MultiThreadedExecutor promises: callbacks in a reentrant
group run at the same time on different threads, and a callback's exception reaches the
spinning thread."""

from __future__ import annotations

import threading

import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from clip_perception.ros.executor import HandOffExecutor


def test_reentrant_callbacks_run_concurrently(ros_context):
    node = Node("handoff_concurrency", context=ros_context)
    executor = HandOffExecutor(num_threads=2, context=ros_context)
    executor.add_node(node)
    group = ReentrantCallbackGroup()
    released = threading.Event()
    seen: dict[str, object] = {}

    def waiting() -> None:
        waiter.cancel()  # once: a second call would take the other thread
        # Completes only if the other callback runs while this one still blocks a thread.
        seen["waiting_thread"] = threading.get_ident()
        seen["released_in_time"] = released.wait(timeout=10.0)

    def releasing() -> None:
        releaser.cancel()
        seen["releasing_thread"] = threading.get_ident()
        released.set()

    waiter = node.create_timer(0.01, waiting, callback_group=group)
    releaser = node.create_timer(0.05, releasing, callback_group=group)
    try:
        while "released_in_time" not in seen:
            executor.spin_once(timeout_sec=1.0)
    finally:
        executor.shutdown()
        node.destroy_node()
    assert seen["released_in_time"] is True
    assert seen["waiting_thread"] != seen["releasing_thread"]


def test_callback_exception_reaches_the_spinning_thread(ros_context):
    node = Node("handoff_exception", context=ros_context)
    executor = HandOffExecutor(num_threads=2, context=ros_context)
    executor.add_node(node)

    def failing() -> None:
        raise ValueError("raised in a callback")

    node.create_timer(0.01, failing)
    try:
        with pytest.raises(ValueError, match="raised in a callback"):
            for _ in range(200):  # the failure surfaces on a later spin_once than the call
                executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        node.destroy_node()
