"""scoring.rle: COCO compressed RLE in numpy, byte for byte what pycocotools writes and reads
(the lean serving environments do not carry pycocotools; evaluation and users' tools do)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from scoring import rle


def coco(mask: np.ndarray) -> dict:
    encoded = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def ring(height: int, width: int) -> np.ndarray:
    """A filled disc with a hole in the middle (the hole touches nothing)."""
    mask = np.zeros((height, width), np.uint8)
    centre, outer = (width // 2, height // 2), min(width, height) // 3
    cv2.circle(mask, centre, outer, 1, -1)
    cv2.circle(mask, centre, outer // 2, 0, -1)
    return mask.astype(bool)


def edge_cases() -> dict[str, np.ndarray]:
    cases = {}
    for h, w in [(1, 1), (1, 7), (7, 1), (4, 3), (0, 5), (5, 0), (0, 0)]:
        cases[f"empty-{h}x{w}"] = np.zeros((h, w), bool)
        cases[f"full-{h}x{w}"] = np.ones((h, w), bool)
    one = np.zeros((6, 9), bool)
    one[2, 5] = True
    cases["one-pixel"] = one
    for at in [(0, 0), (5, 8), (0, 8), (5, 0)]:
        corner = np.zeros((6, 9), bool)
        corner[at] = True
        cases[f"corner-{at[0]}-{at[1]}"] = corner
    row = np.zeros((6, 9), bool)
    row[3] = True
    cases["one-row"] = row
    column = np.zeros((6, 9), bool)
    column[:, 4] = True
    cases["one-column"] = column
    cases["first-and-last-rows"] = np.isin(np.arange(6), [0, 5])[:, None] & np.ones((6, 9), bool)
    cases["checker"] = (np.indices((7, 5)).sum(0) % 2).astype(bool)
    cases["ring"] = ring(60, 80)
    # a run of 1s crossing from the bottom of one column to the top of the next
    crossing = np.zeros((5, 4), bool)
    crossing[3:, 1] = True
    crossing[:2, 2] = True
    cases["run-across-columns"] = crossing
    cases["long-runs"] = np.pad(np.ones((700, 900), bool), ((300, 0), (0, 1200)))  # counts > 2**20
    return cases


EDGE = edge_cases()


@pytest.mark.parametrize("name", list(EDGE))
def test_edge_cases_match_pycocotools(name):
    mask = EDGE[name]
    assert rle.encode(mask) == coco(mask)
    assert np.array_equal(rle.decode(coco(mask)), mask)


def test_random_masks_match_pycocotools_byte_for_byte():
    rng = np.random.default_rng(22)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((height, width)) < rng.random()
        assert rle.encode(mask) == coco(mask), (height, width)
    # blobs: long runs whose differences go negative (the sign bit of the string form)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        mask = np.zeros((int(rng.integers(20, 300)), int(rng.integers(20, 300))), np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            centre = tuple(int(v) for v in rng.integers(0, mask.shape[::-1]))
            axes = tuple(int(v) for v in rng.integers(1, 80, 2))
            cv2.ellipse(mask, centre, axes, float(rng.integers(0, 180)), 0, 360, int(rng.integers(0, 2)), -1)
        assert rle.encode(mask.astype(bool)) == coco(mask), seed


def test_integer_masks_and_decoding_pycocotools_strings():
    mask = ring(31, 47)
    assert rle.encode(mask.astype(np.uint8)) == coco(mask)
    encoded = coco(mask)
    assert np.array_equal(rle.decode(encoded), mask_util.decode({**encoded, "counts": encoded["counts"].encode()}).astype(bool))
    assert rle.string_counts(encoded["counts"]).tolist() == rle.run_lengths(mask).tolist()


def test_ring_keeps_its_hole():
    mask = ring(120, 160)
    decoded = mask_util.decode({"size": [120, 160], "counts": rle.encode(mask)["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    assert not decoded[60, 80] and decoded[60, 80 + 30]  # the hole stays a hole


def test_decode_refuses_what_is_not_an_rle():
    with pytest.raises(ValueError, match="outside"):
        rle.decode({"size": [2, 2], "counts": "~~"})
    with pytest.raises(ValueError, match="cover"):
        rle.decode({"size": [2, 2], "counts": "5"})
    with pytest.raises(ValueError, match="end inside"):
        rle.decode({"size": [2, 2], "counts": "P"})
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 1), bool))


def test_a_window_encodes_as_the_picture_size_mask_it_stands_for():
    """Answers encode each detection's mask window without pasting it into a picture-size mask
    (work in proportion to the object): the string is the full mask's, byte for byte,
    wherever the window sits (corners, whole columns, a single pixel, empty)."""
    rng = np.random.default_rng(3)
    height, width = 37, 53
    cases = [((0, 0), (37, 53)), ((0, 0), (5, 7)), ((46, 30), (7, 7)), ((10, 0), (37, 4)),
             ((52, 36), (1, 1)), ((3, 4), (9, 11))]
    for (x0, y0), (h, w) in cases:
        for density in (0.0, 0.3, 1.0):
            pixels = rng.random((h, w)) < density
            full = np.zeros((height, width), bool)
            full[y0:y0 + h, x0:x0 + w] = pixels
            want = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))
            got = rle.encode_window(pixels, (x0, y0), (height, width))
            assert got == {"size": want["size"], "counts": want["counts"].decode()}, ((x0, y0), (h, w))
    with pytest.raises(ValueError, match="does not fit"):
        rle.encode_window(np.ones((5, 5), bool), (50, 0), (height, width))
