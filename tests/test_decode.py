"""ragged_decode_attention: Triton (interpreted or compiled, single- and multi-split), torch and the
dispatcher against the per-head reference and against dense attention restricted to each head's
kept positions; both metadata layouts (packed, with spare room); GQA; empty segments; bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.attend.triton_impl as decode_triton
from proxykv.kernels import gather_kv_ragged, ragged_decode_attention
from proxykv.kernels.attend.reference import ragged_decode_attention_reference
from proxykv.selection import Selection
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

IMPLS = ["torch", "triton", None]


def dense_restricted_attention(q, k, v, mask, scale=None):
    """Dense softmax attention of ``q [B, H_q, D]`` over ``k, v [B, H_kv, T, D]`` where only
    ``mask [B, H_kv, T]`` positions are visible, in float64; zeros where nothing is visible."""
    group = q.shape[1] // k.shape[1]
    expand = lambda t: t.double().cpu().repeat_interleave(group, dim=1)
    visible = mask.cpu().repeat_interleave(group, dim=1)[:, :, None, :]
    out = F.scaled_dot_product_attention(q.double().cpu()[:, :, None], expand(k), expand(v),
                                         attn_mask=visible, scale=scale)[:, :, 0]
    return torch.where(visible[:, :, 0].any(-1, keepdim=True), out, 0.0)


def _lengths_strategy(count: int):
    return st.lists(st.sampled_from([0, 1, 2, 31, 32, 33, 64, 65]) | st.integers(0, 200),
                    min_size=count, max_size=count)


@st.composite
def decode_cases(draw):
    b = draw(st.integers(1, 2))
    h_q, h_kv = draw(pst.gqa_heads(max_kv_heads=2))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    lengths = draw(_lengths_strategy(b * h_kv))
    spare = draw(st.lists(st.integers(0, 4), min_size=b * h_kv, max_size=b * h_kv)) \
        if draw(st.booleans()) else None
    scale = draw(st.sampled_from([None, 0.3, 1.0]))
    return (b, h_q, h_kv, d, lengths, spare, scale, draw(pst.dtypes()),
            draw(st.sampled_from(["contiguous", "strided"])), draw(st.integers(0, 10_000)))


def _build(case, device):
    b, h_q, _, d, lengths, spare, scale, dtype, layout, seed = case
    generator = torch.Generator().manual_seed(seed)
    rooms = [n + (spare[i] if spare else 0) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0] + torch.tensor(rooms).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(cu_seqlens[-1])

    def storage(*shape):  # cast and move the whole storage, then take views: strides survive
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    if layout == "contiguous":
        k, v, q = storage(rows, d), storage(rows, d), storage(b, h_q, d)
    else:  # slices of wider buffers, and q stored [H_q, B, D]
        k = storage(rows, d + 5)[:, 2:d + 2]
        v = storage(rows, 2 * d)[:, ::2]
        q = storage(h_q, b, d).transpose(0, 1)
    if spare:  # garbage in the spare room must never leak into the output
        for s, n in enumerate(lengths):
            k[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
            v[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device) if spare else None
    return q, k, v, cu_seqlens.to(device), seq_lens, scale, dtype


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=decode_cases())
def test_ragged_decode_matches_reference(impl, case, device):
    q, k, v, cu_seqlens, seq_lens, scale, dtype = _build(case, device)
    out = ragged_decode_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, scale=scale, impl=impl)
    expected = ragged_decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
                                                 seq_lens=None if seq_lens is None else
                                                 seq_lens.cpu(), scale=scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected, dtype=dtype, name=f"ragged_decode[{dtype}]")


@pytest.mark.parametrize("keys_per_split", [32, 64, 96, 256], ids=lambda n: f"split={n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
def test_every_split_plan_gives_the_same_result(keys_per_split, dtype, device):
    """Many splits (merge kernel), one split (direct epilogue) and more splits than any segment
    needs (idle programs) all agree with the reference."""
    case = (2, 8, 2, 32, [0, 130, 1, 64], [3, 0, 0, 2], None, dtype, "strided", 4)
    q, k, v, cu_seqlens, seq_lens, _, _ = _build(case, device)
    max_seq_len = 200  # longer than any segment: splits past every segment's end stay idle
    on_gpu = q.is_cuda
    block_n = decode_triton.gpu_tile(dtype)[0] if on_gpu else 32
    keys_per_split = -(-keys_per_split // block_n) * block_n
    plan = decode_triton.plan_ragged_attention(max_seq_len, 4, 4, 32, dtype, on_gpu,
                                               keys_per_split=keys_per_split)
    out = decode_triton.ragged_decode_attention_triton(q, k, v, cu_seqlens, seq_lens,
                                                       scale=32 ** -0.5, max_seq_len=max_seq_len,
                                                       plan=plan)
    expected = ragged_decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
                                                 seq_lens=seq_lens.cpu())
    assert_close(out, expected, dtype=dtype, name=f"{plan}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("layout", pst.LAYOUTS)
def test_gather_then_decode_equals_dense_attention_over_kept_positions(impl, dtype, layout,
                                                                       device):
    b, h_q, h_kv, t, d = 2, 6, 3, 150, 32
    generator = torch.Generator().manual_seed(11)
    k = pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device)
    v = pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device)
    q = torch.randn(b, h_q, d, generator=generator).to(dtype=dtype, device=device)
    # Per-head budgets: 0 (empty), a few, about half, everything.
    budgets = torch.tensor([[0.0, 0.05, 0.5], [1.0, 0.3, 0.02]])[:, None, :, None]
    mask = torch.rand(b, 1, h_kv, t, generator=generator) < budgets
    view = Selection.from_mask(mask).layer(0)
    k_packed, v_packed = gather_kv_ragged(k, v, view.indices.to(device),
                                          view.cu_seqlens.to(device), impl=impl)
    out = ragged_decode_attention(q, k_packed, v_packed, view.cu_seqlens.to(device), impl=impl)
    expected = dense_restricted_attention(q, k, v, mask[:, 0])
    assert_close(out, expected, dtype=dtype, name="ragged decode vs dense masked attention")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_segments_empty_gives_zeros(impl, device):
    q = torch.randn(2, 4, 16, device=device)
    empty = torch.zeros(0, 16, device=device)
    cu_seqlens = torch.zeros(2 * 2 + 1, dtype=torch.int32, device=device)
    out = ragged_decode_attention(q, empty, empty, cu_seqlens, impl=impl)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 16))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_kept_row_returns_its_value(impl, device):
    v_row = torch.randn(1, 8)
    q = torch.randn(1, 2, 8)
    out = ragged_decode_attention(q.to(device), torch.randn(1, 8, device=device),
                                  v_row.to(device), torch.tensor([0, 1], dtype=torch.int32,
                                                                 device=device), impl=impl)
    assert_close(out.cpu(), v_row.expand(1, 2, 8).reshape(1, 2, 8))


def test_impl_none_runs_the_triton_kernel_under_the_interpreter(monkeypatch, device):
    calls = []
    original = decode_triton.ragged_decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs["max_seq_len"])
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_triton, "ragged_decode_attention_triton", spy)
    cu_seqlens = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)
    ragged_decode_attention(torch.randn(1, 2, 8, device=device), torch.randn(10, 8, device=device),
                            torch.randn(10, 8, device=device), cu_seqlens)
    assert calls == [7]


def test_inputs_are_not_modified(device):
    q, k, v = (torch.randn(1, 4, 8, device=device), torch.randn(9, 8, device=device),
               torch.randn(9, 8, device=device))
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([2, 5], dtype=torch.int32, device=device)
    before = [t.clone() for t in (q, k, v, cu_seqlens, seq_lens)]
    for impl in ("torch", "triton"):
        ragged_decode_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, impl=impl)
    for original, now in zip(before, (q, k, v, cu_seqlens, seq_lens)):
        assert torch.equal(original, now)


# ---------------------------------------------------------------------------------- bad input

def _args(**changes):
    arguments = dict(q=torch.zeros(1, 4, 8), k_packed=torch.zeros(9, 8),
                     v_packed=torch.zeros(9, 8),
                     cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=torch.zeros(4, 8)), ValueError, r"q must be a 3-D tensor \[B, H_q, D\]"),
    (dict(q=torch.zeros(1, 4, 8, dtype=torch.float16)), TypeError,
     "q and k_packed must have the same dtype, got torch.float16 and torch.float32"),
    (dict(v_packed=torch.zeros(9, 4)), ValueError,
     r"k_packed and v_packed must both be \[N, D\] with D = 8"),
    (dict(k_packed=torch.zeros(9, 4), v_packed=torch.zeros(9, 4)), ValueError,
     r"k_packed and v_packed must both be \[N, D\] with D = 8"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 9.0])), TypeError,
     "cu_seqlens must be int32 or int64, got torch.float32"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9, 9], dtype=torch.int32)), ValueError,
     "the number of query heads H_q=4 must be a multiple of the number of KV heads H_kv=3"),
    (dict(q=torch.zeros(2, 4, 8), cu_seqlens=torch.tensor([0, 4, 6, 9], dtype=torch.int32)),
     ValueError, r"cu_seqlens must have B \* H_kv \+ 1 entries with B = 2 \(from q\), got 4"),
    (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens must end at N = k_packed.shape\[0\] = 9, got cu_seqlens\[-1\] = 8"),
    (dict(cu_seqlens=torch.tensor([0, 10, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([2, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens must start at 0"),
    (dict(seq_lens=torch.tensor([4, 6], dtype=torch.int32)), ValueError,
     (r"seq_lens\[1\] \(segment b=0, h=1\) = 6 exceeds the segment's room "
      r"cu_seqlens\[2\] - cu_seqlens\[1\] = 5")),
    (dict(seq_lens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError,
     "seq_lens must be >= 0, got a minimum of -1"),
    (dict(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     r"seq_lens must have B \* H_kv = 2 entries"),
    (dict(seq_lens=torch.tensor([1.0, 2.0])), TypeError,
     "seq_lens must be int32 or int64, got torch.float32"),
    (dict(max_seq_len=4), ValueError,
     r"max_seq_len = 4 is shorter than the longest segment \(5 rows\)"),
    (dict(max_seq_len=-1), ValueError, "max_seq_len must be >= 0, got -1"),
    (dict(scale="big"), TypeError, "scale must be a float, got str 'big'"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float > 0 .*got nan"),
    (dict(scale=0), ValueError, r"scale must be a finite float > 0 .*got 0.0"),
    (dict(k_packed=torch.zeros(9, 8, device="meta")), ValueError,
     "q and k_packed must be on the same device, got cpu and meta"),
    (dict(seq_lens=torch.tensor([1, 2], dtype=torch.int32, device="meta")), ValueError,
     "q and seq_lens must be on the same device, got cpu and meta"),
    (dict(impl="gpu"), ValueError, "impl must be one of 'triton', 'torch' or None"),
], ids=["q-rank", "q-dtype", "v-dim", "kv-dim", "cu-float", "gqa", "cu-vs-batch", "cu-end",
        "cu-decreasing", "cu-start", "seq-lens-too-long", "seq-lens-negative",
        "seq-lens-count", "seq-lens-float", "max-seq-len-short", "max-seq-len-negative",
        "scale-type", "scale-nan", "scale-zero", "k-device", "seq-lens-device", "impl"])
def test_bad_input_raises(changes, error, message):
    with pytest.raises(error, match=message):
        ragged_decode_attention(**_args(**changes))


def test_bad_metadata_is_caught_before_any_kernel_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(decode_triton, "ragged_decode_attention_triton", forbidden)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        ragged_decode_attention(**_args(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)),
                                impl="triton")
