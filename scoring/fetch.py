"""Fetching images given as URLs: http(s) only, with timeouts and a size cap."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from scoring.errors import InputError

MAX_DOWNLOAD_BYTES = int(os.environ.get("MMDET_MLFLOW_MAX_DOWNLOAD_BYTES", 32 * 1024 * 1024))
TIMEOUT_SECONDS = float(os.environ.get("MMDET_MLFLOW_FETCH_TIMEOUT", 10))


def fetch_url(url: str) -> bytes:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(f"only http(s) URLs with a host can be fetched, got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "mmdet-mlflow"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise InputError(f"fetching {url} failed: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise InputError(f"fetching {url} failed: {reason}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data
