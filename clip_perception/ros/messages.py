"""Engine results to ROS messages. Boxes stay in source-image pixels; headers are copied.

vision_msgs is optional: when it is importable, ``VISION_MSGS`` is True and
``to_detection2d_array`` fills vision_msgs/Detection2DArray (class_id = query text, score
filled); without it the node simply does not offer that output.
"""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from clip_perception.detections import Classification as EngineClassification
from clip_perception.detections import Detections
from clip_perception.msg import Classification, Detection, DetectionArray, Vocabulary
from clip_perception.ros.image_conversion import rgb_to_image_fields

try:  # optional dependency: present on robots that installed ros-<distro>-vision-msgs
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
    VISION_MSGS = True
except ImportError:  # pragma: no cover - depends on the installation
    VISION_MSGS = False


def to_detection_array(result: Detections, header: Header) -> DetectionArray:
    """One DetectionArray for one image; centre/size boxes in that image's pixels."""
    height, width = result.image_size
    msg = DetectionArray(header=header, vocabulary_version=result.vocabulary_version,
                         image_width=width, image_height=height)
    boxes = result.boxes.astype(np.float64)  # (N, 4) xyxy
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2.0  # (N, 2)
    sizes = boxes[:, 2:] - boxes[:, :2]  # (N, 2)
    msg.detections = [
        Detection(query=label, query_index=int(q), score=float(s),
                  center_x=float(c[0]), center_y=float(c[1]),
                  size_x=float(z[0]), size_y=float(z[1]))
        for label, q, s, c, z in zip(result.labels, result.query_indices, result.scores,
                                     centers, sizes, strict=True)
    ]
    return msg


def to_detection2d_array(array: DetectionArray) -> Detection2DArray:
    """The same detections as vision_msgs/Detection2DArray (only when VISION_MSGS)."""
    out = Detection2DArray(header=array.header)
    for det in array.detections:
        d2 = Detection2D(header=array.header)
        d2.bbox.center.position.x = float(det.center_x)
        d2.bbox.center.position.y = float(det.center_y)
        d2.bbox.size_x = float(det.size_x)
        d2.bbox.size_y = float(det.size_y)
        d2.id = str(det.query_index)
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = det.query
        hypothesis.hypothesis.score = float(det.score)
        d2.results = [hypothesis]
        out.detections.append(d2)
    return out


def to_image(rgb: np.ndarray, header: Header, encoding: str = "rgb8") -> Image:
    encoding, height, width, step, data = rgb_to_image_fields(rgb, encoding)
    return Image(header=header, height=height, width=width, encoding=encoding,
                 is_bigendian=0, step=step, data=data)


def to_vocabulary(version: int, queries: list[str], thresholds: list[float],
                  templates: list[str]) -> Vocabulary:
    return Vocabulary(version=version, queries=queries, thresholds=thresholds,
                      templates=templates)


def to_classification(result: EngineClassification, row: int, header: Header) -> Classification:
    return Classification(header=header, vocabulary_version=result.vocabulary_version,
                          labels=list(result.labels),
                          scores=[float(p) for p in result.probs[row]])
