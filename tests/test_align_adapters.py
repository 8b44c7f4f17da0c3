"""Aligners: registry, the training-free maps (exact on hand-built cases), linear, the axial
mapper (against its float64 oracle, its residual start, invariants), -inf handling, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv import align
from proxykv.align import (
    available_aligners,
    depth_interp_matrix,
    get_aligner,
    head_resample_matrix,
    layer_interp_matrix,
    register_aligner,
)
from proxykv.align.base import Aligner
from proxykv.testing import assert_close

NEG_INF = float("-inf")
ALL_ALIGNERS = ["identity", "depth_interp", "mean_broadcast", "linear", "axial"]
QWEN_05B, QWEN_7B = (24, 2), (28, 4)


def scores(batch, shape, length, *, seed=0):
    return torch.randn(batch, *shape, length, generator=torch.Generator().manual_seed(seed))


def randomise_weights(aligner: Aligner, seed: int = 1) -> Aligner:
    """Non-zero weights everywhere, so a learned aligner is not at its depth_interp start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in aligner.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return aligner


def test_registry_lists_every_adapter():
    assert set(ALL_ALIGNERS) <= set(available_aligners())
    assert available_aligners() == sorted(available_aligners())


def test_unknown_aligner_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown aligner 'nope'; available: 'axial', "
                                         r"'depth_interp', 'identity', 'linear', 'mean_broadcast'"):
        get_aligner("nope", (2, 2), (2, 2))


def test_unknown_parameter_is_a_type_error_naming_the_accepted_ones():
    with pytest.raises(TypeError, match=r"get_aligner\('axial'\) got unexpected parameter\(s\) "
                                        r"'kernel'; accepted: conv_kernel, conv_filters, "
                                        r"pool_sizes, profiles, hidden"):
        get_aligner("axial", (2, 2), (3, 2), kernel=5)
    with pytest.raises(TypeError, match=r"get_aligner\('depth_interp'\) got unexpected "
                                        r"parameter\(s\) 'a', 'hidden'; accepted: none"):
        get_aligner("depth_interp", (2, 2), (3, 2), hidden=4, a=1)
    with pytest.raises(ValueError, match=r"unknown aligner 'nope'; available: "):
        get_aligner("nope", (2, 2), (3, 2), hidden=4)


@pytest.mark.parametrize("shape, error, message", [
    pytest.param((2,), TypeError, r"proxy_shape must be a pair of ints \(layers, heads\), got "
                 r"\(2,\)", id="one-number"),
    pytest.param((2, 2.0), TypeError, r"proxy_shape must be a pair of ints", id="float"),
    pytest.param((0, 2), ValueError, r"proxy_shape must have layers >= 1 and heads >= 1, got "
                 r"\(0, 2\)", id="zero-layers"),
])
def test_bad_model_shapes_raise(shape, error, message):
    with pytest.raises(error, match=message):
        get_aligner("depth_interp", shape, (2, 2))


def test_register_aligner_rejects_taken_names_and_non_aligners():
    class Again(Aligner):
        name = "identity"

    with pytest.raises(ValueError, match=r"aligner 'identity' is already registered "
                                         r"\(IdentityAligner\); pass replace=True"):
        register_aligner(Again)
    with pytest.raises(TypeError, match=r"register_aligner needs a subclass of "
                                        r"proxykv.align.Aligner"):
        register_aligner(dict)


def test_register_aligner_adds_a_usable_adapter():
    @register_aligner(name="test_negated_identity", replace=True)
    class Negated(Aligner):
        name = "test_negated_identity"

        def _align(self, x):
            return -x

    x = scores(1, (2, 2), 5)
    assert "test_negated_identity" in available_aligners()
    assert torch.equal(get_aligner("test_negated_identity", (2, 2), (2, 2))(x), -x)


def test_identity_is_exact_and_copies():
    x = scores(2, (3, 2), 17)
    x[0, :, :, :4] = NEG_INF
    aligner = get_aligner("identity", (3, 2), (3, 2))
    out = aligner(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_identity_needs_equal_shapes():
    with pytest.raises(ValueError, match=r"the 'identity' aligner needs proxy_shape == "
                                         r"target_shape, got \(24, 2\) and \(28, 4\)"):
        get_aligner("identity", QWEN_05B, QWEN_7B)


def test_identity_accepts_strided_input():
    storage = scores(2, (3, 4), 20)
    view = storage[:, :, ::2, 3:]
    assert torch.equal(get_aligner("identity", (3, 2), (3, 2))(view), view)


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (24, 2)], ids=str)
def test_depth_interp_with_equal_shapes_is_the_identity(shape):
    x = scores(2, shape, 33)
    x[1, 0, 0, 5] = NEG_INF
    assert torch.equal(get_aligner("depth_interp", shape, shape)(x), x)


@pytest.mark.parametrize("proxy_layers", [2, 3, 5])
def test_depth_interp_with_twice_the_depth_averages_neighbours(proxy_layers):
    # Lt = 2*Lp - 1: even target layers are proxy layers, odd ones the mean of the two around them.
    x = scores(2, (proxy_layers, 2), 11)
    out = get_aligner("depth_interp", (proxy_layers, 2), (2 * proxy_layers - 1, 2))(x)
    for layer in range(2 * proxy_layers - 1):
        low = layer // 2
        expected = x[:, low] if layer % 2 == 0 else (x[:, low] + x[:, low + 1]) / 2
        assert torch.equal(out[:, layer], expected), f"target layer {layer}"


def test_depth_interp_broadcasts_and_averages_heads():
    x = scores(1, (1, 2), 7)
    broadcast = get_aligner("depth_interp", (1, 2), (1, 4))(x)
    assert torch.equal(broadcast, x[:, :, [0, 0, 1, 1]])
    y = scores(1, (1, 4), 7)
    averaged = get_aligner("depth_interp", (1, 4), (1, 2))(y)
    assert torch.equal(averaged[:, :, 0], (y[:, :, 0] + y[:, :, 1]) / 2)
    assert torch.equal(averaged[:, :, 1], (y[:, :, 2] + y[:, :, 3]) / 2)


def test_layer_and_head_matrices_on_hand_built_cases():
    assert layer_interp_matrix(3, 2).tolist() == [[1, 0, 0], [0, 0, 1]]
    assert layer_interp_matrix(4, 1).tolist() == [[0, 0.5, 0.5, 0]]
    assert layer_interp_matrix(1, 3).tolist() == [[1], [1], [1]]
    assert layer_interp_matrix(3, 4).flatten().tolist() == pytest.approx(
        [1, 0, 0, 1 / 3, 2 / 3, 0, 0, 2 / 3, 1 / 3, 0, 0, 1])
    # 2 -> 3 heads: the middle target head straddles both proxy heads.
    assert head_resample_matrix(2, 3).tolist() == [[1, 0], [0.5, 0.5], [0, 1]]


@given(proxy=st.tuples(st.integers(1, 6), st.integers(1, 5)),
       target=st.tuples(st.integers(1, 6), st.integers(1, 5)))
def test_depth_interp_rows_are_convex_weights(proxy, target):
    matrix = depth_interp_matrix(proxy, target)
    assert matrix.shape == (target[0] * target[1], proxy[0] * proxy[1])
    assert (matrix >= 0).all()
    assert_close(matrix.sum(dim=1), torch.ones(matrix.shape[0]))
    # A layer reads at most two proxy layers, a target head the proxy heads its slice overlaps.
    assert ((layer_interp_matrix(proxy[0], target[0]) > 0).sum(dim=1) <= 2).all()


def test_depth_interp_marks_only_outputs_that_read_an_invalid_entry():
    x = scores(1, (3, 1), 6)
    x[0, 0, 0, 2] = NEG_INF  # proxy layer 0 only
    out = get_aligner("depth_interp", (3, 1), (5, 1))(x)
    # Target layers 0 (= proxy 0) and 1 (mean of proxy 0 and 1) read it; 2..4 do not.
    assert torch.isneginf(out[0, :2, 0, 2]).all()
    assert torch.isfinite(out[0, 2:, 0, 2]).all() and torch.isfinite(out[0, :, 0, [0, 1, 3]]).all()


def test_mean_broadcast_gives_every_head_the_token_mean():
    x = scores(2, (3, 2), 9)
    x[1, 2, 1, 4] = NEG_INF
    out = get_aligner("mean_broadcast", (3, 2), (4, 3))(x)
    assert out.shape == (2, 4, 3, 9) and out.is_contiguous()
    expected = x.mean(dim=(1, 2))
    for layer in range(4):
        for head in range(3):
            assert_close(out[:, layer, head], expected)
    assert torch.isneginf(out[1, :, :, 4]).all()


def test_untrained_linear_reproduces_depth_interp():
    x = scores(3, QWEN_05B, 40) * 2.5 - 7
    assert_close(get_aligner("linear", QWEN_05B, QWEN_7B)(x),
                 get_aligner("depth_interp", QWEN_05B, QWEN_7B)(x))


@pytest.mark.parametrize("params", [
    pytest.param({}, id="defaults"),
    pytest.param({"conv_filters": 0, "pool_sizes": (), "hidden": 0}, id="linear-only"),
    pytest.param({"conv_kernel": 1, "pool_sizes": (3,), "hidden": 8}, id="small"),
])
def test_untrained_axial_is_exactly_depth_interp(params):
    x = scores(2, QWEN_05B, 150) * 3 - 10
    x[1, :, :, 120:] = NEG_INF  # padding: invalid in every channel
    axial = get_aligner("axial", QWEN_05B, QWEN_7B, **params)
    assert torch.equal(axial(x), get_aligner("depth_interp", QWEN_05B, QWEN_7B)(x))


def test_axial_is_small_relative_to_the_proxy():
    axial = get_aligner("axial", QWEN_05B, QWEN_7B)
    parameters = sum(p.numel() for p in axial.parameters())
    assert parameters < 0.001 * 494_000_000  # Qwen2.5-0.5B has ~494M parameters


@pytest.mark.parametrize("name", ["linear", "axial"])
def test_learned_aligners_are_equivariant_to_affine_input_changes(name):
    # out(a*x + c) = a*out(x) + c per sample: rankings never depend on the input's scale.
    aligner = randomise_weights(get_aligner(name, (3, 2), (2, 3)))
    x = scores(2, (3, 2), 64)
    x[0, :, :, 50:] = NEG_INF
    scale = torch.tensor([3.0, 0.25]).view(2, 1, 1, 1)
    shift = torch.tensor([-5.0, 2.0]).view(2, 1, 1, 1)
    assert_close(aligner(x * scale + shift), aligner(x) * scale + shift, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mean_broadcast", "linear", "axial"])
def test_mixing_aligners_invalidate_a_token_invalid_in_any_channel(name):
    aligner = randomise_weights(get_aligner(name, (2, 2), (3, 2)))
    x = scores(2, (2, 2), 30)
    x[0, 1, 0, 7] = NEG_INF
    x[1, :, :, 25:] = NEG_INF
    out = aligner(x)
    invalid = torch.zeros(2, 30, dtype=torch.bool)
    invalid[0, 7] = True
    invalid[1, 25:] = True
    assert torch.equal(torch.isneginf(out), invalid[:, None, None, :].expand_as(out))
    assert torch.isfinite(out[~torch.isneginf(out)]).all()


def test_fully_invalid_sample_stays_invalid_and_other_samples_are_unaffected():
    axial = randomise_weights(get_aligner("axial", (2, 2), (3, 2)))
    x = scores(2, (2, 2), 20)
    alone = axial(x[1:])
    x[0] = NEG_INF
    out = axial(x)
    assert torch.isneginf(out[0]).all()
    assert_close(out[1:], alone)


def test_axial_sees_temporal_context():
    # A learned depthwise convolution lets token t depend on its neighbours; linear cannot.
    x = scores(1, (2, 1), 40)
    bumped = x.clone()
    bumped[..., 20] += 1.0
    axial = randomise_weights(get_aligner("axial", (2, 1), (2, 1), pool_sizes=()))
    linear = randomise_weights(get_aligner("linear", (2, 1), (2, 1)))
    changed_axial = (axial(bumped) != axial(x))[0, :, :, [17, 18, 19, 21, 22, 23]]
    assert changed_axial.all()
    # linear changes neighbours only through the sample statistics: by the same shift everywhere.
    delta = (linear(bumped) - linear(x))[0, :, :, [0, 10, 19, 21, 39]]
    assert_close(delta, delta[..., :1].expand_as(delta), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL_ALIGNERS)
def test_wrong_input_shape_raises(name):
    aligner = get_aligner(name, (3, 2), (3, 2))
    with pytest.raises(ValueError, match=r"scores must have shape \[B, Lp=3, Hp=2, T\] for the "
                                         r"proxy model \(3 layers x 2 heads\), got shape "
                                         r"\(1, 2, 3, 10\)"):
        aligner(torch.zeros(1, 2, 3, 10))
    with pytest.raises(ValueError, match=r"scores must be a 4-D tensor"):
        aligner(torch.zeros(3, 2, 10))
    with pytest.raises(TypeError, match=r"scores must be float32 or float64, got "
                                        r"torch.float16"):
        aligner(torch.zeros(1, 3, 2, 10, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scores must have at least one position \(T >= 1\)"):
        aligner(torch.zeros(1, 3, 2, 0))


@pytest.mark.parametrize("params, error, message", [
    pytest.param({"conv_kernel": 4}, ValueError, "conv_kernel must be odd", id="even-kernel"),
    pytest.param({"pool_sizes": (9, 8)}, ValueError, "each pool_sizes entry must be odd",
                 id="even-pool"),
    pytest.param({"pool_sizes": 9}, TypeError, "pool_sizes must be a sequence of odd ints",
                 id="pool-int"),
    pytest.param({"hidden": -1}, ValueError, "hidden must be >= 0", id="negative-hidden"),
])
def test_axial_rejects_bad_parameters(params, error, message):
    with pytest.raises(error, match=message):
        get_aligner("axial", (2, 2), (2, 2), **params)


@pytest.mark.parametrize("name", ALL_ALIGNERS)
def test_output_contract(name, device):
    aligner = get_aligner(name, (2, 3), (2, 3)).to(device)
    x = scores(2, (2, 3), 45).to(device)
    out = aligner(x)
    assert out.shape == (2, 2, 3, 45) and out.dtype == torch.float32
    assert out.device == x.device and out.is_contiguous()


def test_to_log_scores_keeps_invalid_positions_and_zero_mass():
    mass = torch.tensor([0.5, 0.0, NEG_INF, 1.0])
    logs = align.to_log_scores(mass, floor=1e-20)
    assert logs[0] == torch.log(torch.tensor(0.5)) and logs[3] == 0.0
    assert torch.isfinite(logs[1]) and torch.isneginf(logs[2])
    with pytest.raises(ValueError, match=r"floor must be a finite float > 0, got 0.0"):
        align.to_log_scores(mass, floor=0)


@st.composite
def axial_cases(draw):
    proxy = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    target = (draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    params = {
        "conv_kernel": draw(st.sampled_from([1, 3, 7])),
        "conv_filters": draw(st.integers(0, 2)),
        "pool_sizes": draw(st.lists(st.sampled_from([1, 3, 9, 33]), max_size=2)),
        "profiles": draw(st.integers(1, 3)),
        "hidden": draw(st.sampled_from([0, 5])),
    }
    length = draw(st.sampled_from([1, 2, 17, 64, 129]))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *proxy, length, generator=generator) * 3 - 4
    pattern = draw(st.sampled_from(["none", "padding", "scattered", "whole-sample"]))
    if pattern == "padding":
        x[-1, :, :, length // 2 + 1:] = NEG_INF
    elif pattern == "scattered":
        x[torch.rand(x.shape, generator=generator) < 0.1] = NEG_INF
    elif pattern == "whole-sample":
        x[0] = NEG_INF
    return proxy, target, params, x, seed


@given(case=axial_cases())
def test_axial_matches_the_float64_reference(case, device):
    from proxykv.align.reference import axial_reference

    proxy, target, params, x, seed = case
    axial = randomise_weights(get_aligner("axial", proxy, target, **params), seed=seed)
    expected = axial_reference(axial, x)
    actual = axial.to(device)(x.to(device))
    assert_close(actual, expected.float(), name=f"axial {params}")


@pytest.mark.parametrize("width", [1, 3, 7])
def test_both_depthwise_convolution_paths_agree(width):
    # CUDA takes the shifted multiply-adds, the CPU F.conv1d; run both here.
    from proxykv.align.axial import _depthwise_conv

    generator = torch.Generator().manual_seed(width)
    signal = torch.randn(2, 3, 40, generator=generator)
    weight = torch.randn(3, 2, width, generator=generator)
    assert_close(_depthwise_conv(signal, weight, shifted=True),
                 _depthwise_conv(signal, weight, shifted=False))
