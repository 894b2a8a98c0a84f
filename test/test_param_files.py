"""config/*.yaml, the parameter files users copy, against the parameters the nodes declare:
every key is declared, with the declared default; every declared parameter is in the file
(those whose default is an empty list appear as commented examples)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from clip_perception.ros import classifier_node, detector_node

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize(("file", "specs"), [("detector.yaml", detector_node.SPECS),
                                             ("classifier.yaml", classifier_node.SPECS)])
def test_parameter_file_matches_the_declarations(file: str, specs: list) -> None:
    text = (CONFIG / file).read_text(encoding="utf-8")
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    declared = {spec.name: spec for spec in specs}
    assert set(values) <= set(declared), set(values) - set(declared)
    for name, value in values.items():
        assert value == declared[name].default, name
    for name, spec in declared.items():
        if name not in values:
            assert spec.default == [] and f"# {name}:" in text, f"{name} missing from {file}"
