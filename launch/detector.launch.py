"""Open-vocabulary detector on one camera (more cameras: list image_topics in params_file).

    ros2 launch clip_perception detector.launch.py model:=~/models/owlvit-base-patch32 \
        image_topic:=/camera/image_raw queries:="a mug, a person" use_rviz:=true
"""

from clip_perception.ros.launch_common import perception_launch


def generate_launch_description():
    return perception_launch("detector_node", "clip_detector", "detector.yaml",
                             vocabulary_param="queries", example="a mug, a person")
