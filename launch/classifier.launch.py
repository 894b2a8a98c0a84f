"""CLIP zero-shot scene classification on one camera.

    ros2 launch clip_perception classifier.launch.py model:=~/models/clip-vit-base-patch32 \
        image_topic:=/camera/image_raw queries:="a kitchen, a corridor, an office"
"""

from clip_perception.ros.launch_common import perception_launch


def generate_launch_description():
    return perception_launch("classifier_node", "clip_classifier", "classifier.yaml",
                             vocabulary_param="labels", example="a kitchen, a corridor")
