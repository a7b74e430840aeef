"""The size limit of a served request's body, shared by both servers: the Azure online entry
script (``scoring.azureml``) and ``mlflow models serve`` (``scoring.serving_guards``)."""
from __future__ import annotations

from scoring import settings
from scoring.errors import RequestTooLarge


def max_request_bytes() -> int:
    """Base64 inflates images by 4/3: the default 64 MiB is a handful of 12-megapixel photos."""
    return settings.MAX_REQUEST_BYTES.value()


def too_large(size: int | None) -> RequestTooLarge:
    shown = f"{size} bytes" if size is not None else "more bytes"
    return RequestTooLarge(f"the request is {shown}, over the limit of {max_request_bytes()} bytes "
                           f"({settings.MAX_REQUEST_BYTES.env}); send fewer or smaller images per request")
