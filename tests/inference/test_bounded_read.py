"""Bounded inflation of deflated datasets: refused past the limit after bounded work, and a
stream followed by padding (pydicom pads odd lengths) ends instead of looping."""

from __future__ import annotations

import zlib

import pytest

from inference.bounded_read import InputTooLarge, inflate_bounded


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.timeout(10)
def test_a_padded_stream_of_several_steps_inflates_whole() -> None:
    payload = bytes(range(256)) * (12 * 4096)  # 12 MB: a dozen 1 MB steps
    assert inflate_bounded(_deflate(payload) + b"\x00", 16 << 20) == payload
    assert inflate_bounded(_deflate(payload), 16 << 20) == payload


def test_inflating_past_the_limit_is_refused() -> None:
    bomb = _deflate(bytes(64 << 20))
    assert len(bomb) < 1 << 20
    with pytest.raises(InputTooLarge) as refused:
        inflate_bounded(bomb, 8 << 20)
    assert refused.value.reason == "too_large"


def test_corrupt_data_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="corrupt"):
        inflate_bounded(b"\xff" * 100, 1 << 20)
