"""The work one request, or one picture of a batch job, may cost: decided before the work starts
where it can be, bounded by a deadline where it cannot.

Before any pass of the network (``check_work``), from the picture's size, its tiles and the
params: the picture must survive the model's resize; its worst-case mask work (max_detections x
pixels) must be within ``MMDET_MLFLOW_MAX_MASK_PIXELS`` unless no mask is asked for; and a tiled
picture's merge may take at most ``MMDET_MLFLOW_MAX_TILE_CANDIDATES`` detections, counted as
(tiles + 1) x max_detections, since each pass keeps at most max_detections whatever the
score_threshold (a higher one usually keeps fewer, which cannot be known before the passes).
Over a limit the request is a 400 naming the params to change.

What cannot be counted (the network's speed on this machine, how busy it is) is bounded by a
``Deadline``, checked between forward passes, between merge steps and between masks: past it
the work stops, so the worker is free again, and the request is answered 400 (the same on every
server) within about one pass of the deadline. A served request's deadline (``request_deadline``)
comes before the server's own timeout, so that our answer, not the server's 504, reaches the
client; a batch job gives each picture its own (``picture_deadline``), and a picture past it gets
an error row while the job goes on.
"""
from __future__ import annotations

# Imports the standard library and the project's settings alone: the deployment tooling reads
# ``before_timeout`` in an environment without numpy.

import contextlib
import os
import sys
import time
from contextvars import ContextVar

from scoring import settings
from scoring.errors import InputError
from scoring.fetch import Deadline

LESS_WORK = ("send a smaller picture, a coarser tile_grid_size, a lower max_detections or a "
             "higher score_threshold")

# Servers' own request timeouts, in seconds, as each reads its environment: MLflow's scoring
# server (``mlflow models serve``, 60 s when unset) and the Azure ML inference server, which
# reads the deployment's request timeout in milliseconds.
MLFLOW_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
MLFLOW_DEFAULT_TIMEOUT = 60.0
AZUREML_TIMEOUT_MS_ENV = "SCORING_TIMEOUT_MS"
# Our deadline leaves this share of the server's timeout (at least MIN_MARGIN_SECONDS) for the
# pass in flight when the deadline passes, and for the answer to travel.
MARGIN_SHARE = 0.15
MIN_MARGIN_SECONDS = 3.0
# When the request being answered reached us (time.monotonic), where an entry script knows it:
# the server's clock starts then, before the body is read and parsed.
_ARRIVED: ContextVar[float | None] = ContextVar("mmdet_mlflow_request_arrived", default=None)


@contextlib.contextmanager
def request_arrived():
    """Mark, for the request answered inside the block, when it arrived (now): its deadline
    counts from then, as the server's timeout does."""
    token = _ARRIVED.set(time.monotonic())
    try:
        yield
    finally:
        _ARRIVED.reset(token)


def server_timeout() -> tuple[float, str] | None:
    """The timeout of the server this process answers for, and where it was read; None when no
    server timeout is known (Python use, batch jobs)."""
    azureml = os.environ.get(AZUREML_TIMEOUT_MS_ENV, "").strip()
    if azureml:
        try:
            return float(azureml) / 1000.0, AZUREML_TIMEOUT_MS_ENV
        except ValueError:
            pass
    if "mlflow.pyfunc.scoring_server" in sys.modules:
        mlflow = os.environ.get(MLFLOW_TIMEOUT_ENV, "").strip()
        try:
            return (float(mlflow) if mlflow else MLFLOW_DEFAULT_TIMEOUT), MLFLOW_TIMEOUT_ENV
        except ValueError:
            return MLFLOW_DEFAULT_TIMEOUT, MLFLOW_TIMEOUT_ENV
    return None


def request_seconds() -> tuple[float, str]:
    """Seconds a served request's work may take, and why: ``MMDET_MLFLOW_REQUEST_TIMEOUT``,
    shortened to come before the server's own timeout less a margin."""
    seconds, why = settings.REQUEST_TIMEOUT.value(), settings.REQUEST_TIMEOUT.source()
    server = server_timeout()
    if server is not None:
        limit, env = server
        before_server = before_timeout(limit)
        if before_server < seconds:
            seconds, why = before_server, f"before the server's {limit:g} s timeout, {env}"
    return seconds, why


def before_timeout(limit: float) -> float:
    """Seconds of work that end before a timeout of ``limit`` seconds, with a margin for the pass
    in flight when the deadline passes and for the answer to travel."""
    return max(limit - max(MIN_MARGIN_SECONDS, MARGIN_SHARE * limit), 0.5 * limit)


def request_deadline() -> Deadline:
    """The served request's deadline, from when it arrived where that is known, else from now."""
    seconds, why = request_seconds()
    arrived = _ARRIVED.get()
    start = time.monotonic() if arrived is None else arrived
    return Deadline(start + seconds, f"the request took longer than {seconds:g} s ({why})")


def picture_deadline(request: Deadline | None = None) -> Deadline:
    """A batch job's picture: ``MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT`` from now (or the request's
    deadline, when that comes first)."""
    seconds = settings.BATCH_PICTURE_TIMEOUT.value()
    own = Deadline.after(seconds, f"the picture took longer than {seconds:g} s "
                                  f"({settings.BATCH_PICTURE_TIMEOUT.source()})")
    return own if request is None or own.at < request.at else request


def check_deadline(deadline: Deadline | None, doing: str = "") -> None:
    """An InputError once ``deadline`` has passed, saying what was being done."""
    if deadline is not None and deadline.passed():
        raise InputError(f"{deadline.what}{' ' + doing if doing else ''}; {LESS_WORK}")


def check_work(predictor, image, params, tiles: int, key=None) -> None:
    """Refuse, before the model runs, what it cannot take or what would cost too much
    (``tiles``: the picture's tiles under the params, 0 without tiling)."""
    problem = predictor.image_problem(image)
    if problem:
        raise InputError(problem, row=key)
    height, width = image.shape[:2]
    if tiles:
        limit = settings.MAX_TILE_CANDIDATES.value()
        candidates = (tiles + 1) * params.max_detections
        if candidates > limit:
            raise InputError(
                f"tile_grid_size {params.tile_grid_size!r} makes {tiles} tiles of this {width}x{height} "
                f"picture: {tiles + 1} passes x max_detections {params.max_detections} = {candidates} "
                f"detections to merge, over the limit of {limit} ({settings.MAX_TILE_CANDIDATES.source()}); "
                f"lower max_detections or use a coarser tile_grid_size", row=key)
    if params.mask_format == "none":
        return  # no mask is made: the mask work is nothing
    max_mask_pixels = settings.MAX_MASK_PIXELS.value()
    if params.max_detections * width * height > max_mask_pixels:
        raise InputError(
            f"max_detections {params.max_detections} x {width}x{height} pixels = "
            f"{params.max_detections * width * height} mask pixels, over the limit of "
            f"{max_mask_pixels} ({settings.MAX_MASK_PIXELS.source()}); lower max_detections or send a "
            f"smaller image", row=key)
