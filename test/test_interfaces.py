"""The generated interfaces import and survive CDR serialisation with every field intact."""

import pytest
from rclpy import serialization as rclpy_serialization

from clip_perception.msg import Classification, Detection, DetectionArray, Vocabulary
from clip_perception.srv import SetImageQuery, SetQueries


def make_detection_array() -> DetectionArray:
    msg = DetectionArray()
    msg.header.stamp.sec = 1_700_000_123
    msg.header.stamp.nanosec = 456_789_000
    msg.header.frame_id = "front_camera_optical_frame"
    msg.vocabulary_version = 42
    msg.image_width = 640
    msg.image_height = 480
    msg.detections = [
        Detection(query="a red mug", query_index=0, score=0.875, center_x=320.5,
                  center_y=240.25, size_x=64.0, size_y=48.5),
        Detection(query="a person in a hi-vis vest ☃", query_index=3, score=0.125,
                  center_x=10.0, center_y=470.0, size_x=20.0, size_y=20.0),
    ]
    return msg


def test_detection_array_round_trips_through_cdr():
    msg = make_detection_array()
    data = rclpy_serialization.serialize_message(msg)
    back = rclpy_serialization.deserialize_message(data, DetectionArray)
    assert back == msg
    assert back.header.frame_id == "front_camera_optical_frame"
    assert back.header.stamp.nanosec == 456_789_000
    assert back.vocabulary_version == 42
    assert (back.image_width, back.image_height) == (640, 480)
    assert [d.query for d in back.detections] == ["a red mug", "a person in a hi-vis vest ☃"]
    assert back.detections[1].query_index == 3
    assert back.detections[0].score == pytest.approx(0.875)
    assert back.detections[0].center_y == pytest.approx(240.25)
    assert back.detections[0].size_y == pytest.approx(48.5)


def test_other_interfaces_have_the_documented_fields():
    vocabulary = Vocabulary(version=3, queries=["a", "b"], thresholds=[0.1, 0.2],
                            templates=["a photo of {}"])
    back = rclpy_serialization.deserialize_message(
        rclpy_serialization.serialize_message(vocabulary), Vocabulary)
    assert back == vocabulary
    classification = Classification(vocabulary_version=1, labels=["x"], scores=[1.0])
    assert rclpy_serialization.deserialize_message(
        rclpy_serialization.serialize_message(classification), Classification) == classification
    request = SetQueries.Request(queries=["a mug"], thresholds=[0.3], templates=["{}"])
    assert request.queries == ["a mug"]
    response = SetQueries.Response(success=False, message="why", vocabulary_version=7,
                                   active_queries=["a mug"])
    assert (response.success, response.message, response.vocabulary_version) == (
        False, "why", 7)
    image_request = SetImageQuery.Request(label="my mug", x_min=1.0, y_min=2.0, x_max=3.0,
                                          y_max=4.0, append=True)
    assert image_request.image.encoding == ""
    assert (image_request.x_max, image_request.append) == (3.0, True)
    assert set(SetImageQuery.Response.get_fields_and_field_types()) == {
        "success", "message", "vocabulary_version"}
