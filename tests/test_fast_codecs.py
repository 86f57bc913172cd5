"""The fast codecs against bitsandbytes, byte for byte: every float16 and bfloat16 value, float32 values on and
next to every bucket boundary, signed zeros, denormals, zero blocks, non-finite blocks, short tail blocks,
odd element counts, every blocksize, nested statistics, many random tensors, several chunks and lanes."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

from ia3convert.codecs import fast, four_bit, int8

QUANT_TYPES = ("nf4", "fp4")
HALF_TYPES = (torch.float16, torch.bfloat16)
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so that NaNs and signed zeros compare too)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(mine: torch.Tensor, reference: torch.Tensor) -> None:
    assert mine.dtype == reference.dtype and mine.shape == reference.shape
    assert torch.equal(bits(mine), bits(reference))


def assert_4bit_like_bnb(weight: torch.Tensor, quant_type: str, blocksize: int = 64) -> None:
    """fast.quantize_4bit gives bitsandbytes' packed codes and absmax, bit for bit."""
    codes, absmax = fast.quantize_4bit(weight, F.get_4bit_type(quant_type, device="cpu"), blocksize)
    reference, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    assert_same(codes, reference)
    assert_same(absmax, state.absmax)


def blocks_with_absmax(values: torch.Tensor, top: float, dtype: torch.dtype, blocksize: int = 64) -> torch.Tensor:
    """``values`` laid out in blocks that each also hold ``top`` (their absmax), as ``dtype``."""
    per_block = blocksize - 1
    values = values.to(dtype)
    pad = (-values.numel()) % per_block
    values = torch.cat([values, torch.zeros(pad, dtype=dtype)]).reshape(-1, per_block)
    column = torch.full((values.shape[0], 1), top, dtype=dtype)
    return torch.cat([column, values], dim=1).reshape(-1)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All finite values of a 16-bit float type."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)]


def boundaries(quant_type: str) -> torch.Tensor:
    """Midpoints between neighbouring values of the sorted code book: where the buckets change."""
    ordered = F.get_4bit_type(quant_type, device="cpu").sort().values
    return (ordered[:-1] + ordered[1:]) / 2


def around(values: torch.Tensor, steps: int) -> torch.Tensor:
    """``values`` and their float32 neighbours up to ``steps`` ulps away on either side."""
    out, up, down = [values], values, values
    for _ in range(steps):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        out += [up, down]
    return torch.cat(out)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("top", [1.0, 0.7, 3.0e-3, 6.0e-5, 1.0e-7, 60000.0, None])
def test_every_16bit_value(quant_type, dtype, top):
    """Exhaustive for 16-bit inputs: each finite value whose magnitude is at most the block's absmax
    (``None``: the type's largest value, so every finite value)."""
    top = torch.tensor(torch.finfo(dtype).max if top is None else top, dtype=dtype)
    values = every_value(dtype)
    values = values[values.float().abs() <= top.float()]
    assert_4bit_like_bnb(blocks_with_absmax(values, top.item(), dtype), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("top", [1.0, 0.125, 32.0, 0.7, 3.3e-5, 2.0e38, 1.0e-39, 1.0e-44])
def test_float32_on_and_next_to_every_boundary(quant_type, top):
    """Values that scale exactly onto a boundary (ties go to the lower bucket) and those a few ulps away."""
    top32 = torch.tensor(top)
    scale = 1.0 / top32.clamp(min=1e-38)
    targets = around(boundaries(quant_type), 2)
    # Preimages of each target under x -> x * scale, and their neighbours: some land exactly on a boundary.
    preimages = around(targets / scale, 3)
    candidates = torch.cat([targets * top32, preimages, -preimages])
    candidates = candidates[torch.isfinite(candidates) & (candidates.abs() <= top32)]
    assert_4bit_like_bnb(blocks_with_absmax(candidates, top, torch.float32), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_special_blocks(quant_type, dtype):
    """Signed zeros, zero blocks, +-absmax (+-1 after scaling), denormals, a denormal absmax, extremes."""
    info = torch.finfo(dtype)
    tiny, denormal = info.tiny, info.tiny / 8
    blocks = [
        [0.0, -0.0] * 32,  # an all-zero block with both zeros
        [-0.0] * 64,
        [1.0, -1.0, 0.0, -0.0] + [0.5, -0.5] * 30,
        [-1.0] + [0.999] * 63,  # the absmax is negative
        [denormal, -denormal, denormal / 2, 0.0, -0.0] + [denormal / 4] * 59,  # absmax is a denormal
        [tiny, -tiny, denormal, -denormal] * 16,
        [info.max, -info.max, tiny, -tiny, denormal, -denormal, 1.0, -1.0] * 8,
        [info.max / 3, info.max / 7] * 32,
        [1e-3 * (i - 32) for i in range(64)],
    ]
    weight = torch.tensor(blocks, dtype=torch.float32).to(dtype).reshape(-1)
    assert_4bit_like_bnb(weight, quant_type)
    assert_4bit_like_bnb(weight[:-1], quant_type)  # a short, odd tail block too


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_non_finite_blocks_take_bitsandbytes_path(quant_type, dtype):
    weight = torch.randn(6, 64).to(dtype)
    weight[1, 3], weight[2, 5], weight[3, 7], weight[4, 0] = float("inf"), float("-inf"), float("nan"), float("nan")
    weight[4, 1] = float("inf")
    assert_4bit_like_bnb(weight.reshape(-1), quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 7), (3, 67), (5, 64), (7, 33), (48, 128), (9, 4097)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_shapes_and_blocksizes(quant_type, dtype, shape, blocksize):
    """Whole blocks, a short tail block, odd element counts, blocks larger than the tensor."""
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(dtype)
    assert_4bit_like_bnb(weight, quant_type, blocksize)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("shape", [(64, 256), (30, 100), (33, 129)])
def test_four_bit_encode_is_bitsandbytes(quant_type, nested, dtype, shape):
    """The whole checkpoint entry (codes and every statistic, nested or not) matches bitsandbytes'."""
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    packed = four_bit.encode(weight, quant_type, 64, nested, dtype=dtype)
    codes, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    reference = state.as_dict(packed=True)
    assert_same(packed.codes, codes)
    assert packed.stats.keys() == reference.keys()
    for key, value in reference.items():
        assert_same(packed.stats[key], value)


def random_weight(generator: torch.Generator) -> torch.Tensor:
    """A random matrix with mixed magnitudes: gaussian rows, heavy tails, zero runs, exact repeats."""
    rows = int(torch.randint(1, 40, (1,), generator=generator))
    cols = int(torch.randint(1, 300, (1,), generator=generator))
    weight = torch.randn(rows, cols, generator=generator)
    weight *= torch.exp(torch.randn(rows, 1, generator=generator) * 4)  # magnitudes over many decades
    weight *= torch.exp(torch.randn(rows, cols, generator=generator))
    mask = torch.rand(rows, cols, generator=generator)
    weight[mask < 0.05] = 0.0
    weight[mask > 0.97] = -0.0
    if cols > 4:
        weight[:, 1] = weight[:, 0]
        weight[:, 2] = -weight[:, 0]
    return weight


@pytest.mark.parametrize("seed", range(40))
def test_random_tensors(seed, monkeypatch):
    """Random dtypes, shapes, blocksizes and magnitudes, through small chunks so that many chunks and both
    lanes run."""
    monkeypatch.setattr(fast, "CHUNK", 512)
    generator = torch.Generator().manual_seed(seed)
    weight = random_weight(generator).to(FLOAT_TYPES[seed % 3])
    blocksize = (32, 64, 128, 256)[seed // 3 % 4]
    assert_4bit_like_bnb(weight, QUANT_TYPES[seed % 2], blocksize)
    codes, scb = int8.encode(weight)
    reference_codes, reference_scb, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    nonzero = reference_scb != 0
    assert_same(scb, reference_scb)
    assert torch.equal(codes[nonzero], reference_codes[nonzero]) and not codes[~nonzero].any()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_large_tensor_default_chunks(quant_type):
    """More than one default-size chunk, over both lanes."""
    weight = (torch.randn(1031, 1024, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.float16)
    assert_4bit_like_bnb(weight, quant_type)


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_int8_rows_like_bitsandbytes(dtype):
    """Round-half-to-even ties (a row absmax of 127 makes the scale 1), denormals, extremes, zero rows."""
    info = torch.finfo(dtype)
    ties = torch.arange(-254, 255, dtype=torch.float32) / 2  # -127, -126.5, ..., 127
    rows = torch.stack([
        ties[:256],
        ties[-256:],
        torch.full((256,), info.max).where(torch.arange(256) % 2 == 0, torch.tensor(info.tiny)),
        torch.full((256,), info.tiny / 4),
        torch.zeros(256),
        torch.randn(256, generator=torch.Generator().manual_seed(0)),
    ]).to(dtype)
    codes, stats = fast.quantize_int8_rows(rows)
    reference_codes, reference_stats, _ = F.int8_vectorwise_quant(rows)
    assert_same(stats, reference_stats.float())
    assert torch.equal(codes[:4], reference_codes[:4]) and torch.equal(codes[5], reference_codes[5])
    assert stats[4] == 0 and not codes[4].any()


def test_int8_encode_many_chunks_is_int8params():
    """int8.encode over several chunks equals what transformers stores (bitsandbytes' Int8Params)."""
    import bitsandbytes as bnb

    weight = (torch.randn(700, 1024, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.float16)
    codes, scb = int8.encode(weight)
    reference = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert_same(codes, reference.CB)
    assert_same(scb, reference.SCB)


def test_invalid_arguments():
    code = F.get_4bit_type("nf4", device="cpu")
    with pytest.raises(ValueError, match="blocksize"):
        fast.quantize_4bit(torch.randn(4, 64), code, 63)
    with pytest.raises(ValueError, match="float"):
        fast.quantize_4bit(torch.ones(4, 64, dtype=torch.int32), code, 64)
    with pytest.raises(ValueError, match="2-D"):
        fast.quantize_int8_rows(torch.randn(64))
    with pytest.raises(ValueError, match="blocksize"):
        four_bit.encode(torch.randn(4, 64), "nf4", 48)
    with pytest.raises(ValueError, match="inside"):
        fast.quantize_4bit(torch.randn(4, 64), torch.linspace(-2, 2, 16), 64)
    with pytest.raises(ValueError, match="too close"):
        crowded = torch.cat([torch.linspace(-1, 0.5, 14), torch.tensor([0.5 + 1e-6, 0.5 + 2e-6])])
        fast.quantize_4bit(torch.randn(4, 64), crowded, 64)
