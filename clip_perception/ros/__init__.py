"""ROS 2 layer of clip_perception: thin nodes that call the engine, and message conversion.

This is the only package that imports rclpy or message types.
"""
