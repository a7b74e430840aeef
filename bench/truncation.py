"""What the decoder's check for data that ends early (scoring/truncation.py) costs, next to the
decode it guards, per accepted format, on photo-sized pictures made here.

    PYTHONPATH=. python bench/truncation.py [--megapixels 12] [--repeat 5]

Prints, per format, the file size, the best time of the check and of ``image_from_bytes``
(header, check and decode) and their ratio, measured in this one run."""
from __future__ import annotations

import argparse
import functools
import io
import time

import numpy as np


def photo(megapixels: float) -> np.ndarray:
    """A 4:3 RGB picture with smooth areas and noise, so that it compresses like a photo."""
    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    width = height * 4 // 3
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def best(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from PIL import Image

    from scoring.decode import image_from_bytes
    from scoring.truncation import ends_early

    picture = Image.fromarray(photo(args.megapixels))
    print(f"{picture.width}x{picture.height} pixels; best of {args.repeat}")
    for fmt, options in [("JPEG", {"quality": 90}), ("JPEG", {"quality": 90, "progressive": True}),
                         ("PNG", {}), ("WEBP", {"quality": 90}), ("TIFF", {}), ("BMP", {})]:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        data = buffer.getvalue()
        with Image.open(io.BytesIO(data)) as opened:
            check = best(functools.partial(ends_early, data, opened.format, opened), args.repeat)
        decode = best(functools.partial(image_from_bytes, data), args.repeat)
        name = fmt + (" progressive" if options.get("progressive") else "")
        print(f"{name:17s} {len(data) / 2**20:7.1f} MiB  check {check * 1e3:7.2f} ms  "
              f"decode {decode * 1e3:8.1f} ms  check/decode {check / decode:.4f}", flush=True)


if __name__ == "__main__":
    main()
