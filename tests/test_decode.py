"""The one decoder: every way a request can carry an image gives mmdet's own pixels, and every
bad input is an InputError naming its row."""
from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import b64, scene_image
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
