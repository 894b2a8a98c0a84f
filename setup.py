"""pip-installable, ROS-free core of clip_perception (everything outside clip_perception/ros/).

The ROS 2 package (nodes, messages, launch files) is built with colcon from CMakeLists.txt;
this file serves users who want the engine and the ``clip-perception`` command without ROS.
"""

from setuptools import find_packages, setup

setup(
    name="clip_perception",
    version="0.1.0",
    description="Open-vocabulary detection (OWL-ViT/OWLv2) and CLIP zero-shot classification",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clip_perception", "clip_perception.*"],
                           exclude=["clip_perception.ros", "clip_perception.ros.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "ftfy>=6.1",
        "regex>=2023.0",
        "safetensors>=0.4",
        "opencv-python-headless>=4.8",
        "tqdm>=4.66",
        "scipy>=1.10",
        "pycocotools>=2.0.7",
        "rosbags>=0.10",
    ],
    entry_points={"console_scripts": ["clip-perception=clip_perception.cli:main"]},
)
