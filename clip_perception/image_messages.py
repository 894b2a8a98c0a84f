"""sensor_msgs/Image and CompressedImage <-> (H, W, 3) uint8 RGB numpy arrays, without ROS.

Messages are duck-typed on their fields (``encoding``, ``width``, ``height``, ``step``,
``is_bigendian``, ``data`` for Image; ``format``, ``data`` for CompressedImage), so this module
imports neither rclpy nor message packages: it is tested and fuzzed without ROS and the nodes
only pass messages through.

Every malformed message raises :class:`ImageConversionError` (a ``ValueError``) with a
one-line reason; no other exception escapes the converters.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import cv2
import numpy as np


class ImageConversionError(ValueError):
    """A message that cannot be converted; ``str(error)`` is a one-line reason."""


# Bytes per pixel of each supported encoding, as laid out in ``data``.
_BYTES_PER_PIXEL: dict[str, int] = {
    "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4,
    "mono8": 1, "mono16": 2, "16UC1": 2,
    "bayer_rggb8": 1, "bayer_bggr8": 1, "bayer_gbrg8": 1, "bayer_grbg8": 1,
    "bayer_rggb16": 2, "bayer_bggr16": 2, "bayer_gbrg16": 2, "bayer_grbg16": 2,
    # sensor_msgs' "yuv422" is UYVY byte order (U0 Y0 V0 Y1); "yuv422_yuy2" is YUYV.
    "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_BYTES_PER_PIXEL)

# OpenCV names a Bayer pattern by the second and third pixel of its *second* row, ROS by the
# top-left 2x2 block read row by row, so ROS "rggb" is OpenCV "BG" (as in cv_bridge). The
# 2-letter names are used because the RGGB-style aliases only exist in recent OpenCV.
_BAYER_TO_RGB = {
    "rggb": cv2.COLOR_BayerBG2RGB,
    "bggr": cv2.COLOR_BayerRG2RGB,
    "gbrg": cv2.COLOR_BayerGR2RGB,
    "grbg": cv2.COLOR_BayerGB2RGB,
}

_YUV422_TO_RGB = {
    "yuv422": cv2.COLOR_YUV2RGB_UYVY, "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUYV, "yuyv": cv2.COLOR_YUV2RGB_YUYV,
}

_COLOUR_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
}


def image_to_rgb(msg: Any) -> np.ndarray:
    """Convert a sensor_msgs/Image (or anything with its fields) to (H, W, 3) uint8 RGB.

    16-bit encodings (mono16, 16UC1, bayer_*16) keep the high byte (value >> 8): a fixed
    scaling, so brightness is stable from frame to frame (unlike min/max normalisation). It
    suits data that spans the 16-bit range (right-aligned 12-bit data comes out dark) and
    truncates where cv_bridge's 1/256 scaling rounds. Bayer data is scaled first and then
    demosaiced bilinearly in 8 bits, which is cheaper and differs by at most one level.

    For rgb8 the result is a read-only view on ``msg.data`` (no copy; copy it to write);
    every other encoding returns a new contiguous array.
    """
    encoding, height, width, step, bigendian, buf = _image_fields(msg)
    bpp = _BYTES_PER_PIXEL.get(encoding)
    if bpp is None:
        raise ImageConversionError(f"unsupported encoding {encoding!r}")
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"empty image: {width}x{height}")
    if step < width * bpp:
        raise ImageConversionError(
            f"step {step} < width {width} * {bpp} bytes per pixel ({encoding})")
    if buf.size < step * height:
        raise ImageConversionError(
            f"data has {buf.size} bytes, step {step} * height {height} needs {step * height}")
    if encoding in _YUV422_TO_RGB and width % 2:
        raise ImageConversionError(f"{encoding} needs an even width, got {width}")

    rows = buf[: step * height].reshape(height, step)  # (H, step): each row with its padding
    pixels = rows[:, : width * bpp].reshape(height, width, bpp)  # (H, W, bpp), still a view
    if encoding == "rgb8":
        pixels.flags.writeable = False  # shares memory with msg.data
        return pixels
    if encoding in _COLOUR_TO_RGB:
        return _cvt(pixels, _COLOUR_TO_RGB[encoding])
    if encoding in _YUV422_TO_RGB:
        return _cvt(pixels, _YUV422_TO_RGB[encoding])
    # One sample per pixel from here on. The high byte of a 16-bit sample is exactly
    # value >> 8: pick it by endianness instead of doing 16-bit arithmetic.
    gray = pixels[:, :, (0 if bigendian else 1) if bpp == 2 else 0]  # (H, W), strided view
    if encoding.startswith("bayer_"):
        return _cvt(gray, _BAYER_TO_RGB[encoding[6:10]])
    return _cvt(gray, cv2.COLOR_GRAY2RGB)  # mono8, mono16, 16UC1


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to a new (H, W, 3) uint8 RGB array.

    ``format`` may be a bare codec ("jpeg", "png") or image_transport's
    "<encoding>; <codec> compressed <encoding>"; image_transport compresses colour images as
    bgr8, which is what OpenCV decodes to. compressedDepth (16-bit depth with a custom header)
    is rejected. EXIF orientation is ignored so pixels stay aligned with the CameraInfo.
    """
    try:
        fmt = msg.format
        buf = np.frombuffer(msg.data, dtype=np.uint8)  # (nbytes,)
    except (AttributeError, TypeError, ValueError, BufferError) as exc:
        raise ImageConversionError(f"not a CompressedImage: {_one_line(exc)}") from None
    if not isinstance(fmt, str):
        raise ImageConversionError(f"format must be a string, got {type(fmt).__name__}")
    if "compresseddepth" in fmt.lower() or not re.search(r"\b(jpe?g|png)\b", fmt.lower()):
        raise ImageConversionError(f"unsupported compressed format {fmt!r}")
    if buf.size == 0:
        raise ImageConversionError("empty compressed image")
    if buf[:2].tobytes() == b"\xff\xd8" and not _jpeg_has_end(buf.tobytes()):
        raise ImageConversionError("truncated JPEG: no end-of-image marker after the last scan")
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        raise ImageConversionError(f"cannot decode {fmt!r}: {_one_line(exc)}") from None
    if bgr is None:
        raise ImageConversionError(f"cannot decode {fmt!r} data ({buf.size} bytes)")
    return _cvt(bgr, cv2.COLOR_BGR2RGB)


def rgb_to_image_fields(
    rgb: np.ndarray, encoding: str = "rgb8"
) -> tuple[str, int, int, int, bytes]:
    """Fields of a sensor_msgs/Image holding ``rgb``: (encoding, height, width, step, data).

    ``rgb`` is (H, W, 3) uint8 RGB; ``encoding`` is "rgb8" or "bgr8". Rows are unpadded
    (step = 3 * W). Assigning ``data`` to a real message is faster wrapped as
    ``array.array("B", data)``: rclpy then skips its per-byte range check.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        raise ImageConversionError(
            f"expected an (H, W, 3) uint8 array, got {getattr(rgb, 'shape', type(rgb))}")
    if encoding not in ("rgb8", "bgr8"):
        raise ImageConversionError(f"can only publish rgb8 or bgr8, not {encoding!r}")
    height, width = rgb.shape[:2]
    pixels = rgb if encoding == "rgb8" else rgb[:, :, ::-1]  # (H, W, 3) in wire channel order
    return encoding, height, width, 3 * width, pixels.tobytes()  # tobytes() is C order


def _image_fields(msg: Any) -> tuple[str, int, int, int, bool, np.ndarray]:
    """The Image fields, type-checked; ``data`` as a flat uint8 view (no copy)."""
    try:
        encoding = msg.encoding
        # operator.index rejects floats and strings, which int() would silently accept.
        height, width, step = (operator.index(v) for v in (msg.height, msg.width, msg.step))
        bigendian = bool(msg.is_bigendian)
        buf = np.frombuffer(msg.data, dtype=np.uint8)  # (nbytes,)
    except (AttributeError, TypeError, ValueError, BufferError) as exc:
        raise ImageConversionError(f"not an Image: {_one_line(exc)}") from None
    if not isinstance(encoding, str):
        raise ImageConversionError(f"encoding must be a string, got {type(encoding).__name__}")
    return encoding, height, width, step, bigendian, buf


def _cvt(src: np.ndarray, code: int) -> np.ndarray:
    # The checks in image_to_rgb cover OpenCV's preconditions; this keeps the no-cv2.error
    # promise should another OpenCV version add one.
    try:
        return cv2.cvtColor(src, code)
    except cv2.error as exc:
        raise ImageConversionError(f"OpenCV conversion failed: {_one_line(exc)}") from None


def _jpeg_has_end(data: bytes) -> bool:
    """Whether an end-of-image marker (FF D9) follows the last start-of-scan (FF DA).

    OpenCV 4.x decodes truncated JPEGs to a partly grey image with only a warning. Entropy
    coded data escapes FF bytes, so these markers cannot occur inside a scan; padding after
    the end marker (some cameras' MJPEG buffers) is accepted.
    """
    return data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) != -1


def _one_line(exc: Exception) -> str:
    """OpenCV's errors span lines and end with the reason; keep that line."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
