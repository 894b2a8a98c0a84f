"""clip_perception: open-vocabulary detection and zero-shot classification for ROS 2 robots.

The ROS-free engine lives in this package (``clip_perception.model`` for the networks,
the top-level modules for detection, classification, vocabulary and the CLI); the ROS 2
nodes live in ``clip_perception.ros``. The generated ``msg`` and ``srv`` subpackages are
merged into this namespace when the package is built with colcon.
"""
