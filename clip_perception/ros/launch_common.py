"""The one launch description behind launch/detector.launch.py and classifier.launch.py.

Written to the Jazzy launch API (launch, launch_ros); imported only by the launch files.
"""

import os

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

# Fast DDS 2.x (Jazzy) reads its default XML profile from this variable.
DDS_PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"


def perception_launch(executable: str, node_name: str, config_name: str,
                      vocabulary_param: str, example: str) -> LaunchDescription:
    """Launch ``executable`` on one camera with the package's config, overridable by args.

    vocabulary_param: the string-array parameter the comma-separated ``queries`` argument
    fills ("queries" for the detector, "labels" for the classifier).
    """
    arguments = {
        "model": ("", "checkpoint folder (config.json + weights); empty: params_file's model"),
        "device": ("", "auto | cpu | cuda | cuda:N; empty: params_file's device"),
        "image_topic": ("/camera/image_raw", "camera topic (sensor_msgs/Image)"),
        "image_transport": ("", "raw | compressed; empty: params_file's image_transport"),
        "queries": ("", f"comma-separated start-up vocabulary, e.g. '{example}'"),
        "params_file": ("", f"parameters YAML; empty: the package's config/{config_name}"),
        "namespace": ("", "namespace for the node and its topics"),
        "use_rviz": ("false", "start RViz with an Image display on the annotated topic"),
        "dds_profile": ("", "Fast DDS XML profile for the node; empty: "
                        "$FASTRTPS_DEFAULT_PROFILES_FILE if set, else the package's "
                        "config/fastdds_large_data.xml (a shared-memory segment that fits "
                        "camera frames; the camera driver needs it too, see docs/ros.md)"),
    }

    def nodes(context):
        def arg(name: str) -> str:
            return LaunchConfiguration(name).perform(context).strip()

        share = FindPackageShare("clip_perception").perform(context)
        overrides = {name: arg(name) for name in ("model", "device", "image_transport")
                     if arg(name)}
        if "model" in overrides:
            overrides["model"] = os.path.expanduser(overrides["model"])
        vocabulary = [q.strip() for q in arg("queries").split(",") if q.strip()]
        if vocabulary:
            overrides[vocabulary_param] = vocabulary
        params_file = arg("params_file") or os.path.join(share, "config", config_name)
        dds_profile = arg("dds_profile") or os.environ.get(DDS_PROFILE_VARIABLE) or \
            os.path.join(share, "config", "fastdds_large_data.xml")
        launched = [Node(
            package="clip_perception", executable=executable, name=node_name,
            namespace=arg("namespace"), parameters=[params_file, overrides],
            # The node subscribes "image" by default; its outputs follow the remapped name
            # (<image_topic>/detections, <image_topic>/classification, ...).
            remappings=[("image", arg("image_topic"))],
            additional_env={DDS_PROFILE_VARIABLE: dds_profile},
            output="screen", emulate_tty=True)]
        if arg("use_rviz").lower() in ("true", "1", "yes"):
            launched.append(Node(
                package="rviz2", executable="rviz2", name=f"{node_name}_rviz",
                arguments=["-d", os.path.join(share, "config", "detector.rviz")],
                output="screen"))
        return launched

    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, (default, description) in arguments.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=nodes)])
