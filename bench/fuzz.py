"""A long fuzzing run of the properties tests/test_fuzz.py checks briefly: the request parser,
the decoder and the predict params must raise nothing but our InputError, whatever comes in;
damaged images (cut short, bits flipped in headers and in pixel data) must decode to the same
pixels or the same InputError every time.

    PYTHONPATH=. python bench/fuzz.py --examples 20000 [--seed 1]

Prints each property's example count and time; a failure prints hypothesis's shrunk example."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed (default: random)")
    args = parser.parse_args()

    from hypothesis import HealthCheck, given, seed, settings

    from fuzz_properties import (check_decode, check_decode_deterministic, check_parse_request,
                                 check_params, damaged_images, image_values, params, requests)

    long_run = settings(max_examples=args.examples, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))
    failed = 0
    for name, strategy, check in [("parse_request", requests(), check_parse_request),
                                  ("decode_image", image_values, check_decode),
                                  ("PredictParams.updated", params, check_params),
                                  ("decode_image, damaged, 3 times", damaged_images(), check_decode_deterministic)]:
        test = long_run(given(strategy)(check))
        if args.seed is not None:
            test = seed(args.seed)(test)
        start = time.monotonic()
        try:
            test()
            print(f"{name}: {args.examples} examples, only InputError escaped "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        except Exception as err:  # hypothesis has printed the falsifying example
            failed += 1
            print(f"{name}: FAILED after {time.monotonic() - start:.0f} s: {type(err).__name__}: {err}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
