"""Shared fixtures: a per-test rclpy context and peer processes on the same DDS domain."""

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS = pathlib.Path(__file__).resolve().parent / "peers"


@pytest.fixture(scope="module")
def two_torch_threads() -> Iterator[None]:
    """torch on at most 2 threads (the CI machine's cores) for a module, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def ros_context() -> Iterator[object]:
    """An initialised rclpy context of this test's own, shut down afterwards."""
    import rclpy

    assert os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "LOCALHOST", (
        "run the ROS tests through scripts/test so DDS traffic stays on this host")
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.shutdown(context=context)


@pytest.fixture
def start_peer() -> Iterator[object]:
    """Start `python test/peers/<name>.py ARGS...` as a separate process; stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(PEERS / f"{name}.py"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
