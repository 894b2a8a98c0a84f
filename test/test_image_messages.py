"""image_conversion against references built here, malformed input, and fuzzing.

Every encoding is produced from a known RGB (or grey) image by packing it by hand with numpy
(channel swaps, Bayer mosaics, BT.601 YUV 4:2:2), so each conversion is checked against the
image it came from rather than against OpenCV itself.

Hypothesis runs the "image_conversion" profile (10,000 raw-image cases plus 2,000 compressed
ones; the file takes 15-25 s on 2 cores); HYPOTHESIS_PROFILE=long selects
"image_conversion_long" (50x as many).
"""

import array
import os
import types

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clip_perception.image_messages import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_image_fields,
)

settings.register_profile(
    "image_conversion", max_examples=10_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "image_conversion_long", settings.get_profile("image_conversion"), max_examples=500_000)
FUZZ = settings.get_profile(
    "image_conversion_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long"
    else "image_conversion")

# The test's own idea of each encoding's layout: bytes per pixel, written out independently
# of the module's table.
REF_BPP = {
    "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "16UC1": 2,
    **{f"bayer_{p}8": 1 for p in ("rggb", "bggr", "gbrg", "grbg")},
    **{f"bayer_{p}16": 2 for p in ("rggb", "bggr", "gbrg", "grbg")},
    "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
}
YUV = {"yuv422": "uyvy", "uyvy": "uyvy", "yuv422_yuy2": "yuyv", "yuyv": "yuyv"}
MONO = ("mono8", "mono16", "16UC1")
GARBAGE = 0xA5  # fills row padding; it must never show up in the output

H, W = 32, 48
_y, _x = np.mgrid[0:H, 0:W]  # (H, W) each
# A smooth ramp: neighbouring pixels differ by at most 4 levels per channel.
RGB = np.stack([40 + 3 * _x, 30 + 4 * _y, 200 - 2 * _x - 2 * _y], axis=-1).astype(np.uint8)
GRAY = (_x * 5 + _y * 3).astype(np.uint8)  # (H, W)
MAX_STEP = 4  # largest difference between neighbouring pixels of RGB, per channel


def test_supported_encodings_match_the_reference_table():
    assert set(REF_BPP) == SUPPORTED_ENCODINGS


def make_msg(encoding, payload, width, pad=0, bigendian=False):
    """An Image stand-in: payload (H, W * bpp) uint8, rows padded with `pad` GARBAGE bytes."""
    height = payload.shape[0]
    rows = np.full((height, payload.shape[1] + pad), GARBAGE, np.uint8)  # (H, step)
    rows[:, : payload.shape[1]] = payload
    return types.SimpleNamespace(encoding=encoding, height=height, width=width,
                                 step=rows.shape[1], is_bigendian=int(bigendian),
                                 data=rows.tobytes())


def to_bytes16(values, bigendian):
    """(H, W) uint16 -> (H, 2W) bytes in the given byte order."""
    wire = values.astype(">u2" if bigendian else "<u2")
    return wire.view(np.uint8).reshape(values.shape[0], -1)  # (H, 2W)


def bayer_mosaic(rgb, pattern):
    """Sample rgb through a colour filter array named as ROS does (top-left 2x2, row-major)."""
    mosaic = np.empty(rgb.shape[:2], np.uint8)  # (H, W)
    for i, letter in enumerate(pattern):
        dy, dx = divmod(i, 2)
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(letter)]
    return mosaic


def yuv422(rgb, order):
    """BT.601 limited-range Y'CbCr, chroma averaged over horizontal pixel pairs, packed."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    y, u, v = (np.clip(np.round(c), 0, 255).astype(np.uint8)
               for c in (y, (u[:, 0::2] + u[:, 1::2]) / 2, (v[:, 0::2] + v[:, 1::2]) / 2))
    packed = np.empty((rgb.shape[0], rgb.shape[1] // 2, 4), np.uint8)  # (H, W/2, 4) per pair
    lanes = {"uyvy": (u, y[:, 0::2], v, y[:, 1::2]), "yuyv": (y[:, 0::2], u, y[:, 1::2], v)}
    for lane, plane in enumerate(lanes[order]):
        packed[:, :, lane] = plane
    return packed.reshape(rgb.shape[0], -1)  # (H, 2W)


def encode(encoding, bigendian=False):
    """(payload (H, W * bpp), expected RGB, tolerance) for `encoding` made from RGB or GRAY.

    Tolerances: exact for channel shuffles and mono. Bayer: bilinear demosaicing reproduces a
    linear ramp exactly, except that OpenCV replicates the outermost row and column, which costs
    one ramp step (MAX_STEP) there. YUV: 8-bit Y/U/V are expanded by up to 2x (limited range),
    so quantisation costs up to 2 levels, and averaging a pair's chroma on the ramp 1 more.
    """
    rng = np.random.default_rng(0)
    if encoding in ("rgb8", "bgr8"):
        return (RGB if encoding == "rgb8" else RGB[..., ::-1]).reshape(H, -1), RGB, 0  # (H, 3W)
    if encoding in ("rgba8", "bgra8"):
        alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
        colour = RGB if encoding == "rgba8" else RGB[..., ::-1]
        return np.concatenate([colour, alpha], axis=-1).reshape(H, -1), RGB, 0  # (H, 4W)
    expected_mono = np.repeat(GRAY[..., None], 3, axis=-1)  # (H, W, 3)
    if encoding == "mono8":
        return GRAY, expected_mono, 0
    low = rng.integers(0, 256, (H, W)).astype(np.uint16)  # dropped by the >> 8 scaling
    if encoding in MONO:
        return to_bytes16((GRAY.astype(np.uint16) << 8) | low, bigendian), expected_mono, 0
    if encoding in YUV:
        return yuv422(RGB, YUV[encoding]), RGB, 3
    mosaic = bayer_mosaic(RGB, encoding[6:10])
    if encoding.endswith("16"):
        mosaic = to_bytes16((mosaic.astype(np.uint16) << 8) | low, bigendian)
    return mosaic, RGB, None  # None: the Bayer rule in check_close


def check_close(out, expected, tolerance):
    assert out.shape == expected.shape and out.dtype == np.uint8
    err = np.abs(out.astype(np.int16) - expected)  # (H, W, 3)
    if tolerance is not None:
        assert err.max() <= tolerance
    else:
        assert err[1:-1, 1:-1].max() == 0
        assert err.max() <= MAX_STEP


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 5])  # 5: padded rows, and an odd step for 16-bit data
@pytest.mark.parametrize("encoding", sorted(SUPPORTED_ENCODINGS))
def test_every_encoding_matches_its_source(encoding, pad, bigendian):
    payload, expected, tolerance = encode(encoding, bigendian)
    out = image_to_rgb(make_msg(encoding, payload, W, pad, bigendian))
    check_close(out, expected, tolerance)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("colour", [(200, 0, 0), (0, 200, 0), (0, 0, 200), (10, 120, 230)])
def test_bayer_uniform_scene_keeps_its_colour(pattern, bits, colour):
    scene = np.broadcast_to(np.array(colour, np.uint8), (6, 8, 3))  # (H, W, 3)
    mosaic = bayer_mosaic(scene, pattern)
    if bits == 16:
        mosaic = to_bytes16(mosaic.astype(np.uint16) << 8, bigendian=False)
    out = image_to_rgb(make_msg(f"bayer_{pattern}{bits}", mosaic, 8))
    np.testing.assert_array_equal(out, scene)


@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_keeps_the_high_byte(bigendian):
    payload = np.array([[0x1234, 0xFFFF, 0x00FF]], np.uint16)  # (1, 3)
    out = image_to_rgb(make_msg("mono16", to_bytes16(payload, bigendian), 3, 1, bigendian))
    np.testing.assert_array_equal(out[0, :, 0], [0x12, 0xFF, 0x00])


def test_rgb8_is_a_read_only_view_without_copy():
    msg = make_msg("rgb8", RGB.reshape(H, -1), W, pad=4)  # (H, 3W) rows
    msg.data = bytearray(msg.data)  # writable, like rclpy's array.array
    out = image_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))
    assert not out.flags.writeable
    np.testing.assert_array_equal(out, RGB)


def _msg(**overrides):
    fields = dict(encoding="rgb8", height=2, width=4, step=12, is_bigendian=0,
                  data=bytes(24))
    return types.SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("msg,reason", [
    (_msg(data=bytes(23)), "data has 23 bytes"),  # one byte short
    (_msg(data=b""), "data has 0 bytes"),
    (_msg(step=11), "step 11 < width 4"),
    (_msg(step=-12), "step -12 < width 4"),
    (_msg(encoding="rgb16"), "unsupported encoding"),
    (_msg(encoding="RGB8"), "unsupported encoding"),
    (_msg(encoding=""), "unsupported encoding"),
    (_msg(encoding=None), "encoding must be a string"),
    (_msg(width=0, step=0, data=b""), "empty image"),
    (_msg(height=0, data=b""), "empty image"),
    (_msg(height=-1), "empty image"),
    (_msg(width=2.5), "not an Image"),
    (_msg(height="2"), "not an Image"),
    (_msg(data=None), "not an Image"),
    (_msg(data=list(range(24))), "not an Image"),
    (_msg(encoding="yuv422", width=3, step=6), "even width"),
    (_msg(encoding="yuyv", width=5, step=10, height=1, data=bytes(10)), "even width"),
    (types.SimpleNamespace(encoding="rgb8", height=1, width=1, step=3), "not an Image"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_images_raise_a_one_line_error(msg, reason):
    with pytest.raises(ImageConversionError, match=reason) as info:
        image_to_rgb(msg)
    assert "\n" not in str(info.value)


# --- property-based fuzzing of raw images -----------------------------------------------

BAD_ENCODINGS = ["", "RGB8", "rgb16", "bayer_rggb", "bayer_xyzw8", "yuv420", "nv12", "32FC1",
                 "8UC3", "jpeg", "mono8 ", "16uc1", "bgr8\x00"]


def reference_decode(msg):
    """Exact conversions by plain slicing and arithmetic, or None if there is no exact one."""
    bpp = REF_BPP[msg.encoding]
    rows = [msg.data[r * msg.step: r * msg.step + msg.width * bpp] for r in range(msg.height)]
    px = np.frombuffer(b"".join(rows), np.uint8).reshape(msg.height, msg.width, bpp)  # (H,W,bpp)
    if msg.encoding in ("mono16", "16UC1"):
        values = np.frombuffer(px.tobytes(), ">u2" if msg.is_bigendian else "<u2")
        px = (values >> 8).astype(np.uint8).reshape(msg.height, msg.width, 1)  # (H, W, 1)
    channels = {"rgb8": [0, 1, 2], "bgr8": [2, 1, 0], "rgba8": [0, 1, 2], "bgra8": [2, 1, 0],
                "mono8": [0, 0, 0], "mono16": [0, 0, 0], "16UC1": [0, 0, 0]}
    return px[:, :, channels[msg.encoding]] if msg.encoding in channels else None


# Ways to spoil a message. Hypothesis favours small collections, so about half the messages
# get none (and mostly convert) while the rest mix up to three flaws.
FLAWS = st.sets(st.sampled_from(["encoding", "zero_width", "zero_height", "short_step",
                                 "any_step", "short_data", "empty_data"]), max_size=3)
# Strategies are built once here: building them inside image_messages would double its cost.
GOOD_ENCODING, BAD_ENCODING = st.sampled_from(sorted(REF_BPP)), st.sampled_from(BAD_ENCODINGS)
SIDE = st.integers(1, 64)
EXTRA = st.one_of(st.just(0), st.integers(1, 16), st.integers(17, 64))  # exact, padded, long
PER_MILLE = st.integers(0, 999)  # scales a length down to something shorter
ANY_STEP = st.integers(0, 300)
SEED = st.integers(0, 2**32 - 1)
BIT = st.integers(0, 1)


@st.composite
def image_messages(draw):
    flaws = draw(FLAWS)
    encoding = draw(BAD_ENCODING if "encoding" in flaws else GOOD_ENCODING)
    width = 0 if "zero_width" in flaws else draw(SIDE)
    height = 0 if "zero_height" in flaws else draw(SIDE)
    needed = width * REF_BPP.get(encoding, 3)
    if "any_step" in flaws:
        step = draw(ANY_STEP)
    elif "short_step" in flaws:
        step = needed * draw(PER_MILLE) // 1000
    else:
        step = needed + draw(EXTRA)
    size = step * height
    if "empty_data" in flaws:
        length = 0
    elif "short_data" in flaws:
        length = size * draw(PER_MILLE) // 1000
    else:
        length = size + draw(EXTRA)
    # Random bytes from numpy: drawing kilobytes through Hypothesis would be far slower.
    data = np.random.default_rng(draw(SEED)).integers(0, 256, length, np.uint8).tobytes()
    return types.SimpleNamespace(encoding=encoding, width=width, height=height, step=step,
                                 is_bigendian=draw(BIT), data=data)


@FUZZ
@given(image_messages())
def test_fuzzed_images_convert_exactly_or_raise(msg):
    bpp = REF_BPP.get(msg.encoding)
    valid = (bpp is not None and msg.width > 0 and msg.height > 0
             and msg.step >= msg.width * bpp and len(msg.data) >= msg.step * msg.height
             and not (msg.encoding in YUV and msg.width % 2))
    event("converts" if valid else "raises")  # the mix shows in --hypothesis-show-statistics
    if not valid:
        with pytest.raises(ImageConversionError):
            image_to_rgb(msg)
        return
    out = image_to_rgb(msg)
    assert out.shape == (msg.height, msg.width, 3) and out.dtype == np.uint8
    reference = reference_decode(msg)
    if reference is not None:
        np.testing.assert_array_equal(out, reference)


# --- compressed images ------------------------------------------------------------------

JPEG, PNG = (cv2.imencode(ext, cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))[1].tobytes()
             for ext in (".jpg", ".png"))


@pytest.mark.parametrize("fmt", ["jpeg", "JPEG", "jpg", "rgb8; jpeg compressed bgr8",
                                 "bgr8; jpeg compressed bgr8"])
def test_jpeg_decodes_to_rgb(fmt):
    out = compressed_to_rgb(types.SimpleNamespace(format=fmt, data=JPEG))
    assert out.shape == RGB.shape and out.dtype == np.uint8
    # Lossy at OpenCV's default quality 95 with 4:2:0 chroma: small on average, a few levels
    # at most on this smooth ramp. A red/blue swap would be off by ~100.
    err = np.abs(out.astype(np.int16) - RGB)
    assert err.mean() < 2 and err.max() <= 12


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed bgr8", "bgr8; png compressed bgr8"])
def test_png_decodes_exactly(fmt):
    np.testing.assert_array_equal(
        compressed_to_rgb(types.SimpleNamespace(format=fmt, data=PNG)), RGB)


def test_jpeg_with_padding_after_the_end_marker_decodes():
    out = compressed_to_rgb(types.SimpleNamespace(format="jpeg", data=JPEG + bytes(100)))
    assert out.shape == RGB.shape


@pytest.mark.parametrize("fmt", ["", "tiff", "h264", "16UC1; compressedDepth png", "jpegxl"])
def test_unsupported_formats_raise(fmt):
    with pytest.raises(ImageConversionError):
        compressed_to_rgb(types.SimpleNamespace(format=fmt, data=PNG))


@pytest.mark.parametrize("fmt,data", [("jpeg", JPEG), ("png", PNG)], ids=["jpeg", "png"])
def test_truncated_images_raise(fmt, data):
    for cut in (0, 1, 2, 8, 100, len(data) // 2, len(data) - 2, len(data) - 1):
        # A JPEG cut after its first marker must be caught by the end-marker check: OpenCV 4.x
        # would decode it to a partly grey image.
        reason = "truncated JPEG" if fmt == "jpeg" and cut >= 2 else None
        with pytest.raises(ImageConversionError, match=reason):
            compressed_to_rgb(types.SimpleNamespace(format=fmt, data=data[:cut]))


@pytest.mark.parametrize("msg", [
    types.SimpleNamespace(format="jpeg"),
    types.SimpleNamespace(format=None, data=JPEG),
    types.SimpleNamespace(format="jpeg", data="not bytes"),
])
def test_malformed_compressed_messages_raise(msg):
    with pytest.raises(ImageConversionError):
        compressed_to_rgb(msg)


@st.composite
def corrupt_compressed(draw):
    """Random bytes, or a real JPEG/PNG truncated and with a few bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from([JPEG, PNG])))
    del data[draw(st.integers(0, len(data))):]
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(FUZZ, max_examples=FUZZ.max_examples // 5)
@given(corrupt_compressed(), st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8"]))
def test_corrupt_compressed_data_decodes_or_raises(data, fmt):
    try:
        out = compressed_to_rgb(types.SimpleNamespace(format=fmt, data=data))
    except ImageConversionError:
        return
    # Overwritten bytes inside a complete stream may still decode, to some image.
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8


# --- publishing and real messages -------------------------------------------------------

@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_rgb_to_image_fields_round_trips(encoding):
    view = RGB[::-1]  # a non-contiguous input must still be serialised in C order
    enc, height, width, step, data = rgb_to_image_fields(view, encoding)
    assert (enc, height, width, step, len(data)) == (encoding, H, W, 3 * W, H * W * 3)
    msg = types.SimpleNamespace(encoding=enc, height=height, width=width, step=step,
                                is_bigendian=0, data=data)
    np.testing.assert_array_equal(image_to_rgb(msg), view)


@pytest.mark.parametrize("rgb,encoding", [
    (RGB[..., 0], "rgb8"), (RGB.astype(np.float32), "rgb8"), (RGB, "mono8"),
    (np.zeros((2, 2, 4), np.uint8), "rgb8"), ([[0, 0, 0]], "rgb8")])
def test_rgb_to_image_fields_validates(rgb, encoding):
    with pytest.raises(ImageConversionError):
        rgb_to_image_fields(rgb, encoding)


def test_real_sensor_msgs():
    sensor_msgs = pytest.importorskip("sensor_msgs.msg", reason="needs ROS 2 (scripts/test)")
    for encoding in ("rgb8", "bgr8"):
        enc, height, width, step, data = rgb_to_image_fields(RGB, encoding)
        msg = sensor_msgs.Image(encoding=enc, height=height, width=width, step=step, data=data)
        out = image_to_rgb(msg)
        np.testing.assert_array_equal(out, RGB)
        # rgb8 gives a view on msg.data, which rclpy stores as a writable array.array.
        assert out.flags.writeable == (encoding == "bgr8")
    payload = yuv422(RGB, "uyvy")
    msg = sensor_msgs.Image(encoding="yuv422", height=H, width=W, step=payload.shape[1],
                            data=array.array("B", payload.tobytes()))
    check_close(image_to_rgb(msg), RGB, 3)
    png = sensor_msgs.CompressedImage(format="rgb8; png compressed bgr8",
                                      data=array.array("B", PNG))
    np.testing.assert_array_equal(compressed_to_rgb(png), RGB)
    with pytest.raises(ImageConversionError):
        compressed_to_rgb(sensor_msgs.CompressedImage(format="jpeg",
                                                      data=array.array("B", JPEG[:-10])))
