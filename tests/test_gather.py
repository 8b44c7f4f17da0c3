"""gather_kv / gather_kv_ragged: Triton (interpreted or compiled), torch and the dispatcher against
plain indexing, over cache layouts, dtypes, index sets (empty, full, sparse) and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.gather.triton_impl as gather_triton
from proxykv.kernels import gather_kv, gather_kv_ragged
from proxykv.kernels.gather.reference import gather_kv_ragged_reference, gather_kv_reference
from proxykv.selection import Selection
from proxykv.testing import strategies as pst

IMPLS = ["torch", "triton", None]
HEAD_DIMS = [1, 16, 24, 64]


def _kv(shape, dtype, layout, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return (pst.make_bhtd(shape, dtype, layout, generator, device),
            pst.make_bhtd(shape, dtype, layout, generator, device))


def _kept_mask(draw, rows: int, seq_len: int) -> torch.Tensor:
    """bool ``[rows, T]`` keep-mask; per row density 0 (empty), 1 (full) or in between."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    densities = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
                                           min_size=rows, max_size=rows)))
    return torch.rand(rows, seq_len, generator=generator) < densities[:, None]


@st.composite
def uniform_cases(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seq_len = draw(pst.lengths(1, 300))
    d = draw(st.sampled_from(HEAD_DIMS))
    n = draw(st.sampled_from([0, 1, seq_len, min(seq_len, 17), min(seq_len, 65)]) |
             st.integers(0, seq_len))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    indices = torch.rand(b, h, seq_len, generator=generator).argsort(-1)[..., :n].sort(-1).values
    indices = indices.to(draw(st.sampled_from([torch.int32, torch.int64])))
    if draw(st.booleans()):  # a strided view of the index tensor
        indices = indices.transpose(0, 1).contiguous().transpose(0, 1)
    return (b, h, seq_len, d), draw(pst.dtypes()), draw(pst.layouts()), indices, \
        draw(st.integers(0, 1000)), draw(st.sampled_from(["none", "contiguous", "strided"]))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=uniform_cases())
def test_gather_kv_equals_plain_indexing(impl, case, device):
    shape, dtype, layout, indices, seed, out_kind = case
    k, v = _kv(shape, dtype, layout, seed, device)
    indices = indices.to(device)
    b, h, _, d = shape
    n = indices.shape[-1]
    out = None
    if out_kind == "contiguous":
        out = (torch.empty(b, h, n, d, dtype=dtype, device=device),
               torch.empty(b, h, n, d, dtype=dtype, device=device))
    elif out_kind == "strided":  # [B, n, H, D] storage seen as [B, H, n, D]
        out = tuple(torch.empty(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
                    for _ in range(2))
    k_sel, v_sel = gather_kv(k, v, indices, out=out, impl=impl)
    k_ref, v_ref = gather_kv_reference(k.cpu(), v.cpu(), indices.cpu())
    assert k_sel.shape == (b, h, n, d) and k_sel.dtype == dtype
    assert torch.equal(k_sel.cpu(), k_ref) and torch.equal(v_sel.cpu(), v_ref)
    if out is not None:
        assert k_sel is out[0] and v_sel is out[1]


@st.composite
def ragged_cases(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seq_len = draw(pst.lengths(1, 300))
    mask = _kept_mask(draw, b * h, seq_len)
    indices = mask.nonzero()[:, 1].to(draw(st.sampled_from([torch.int32, torch.int64])))
    cu_seqlens = torch.zeros(b * h + 1, dtype=torch.int32)
    cu_seqlens[1:] = mask.sum(-1).cumsum(0)
    return ((b, h, seq_len, draw(st.sampled_from(HEAD_DIMS))), draw(pst.dtypes()),
            draw(pst.layouts()), indices, cu_seqlens, draw(st.integers(0, 1000)),
            draw(st.sampled_from(["none", "packed", "with_room"])),
            draw(st.lists(st.integers(0, 5), min_size=b * h, max_size=b * h)))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=ragged_cases())
def test_gather_kv_ragged_equals_plain_indexing(impl, case, device):
    shape, dtype, layout, indices, cu_seqlens, seed, out_kind, spare = case
    k, v = _kv(shape, dtype, layout, seed, device)
    d = shape[-1]
    k_ref, v_ref = gather_kv_ragged_reference(k.cpu(), v.cpu(), indices, cu_seqlens)
    indices, cu_seqlens = indices.to(device), cu_seqlens.to(device)
    n = indices.numel()
    if out_kind == "none":
        k_out, v_out = gather_kv_ragged(k, v, indices, cu_seqlens, impl=impl)
        assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)
        return
    if out_kind == "packed":  # a strided out: every other row of a larger buffer
        buffers = [torch.empty(2 * n, d + 2, dtype=dtype, device=device)[::2, :d]
                   for _ in range(2)]
        k_out, v_out = gather_kv_ragged(k, v, indices, cu_seqlens, out=tuple(buffers), impl=impl)
        assert k_out is buffers[0] and v_out is buffers[1]
        assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)
        return
    # Spare room after every segment: it must be left exactly as it was.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
    room = torch.zeros_like(cu_seqlens, device="cpu")
    room[1:] = (lengths + torch.tensor(spare)).cumsum(0)
    rows = int(room[-1])
    sentinel = torch.full((rows, d), 7.0, dtype=dtype)
    buffers = (sentinel.clone().to(device), sentinel.clone().to(device))
    gather_kv_ragged(k, v, indices, cu_seqlens, out=buffers, out_cu_seqlens=room.to(device),
                     impl=impl)
    expected_k, expected_v = sentinel.clone(), sentinel.clone()
    starts = cu_seqlens.cpu().tolist()
    for s in range(lengths.numel()):
        length = int(lengths[s])
        expected_k[int(room[s]):int(room[s]) + length] = k_ref[starts[s]:starts[s] + length]
        expected_v[int(room[s]):int(room[s]) + length] = v_ref[starts[s]:starts[s] + length]
    assert torch.equal(buffers[0].cpu(), expected_k) and torch.equal(buffers[1].cpu(), expected_v)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("pattern", ["all-empty", "all-full", "only-last", "only-first"])
def test_ragged_extreme_segment_patterns(impl, pattern, device):
    b, h, t, d = 2, 3, 70, 8
    mask = torch.zeros(b * h, t, dtype=torch.bool)
    if pattern == "all-full":
        mask[:] = True
    elif pattern == "only-last":
        mask[-1, ::3] = True
    elif pattern == "only-first":
        mask[0, 5:9] = True
    indices = mask.nonzero()[:, 1].to(torch.int32)
    cu_seqlens = torch.cat([torch.zeros(1), mask.sum(-1).cumsum(0)]).to(torch.int32)
    k, v = _kv((b, h, t, d), torch.float32, "bthd", 3, device)
    k_out, v_out = gather_kv_ragged(k, v, indices.to(device), cu_seqlens.to(device), impl=impl)
    k_ref, v_ref = gather_kv_ragged_reference(k.cpu(), v.cpu(), indices, cu_seqlens)
    assert k_out.shape == (int(mask.sum()), d)
    assert torch.equal(k_out.cpu(), k_ref) and torch.equal(v_out.cpu(), v_ref)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ragged_gather_of_a_selection_layer_equals_masking(impl, device):
    b, layers, h, t, d = 2, 3, 2, 90, 16
    generator = torch.Generator().manual_seed(5)
    budgets = torch.tensor([0.1, 0.6])[None, None, :, None]  # per-head budgets differ
    mask = torch.rand(b, layers, h, t, generator=generator) < budgets
    selection = Selection.from_mask(mask)
    assert selection.is_ragged
    for layer in range(layers):
        k, v = _kv((b, h, t, d), torch.float16, "cache_slice", layer, device)
        view = selection.layer(layer)
        k_out, _ = gather_kv_ragged(k, v, view.indices.to(device), view.cu_seqlens.to(device),
                                    impl=impl)
        expected = torch.cat([k[bb, hh][mask[bb, layer, hh]].cpu()
                              for bb in range(b) for hh in range(h)])
        assert torch.equal(k_out.cpu(), expected)


@pytest.mark.parametrize("d", [192, 256])
def test_head_dims_above_one_block_chunk_the_head_dim(d, device):
    # BLOCK_D caps at 128, so D = 192 / 256 run the kernels' head-dim chunk loop more than once.
    b, h, t = 1, 2, 12
    k, v = _kv((b, h, t, d), torch.float16, "bthd", d, device)
    indices = torch.tensor([[[0, 4, 11], [2, 3, 7]]])
    k_uni, v_uni = gather_kv(k, v, indices.to(device), impl="triton")
    k_ref, v_ref = gather_kv_reference(k.cpu(), v.cpu(), indices)
    assert torch.equal(k_uni.cpu(), k_ref) and torch.equal(v_uni.cpu(), v_ref)
    packed = torch.tensor([0, 4, 11, 5], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 3, 4], dtype=torch.int32)
    k_rag, v_rag = gather_kv_ragged(k, v, packed.to(device), cu_seqlens.to(device), impl="triton")
    k_ref, v_ref = gather_kv_ragged_reference(k.cpu(), v.cpu(), packed, cu_seqlens)
    assert torch.equal(k_rag.cpu(), k_ref) and torch.equal(v_rag.cpu(), v_ref)


def test_unsorted_last_segment_before_empty_trailing_segments_is_caught():
    # Empty trailing segments start at N; that must not excuse the last entry from the sort check.
    k = v = torch.zeros(1, 3, 10, 4)
    with pytest.raises(ValueError, match="at packed positions 1, 2"):
        gather_kv_ragged(k, v, torch.tensor([0, 5, 2]),
                         torch.tensor([0, 0, 3, 3], dtype=torch.int32))


def test_uniform_and_ragged_gathers_agree(device):
    b, h, t, d = 2, 2, 40, 16
    indices = torch.stack([torch.randperm(t)[:11].sort().values for _ in range(b * h)])
    k, v = _kv((b, h, t, d), torch.bfloat16, "head_slice", 9, device)
    k_uni, v_uni = gather_kv(k, v, indices.reshape(b, h, 11).to(device), impl="triton")
    cu_seqlens = (torch.arange(b * h + 1) * 11).to(torch.int32)
    k_rag, v_rag = gather_kv_ragged(k, v, indices.reshape(-1).to(device), cu_seqlens.to(device),
                                    impl="triton")
    assert torch.equal(k_uni.reshape(-1, d), k_rag) and torch.equal(v_uni.reshape(-1, d), v_rag)


def test_impl_none_runs_the_triton_kernels_under_the_interpreter(monkeypatch, device):
    calls = []
    for name in ("gather_kv_triton", "gather_kv_ragged_triton"):
        original = getattr(gather_triton, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(gather_triton, name, spy)
    k, v = _kv((1, 2, 10, 8), torch.float32, "contiguous", 0, device)
    gather_kv(k, v, torch.tensor([[[1, 4]], [[0, 9]]], device=device).reshape(1, 2, 2))
    gather_kv_ragged(k, v, torch.tensor([3, 5, 7], device=device),
                     torch.tensor([0, 1, 3], dtype=torch.int32, device=device))
    assert calls == ["gather_kv_triton", "gather_kv_ragged_triton"]


def test_inputs_are_not_modified(device):
    k, v = _kv((2, 2, 30, 8), torch.float32, "bthd", 1, device)
    indices = torch.tensor([2, 7, 8, 0, 29, 4, 5, 6], device=device)
    cu_seqlens = torch.tensor([0, 3, 5, 5, 8], dtype=torch.int32, device=device)
    before = [t.clone() for t in (k, v, indices, cu_seqlens)]
    for impl in ("torch", "triton"):
        gather_kv_ragged(k, v, indices, cu_seqlens, impl=impl)
        gather_kv(k, v, indices[:4].reshape(1, 1, 4).expand(2, 2, 4).sort(-1).values, impl=impl)
    for original, now in zip(before, (k, v, indices, cu_seqlens)):
        assert torch.equal(original, now)


def test_check_indices_false_skips_validation_but_gathers_the_same(device):
    k, v = _kv((1, 2, 20, 8), torch.float16, "contiguous", 2, device)
    indices = torch.tensor([[[1, 5, 9]], [[0, 2, 19]]], device=device).reshape(1, 2, 3)
    checked = gather_kv(k, v, indices, impl="triton")
    unchecked = gather_kv(k, v, indices, check_indices=False, impl="triton")
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    # Unsorted indices pass without the check (the caller vouched for them) and still gather.
    swapped = indices.flip(-1)
    k_sel, _ = gather_kv(k, v, swapped, check_indices=False, impl="torch")
    assert torch.equal(k_sel, k.gather(2, swapped[..., None].expand(-1, -1, -1, 8)))


# ---------------------------------------------------------------------------------- bad input

def _uniform_args(**changes):
    arguments = dict(k=torch.zeros(1, 2, 10, 4), v=torch.zeros(1, 2, 10, 4),
                     indices=torch.tensor([[[0, 3, 9], [1, 2, 3]]]))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(indices=torch.tensor([[[0, 3, 10], [1, 2, 3]]])), ValueError,
     r"indices must lie in \[0, 10\), got values in \[0, 10\]"),
    (dict(indices=torch.tensor([[[-1, 3, 9], [1, 2, 3]]])), ValueError,
     r"indices must lie in \[0, 10\), got values in \[-1, 9\]"),
    (dict(indices=torch.tensor([[[0, 9, 3], [1, 2, 3]]])), ValueError,
     "indices must be strictly increasing along its last dimension"),
    (dict(indices=torch.tensor([[[0, 3, 9], [1, 2, 2]]])), ValueError,
     "indices must be strictly increasing along its last dimension"),
    (dict(indices=torch.tensor([[[0.0, 3.0, 9.0], [1.0, 2.0, 3.0]]])), TypeError,
     "indices must be int32 or int64, got torch.float32"),
    (dict(indices=torch.tensor([[0, 3, 9]])), ValueError,
     r"indices must be a 3-D tensor \[B, H_kv, n\], got shape \(1, 3\)"),
    (dict(indices=torch.tensor([[[0, 3, 9]]])), ValueError,
     "indices has KV head count H_kv 1 in dimension 1, expected 2"),
    (dict(v=torch.zeros(1, 2, 10, 4, dtype=torch.float16)), TypeError,
     "k and v must have the same dtype, got torch.float32 and torch.float16"),
    (dict(v=torch.zeros(1, 2, 11, 4)), ValueError,
     r"v must have the shape of k \(1, 2, 10, 4\)"),
    (dict(k=torch.zeros(2, 10, 4)), ValueError, r"k must be a 4-D tensor \[B, H_kv, T, D\]"),
    (dict(k=torch.zeros(1, 2, 10, 4, dtype=torch.int32)), TypeError,
     "k must be float16, bfloat16 or float32, got torch.int32"),
    (dict(indices=torch.tensor([[[0, 3, 9], [1, 2, 3]]], device="meta")), ValueError,
     "k and indices must be on the same device, got cpu and meta"),
    (dict(v=torch.zeros(1, 2, 10, 4, device="meta")), ValueError,
     "k and v must be on the same device, got cpu and meta"),
    (dict(out=torch.zeros(1, 2, 3, 4)), TypeError, "out must be a pair"),
    (dict(out=(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 4))), ValueError,
     r"out\[1\] must have shape \(1, 2, 3, 4\) \[B, H_kv, n, D\], got \(1, 2, 4, 4\)"),
    (dict(out=(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 4))),
     TypeError, r"out\[0\] must be float32, got torch.bfloat16"),
    (dict(impl="cuda"), ValueError, "impl must be one of 'triton', 'torch' or None"),
], ids=["above-T", "negative", "unsorted", "repeated", "float-indices", "indices-rank",
        "indices-heads", "kv-dtype", "kv-shape", "k-rank", "k-int", "indices-device",
        "v-device", "out-not-pair", "out-shape", "out-dtype", "impl"])
def test_gather_kv_bad_input_raises(changes, error, message):
    with pytest.raises(error, match=message):
        gather_kv(**_uniform_args(**changes))


def _ragged_args(**changes):
    arguments = dict(k=torch.zeros(1, 2, 10, 4), v=torch.zeros(1, 2, 10, 4),
                     indices=torch.tensor([0, 3, 9, 1, 2]),
                     cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(indices=torch.tensor([0, 3, 10, 1, 2])), ValueError,
     r"indices must lie in \[0, T\) = \[0, 10\), got values in \[0, 10\]"),
    (dict(indices=torch.tensor([0, 9, 3, 1, 2])), ValueError,
     (r"strictly increasing within each segment .*segment 0 \(b=0, h=0\) has 9 then 3 at "
      r"packed positions 1, 2")),
    (dict(indices=torch.tensor([0, 3, 9, 2, 2])), ValueError,
     r"segment 1 \(b=0, h=1\) has 2 then 2 at packed positions 3, 4"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError,
     r"cu_seqlens must be non-decreasing .* cu_seqlens\[2\] < cu_seqlens\[1\]"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), ValueError,
     r"cu_seqlens must end at N = indices.numel\(\) = 5, got cu_seqlens\[-1\] = 4"),
    (dict(cu_seqlens=torch.tensor([1, 3, 5], dtype=torch.int32)), ValueError,
     r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
    (dict(cu_seqlens=torch.tensor([0.0, 3.0, 5.0])), TypeError,
     "cu_seqlens must be int32 or int64, got torch.float32"),
    (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     r"cu_seqlens must have B \* H_kv \+ 1 = 3 entries, got 2"),
    (dict(indices=torch.tensor([[0, 3, 9, 1, 2]])), ValueError,
     r"indices must be a 1-D tensor \[N\]"),
    (dict(cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32, device="meta")), ValueError,
     "k and cu_seqlens must be on the same device, got cpu and meta"),
    (dict(v=torch.zeros(1, 2, 10, 4, dtype=torch.bfloat16)), TypeError,
     "k and v must have the same dtype"),
    (dict(out=(torch.zeros(5, 4), torch.zeros(5, 3))), ValueError,
     r"out\[1\] must have shape \(5, 4\) \[N, D\], got \(5, 3\)"),
    (dict(out_cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError,
     "out_cu_seqlens needs out"),
    (dict(out=(torch.zeros(6, 4), torch.zeros(6, 4)),
          out_cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32)), ValueError,
     (r"out_cu_seqlens gives segment 0 room for fewer rows than cu_seqlens puts in it "
      r"\(b=0, h=0\)")),
    (dict(out=(torch.zeros(6, 4), torch.zeros(6, 4)),
          out_cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError,
     "out_cu_seqlens must end at the number of rows of out = 6, got out_cu_seqlens"),
    (dict(out=(torch.zeros(6, 4), torch.zeros(5, 4)),
          out_cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     r"out\[1\] must have shape \(6, 4\) \[M, D\], got \(5, 4\)"),
    (dict(out=(torch.zeros(6), torch.zeros(6)),
          out_cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     r"out\[0\] must be a 2-D tensor \[M, D\], got shape \(6,\)"),
], ids=["above-T", "unsorted", "repeated", "cu-decreasing", "cu-short", "cu-not-zero",
        "cu-float", "cu-length", "indices-rank", "cu-device", "kv-dtype", "out-shape",
        "out-cu-without-out", "out-cu-too-small", "out-cu-end", "out-cu-rows-differ",
        "out-cu-rank"])
def test_gather_kv_ragged_bad_input_raises(changes, error, message):
    with pytest.raises(error, match=message):
        gather_kv_ragged(**_ragged_args(**changes))


def test_ragged_bad_input_is_caught_before_any_kernel_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(gather_triton, "gather_kv_ragged_triton", forbidden)
    with pytest.raises(ValueError, match="strictly increasing"):
        gather_kv_ragged(**_ragged_args(indices=torch.tensor([0, 9, 3, 1, 2])), impl="triton")
