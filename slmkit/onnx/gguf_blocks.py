"""GGUF quantized blocks as the arrays onnxruntime's MatMulNBits reads, value for value.

Every GGUF type carried here dequantizes as `w = scale · (code − zero_point) + min` per block of
16 or 32 values along a row, with integer codes of at most 8 bits. MatMulNBits computes
`scale · (code − zero_point)` with uint8 zero points on its fast kernels; the `min` term (Q4_1,
Q5_1 and the k-quants) is added by the graph as `blocksum(x) · minᵀ` (slmkit.onnx.gguf_carry), since
float zero points leave the fast kernel (465 µs against 13 µs for a 576×1536 product here).

The block layouts follow `gguf.quants` (the reference that `GGUFReader` users dequantize with);
`BlockWeights.dequantize` computes in the same float32 order, so the test compares bit for bit.
Types with no such form (Q2_K, Q3_K, the i-quants, float tensors) are not carried.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

SUPER_BLOCK = 256  # values per k-quant super-block (QK_K)


@dataclass(frozen=True)
class BlockWeights:
    """A [N, K] weight as `w[n, k] = scales[n, k // block_size] · (codes[n, k] − zero_points[n,
    k // block_size]) + mins[n, k // min_block_size]`; `mins` is None for symmetric types.

    The minimums keep the file's own block when the codes are re-blocked (`with_block_size`):
    the graph adds them as `blocksum(x) · minsᵀ`, and a block sum over 32 values costs half the
    minimums of one over each 16, with the same exact values."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K // block_size]
    zero_points: np.ndarray  # uint8 [N, K // block_size]
    mins: np.ndarray | None  # float32 [N, K // min_block_size]
    block_size: int
    code_bits: int  # bits the codes use: 4, 5, 6 or 8

    @property
    def bits(self) -> int:
        """MatMulNBits storage: 4-bit codes as such, 5- to 8-bit codes in 8 bits (exactly)."""
        return 4 if self.code_bits <= 4 else 8

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def min_block_size(self) -> int:
        """Values per minimum (the file's block, or the codes' block when a minimum varies within it)."""
        return self.block_size if self.mins is None else self.shape[1] // self.mins.shape[1]

    def mins_per(self, block_size: int) -> np.ndarray:
        """The minimums repeated to one per `block_size` values (a divisor of min_block_size)."""
        assert self.mins is not None
        return np.repeat(self.mins, self.min_block_size // block_size, axis=1)

    def dequantize(self) -> np.ndarray:
        """The float32 weight, computed in gguf's order: scale · code first, then + min."""
        scales = np.repeat(self.scales, self.block_size, axis=1)
        zero = np.repeat(self.zero_points, self.block_size, axis=1).astype(np.int16)
        values = scales * (self.codes.astype(np.int16) - zero).astype(np.float32)
        return values if self.mins is None else values + np.repeat(self.mins, self.min_block_size, axis=1)

    def rows(self, index: np.ndarray | slice) -> BlockWeights:
        """The weight of the selected output rows (a permutation or a slice)."""
        mins = None if self.mins is None else self.mins[index]
        return BlockWeights(
            self.codes[index], self.scales[index], self.zero_points[index], mins, self.block_size, self.code_bits
        )

    def with_block_size(self, block_size: int) -> BlockWeights:
        """The same values in smaller blocks: each block's scale and zero point repeat; the
        minimums stay per their own block."""
        if block_size == self.block_size:
            return self
        if self.block_size % block_size:
            raise ValueError(f"cannot split blocks of {self.block_size} into blocks of {block_size}")
        times = self.block_size // block_size
        return BlockWeights(
            self.codes,
            np.repeat(self.scales, times, axis=1),
            np.repeat(self.zero_points, times, axis=1),
            self.mins,
            block_size,
            self.code_bits,
        )

    def recentered(self) -> BlockWeights:
        """The same weight with every zero point at MatMulNBits' default, 2^(bits−1), so that the
        node needs no zero-point input and the codes it multiplies with int8 activations are
        centred on zero.

        A symmetric type's codes only shift (Q5_0's zero point 16 becomes 128 in 8 bits), exactly.
        A type with minimums stores `scale · code + min` with codes from 0 up: their common
        offset would meet the activations' rounding error at full size, while llama.cpp's
        `m · Σ x_q` uses the rounded activations' own sums and cancels it. Here the codes are
        centred at 2^(code_bits−1) and `scale · 2^(code_bits−1)` moves into the minimum, which the
        graph adds with the exact activations (equal to the file's values up to float rounding).
        """
        default = 1 << (self.bits - 1)
        centre = 0 if self.mins is None else 1 << (self.code_bits - 1)
        shift = default - centre - self.zero_points.astype(np.int16)  # per block
        codes = self.codes.astype(np.int16) + np.repeat(shift, self.block_size, axis=1)
        mins = (
            None if self.mins is None else _coarsest(self.mins_per(self.block_size) + self.scales * np.float32(centre))
        )
        zero_points = np.full_like(self.zero_points, default)
        return BlockWeights(codes.astype(np.uint8), self.scales, zero_points, mins, self.block_size, self.code_bits)


def _coarsest(mins: np.ndarray) -> np.ndarray:
    """Minimums [N, blocks] merged, pair by pair, while neighbouring blocks hold equal values in
    every row: the widest blocks that give the same values."""
    while mins.shape[1] % 2 == 0 and np.array_equal(mins[:, 0::2], mins[:, 1::2]):
        mins = mins[:, 0::2]
    return np.ascontiguousarray(mins)


def concat_rows(parts: list[BlockWeights]) -> BlockWeights:
    """Stack weights along N (a packed q/k/v MatMul), in the smallest block size and widest codes."""
    if len(parts) == 1:
        return parts[0]
    block_size = min(part.block_size for part in parts)
    parts = [part.with_block_size(block_size) for part in parts]
    with_mins = [part for part in parts if part.mins is not None]
    mins = None
    if with_mins:
        min_block = min(part.min_block_size for part in with_mins)
        columns = parts[0].shape[1] // min_block
        mins = _coarsest(np.concatenate([
            part.mins_per(min_block) if part.mins is not None else np.zeros((part.shape[0], columns), np.float32)
            for part in parts
        ]))  # fmt: skip
    return BlockWeights(
        np.concatenate([part.codes for part in parts]),
        np.concatenate([part.scales for part in parts]),
        np.concatenate([part.zero_points for part in parts]),
        mins,
        block_size,
        max(part.code_bits for part in parts),
    )


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block, as float32 [n_blocks, 1] (exact)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, run: int) -> np.ndarray:
    """Codes packed as gguf does: each run of `run` bytes holds `run` low nibbles, then `run` high ones."""
    n = packed.shape[0]
    groups = packed.reshape(n, -1, 1, run) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (groups & np.uint8(0x0F)).reshape(n, -1)


def _unpack(blocks: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """(codes, scales, zero points, mins, block size, code bits) per GGUF block, as in gguf.quants."""
    n = blocks.shape[0]
    if qtype == Q.Q4_0:
        return _nibbles(blocks[:, 2:], 16), _f16(blocks, 0), np.full((n, 1), 8), None, 32, 4
    if qtype == Q.Q4_1:
        return _nibbles(blocks[:, 4:], 16), _f16(blocks, 0), np.zeros((n, 1)), _f16(blocks, 2), 32, 4
    if qtype in (Q.Q5_0, Q.Q5_1):
        offset = 2 if qtype == Q.Q5_0 else 4
        high = np.unpackbits(blocks[:, offset : offset + 4], axis=1, bitorder="little")
        codes = _nibbles(blocks[:, offset + 4 :], 16) | (high << np.uint8(4))
        if qtype == Q.Q5_0:
            return codes, _f16(blocks, 0), np.full((n, 1), 16), None, 32, 5
        return codes, _f16(blocks, 0), np.zeros((n, 1)), _f16(blocks, 2), 32, 5
    if qtype == Q.Q8_0:
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, _f16(blocks, 0), np.full((n, 1), 128), None, 32, 8
    if qtype in (Q.Q4_K, Q.Q5_K):
        sub_scales, sub_mins = Q4_K.get_scale_min(blocks[:, 4:16])
        scales = _f16(blocks, 0) * sub_scales.astype(np.float32)
        mins = -(_f16(blocks, 2) * sub_mins.astype(np.float32))
        if qtype == Q.Q4_K:
            return _nibbles(blocks[:, 16:], 32), scales, np.zeros((n, 8)), mins, 32, 4
        high = np.unpackbits(blocks[:, 16:48].reshape(n, 32, 1), axis=2, bitorder="little").transpose(0, 2, 1)
        codes = _nibbles(blocks[:, 48:], 32) | (high.reshape(n, -1) << np.uint8(4))
        return codes, scales, np.zeros((n, 8)), mins, 32, 5
    if qtype == Q.Q6_K:
        low = _nibbles(blocks[:, :128], 64)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)).reshape(n, -1)
        scales = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
        return low | (high << np.uint8(4)), scales, np.full((n, 16), 32), None, 16, 6
    raise KeyError(f"GGUF type {qtype.name} has no exact MatMulNBits form")


CARRIED_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def block_weights(data: np.ndarray, qtype: Q, rows: int, columns: int) -> BlockWeights:
    """A GGUF tensor's raw bytes (`GGUFReader`'s `data`, one row of blocks per output row) as
    BlockWeights of shape [rows, columns].

    Raises:
        KeyError: the type has no exact MatMulNBits form (see CARRIED_TYPES).
    """
    if qtype not in CARRIED_TYPES:
        raise KeyError(f"GGUF type {qtype.name} has no exact MatMulNBits form")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    codes, scales, zero_points, mins, block_size, code_bits = _unpack(raw.reshape(-1, _type_size(qtype)), qtype)
    blocks_per_row = columns // block_size

    def per_row(values: np.ndarray, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(values.reshape(rows, blocks_per_row).astype(dtype))

    return BlockWeights(
        codes=codes.reshape(rows, columns).astype(np.uint8),
        scales=per_row(scales, np.float32),
        zero_points=per_row(np.broadcast_to(zero_points, scales.shape), np.uint8),
        mins=None if mins is None else per_row(np.broadcast_to(mins, scales.shape), np.float32),
        block_size=block_size,
        code_bits=code_bits,
    )


def _type_size(qtype: Q) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype][1]
