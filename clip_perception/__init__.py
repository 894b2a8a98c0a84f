"""clip_perception: open-vocabulary detection and zero-shot classification for ROS 2 robots.

The ROS-free engine lives in this package (``clip_perception.model`` for the networks,
the top-level modules for detection, classification, vocabulary and the CLI); the ROS 2
nodes live in ``clip_perception.ros``. The generated ``msg`` and ``srv`` subpackages are
merged into this namespace when the package is built with colcon.

``clip_perception.load_detector`` and ``clip_perception.load_classifier`` are resolved on
first use, so importing the messages does not import torch.
"""


def __getattr__(name: str):
    if name == "load_detector":
        from clip_perception.detector import load_detector
        return load_detector
    if name == "load_classifier":
        from clip_perception.classifier import load_classifier
        return load_classifier
    raise AttributeError(f"module 'clip_perception' has no attribute {name!r}")
