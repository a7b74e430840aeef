"""The one decoder: every way a request can carry an image gives mmdet's own pixels, and every
bad input is an InputError naming its row."""
from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import b64, scene_image
from hostile_cases import gif_screen_bomb, png_bomb, tiff_bomb
from PIL import Image

from scoring.decode import decode_image
from scoring.errors import InputError


def test_base64_variants_and_bytes_decode_to_the_same_bgr_pixels(image_files):
    raw = image_files[0].read_bytes()
    text = base64.b64encode(raw).decode()
    expected = cv2.imread(str(image_files[0]), cv2.IMREAD_COLOR)  # BGR, as mmdet reads files
    variants = [
        text,
        "data:image/png;base64," + text,
        "\n".join(text[i:i + 76] for i in range(0, len(text), 76)),  # MIME line breaks
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw,
    ]
    for value in variants:
        assert np.array_equal(decode_image(value, row=0), expected)


def test_channel_order_is_bgr_like_mmdet():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    pixels = decode_image(buf.getvalue())
    assert pixels[0, 0].tolist() == [0, 0, 255]  # B, G, R


def test_exif_orientation_is_applied(tmp_path):
    picture = scene_image(128, 64, 3)[:, :, ::-1]  # RGB, wider than tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "JPEG", quality=95, exif=exif)
    pixels = decode_image(buf.getvalue())
    assert pixels.shape == (128, 64, 3)
    upright = np.asarray(Image.open(io.BytesIO(buf.getvalue())).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(pixels[:, :, ::-1].astype(int) - upright.astype(int)).mean() < 3


@pytest.mark.parametrize("value, problem", [
    ("not base64 at all!", "not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "not an image"),
    ("", "empty image string"),
    (None, "got nothing"),
    (12, "got int"),
    ("ftp://example.com/a.png", "not valid base64"),
])
def test_bad_values_name_the_row_and_the_problem(value, problem):
    with pytest.raises(InputError) as err:
        decode_image(value, row=7)
    assert str(err.value).startswith("row 7: ") and problem in str(err.value)


def test_truncated_image_is_an_input_error(image_files):
    data = image_files[0].read_bytes()
    with pytest.raises(InputError, match="row 3: "):
        decode_image(data[: len(data) // 3], row=3)


def test_decompression_bomb_is_refused_from_the_header():
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, "PNG")  # tiny file, 144 megapixels
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(InputError, match="over the limit"):
        decode_image(buf.getvalue(), row=0)


def test_pyfunc_errors_name_the_row_and_are_bad_request(tiny_model_dir, image_files):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(tiny_model_dir))
    good = b64(image_files[0])
    cases = [
        (pd.DataFrame({"image": [good, "%%%"]}, index=[10, 11]), "row 11: not valid base64"),
        (pd.DataFrame({"image": pd.Series([], dtype=str)}), "no rows"),
    ]
    for frame, message in cases:
        with pytest.raises(MlflowException) as err:
            model.predict(frame)
        assert message in err.value.message
        assert err.value.get_http_status_code() == 400
    for params, message in [({"score_threshold": 1.5}, "between 0.0 and 1.0"),
                            ({"max_detections": 0}, "between 1 and")]:
        with pytest.raises(MlflowException) as err:
            model.predict(pd.DataFrame({"image": [good]}), params=params)
        assert message in err.value.message and err.value.get_http_status_code() == 400


# --- data cut short: refused, never completed from memory --------------------------------------

def _cut(data: bytes, share: float) -> bytes:
    return data[: int(len(data) * share)]


@pytest.mark.parametrize("share", [0.35, 0.6, 0.85])
def test_a_cut_baseline_jpeg_is_refused_not_completed_with_whatever_memory_held(share):
    # OpenCV decodes the rows a cut baseline JPEG reaches and returns the others as the memory
    # it allocated held: five decodes of the same bytes gave five different arrays
    from hostile_cases import encoded, picture

    data = _cut(encoded("JPEG", picture(640, 480, 1)), share)
    for _ in range(3):
        with pytest.raises(InputError, match=r"^row 3: the image data ends early: the JPEG "):
            decode_image(data, row=3)


@pytest.mark.parametrize("name", ["jpeg", "jpeg-progressive", "png", "webp-lossy", "webp-lossless", "bmp",
                                  "bmp-palette", "tiff", "tiff-lzw", "gif", "mpo"])
@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_every_accepted_format_cut_short_says_the_data_ends_early(name, share):
    from hostile_cases import ACCEPTED

    data = _cut(ACCEPTED[name](), share)
    with pytest.raises(InputError, match=r"^row 4: the image data ends early"):
        decode_image(data, row=4)


def test_a_jpeg_missing_only_its_end_marker_is_refused_and_bytes_after_it_are_ignored():
    from hostile_cases import encoded, picture

    whole = encoded("JPEG", picture(64, 48))
    assert whole.endswith(b"\xff\xd9")
    for cut in (whole[:-1], whole[:-2]):
        with pytest.raises(InputError, match="the image data ends early: the JPEG"):
            decode_image(cut)
    # padding and a second picture after the end marker are not part of the first picture
    expected = decode_image(whole)
    assert np.array_equal(decode_image(whole + b"\x00" * 100), expected)
    assert np.array_equal(decode_image(whole + whole), expected)


def test_a_jpeg_damaged_inside_its_scan_decodes_to_the_same_pixels_every_time():
    # complete data with flipped bits: libjpeg fills what it cannot decode with a fixed gray
    from hostile_cases import encoded, picture

    data = bytearray(encoded("JPEG", picture(256, 192, 2)))
    scan = data.index(b"\xff\xda")
    for at in range(scan + 40, len(data) - 2, 97):
        data[at] ^= 0x5A
    data = bytes(data).replace(b"\xff\xd9", b"\xff\x00")[:-2] + b"\xff\xd9"  # no early end marker
    outcomes = set()
    for _ in range(5):
        try:
            outcomes.add(decode_image(data).tobytes())
        except InputError as err:
            outcomes.add(str(err))
    assert len(outcomes) == 1


def test_a_png_cut_inside_its_header_says_the_data_ends_early():
    from hostile_cases import encoded

    with pytest.raises(InputError, match="row 0: the image data ends early"):
        decode_image(encoded("PNG")[:20], row=0)


# Formats: an explicit list, sizes checked from every header

def _saved(fmt: str, mode: str = "RGB", size=(20, 10), **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    _saved("PPM"), _saved("ICO", size=(16, 16)), _saved("PCX"), _saved("TGA"), _saved("PDF"),
    _saved("IM"), _saved("SGI"), _saved("XBM", "1"), b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03",
], ids=["ppm", "ico", "pcx", "tga", "pdf", "im", "sgi", "xbm", "svg", "psd"])
def test_formats_outside_the_list_are_refused(data):
    from scoring.decode import decode_image

    with pytest.raises(InputError, match="row 2: not an image .*we accept JPEG, PNG, WEBP, BMP, TIFF, GIF"):
        decode_image(data, row=2)


@pytest.mark.parametrize("data", [gif_screen_bomb(65535, 65535), tiff_bomb(100_000, 100_000),
                                  png_bomb(100_000, 100_000)], ids=["gif-screen", "tiff", "png"])
def test_every_accepted_format_is_size_checked_before_decoding(data):
    from scoring.decode import decode_image

    with pytest.raises(InputError, match="over the limit of 50000000"):
        decode_image(data, row=0)
