"""pool_scores: Triton (interpreted or compiled), torch and the dispatcher against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.pool.triton_impl as pool_triton
from proxykv import pool_scores
from proxykv.kernels.pool.reference import pool_scores_reference
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

IMPLS = ["torch", "triton", None]


@st.composite
def pooling_cases(draw):
    rank = draw(st.integers(1, 4))
    leading = draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1))
    length = draw(pst.lengths(1, 200))
    scores = draw(pst.score_tensors((*leading, length)))
    scores = draw(pst.strided_views(scores))
    kernel_size = draw(st.sampled_from([1, 3, 5, 7, 15])) if draw(st.booleans()) \
        else 2 * draw(st.integers(0, 40)) + 1
    mode = draw(st.sampled_from(["max", "avg"]))
    return scores, kernel_size, mode


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=pooling_cases())
def test_pool_scores_matches_reference(impl, case, device):
    scores, kernel_size, mode = case
    scores = scores.to(device)
    expected = pool_scores_reference(scores.cpu(), kernel_size, mode)
    actual = pool_scores(scores, kernel_size, mode=mode, impl=impl)
    assert actual.dtype == torch.float32 and actual.device == scores.device
    assert_close(actual, expected, name=f"pool_scores[{mode}, k={kernel_size}]")


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=pooling_cases(), data=st.data())
def test_pool_scores_with_pos_inf_matches_reference(impl, case, data, device):
    scores, kernel_size, mode = case
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = scores.masked_fill(torch.rand(scores.shape, generator=generator) < 0.1,
                                float("inf"))
    expected = pool_scores_reference(scores, kernel_size, mode)
    actual = pool_scores(scores.to(device), kernel_size, mode=mode, impl=impl)
    assert not bool(actual.isnan().any()), "NaN from +inf input"
    assert_close(actual, expected, name=f"pool_scores[{mode}, k={kernel_size}] with +inf")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pos_inf_spreads_over_its_window_but_not_into_invalid_positions(impl, mode, device):
    scores = torch.tensor([1.0, float("inf"), 2.0, float("-inf"), 3.0, 4.0], device=device)
    pooled = pool_scores(scores, 3, mode=mode, impl=impl).cpu()
    assert pooled.tolist()[:4] == [float("inf"), float("inf"), float("inf"), float("-inf")]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_float64_scores_are_read_as_float32(impl, device):
    scores = torch.randn(3, 20, dtype=torch.float64, device=device)
    pooled = pool_scores(scores, 5, mode="avg", impl=impl)
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, pool_scores(scores.float(), 5, mode="avg", impl=impl))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_invalid_positions_stay_invalid_and_never_leak(impl, mode, device):
    scores = torch.tensor([[float("-inf"), 5.0, float("-inf"), float("-inf"), 1.0, 3.0]],
                          device=device)
    pooled = pool_scores(scores, 3, mode=mode, impl=impl).cpu()
    assert torch.isneginf(pooled[0, [0, 2, 3]]).all()
    if mode == "max":
        assert pooled[0].tolist()[1:] == [5.0, float("-inf"), float("-inf"), 3.0, 3.0]
    else:
        # avg over the valid entries only: position 1 sees only itself, 4 sees (1+3)/2.
        assert pooled[0, 1] == 5.0 and pooled[0, 4] == 2.0 and pooled[0, 5] == 2.0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fully_invalid_row_stays_invalid(impl, device):
    scores = torch.full((2, 33), float("-inf"), device=device)
    scores[1] = 1.0
    pooled = pool_scores(scores, 5, mode="avg", impl=impl).cpu()
    assert torch.isneginf(pooled[0]).all() and (pooled[1] == 1.0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_window_wider_than_the_sequence(impl, device):
    scores = torch.tensor([1.0, 4.0, 2.0], device=device)
    assert pool_scores(scores, 9, mode="max", impl=impl).cpu().tolist() == [4.0, 4.0, 4.0]
    assert pool_scores(scores, 9, mode="avg", impl=impl).cpu().allclose(
        torch.full((3,), 7.0 / 3))


def test_more_than_three_unmergeable_leading_dims_raise_on_triton(device):
    # Every leading dim steps over a gap, so no two of the four can be merged into one stride.
    scores = torch.randn(4, 4, 4, 4, 5, device=device)[::2, ::2, ::2, ::2, :3]
    with pytest.raises(ValueError, match="cannot be walked as 3 strided dimensions"):
        pool_scores(scores, 3, impl="triton")
    # The torch path handles any layout.
    assert_close(pool_scores(scores, 3, impl="torch").cpu(),
                 pool_scores_reference(scores.cpu(), 3, "max"))


def test_impl_none_runs_the_triton_kernel_under_the_interpreter(monkeypatch, device):
    calls = []
    original = pool_triton.pool_scores_triton

    def spy(*args):
        calls.append(args[1:])
        return original(*args)

    monkeypatch.setattr(pool_triton, "pool_scores_triton", spy)
    pool_scores(torch.randn(4, 10, device=device), 3)
    assert calls == [(3, "max")]


def test_input_is_not_modified(device):
    scores = torch.randn(3, 20, device=device)
    before = scores.clone()
    for impl in ("torch", "triton"):
        pool_scores(scores, 5, mode="avg", impl=impl)
    assert torch.equal(scores, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scores=torch.tensor(1.0)), ValueError,
         r"scores must have at least 1 dimension\(s\) \[\.\.\., T\], got shape \(\)"),
        (dict(scores=torch.zeros(2, 0)), ValueError, r"at least one position \(T >= 1\)"),
        (dict(scores=torch.zeros(4, dtype=torch.float16)), TypeError,
         "scores must be float32 or float64, got torch.float16"),
        (dict(scores=torch.zeros(0, 3, 8)), ValueError,
         r"scores must have every dimension >= 1 \[\.\.\., T\], got shape \(0, 3, 8\)"),
        (dict(scores=torch.zeros(2, 0, 8)), ValueError,
         r"scores must have every dimension >= 1 \[\.\.\., T\], got shape \(2, 0, 8\)"),
        (dict(scores=torch.zeros(2, 8, device="meta")), ValueError,
         "scores must be on a CPU or CUDA device, got meta"),
        (dict(scores=[1.0, 2.0]), TypeError, "scores must be a torch.Tensor, got list"),
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
        (dict(kernel_size=-3), ValueError, "kernel_size must be >= 1, got -3"),
        (dict(kernel_size=4), ValueError, r"kernel_size must be odd \(the window is centred\)"),
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int, got float"),
        (dict(mode="sum"), ValueError, "mode must be one of 'max' or 'avg', got 'sum'"),
        (dict(impl="cuda"), ValueError, "impl must be one of 'triton', 'torch' or None, got 'cuda'"),
    ],
    ids=["rank0", "empty-T", "fp16", "empty-B", "empty-H", "meta", "list", "k0", "k-neg",
         "k-even", "k-float", "mode", "impl"],
)
def test_bad_input_raises_before_running(kwargs, error, message):
    arguments = dict(scores=torch.zeros(2, 8), kernel_size=3, mode="max", impl=None) | kwargs
    scores, kernel_size = arguments.pop("scores"), arguments.pop("kernel_size")
    with pytest.raises(error, match=message):
        pool_scores(scores, kernel_size, **arguments)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' cannot run: tensors are on the CPU and "
                                         "TRITON_INTERPRET=1 is not set"):
        pool_scores(torch.zeros(8), 3, impl="triton")
    # impl=None picks the torch implementation instead, without error.
    assert_close(pool_scores(torch.arange(8.0), 3), pool_scores_reference(torch.arange(8.0), 3,
                                                                          "max"))
