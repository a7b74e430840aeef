"""Generated hostile requests for tests/test_hostile.py (and bench/load.py): every case is made
here at import time from numpy/Pillow/OpenCV and a few hand-written headers, so no binary
fixture is checked in.

A ``Case`` is one request body and what every server must answer: a 200 with one entry per
row (``ok``), or a 4xx whose message matches ``message`` (which names the row for row-level
problems). ``mlflow_parses`` marks cases whose problem is in the request's shape: under
``mlflow models serve`` MLflow's own parser sees them first, so only "a 4xx without a stack
trace" is asked there; ``mlflow_only`` marks bodies only MLflow's server reads
(``dataframe_records``, ``instances``, ``inputs``): the others must refuse them with a 4xx.
``repeat`` sends a case that many times: every answer must be the same (a decoder that left
memory unwritten gave each send of a cut JPEG a different answer); ``either`` allows a 200 or
a 4xx (damaged data that may still decode), but the same one every time. Image URLs may point
at the slow test server through ``SLOW_SERVER``, replaced with its address when the case is
sent.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

SLOW_SERVER = "http://SLOW-SERVER"  # replaced by the slow server's address when sent
FEW = {"max_detections": 2}  # valid cases are about decoding, not about encoding 100 masks


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    body: Any  # a dict sent as JSON, or the exact str/bytes body
    ok: bool = False  # a valid request: 200 with ``rows`` entries
    message: str = ""  # regex the 4xx message must match (empty: any message)
    mlflow_parses: bool = False  # mlflow models serve answers it from its own request parser
    status: int | None = None  # a specific 4xx, when it matters (413)
    rows: int = 1
    slow: bool = False  # fetches from the slow server (needs it allow-listed)
    our_parser_only: bool = False  # a body only our parser (Azure's script, the pyfunc here) reads
    chunked: bool = False  # servers get it with no Content-Length (Transfer-Encoding: chunked)
    mlflow_only: bool = False  # a body only MLflow's server reads; the others answer a 4xx
    repeat: int = 1  # sent this many times: the answers must all be the same
    either: bool = False  # a 200 (``rows`` entries) or a 4xx, the same every time

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"

    def payload(self, slow_server: str = SLOW_SERVER) -> bytes:
        body = self.body if isinstance(self.body, (str, bytes)) else json.dumps(self.body)
        if isinstance(body, str):
            body = body.encode("utf-8", errors="surrogatepass")
        return body.replace(SLOW_SERVER.encode(), slow_server.encode())


def split(images: list, params: dict | None = None, index: list | None = None, **extra) -> dict:
    """MLflow's ``dataframe_split`` request, which both servers take."""
    body: dict = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
    if index is not None:
        body["dataframe_split"]["index"] = index
    if params is not None:
        body["params"] = params
    body.update(extra)
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- pictures -----------------------------------------------------------------------------------

def picture(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    """An RGB test picture with a horizontal gradient and a block (so orientation shows)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image[..., 1] = rng.integers(0, 60, (height, width))
    image[: max(1, height // 3), : max(1, width // 4), 2] = 255
    return image


def long_thin(width: int, height: int) -> np.ndarray:
    """A smooth picture (a few kilobytes as PNG however large) with a bright band to detect."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (np.arange(width) % 256).astype(np.uint8)[None, :]
    image[height // 3: 2 * height // 3, ::7, 1] = 255
    return image


def encoded(fmt: str, image: Image.Image | np.ndarray | None = None, **kwargs) -> bytes:
    if image is None:
        image = picture()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded("JPEG", picture(40, 24), exif=exif, quality=90)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares width x height (8-bit gray) with a tiny payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + (_png_chunk(b"IDAT", idat) if idat else b"")
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


def gif_screen_bomb(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen (the size Pillow reports) is width x height."""
    data = bytearray(encoded("GIF", Image.new("P", (1, 1))))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def tiff_bomb(width: int, height: int) -> bytes:
    """A little-endian TIFF declaring width x height, 8-bit gray, one strip of 4 bytes."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8 + 2 + 12 * 8 + 4), (278, 4, 1, height), (279, 4, 1, 4)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) if kind == 4 else
        struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 4


def bmp_bomb(width: int, height: int) -> bytes:
    data = bytearray(encoded("BMP", picture(4, 4)))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 frame header declares width x height."""
    data = bytearray(encoded("JPEG", picture(8, 8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_bomb(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header declares width x height (max 16384 each)."""
    data = bytearray(encoded("WEBP", picture(4, 4), lossless=True))
    at = data.index(b"VP8L") + 8 + 1  # the signature byte 0x2f, then 14+14 bits of size - 1
    bits = int.from_bytes(data[at:at + 4], "little")
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[at:at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def psd_header() -> bytes:
    return b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + b"\x00" * 64


def ico() -> bytes:
    return encoded("ICO", picture(16, 16))


def cmyk_jpeg() -> bytes:
    return encoded("JPEG", Image.fromarray(picture()).convert("CMYK"))


def png16(channels: int) -> bytes:
    import cv2

    image = (np.linspace(0, 65535, 48 * 32 * channels) % 65536).astype(np.uint16).reshape(32, 48, channels)
    return cv2.imencode(".png", image if channels > 1 else image[..., 0])[1].tobytes()


def animated_gif() -> bytes:
    frames = [Image.fromarray(picture(seed=s)).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def tiff_float() -> bytes:
    return encoded("TIFF", Image.fromarray(picture()[..., 0].astype(np.float32) / 255, mode="F"))


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# --- the cases -------------------------------------------------------------------------------------

GOOD = b64(encoded("PNG"))


def _shape_cases() -> list[Case]:
    f = "shape"
    ok_split = split([GOOD], FEW)
    cases = [
        Case(f, "not-json", "{not json", message="not valid JSON", mlflow_parses=True),
        Case(f, "empty-body", "", message="not valid JSON", mlflow_parses=True),
        Case(f, "json-array", "[1, 2]", message="must be a JSON object", mlflow_parses=True),
        Case(f, "json-string", '"image"', message="must be a JSON object", mlflow_parses=True),
        Case(f, "json-null", "null", message="must be a JSON object", mlflow_parses=True),
        Case(f, "empty-object", "{}", message="exactly one of", mlflow_parses=True),
        # MLflow's server ignores keys it does not know (input_data is Azure's): ours is stricter
        Case(f, "both-keys", {**ok_split, "input_data": ok_split["dataframe_split"]},
             message="exactly one of", our_parser_only=True),
        Case(f, "split-not-object", {"dataframe_split": [GOOD]}, message="must be an object"),
        Case(f, "no-image-column", {"dataframe_split": {"columns": ["picture"], "data": [[GOOD]]}},
             message="includes 'image'"),
        Case(f, "numeric-column", {"dataframe_split": {"columns": [1], "data": [[GOOD]]}},
             message="columns must be a list of distinct names"),
        Case(f, "list-column", {"dataframe_split": {"columns": [["image"]], "data": [[GOOD]]}},
             message="columns must be a list"),
        Case(f, "duplicate-columns", {"dataframe_split": {"columns": ["image", "image"], "data": [[GOOD, GOOD]]}},
             message="distinct"),
        # MLflow's parser answered a list or an object beside 'image' with a 500 (an unhashable
        # name), and a null, a number or a repeated other name with a 200; azmlinfsrv with a 400
        Case(f, "column-list-beside-image", {"dataframe_split": {"columns": [["a"], "image"], "data": [[1, GOOD]]}},
             message="columns must be a list of distinct names"),
        Case(f, "column-object-beside-image",
             {"dataframe_split": {"columns": [{"a": 1}, "image"], "data": [[1, GOOD]]}},
             message="columns must be a list of distinct names"),
        Case(f, "column-null-beside-image", {"dataframe_split": {"columns": [None, "image"], "data": [[1, GOOD]]}},
             message="columns must be a list of distinct names"),
        Case(f, "column-number-beside-image", {"dataframe_split": {"columns": [1, "image"], "data": [[1, GOOD]]}},
             message="columns must be a list of distinct names"),
        Case(f, "duplicate-other-columns",
             {"dataframe_split": {"columns": ["a", "a", "image"], "data": [[1, 2, GOOD]]}},
             message="distinct"),
        Case(f, "columns-string", {"dataframe_split": {"columns": "image", "data": [[GOOD]]}},
             message="columns must be a list"),
        Case(f, "empty-data", {"dataframe_split": {"columns": ["image"], "data": []}},
             message="non-empty list"),
        Case(f, "data-object", {"dataframe_split": {"columns": ["image"], "data": {"0": GOOD}}},
             message="non-empty list"),
        Case(f, "row-too-long", {"dataframe_split": {"columns": ["image"], "data": [[GOOD, GOOD]]}},
             message="row 0: expected a row of 1 value"),
        Case(f, "index-short", split([GOOD, GOOD], index=[0]), message="index must be a list as long"),
        Case(f, "index-nested-amplifies", split([GOOD], index=[list(range(100_000))]),
             message="index labels must be strings or numbers"),
        Case(f, "index-object", split([GOOD], index=[{"a": 1}]), message="index labels must be"),
        Case(f, "index-bool", split([GOOD], index=[True]), message="index labels must be"),
        Case(f, "index-labels-named", split(["%%%", GOOD], index=["cat-7", "dog"], params=FEW),
             message="row cat-7: not valid base64"),
        Case(f, "too-many-rows", split(["x"] * 65), message="65 images, over the limit of 64"),
        Case(f, "deep-json", deep(100_000), message="nested too deeply", mlflow_parses=True),
        Case(f, "deep-data", '{"dataframe_split": {"columns": ["image"], "data": ' + deep(50_000) + "}}",
             message="nested too deeply", mlflow_parses=True),
        Case(f, "deep-params", '{"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": '
             + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}", message="nested too deeply", mlflow_parses=True),
        Case(f, "invalid-utf8", b'{"dataframe_split": {"columns": ["image"], "data": [["\xff\xfe"]]}}',
             message="not valid JSON", mlflow_parses=True),
        Case(f, "lone-surrogate", '{"dataframe_split": {"columns": ["image"], "data": [["\\ud800"]]}}',
             message="row 0: not valid base64"),
        Case(f, "huge-number", '{"dataframe_split": {"columns": ["image"], "data": [[1' + "0" * 5000 + "]]}}",
             message="", mlflow_parses=True),
        Case(f, "input-data-form", {"input_data": {"columns": ["image"], "data": [GOOD]}, "params": FEW},
             ok=True, our_parser_only=True),
        Case(f, "flat-data", {"dataframe_split": {"columns": ["image"], "data": [GOOD]}, "params": FEW},
             ok=True, our_parser_only=True),
    ]
    for name, value, problem in [
        ("image-number", 7, "row 0: the 'image' value must be a base64 string"),
        ("image-null", None, "row 0: the 'image' value must be a base64 string"),
        ("image-list", [GOOD], "row 0: the 'image' value must be a base64 string"),
        ("image-object", {"b64": GOOD}, "row 0: the 'image' value must be a base64 string"),
        ("image-bool", True, "row 0: the 'image' value must be a base64 string"),
    ]:
        cases.append(Case(f, name, split([value]), message=problem))
    return cases


def _mlflow_form_cases() -> list[Case]:
    """The request forms only ``mlflow models serve`` reads (records, TF-serving ``instances`` /
    ``inputs``): a 4xx naming the problem where MLflow's own parser made a 500, a silent drop
    or a 200 of a guess; the valid forms still answer."""
    f = "mlflow-form"
    records_keys = r"dataframe_records\[1\] has the keys .* every record must have the same keys"
    cases = [
        Case(f, "records", {"dataframe_records": [{"image": GOOD}], "params": FEW}, ok=True, mlflow_only=True),
        Case(f, "records-mixed-keys", {"dataframe_records": [{"image": GOOD}, {"picture": GOOD}]},
             message=records_keys, mlflow_only=True),
        Case(f, "records-extra-key-in-one", {"dataframe_records": [{"image": GOOD}, {"image": GOOD, "x": 1}]},
             message=records_keys, mlflow_only=True),
        Case(f, "records-not-objects", {"dataframe_records": [GOOD]},
             message=r"dataframe_records\[0\] must be an object", mlflow_only=True),
        Case(f, "records-no-image", {"dataframe_records": [{"picture": GOOD}]},
             message="include 'image'", mlflow_only=True),
        Case(f, "instances-images", {"instances": [GOOD, GOOD], "params": FEW}, ok=True, rows=2, mlflow_only=True),
        Case(f, "instances-records", {"instances": [{"image": GOOD}], "params": FEW}, ok=True, mlflow_only=True),
        Case(f, "inputs-columns", {"inputs": {"image": [GOOD]}, "params": FEW}, ok=True, mlflow_only=True),
        Case(f, "instances-mixed-keys", {"instances": [{"image": GOOD}, {"picture": GOOD}]},
             message=r"instances\[1\] has the keys .* every record must have the same keys", mlflow_only=True),
        Case(f, "inputs-images-and-records", {"inputs": [GOOD, {"image": GOOD}]},
             message=r"inputs must be a list of images or a list of records, not both", mlflow_only=True),
        Case(f, "inputs-ragged-columns", {"inputs": {"image": [GOOD], "b": [1, 2]}},
             message=r"inputs\['b'\] has 2 values, inputs\['image'\] 1", mlflow_only=True),
        Case(f, "inputs-column-not-a-list", {"inputs": {"image": [GOOD], "b": {"c": 1}}},
             message=r"inputs\['b'\] must be a list", mlflow_only=True),
        Case(f, "inputs-no-image", {"inputs": {"picture": [GOOD]}}, message="include 'image'", mlflow_only=True),
        Case(f, "inputs-number", {"inputs": 5},
             message="inputs must be a list of images, a list of records or an object of columns",
             mlflow_only=True),
        Case(f, "instances-empty", {"instances": []}, message="instances must not be empty", mlflow_only=True),
    ]
    return cases


def _base64_cases() -> list[Case]:
    f = "base64"
    raw = encoded("PNG")
    good = b64(raw)
    return [
        Case(f, "invalid-chars", split(["%%%%"]), message="row 0: not valid base64"),
        Case(f, "only-padding", split(["===="]), message="row 0: (not valid base64|empty image)"),
        Case(f, "whitespace", split(["   \n\t "]), message="row 0: empty image string"),
        Case(f, "empty-string", split([""]), message="row 0: empty image string"),
        Case(f, "text-not-image", split([b64(b"hello, I am not a picture")]), message="row 0: not an image"),
        Case(f, "empty-bytes-data-uri", split(["data:image/png;base64,"]), message="row 0: (empty image|not valid)"),
        Case(f, "bad-data-uri", split(["data:image/png;base64,%%%"]), message="row 0: not valid base64"),
        Case(f, "non-ascii", split(["\u00e9\u00e9\u00e9\u00e9"]), message="row 0: not valid base64"),
        Case(f, "long-invalid", split(["!" * 200_000]), message="row 0: not valid base64"),
        Case(f, "mixed-alphabets", split([good[:8] + "-_" + good[10:]]), message="row 0: "),
        Case(f, "second-row-bad", split([good, "%%%"], params=FEW), message="row 1: not valid base64"),
        Case(f, "data-uri", split(["data:image/png;base64," + good], FEW), ok=True),
        Case(f, "url-safe-unpadded", split([base64.urlsafe_b64encode(raw).decode().rstrip("=")], FEW), ok=True),
        Case(f, "mime-lines", split(["\r\n".join(good[i:i + 76] for i in range(0, len(good), 76))], FEW), ok=True),
        Case(f, "missing-padding", split([good.rstrip("=")], FEW), ok=True),
    ]


ACCEPTED = {
    "jpeg": lambda: encoded("JPEG"),
    "jpeg-progressive": lambda: encoded("JPEG", progressive=True),
    "png": lambda: encoded("PNG"),
    "png-text-chunk": lambda: _png_with_text_chunk(),
    "webp-lossy": lambda: encoded("WEBP"),
    "webp-lossless": lambda: encoded("WEBP", lossless=True),
    "bmp": lambda: encoded("BMP"),
    "bmp-palette": lambda: encoded("BMP", Image.fromarray(picture()).convert("P")),
    "tiff": lambda: encoded("TIFF"),
    "tiff-lzw": lambda: encoded("TIFF", compression="tiff_lzw"),
    "gif": lambda: encoded("GIF"),
    "gif-animated": animated_gif,
    "mpo": lambda: encoded("MPO", Image.fromarray(picture())),
}

REFUSED = {
    "ppm": lambda: encoded("PPM"),
    "pgm": lambda: encoded("PPM", Image.fromarray(picture()).convert("L")),
    "ico": ico,
    "pcx": lambda: encoded("PCX"),
    "tga": lambda: encoded("TGA"),
    "pdf": lambda: encoded("PDF"),
    "im": lambda: encoded("IM"),
    "sgi": lambda: encoded("SGI"),
    "xbm": lambda: encoded("XBM", Image.fromarray(picture()).convert("1")),
    "dds": lambda: encoded("DDS", Image.fromarray(picture()).convert("RGBA")),
    "jpeg2000": lambda: encoded("JPEG2000"),
    "psd-header": psd_header,
    "svg-text": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "eps-text": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "heic-header": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    "html": lambda: b"<html><body>not a picture</body></html>",
    "zip": lambda: b"PK\x03\x04" + b"\x00" * 60,
    "elf": lambda: b"\x7fELF\x02\x01\x01" + b"\x00" * 60,
}


def _png_with_text_chunk() -> bytes:
    """A PNG with an ancillary tEXt chunk before its image data (decoders must skip it)."""
    import cv2

    data = cv2.imencode(".png", picture()[:, :, ::-1])[1].tobytes()
    return data[:33] + _png_chunk(b"tEXt", b"Comment\x00hostile but harmless") + data[33:]


def _format_cases() -> list[Case]:
    f = "format"
    cases = [Case(f, f"accepted-{name}", split([b64(make())], FEW), ok=True) for name, make in ACCEPTED.items()]
    for name, make in REFUSED.items():
        try:
            data = make()
        except (OSError, KeyError, ValueError):  # a Pillow built without that writer
            continue
        cases.append(Case(f, f"refused-{name}", split([b64(data)], index=[3]),
                          message=r"row 3: not an image \(\d+ bytes in no format we can read; we accept"))
    return cases


def _bomb_cases() -> list[Case]:
    f = "bomb"
    over = r"row 0: image is (\d+x\d+ = )?\d+ pixels, over the limit"
    return [
        Case(f, "png-100k-square", split([b64(png_bomb(100_000, 100_000))]), message=over),
        Case(f, "png-1-by-60M", split([b64(png_bomb(60_000_000, 1))]), message=over),
        Case(f, "png-max-ihdr", split([b64(png_bomb(2 ** 31 - 1, 2 ** 31 - 1))]), message="row 0: "),
        Case(f, "png-zero-size", split([b64(png_bomb(0, 10))]), message="row 0: "),
        Case(f, "png-real-zlib-bomb", split([b64(encoded("PNG", Image.new("1", (8000, 8000))))]), message=over),
        Case(f, "gif-screen", split([b64(gif_screen_bomb(65535, 65535))]), message=over),
        Case(f, "tiff-100k-square", split([b64(tiff_bomb(100_000, 100_000))]), message=over),
        Case(f, "bmp-50k-square", split([b64(bmp_bomb(50_000, 50_000))]), message=over),
        Case(f, "bmp-negative-height", split([b64(bmp_bomb(50_000, -50_000))]), message="row 0: "),
        Case(f, "jpeg-sof-65500", split([b64(jpeg_bomb(65_500, 65_500))]), message=over),
        Case(f, "webp-16k-square", split([b64(webp_bomb(16_384, 16_384))]), message=over),
    ]


def _truncation_cases() -> list[Case]:
    f = "truncated"
    ends_early = "row 9: the image data ends early"
    cases = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        data = encoded(fmt, picture(64, 48))
        for name, cut in (("header", 12), ("half", len(data) // 2)):
            # a baseline JPEG cut in half was a 200 whose missing rows were whatever memory
            # OpenCV's decoder was given: refused now, as every format is
            cases.append(Case(f, f"{fmt.lower()}-{name}", split([b64(data[:cut])], index=[9]),
                              message=ends_early))
    png = bytearray(encoded("PNG", picture(64, 48)))
    png[-20] ^= 0xFF  # inside the last IDAT: its CRC no longer matches
    cases.append(Case(f, "png-bad-crc", split([b64(bytes(png))], index=[9]),
                      message="row 9: (not an image|corrupt or truncated)"))
    # uploads that stopped at 35, 60 and 85 %, of every accepted format and a photo-sized JPEG,
    # each sent three times: the same refusal every time
    for name, data in damage_seeds().items():
        # an animated GIF's first frame (the one decoded) is its first third: cut after it, the
        # picture is whole and decodes (below)
        for share in (10, 20, 30) if name == "gif-animated" else (35, 60, 85):
            cases.append(Case(f, f"{name}-{share}pc", split([b64(data[:len(data) * share // 100])], index=[9]),
                              message=ends_early, repeat=3))
    animated = damage_seeds()["gif-animated"]
    cases.append(Case(f, "gif-animated-cut-after-first-frame", split([b64(animated[:len(animated) * 85 // 100])], FEW),
                      ok=True, repeat=3))
    cases.append(Case(f, "jpeg-no-end-marker", split([b64(damage_seeds()["jpeg-640x480"][:-2])], index=[9]),
                      message=ends_early, repeat=3))
    return cases


def damage_seeds() -> dict[str, bytes]:
    """Every accepted format, and a baseline JPEG whose decode is photo-sized (640x480)."""
    return {**{name: make() for name, make in ACCEPTED.items()},
            "jpeg-640x480": encoded("JPEG", picture(640, 480, 1), quality=90)}


def _damage_cases() -> list[Case]:
    """Bits flipped in the headers and in the compressed pixels of every accepted format (a
    fixed seed): refused or decoded, but the same answer to each of three sends."""
    import random

    f = "damaged"
    rng = random.Random(23)
    cases = []
    for name, data in damage_seeds().items():
        for where, low, high in (("header", 0, min(200, len(data))), ("data", min(200, len(data) - 1), len(data))):
            for k in range(2):
                flipped = bytearray(data)
                for _ in range(3):
                    flipped[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
                cases.append(Case(f, f"{name}-{where}-flip-{k}", split([b64(bytes(flipped))], FEW),
                                  either=True, repeat=3))
    return cases


def _mode_cases() -> list[Case]:
    f = "mode"
    rgb = Image.fromarray(picture())
    palette_alpha = rgb.convert("P")
    palette_alpha.info["transparency"] = 0
    ok = {
        "cmyk-jpeg": cmyk_jpeg(),
        "gray-jpeg": encoded("JPEG", rgb.convert("L")),
        "png-16bit-gray": png16(1),
        "png-16bit-rgb": png16(3),
        "png-16bit-rgba": png16(4),
        "png-palette": encoded("PNG", rgb.convert("P")),
        "png-palette-alpha": encoded("PNG", palette_alpha),
        "png-la": encoded("PNG", rgb.convert("LA")),
        "png-rgba": encoded("PNG", rgb.convert("RGBA")),
        "png-1bit": encoded("PNG", rgb.convert("1")),
        "webp-rgba": encoded("WEBP", rgb.convert("RGBA")),
        "tiff-cmyk": encoded("TIFF", rgb.convert("CMYK")),
        "tiff-16bit": encoded("TIFF", Image.fromarray((picture()[..., 0].astype(np.uint16) * 257), mode="I;16")),
        "gif-gray": encoded("GIF", rgb.convert("L")),
        "one-pixel": encoded("PNG", picture(1, 1)),
        # thin, but a pixel thick at the input of the suite's tiny model (helpers.TINY_TEST_SCALE)
        "four-by-2000": encoded("PNG", picture(4, 2000)),
        "wide-3000x6": encoded("PNG", picture(3000, 6)),
        "tall-4x2500": encoded("PNG", picture(4, 2500)),
    }
    cases = [Case(f, name, split([b64(data)], FEW), ok=True) for name, data in ok.items()]
    # masks of a long, thin image: mmdet's way upsamples each to 50000x50000 float32 (9.3 GiB,
    # over the servers' address-space limit), the windowed way to 50000x500 (score_threshold 0:
    # the random test model must detect something, or no mask is made)
    cases.append(Case(f, "long-thin-50000x500", split([b64(encoded("PNG", long_thin(50000, 500)))],
                                                      {"max_detections": 2, "score_threshold": 0.0}), ok=True))
    cases += [Case(f, f"exif-orientation-{o}", split([b64(with_exif_orientation(o))], FEW), ok=True)
              for o in range(1, 9)]
    cases += [
        Case(f, "exif-orientation-invalid", split([b64(with_exif_orientation(9))], FEW), ok=True),
        Case(f, "one-by-2000", split([b64(encoded("PNG", picture(2000, 1)))], index=[5]),
             message=r"row 5: image is 2000x1: too thin for the model"),
        Case(f, "2000-by-one", split([b64(encoded("PNG", picture(1, 2000)))], index=[5]),
             message=r"row 5: image is 1x2000: too thin"),
        Case(f, "wide-12000x4", split([b64(encoded("PNG", picture(12000, 4)))]), message="row 0: .*too thin"),
        # OpenCV reads no 32-bit float TIFF (nor does mmdet): refused, not a crash
        Case(f, "tiff-float", split([b64(tiff_float())]), message="row 0: corrupt or truncated TIFF"),
    ]
    return cases


def _param_cases() -> list[Case]:
    f = "params"
    image = [GOOD]
    cases = []
    for name, params, message in [
        ("threshold-string-word", {"score_threshold": "high"}, "score_threshold"),
        ("threshold-negative", {"score_threshold": -0.1}, "score_threshold"),
        ("threshold-above-one", {"score_threshold": 1.5}, "score_threshold"),
        ("threshold-list", {"score_threshold": [0.5]}, "score_threshold"),
        ("threshold-object", {"score_threshold": {"v": 1}}, "score_threshold"),
        ("threshold-null", {"score_threshold": None}, "score_threshold"),
        ("iou-huge", {"iou_threshold": 1e308}, "iou_threshold"),
        ("max-detections-zero", {"max_detections": 0}, "max_detections"),
        ("max-detections-over", {"max_detections": 10_001}, "max_detections"),
        ("max-detections-fraction", {"max_detections": 2.5}, "max_detections"),
        ("max-detections-huge", {"max_detections": 10 ** 30}, "max_detections"),
        ("max-detections-word", {"max_detections": "many"}, "max_detections"),
        ("mask-threshold-bool", {"mask_threshold": True}, "mask_threshold"),
        ("tolerance-negative", {"polygon_tolerance": -1}, "polygon_tolerance"),
        ("agnostic-yes", {"class_agnostic_nms": "yes"}, "class_agnostic_nms"),
        ("agnostic-number", {"class_agnostic_nms": 2}, "class_agnostic_nms"),
        ("unknown-typo", {"score_thresold": 0.9}, "unknown param 'score_thresold'; known params: score_threshold"),
        ("unknown-many", {"a": 1, "b": 2}, "unknown param"),
        ("unknown-empty-name", {"": 1}, "unknown param"),
        ("tile-grid-zero", {"tile_grid_size": "0x4"}, "tile_grid_size"),
        ("tile-grid-word", {"tile_grid_size": "4by4"}, "tile_grid_size"),
        ("tile-grid-too-many", {"tile_grid_size": "100x100"}, "tile_grid_size"),
        ("tile-grid-number", {"tile_grid_size": 4}, "tile_grid_size"),
        ("tile-grid-list", {"tile_grid_size": ["2x2"]}, "tile_grid_size"),
        ("tile-overlap-one", {"tile_overlap_ratio": 1}, "tile_overlap_ratio"),
        ("tile-overlap-negative", {"tile_overlap_ratio": -0.5}, "tile_overlap_ratio"),
        ("tile-nms-above-one", {"tile_predictions_nms_thresh": 2}, "tile_predictions_nms_thresh"),
        # answer formats: every server answers these with our message, naming the param
        ("mask-format-unknown", {"mask_format": "mask"}, "param 'mask_format' must be one of 'polygon', 'rle', 'none'"),
        ("mask-format-list", {"mask_format": ["rle"]}, "mask_format"),
        ("mask-format-case", {"mask_format": "RLE"}, "param 'mask_format' must be one of"),
        ("classes-empty-list", {"classes": []}, "param 'classes' is empty"),
        ("classes-empty-string", {"classes": ""}, "param 'classes' is empty"),
        ("classes-empty-name", {"classes": "person,,car"}, "param 'classes' has an empty name"),
        ("classes-unknown", {"classes": ["person", "unicorn"]},
         "param 'classes' names a class this model does not have: 'unicorn'; the model's classes: person, bicycle, car"),
        ("classes-unknown-in-string", {"classes": "person, Unicorn"}, "does not have: 'Unicorn'"),
        ("classes-number", {"classes": 7}, "param 'classes' must be a list of class names"),
        ("classes-not-strings", {"classes": ["person", 3]}, "param 'classes' must be a list of class names"),
        ("classes-ragged", {"classes": ["person", ["car"]]}, "param 'classes' must be a list of class names"),
        ("classes-object", {"classes": {"person": True}}, "param 'classes' must be a list of class names"),
        ("classes-nothing", {"classes": None}, "param 'classes' must be a list of class names"),
        ("classes-too-many", {"classes": ["person"] * 20_000}, "param 'classes' names 20000 classes, over the limit"),
        ("params-list", [1], "'params' must be a JSON object"),
        ("params-string", "score_threshold=0.5", "'params' must be a JSON object"),
    ]:
        cases.append(Case(f, name, split(image, params), message=message,
                          mlflow_parses=name.startswith("params-") or "null" in name))
    cases += [
        Case(f, "nan", '{"dataframe_split": {"columns": ["image"], "data": [["x"]]}, '
                       '"params": {"score_threshold": NaN}}', message="", mlflow_parses=True),
        Case(f, "infinity", '{"dataframe_split": {"columns": ["image"], "data": [["x"]]}, '
                            '"params": {"score_threshold": Infinity}}', message="", mlflow_parses=True),
        Case(f, "work-cap", split([b64(encoded("PNG", picture(1000, 1000)))], {"max_detections": 10_000}),
             message=r"row 0: max_detections 10000 x 1000x1000 pixels = \d+ mask pixels, over the limit"),
        # MLflow checks params against the signature's types before our model sees them: a
        # number or a boolean sent as a string is refused, naming the param (PredictParams itself
        # takes strings, for the CLI's and batch jobs' settings)
        Case(f, "strings-that-parse", split(image, {"score_threshold": "0.4", "max_detections": "2"}),
             message="(score_threshold|max_detections).*Can not safely convert"),
        Case(f, "boolean-as-string", split(image, {"class_agnostic_nms": "true", "max_detections": 2}),
             message="class_agnostic_nms.*Can not safely convert"),
        Case(f, "all-valid", split(image, {"score_threshold": 0.2, "iou_threshold": 0.5, "max_detections": 2,
                                           "mask_threshold": 0.4, "polygon_tolerance": 0,
                                           "class_agnostic_nms": True}), ok=True),
        Case(f, "integers-for-floats", split(image, {"score_threshold": 0, "max_detections": 1}), ok=True),
        # tiling: a picture smaller than a tile, a grid finer than the picture (clipped), a
        # large picture, and one too thin for the model with or without tiles
        Case(f, "tiled-small-picture", split(image, {"tile_grid_size": "4x4", **FEW}), ok=True),
        Case(f, "tiled-large-picture", split([b64(encoded("PNG", long_thin(1600, 1200)))],
                                             {"tile_grid_size": "3x3", "tile_overlap_ratio": 0.5, **FEW}),
             ok=True),
        Case(f, "tiled-finer-than-picture", split([b64(encoded("PNG", picture(100, 70)))],
                                                  {"tile_grid_size": "8x8", **FEW}), ok=True),
        Case(f, "tiled-one-pixel-high", split([b64(encoded("PNG", long_thin(1500, 1)))],
                                              {"tile_grid_size": "2x2", **FEW}), message="row 0: image is 1500x1: too thin"),
        Case(f, "formats-rle-classes-list", split(image, {"mask_format": "rle", "classes": ["person", "car"],
                                                          "max_detections": 2, "score_threshold": 0.0}), ok=True),
        Case(f, "formats-none-classes-string", split(image, {"mask_format": "none", "classes": "person, car",
                                                             "max_detections": 2}), ok=True),
        # the merge of 65 passes x 10000 detections: refused before any pass, naming what to change
        Case(f, "tiled-over-the-merge-budget", split([b64(encoded("JPEG", picture(1200, 1200)))],
                                                     {"tile_grid_size": "8x8", "max_detections": 10_000,
                                                      "score_threshold": 0.0, "mask_format": "none"}),
             message=r"row 0: .*65 passes x max_detections 10000 = 650000 detections to merge, over the "
                     r"limit of \d+ \(MMDET_MLFLOW_MAX_TILE_CANDIDATES\); lower max_detections or use a "
                     r"coarser tile_grid_size"),
    ]
    return cases


SSRF = {
    "loopback": "http://127.0.0.1:9/a.png",
    "loopback-short": "http://127.1/a.png",
    "loopback-decimal": "http://2130706433/a.png",
    "loopback-octal": "http://0177.0.0.1/a.png",
    "loopback-hex": "http://0x7f.0.0.1/a.png",
    "loopback-ipv6": "http://[::1]/a.png",
    "loopback-ipv4-mapped": "http://[::ffff:127.0.0.1]/a.png",
    "loopback-ipv4-compatible": "http://[::127.0.0.1]/a.png",
    "unspecified": "http://0.0.0.0/a.png",
    "private-10": "http://10.0.0.7/a.png",
    "private-172": "http://172.16.0.1/a.png",
    "private-192": "http://192.168.1.1/a.png",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "metadata-decimal": "http://2852039166/latest/meta-data/",
    "metadata-mapped": "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "metadata-nat64": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "link-local-ipv6": "http://[fe80::1]/a.png",
    "unique-local-ipv6": "http://[fc00::1]/a.png",
    "shared-cgnat": "http://100.64.0.1/a.png",
    "multicast": "http://224.0.0.1/a.png",
    "reserved": "http://240.0.0.1/a.png",
    "https-private": "https://10.1.2.3/a.png",
}


def _url_cases() -> list[Case]:
    f = "url"
    cases = [Case(f, f"ssrf-{name}", split([url], index=[2]),
                  message=r"row 2: refusing to fetch .* is a [\w-]+ address") for name, url in SSRF.items()]
    cases += [
        Case(f, "scheme-ftp", split(["ftp://example.com/a.png"]), message="row 0: not valid base64"),
        Case(f, "scheme-file", split(["file:///etc/passwd"]), message="row 0: not valid base64"),
        Case(f, "scheme-gopher", split(["gopher://127.0.0.1:70/_x"]), message="row 0: not valid base64"),
        Case(f, "credentials", split(["http://user:secret@10.0.0.1/a.png"]),
             message="row 0: URLs with credentials are not fetched"),
        Case(f, "bad-port", split(["http://127.0.0.1:99999/a.png"]), message="row 0: not a valid URL"),
        Case(f, "no-host", split(["http:///a.png"]), message="row 0: only http"),
        # the slow test server on 127.0.0.1, allow-listed by name (localhost) for these only
        Case(f, "slow-drip-headers", split([f"{SLOW_SERVER}/drip-headers"]),
             message=r"row 0: fetching .* took longer than", slow=True),
        Case(f, "slow-endless-body", split([f"{SLOW_SERVER}/endless"]),
             message=r"row 0: .*(took longer than|is larger than \d+ bytes)", slow=True),
        Case(f, "slow-budget-shared", split([f"{SLOW_SERVER}/late"] * 4, FEW),
             message=r"row [123]: fetching .*FETCH_REQUEST_BUDGET", slow=True),
        Case(f, "slow-superscript-length", split([f"{SLOW_SERVER}/superscript-length"], FEW), ok=True, slow=True),
        Case(f, "slow-not-found", split([f"{SLOW_SERVER}/missing"]), message="row 0: fetching .*HTTP 404", slow=True),
        Case(f, "slow-redirect-metadata", split([f"{SLOW_SERVER}/redirect-metadata"]),
             message="row 0: refusing to fetch .*169.254.169.254 is a link-local", slow=True),
        Case(f, "slow-declared-huge", split([f"{SLOW_SERVER}/declared-huge"]),
             message="row 0: .* over the limit of", slow=True),
        Case(f, "slow-not-an-image", split([f"{SLOW_SERVER}/text"]), message="row 0: not an image", slow=True),
    ]
    return cases


OVERSIZED_LIMIT = 2 * 1024 * 1024  # MMDET_MLFLOW_MAX_REQUEST_BYTES of the suite's Azure server


def _oversized_cases() -> list[Case]:
    f = "oversized"
    junk = "A" * (OVERSIZED_LIMIT + 10)
    return [
        Case(f, "body-over-limit", split([junk]), status=413, message="over the limit of"),
        Case(f, "body-over-limit-chunked", split([junk]), status=413, message="over the limit of",
             chunked=True),
        Case(f, "many-junk-rows", split(["QUFB" * 1000] * 64), message="row 0: not an image"),
        Case(f, "rows-and-index-over", split(["x"] * 200, index=list(range(200))),
             message="200 images, over the limit of 64"),
        Case(f, "long-index-label", split(["%%%"], index=["L" * 100_000]), message="row L+"),
    ]


def all_cases() -> list[Case]:
    cases = (_shape_cases() + _base64_cases() + _format_cases() + _bomb_cases() + _truncation_cases()
             + _damage_cases() + _mlflow_form_cases() + _mode_cases() + _param_cases() + _url_cases()
             + _oversized_cases())
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), "case names must be unique"
    return cases
