"""Broken models and resources at the NODE level: the installed executable, given a model it
cannot use, exits 1 within seconds with exactly one error line naming the file at fault (no
traceback); a malicious pickle is refused without running; and a hub model id is an error,
never a download (a socket guard in the node's interpreter records any attempt to reach
another host). Model-level errors are tested in test_checkpoint_loading.py.

There is no on-disk cache in this package (prompt embeddings are cached in memory only), so
there is no non-writable cache case to test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from engine_fixtures import tiny_checkpoint
from ros_harness import executable
from safetensors.torch import load_file

START_TIMEOUT_S = 90  # "no hang": far above the 5-10 s a start-up takes here
PARALLEL_STARTS = 4  # each start is ~5 CPU-s of imports: run several at once
# Loaded by the node's interpreter (via PYTHONPATH) before anything else: any attempt to
# resolve or connect to a host other than this one is written to a file, then refused.
SOCKET_GUARD = '''
import os, socket
_log = os.environ["NETWORK_ATTEMPTS_LOG"]
_local = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "", None)

def _record(what):
    with open(_log, "a") as f:
        f.write(repr(what) + "\\n")
    raise OSError(f"network access blocked by the test: {what!r}")

_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect

def getaddrinfo(host, *args, **kwargs):
    if host not in _local:
        _record(("getaddrinfo", host))
    return _getaddrinfo(host, *args, **kwargs)

def connect(self, address):
    if isinstance(address, tuple) and address[0] not in _local:
        _record(("connect", address))
    return _connect(self, address)

socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
'''


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("owl"), "v1").path


def start_node(model: str, folder: Path, name: str = "detector_node",
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.yaml"
    params.write_text(f"/**:\n  ros__parameters:\n    model: {json.dumps(model)}\n"
                      "    device: cpu\n    queries: ['a mug']\n    labels: ['a mug']\n")
    return subprocess.run([str(executable(name)), "--ros-args", "--params-file", str(params)],
                          capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env={**os.environ, **(env or {})})


def assert_one_error_line(result: subprocess.CompletedProcess, names: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert names in errors[0], errors[0]
    return errors[0]


def broken_copy(owl_dir: Path, folder: Path, damage: Callable[[Path], None]) -> Path:
    target = folder / "model"
    shutil.copytree(owl_dir, target)
    damage(target)
    return target


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# (case, damage to a copy of a good checkpoint, the file the error line must name)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("no weights", lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    ("truncated weights", lambda f: truncate(f / "model.safetensors"), "model.safetensors"),
    ("config that does not match the weights", lambda f: edit_config(
        f, lambda c: c["vision_config"].update(hidden_size=96)), "model.safetensors"),
    ("unsupported architecture", lambda f: edit_config(
        f, lambda c: c.update(architectures=["BertModel"], model_type="bert")),
     "config.json"),
]


@pytest.fixture(scope="module")
def started(owl_dir, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every broken checkpoint of CASES started at once (a few at a time): case -> (the
    model folder, the finished process)."""
    folders = {}
    for case, damage, _ in CASES:
        folder = tmp_path_factory.mktemp("broken")
        folders[case] = (folder, broken_copy(owl_dir, folder, damage))
    with ThreadPoolExecutor(PARALLEL_STARTS) as pool:
        runs = {case: pool.submit(start_node, str(model), folder)
                for case, (folder, model) in folders.items()}
        return {case: (folders[case][1], run.result()) for case, run in runs.items()}


@pytest.mark.parametrize("case, names", [(c[0], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_broken_checkpoint_is_one_error_line_naming_the_file(started, case, names):
    model, result = started[case]
    line = assert_one_error_line(result, names)
    assert str(model) in line


def test_missing_folder_and_the_wrong_model_family(owl_dir, tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with ThreadPoolExecutor(PARALLEL_STARTS) as pool:
        detector = pool.submit(start_node, missing, tmp_path / "d")
        # An OWL checkpoint where the classifier needs CLIP: config.json says what it is.
        wrong = pool.submit(start_node, str(owl_dir), tmp_path / "w", "classifier_node")
        assert_one_error_line(detector.result(), missing)
        line = assert_one_error_line(wrong.result(), str(owl_dir / "config.json"))
    assert "OwlViTForObjectDetection" in line


def test_malicious_pickle_is_refused_and_never_runs(owl_dir, tmp_path):
    marker = tmp_path / "pwned"

    def poison(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save({**state, "payload": Payload(marker)}, folder / "pytorch_model.bin")

    model = broken_copy(owl_dir, tmp_path, poison)
    line = assert_one_error_line(start_node(str(model), tmp_path),
                                 str(model / "pytorch_model.bin"))
    assert "\x1b" not in line  # torch's colour codes are not for a log
    assert not marker.exists(), "the pickle's payload ran inside the node"
    torch.load(model / "pytorch_model.bin", weights_only=False)  # the payload is live:
    assert marker.exists()  # an unrestricted unpickle would have run it


def test_hub_model_id_is_an_error_not_a_download(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    attempts = tmp_path / "network_attempts.log"
    python_path = os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, "NETWORK_ATTEMPTS_LOG": str(attempts),
           "HF_HUB_OFFLINE": "0"}  # nothing in the environment forbids a download
    line = assert_one_error_line(
        start_node("google/owlvit-base-patch32", tmp_path, env=env), "google/owlvit-base-patch32")
    assert "never downloads" in line
    assert not attempts.exists(), attempts.read_text()
    # The guard is live: the same interpreter set-up records a lookup of a remote host.
    probe = subprocess.run(
        ["python", "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert probe.returncode != 0 and "huggingface.co" in attempts.read_text()
