"""Codecs against bitsandbytes' own functions: encodes byte-identical, folds exact, edge cases handled."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

from ia3convert.codecs import four_bit, int8


def weight(rows=48, cols=128, seed=0, dtype=torch.float16):
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def vector(n, seed=1):
    v = 1 + 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed))
    v[0], v[1] = -0.7, 0.0
    return v


def test_int8_encode_is_bitsandbytes_int8params():
    import bitsandbytes as bnb

    w = weight()
    codes, scb = int8.encode(w)
    reference = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(codes, reference.CB) and torch.equal(scb, reference.SCB)
    assert torch.equal(int8.decode(codes, scb), F.int8_vectorwise_dequant(codes, scb).float())


def test_int8_zero_rows_get_zero_codes():
    w = weight()
    w[3] = 0
    codes, scb = int8.encode(w)
    assert scb[3] == 0 and not codes[3].any()
    assert torch.isfinite(int8.decode(codes, scb)).all()


def test_int8_fold_is_exact_and_keeps_code_magnitudes():
    codes, scb = int8.encode(weight())
    v = vector(codes.shape[0])
    new_codes, new_scb = int8.fold_rows(codes, scb, v)
    assert torch.equal(new_codes.abs(), codes.abs())
    assert torch.equal(new_codes[0], -codes[0])
    expected = int8.decode(codes, scb) * v[:, None]
    assert torch.allclose(int8.decode(new_codes, new_scb), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_4bit_encode_is_bitsandbytes(quant_type, nested, dtype):
    w = weight(dtype=dtype)
    packed = four_bit.encode(w, quant_type, 64, nested, dtype=dtype)
    codes, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    assert torch.equal(packed.codes, codes)
    reference = state.as_dict(packed=True)
    assert packed.stats.keys() == reference.keys()
    assert all(torch.equal(packed.stats[k], reference[k]) for k in reference)
    assert torch.equal(four_bit.decode(packed).to(dtype), F.dequantize_4bit(codes, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_4bit_fold_is_exact(quant_type, nested):
    packed = four_bit.encode(weight(), quant_type, 64, nested)
    v = vector(48)
    folded = four_bit.fold_rows(packed, v)
    assert torch.equal(folded.codes, packed.codes)
    assert not folded.nested
    expected = four_bit.decode(packed) * v[:, None]
    assert torch.allclose(four_bit.decode(folded), expected, rtol=1e-6, atol=1e-9)


def test_denest_is_exact_and_renest_is_close():
    packed = four_bit.encode(weight(rows=64, cols=512), "nf4", 64, nested=True)
    plain = four_bit.denest(packed)
    assert not plain.nested and plain.stats["absmax"].dtype == torch.float32
    assert torch.equal(four_bit.decode(plain), four_bit.decode(packed))
    again = four_bit.renest(plain)
    assert again.nested
    error = (four_bit.decode(again) - four_bit.decode(packed)).norm() / four_bit.decode(packed).norm()
    assert 0 < error < 1e-2


def test_4bit_fold_refuses_straddling_blocks():
    packed = four_bit.encode(weight(rows=8, cols=96), "nf4", 64)
    assert not four_bit.can_fold_rows(packed)
    with pytest.raises(ValueError, match="straddle"):
        four_bit.fold_rows(packed, vector(8))
