"""Node parameters: declared once, from one table, with descriptions, ranges and defaults.

Each node lists its ``ParamSpec`` rows; ``declare`` declares them all, and ``validate``
checks a proposed change against the whole resulting state (so that, for example, a new
``queries`` list is checked against the current ``thresholds``) and returns the reason for a
rejection, which ``ros2 param set`` prints. Parameters that need a restart are read-only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from clip_perception.vocabulary import VocabularyError, resolve_templates

# What one vocabulary change may ask for, whatever channel it comes through. Every query is
# encoded and scored against every patch of every frame, so these bound the encode time and
# the per-frame logits memory (B x patches x queries). LVIS (1203 classes) with the 80 CLIP
# prompts fits. The text context is 16 (OWL) or 77 (CLIP) tokens, so a longer text adds
# nothing but tokenizer time, which is quadratic in the length of one word.
MAX_QUERIES = 4096
MAX_PROMPTS = 131072  # queries x templates
MAX_TEXT_CHARS = 1000  # per query and per template, after stripping

# Returns the reason a value is unacceptable, or None when it is fine.
Check = Callable[[Any], str | None]

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_ARRAY_TYPES = {
    str: ParameterType.PARAMETER_STRING_ARRAY,
    float: ParameterType.PARAMETER_DOUBLE_ARRAY,
}


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter.

    kind: the Python type of the value (or of the elements when ``array``).
    default: the default value; an empty array is declared typed but empty.
    choices / bounds: enforced on start-up and on every change.
    read_only: needs a node restart (model, device, topics, QoS).
    """

    name: str
    kind: type
    default: Any
    description: str
    array: bool = False
    read_only: bool = False
    choices: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None
    check: Check | None = None

    def descriptor(self) -> ParameterDescriptor:
        desc = ParameterDescriptor(
            name=self.name,
            type=(_ARRAY_TYPES if self.array else _TYPES)[self.kind],
            description=self.description,
            read_only=self.read_only,
        )
        if self.choices:
            desc.additional_constraints = "one of: " + ", ".join(self.choices)
        if self.bounds is not None and self.kind is float:
            desc.floating_point_range = [
                FloatingPointRange(from_value=self.bounds[0], to_value=self.bounds[1])]
        elif self.bounds is not None and self.kind is int:
            desc.integer_range = [
                IntegerRange(from_value=int(self.bounds[0]), to_value=int(self.bounds[1]))]
        return desc

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this parameter, or None."""
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.bounds is not None:
            low, high = self.bounds
            if (isinstance(value, float) and math.isnan(value)) or not low <= value <= high:
                return f"{self.name} must be in [{low}, {high}], got {value!r}"
        return self.check(value) if self.check else None


def declare(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every parameter and return the start-up values (overrides applied).

    Raises ValueError naming the parameter when a start-up value is unacceptable.
    """
    values = {}
    for spec in specs:
        default = spec.default
        if spec.array and not default:
            # rclpy infers the type from the value; an empty list has none, so declare the
            # type and treat "not set" as empty.
            default = Parameter.Type.STRING_ARRAY if spec.kind is str else (
                Parameter.Type.DOUBLE_ARRAY)
        param = node.declare_parameter(spec.name, default, spec.descriptor())
        value = param.value
        if value is None and spec.array:
            value = []
        values[spec.name] = list(value) if spec.array else value
    problems = validate(specs, values, values)
    if problems:
        raise ValueError(problems)
    return values


def validate(specs: Sequence[ParamSpec], current: dict[str, Any],
             proposed: dict[str, Any],
             whole_state: Callable[[dict[str, Any]], str | None] | None = None) -> str | None:
    """Check ``proposed`` changes (name -> value) on top of ``current``; the reason or None."""
    by_name = {s.name: s for s in specs}
    for name, value in proposed.items():
        spec = by_name.get(name)
        if spec is None:
            continue  # parameters we do not own (use_sim_time, qos overrides) pass through
        problem = spec.problem(value)
        if problem:
            return problem
    if whole_state is not None:
        return whole_state({**current, **proposed})
    return None


def as_result(reason: str | None) -> SetParametersResult:
    return SetParametersResult(successful=reason is None, reason=reason or "")


def values_of(parameters: Sequence[Parameter]) -> dict[str, Any]:
    """Parameter list -> {name: python value}, arrays as lists."""
    out = {}
    for p in parameters:
        value = p.value
        out[p.name] = list(value) if isinstance(value, (list, tuple)) or (
            hasattr(value, "tolist")) else value
    return out


def _not_empty(what: str) -> Check:
    return lambda value: f"{what} must not be empty" if not value else None


def camera_node_specs(vocabulary_param: str, vocabulary_description: str,
                      model_description: str, templates: list[str]) -> list[ParamSpec]:
    """Parameters every perception node has: model, placement, cameras, vocabulary input;
    ``templates`` is the node's default prompt set."""
    return [
        ParamSpec("model", str, "", model_description, read_only=True),
        ParamSpec("device", str, "auto", "auto (CUDA if present) | cpu | cuda | cuda:N",
                  read_only=True),
        ParamSpec("precision", str, "auto", "numeric precision of the model",
                  read_only=True, choices=("auto", "fp32", "fp16", "bf16", "int8")),
        ParamSpec("image_topics", str, ["image"],
                  "camera topics, one per camera; outputs are published under each topic",
                  array=True, read_only=True, check=_not_empty("image_topics")),
        ParamSpec("image_transport", str, "raw",
                  "raw: sensor_msgs/Image on the topic; compressed: "
                  "sensor_msgs/CompressedImage on <topic>/compressed",
                  read_only=True, choices=("raw", "compressed")),
        ParamSpec("qos_reliability", str, "best_effort",
                  "reliability of the camera subscriptions (match the camera driver)",
                  read_only=True, choices=("best_effort", "reliable")),
        ParamSpec(vocabulary_param, str, [], vocabulary_description, array=True),
        ParamSpec("templates", str, templates,
                  "prompt templates: [] = text as is, [clip7] or [clip80] = the CLIP paper's "
                  "ImageNet prompt sets, or prompts that each contain {}", array=True),
        ParamSpec("max_batch", int, 4,
                  "most frames (the newest of each camera) batched into one inference",
                  bounds=(1, 64)),
    ]


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


def vocabulary_limits_problem(queries: Sequence[str], templates: Sequence[str]) -> str | None:
    """Why a vocabulary request is too large for the node, or None; the engine checks the
    rest (empty, duplicate, thresholds, template syntax)."""
    if len(queries) > MAX_QUERIES:
        return f"{len(queries)} queries: at most {MAX_QUERIES} are accepted"
    for what, texts in (("query", queries), ("template", templates)):
        for i, text in enumerate(texts):
            if isinstance(text, str) and len(text.strip()) > MAX_TEXT_CHARS:
                return (f"{what} {i} is {len(text.strip())} characters long: at most "
                        f"{MAX_TEXT_CHARS} are accepted (the model reads only its first "
                        "tokens)")
    try:
        prompts = len(queries) * len(resolve_templates(template_setting(templates)))
    except VocabularyError:
        return None  # the engine names the bad template
    if prompts > MAX_PROMPTS:
        return (f"{len(queries)} queries x {prompts // len(queries)} templates = {prompts} "
                f"prompts: at most {MAX_PROMPTS} are accepted")
    return None
