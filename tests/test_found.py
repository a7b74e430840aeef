"""Issue 11's found items, one test each (each fails without its fix): memory of long thin
images, row amplification, the URL deadline and budget, 500s that must be 400s, params and the
work cap, formats, batch records and resume, and work that outlives its request."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import scene_image
from hostile_cases import encoded, gif_screen_bomb, picture, png_bomb, tiff_bomb
from slow_server import slow_server as serving
from scoring import settings
from scoring.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


# --- 1. memory from long, thin images ---------------------------------------------------------

MASKS_UNDER_AN_ADDRESS_SPACE_LIMIT = textwrap.dedent("""
    import resource, sys
    import torch
    from scoring.runtimes.torch_rtmdet import MaskResampler

    # What the tiny RTMDet-Ins gives a 70000x700 image: resized to 640x6 and padded to 640x640,
    # 80x80 mask logits at stride 8. mmdet's way upsamples them to 70000x70000 (19.5 GiB).
    width, height, detections = 70000, 700, 3
    new_w, new_h = 640, 6
    logits = torch.randn(detections, 80, 80, generator=torch.Generator().manual_seed(0))
    resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    count = 0
    for mask in resampler.iter_masks(logits, 0.5):
        assert mask.shape == (height, width) and mask.dtype == bool, mask.shape
        count += 1
    print("masks", count)
""")


def _address_space_now() -> int:
    """The address space (VmPeak) a Python that imported torch takes, measured, not guessed."""
    probe = "import torch, scoring.runtimes.torch_rtmdet; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300, check=True).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("VmPeak:"))) * 1024


def test_long_thin_image_masks_fit_a_bounded_address_space():
    """Each mask of a 70000x700 image (49 M pixels, under the pixel limit) is made within ~2 GiB
    more than the interpreter itself needs, instead of the 19.5 GiB of upsampled logits."""
    limit = _address_space_now() + 2 * 1024 ** 3
    result = subprocess.run([sys.executable, "-c", MASKS_UNDER_AN_ADDRESS_SPACE_LIMIT, str(limit)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "masks 3" in result.stdout


@pytest.mark.parametrize("width, height", [(1900, 200), (150, 1300)])
def test_windowed_masks_equal_the_exact_ones(width, height):
    """On a moderately elongated image, both paths run: the windowed masks are mmdet's."""
    import torch
    import torch.nn.functional as F

    from scoring.runtimes.base import keep_ratio_size
    from scoring.runtimes.torch_rtmdet import MaskResampler

    new_w, new_h = keep_ratio_size(width, height, (640, 640))
    resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
    logits = torch.randn(4, 80, 80, generator=torch.Generator().manual_seed(1)) * 4
    assert resampler.windowed(logits), "the case must take the windowed path"
    windowed = np.stack(list(resampler.iter_masks(logits, 0.5)))
    # mmdet 3.3.0's _bbox_mask_post_process: two bilinear resizes, then the crop
    up = F.interpolate(logits.unsqueeze(0), scale_factor=8, mode="bilinear")
    up = F.interpolate(up, size=list(resampler.geometry.upsampled_shape(80, 80)), mode="bilinear",
                       align_corners=False)[..., :height, :width]
    exact = (up.sigmoid().squeeze(0) > 0.5).numpy()
    assert windowed.shape == (4, height, width)
    # mmdet scales the height by the width's factor, so for a tall image its upsampled mask can
    # be a row or two short of the image (1298 of 1300 rows here): equal wherever mmdet has pixels
    rows, cols = exact.shape[1:]
    assert rows >= height - 2 and cols >= width - 2
    assert np.array_equal(windowed[:, :rows, :cols], exact)


# --- 2. row amplification through index -------------------------------------------------------

def test_a_nested_index_is_refused_not_multiplied():
    from scoring.azureml.request import parse_request

    body = json.dumps({"input_data": {"index": [list(range(1_000_000))], "data": ["aGVsbG8="]}})
    with pytest.raises(InputError, match="index labels must be strings or numbers"):
        parse_request(body)


def test_rows_in_are_rows_scored_and_the_maximum_is_enforced(monkeypatch):
    from scoring.azureml.request import parse_request

    frame, _ = parse_request({"input_data": {"index": ["a", 7], "data": ["x", "y"]}})
    assert list(frame.index) == ["a", 7] and len(frame) == 2
    monkeypatch.setenv(settings.MAX_ROWS.env, "3")
    with pytest.raises(InputError, match="4 images, over the limit of 3"):
        parse_request({"input_data": {"data": ["x"] * 4}})


def test_the_pyfunc_refuses_a_multiindex(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"image": ["x", "y"]}, index=pd.MultiIndex.from_tuples([(0, 1), (0, 2)]))
    with pytest.raises(MlflowException, match="flat list of labels"):
        tiny_pyfunc.predict(frame)


# --- 3. one deadline per URL, one budget per request -----------------------------------------

@pytest.fixture(scope="module")
def slow_server():
    with serving() as url:
        yield url


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, "127.0.0.1/32")


def test_headers_dripped_slowly_are_cut_at_the_url_deadline(slow_server, allow_loopback, monkeypatch):
    from scoring.fetch import fetch_url

    monkeypatch.setenv(settings.FETCH_TOTAL_TIMEOUT.env, "1")
    with pytest.raises(InputError, match=r"took longer than 1 s \(MMDET_MLFLOW_FETCH_TOTAL_TIMEOUT\)"):
        fetch_url(f"{slow_server}/drip-headers")


def test_a_request_budget_is_shared_by_its_url_rows(slow_server, allow_loopback, monkeypatch):
    """Three URLs, each well within its own deadline, together over the request's budget: the
    rows are fetched one after another against one budget, and the third is refused."""
    from scoring.decode import decode_image
    from scoring.fetch import request_budget

    monkeypatch.setenv(settings.FETCH_REQUEST_BUDGET.env, "1")
    budget = request_budget()
    decoded = []
    with pytest.raises(InputError) as err:
        for row in range(3):
            decoded.append(decode_image(f"{slow_server}/late", row=row, budget=budget))
    assert len(decoded) == 1 and str(err.value).startswith("row 1: fetching")
    assert "FETCH_REQUEST_BUDGET" in str(err.value)


def test_the_budget_counts_fetching_not_the_model_between_rows(slow_server, allow_loopback, monkeypatch):
    """Rows are fetched between forward passes: a slow model must not spend the URL budget
    (two 0.6 s fetches in a 3 s budget, 3.5 s of other work between them)."""
    from scoring.decode import decode_image
    from scoring.fetch import request_budget

    monkeypatch.setenv(settings.FETCH_REQUEST_BUDGET.env, "3")
    budget = request_budget()
    decode_image(f"{slow_server}/late", row=0, budget=budget)
    time.sleep(3.5)  # the model's forward pass on row 0
    assert decode_image(f"{slow_server}/late", row=1, budget=budget).shape == (32, 48, 3)


def test_a_content_length_only_isdigit_accepts_is_not_a_crash(slow_server, allow_loopback):
    from scoring.decode import decode_image

    assert decode_image(f"{slow_server}/superscript-length", row=0).shape == (32, 48, 3)


# --- 4. 500s where 400s are due ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pyfunc(tiny_model_dir):
    import mlflow

    return mlflow.pyfunc.load_model(str(tiny_model_dir))


def _b64_png(image_bgr) -> str:
    import base64

    import cv2

    return base64.b64encode(cv2.imencode(".png", image_bgr)[1].tobytes()).decode()


def test_an_image_too_thin_for_the_resize_is_a_400(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    thin = np.full((1, 2000, 3), 128, np.uint8)
    with pytest.raises(MlflowException) as err:
        tiny_pyfunc.predict(pd.DataFrame({"image": [_b64_png(thin)]}, index=[4]))
    assert err.value.get_http_status_code() == 400
    assert "row 4: image is 2000x1: too thin for the model" in err.value.message


@pytest.mark.parametrize("body, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"input_data": {"data": ["x"]}, "params": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_000 + "}",
     "nested too deeply"),
    (json.dumps({"input_data": {"columns": [1], "data": [["x"]]}}), "columns must be a list of distinct names"),
    (json.dumps({"input_data": {"columns": [["image"]], "data": [["x"]]}}), "columns must be a list"),
    (json.dumps({"input_data": {"index": [[0, 1]], "data": ["x"]}}), "index labels must be"),
    (json.dumps({"input_data": {"index": [{"a": 1}], "data": ["x"]}}), "index labels must be"),
])
def test_request_shapes_that_crashed_are_input_errors(body, message):
    from scoring.azureml.request import parse_request

    with pytest.raises(InputError, match=message):
        parse_request(body)


# --- 5. params: unknown names refused, work capped, work stopped at the deadline ---------------

def test_an_unknown_param_is_refused_naming_the_known_ones(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        tiny_pyfunc.predict(pd.DataFrame({"image": ["x"]}), params={"score_thresold": 0.9})
    assert err.value.get_http_status_code() == 400
    assert "unknown param 'score_thresold'; known params: score_threshold" in err.value.message


def test_the_work_cap_refuses_before_the_model_runs(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    image = _b64_png(np.zeros((1000, 1000, 3), np.uint8))
    with pytest.raises(MlflowException, match="row 0: max_detections 10000 x 1000x1000 pixels"):
        tiny_pyfunc.predict(pd.DataFrame({"image": [image]}), params={"max_detections": 10000})


class _PassesAfter:
    """A request deadline that passes at its n-th check (a clock the test controls, so the test
    says exactly where the runner checks, whatever the machine's speed)."""

    what = "took longer than the test allows"

    def __init__(self, checks: int):
        self.checks = checks

    def passed(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_a_passed_deadline_stops_the_masks_of_an_image(tiny_pyfunc):
    """The runner checks before decoding and before the forward pass; a deadline that passes
    during the forward pass stops the encoding at the next mask (10000 masks of a 700x700 image
    took 6 minutes, long after the client had gone), instead of after the last one."""
    from scoring.runner import score_images

    segmenter = tiny_pyfunc.get_raw_model()
    image = scene_image(64, 48, 0)
    params = {"score_threshold": 0.0, "max_detections": 50}
    items = [(0, image)]
    decode = lambda key, value: value  # noqa: E731  (the image is already decoded)
    whole = list(score_images(segmenter, items, params, decode=decode, deadline=_PassesAfter(99)))
    assert len(whole[0].response["boxes"]) == 50
    with pytest.raises(InputError, match="took longer than the test allows"):
        list(score_images(segmenter, items, params, decode=decode, deadline=_PassesAfter(2)))


# --- 6. formats: an explicit list, sizes checked from every header ----------------------------

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


# --- 7. batch records and resume ----------------------------------------------------------------

def test_batch_records_with_line_breaks_stay_one_line_and_round_trip():
    from scoring.batch_files import COLUMNS, format_record, parse_record

    records = [{"row": 0, "prediction": {"boxes": []}, "file": "two\nlines.png", "error": None},
               {"row": 3, "prediction": None, "file": "a.csv",
                "error": "row 3: not valid base64: 'ab\\r\\ncd'\nsecond line\\n\u2028"},
               {"row": None, "prediction": None, "file": "back\\slash.png", "error": "x"}]
    lines = [format_record(r) for r in records]
    assert all(len(line.splitlines()) == 1 for line in lines)
    assert [parse_record(line) for line in lines] == records
    table = pd.read_csv(io.StringIO("\n".join(lines) + "\n"), names=list(COLUMNS),
                        keep_default_na=False, dtype=str)
    assert len(table) == 3 and list(table["row"]) == ["0", "3", ""]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """A folder with an image, a symlink to an image outside it and a 3-row table."""
    import base64

    base = tmp_path_factory.mktemp("resume")
    outside = base / "elsewhere.png"
    outside.write_bytes(encoded("PNG", picture(40, 30)))
    folder = base / "input"
    folder.mkdir()
    (folder / "a.png").write_bytes(encoded("PNG", picture(32, 24)))
    (folder / "linked.png").symlink_to(outside)
    good = base64.b64encode(encoded("PNG", picture(24, 16))).decode()
    pd.DataFrame({"image": [good, "%%%", good]}).to_csv(folder / "table.csv", index=False)
    return folder


FEW = {"max_detections": 2}  # resume is the point, not the masks


def test_a_symlinked_input_is_recognised_as_done(batch_inputs, tiny_model_dir, tmp_path):
    from mmdet_mlflow.batch import run_batch

    output = tmp_path / "out.jsonl"
    first = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=2, params=FEW)
    assert first["images"] == 4 and first["errors"] == 1
    again = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=2, params=FEW)
    assert again == {"files": 3, "skipped": 3, "images": 0, "errors": 0}
    assert sorted(r["file"] for r in _jsonl(output)) == ["a.png", "linked.png"] + ["table.csv"] * 3


def test_an_output_cut_at_a_line_end_resumes_to_one_complete_set(batch_inputs, tiny_model_dir, tmp_path):
    """Killed after the output's write and before the progress entry, with the output ending
    exactly at a line end in the middle of table.csv's records: the rerun drops what the
    progress file does not vouch for and scores the table again, once."""
    from mmdet_mlflow.batch import progress_file, run_batch

    output = tmp_path / "out.jsonl"
    run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=1, params=FEW)
    whole = _jsonl(output)
    lines = output.read_text().splitlines(keepends=True)
    assert [r["file"] for r in whole][-3:] == ["table.csv"] * 3
    output.write_text("".join(lines[:-2]))  # two of table.csv's three records gone, cut at a line end
    progress = progress_file(output)
    entries = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(entries[:-1]))  # the kill came before table.csv's progress entry
    rerun = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=1, params=FEW)
    assert rerun["skipped"] == 2 and rerun["images"] == 2 and rerun["errors"] == 1
    after = _jsonl(output)
    assert [(r["file"], r["row"]) for r in after] == [(r["file"], r["row"]) for r in whole]
    assert [r["error"] for r in after] == [r["error"] for r in whole]


def test_batch_records_of_a_file_named_with_a_line_break(tiny_model_dir, tmp_path):
    """Azure's batch script: a record of a file whose name holds a line break is one CSV line."""
    from scoring.azureml import batch_score
    from scoring.batch_files import parse_record

    odd = tmp_path / "two\nlines.png"
    odd.write_bytes(b"not an image\nat all")
    batch_score.init(model_dir=str(tiny_model_dir), params=FEW)
    lines = batch_score.run([str(odd)])
    assert len(lines) == 1 and len(lines[0].splitlines()) == 1
    assert parse_record(lines[0])["file"] == "two\nlines.png"
    shutil.rmtree(tmp_path, ignore_errors=True)
