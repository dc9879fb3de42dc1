import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lynxkv.codec.bitpack import pack, packed_size, unpack


@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=100))
    arr = np.array(values, dtype=np.uint8)
    packed = pack(arr, bits)
    assert len(packed) == packed_size(len(values), bits) == -(-len(values) * bits // 8)
    np.testing.assert_array_equal(unpack(packed, len(values), bits), arr)


def test_nibble_order_is_low_first() -> None:
    assert pack(np.array([1, 2, 3], dtype=np.uint8), 4) == bytes([0x21, 0x03])


def test_three_bit_stream_is_little_endian() -> None:
    # values 5, 3, 7 -> bits 101 | 011 << 3 | 111 << 6 = 0b1_1101_1101 = 0x1DD
    assert pack(np.array([5, 3, 7], dtype=np.uint8), 3) == bytes([0xDD, 0x01])


def test_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        unpack(b"\x00\x00\x00", 3, 4)
