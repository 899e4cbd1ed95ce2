"""Synthetic images that are not frontal chest radiographs, to measure the input check.

Deterministic (seeded) generators: text documents, CT-like axial slices, natural-photo-like
scenes, noise and flat images, and chest radiographs turned sideways or upside down.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]


def document(rng: np.random.Generator, size: int = 512) -> U8:
    img = np.full((size, int(size * 0.77)), 245, np.uint8)
    y = 30
    while y < size - 20:
        words = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz    ")) for _ in range(40))
        cv2.putText(img, words, (15, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 20, 1, cv2.LINE_AA)
        y += int(rng.integers(14, 26))
    return img


def ct_slice(rng: np.random.Generator, size: int = 512) -> U8:
    img = np.zeros((size, size), np.float32)
    c = size // 2
    cv2.ellipse(img, (c, c), (int(size * 0.42), int(size * 0.3)), 0, 0, 360, 0.55, -1)
    for dx in (-1, 1):  # lungs
        cv2.ellipse(
            img,
            (c + dx * int(size * 0.18), c - 10),
            (int(size * 0.13), int(size * 0.2)),
            0,
            0,
            360,
            0.08,
            -1,
        )
    cv2.circle(img, (c, c + int(size * 0.2)), int(size * 0.05), 1.0, -1)  # vertebra
    cv2.circle(img, (c - 20, c), int(size * 0.07), 0.65, -1)  # heart/aorta
    cv2.ellipse(img, (c, c), (int(size * 0.44), int(size * 0.32)), 0, 0, 360, 0.3, 6)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def photo(rng: np.random.Generator, size: int = 400) -> U8:
    img = np.zeros((size, int(size * 1.33)), np.float32)
    img[:] = np.linspace(0.8, 0.3, size)[:, None]  # sky-to-ground gradient
    for _ in range(int(rng.integers(4, 12))):
        colour = float(rng.uniform(0, 1))
        x, y = int(rng.integers(0, img.shape[1])), int(rng.integers(0, size))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(10, 90)), colour, -1)
        else:
            w, h = int(rng.integers(20, 160)), int(rng.integers(20, 160))
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, -1)
    img = np.asarray(cv2.GaussianBlur(img, (0, 0), 1.5), dtype=np.float32)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def noise(rng: np.random.Generator, size: int = 256) -> U8:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def flat(rng: np.random.Generator, size: int = 256) -> U8:
    return np.full((size, size), int(rng.integers(0, 256)), np.uint8)


def negatives(chests: list[U8], *, n_each: int = 10, seed: int = 0) -> Iterator[tuple[str, U8]]:
    """Yield (kind, image) pairs of non-frontal-chest images."""
    rng = np.random.default_rng(seed)
    for _ in range(n_each):
        yield "document", document(rng)
        yield "ct_slice", ct_slice(rng)
        yield "photo", photo(rng)
        yield "noise", noise(rng)
        yield "flat", flat(rng)
    for img in chests[:n_each]:
        yield "chest_rotated_90", np.ascontiguousarray(np.rot90(img))
        yield "chest_upside_down", np.ascontiguousarray(img[::-1])
