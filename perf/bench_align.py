"""Benchmark of the aligners' forward pass on a realistic proxy/target pair: Qwen2.5-0.5B
(24 layers x 2 KV heads) -> Qwen2.5-7B (28 x 4), up to 128k tokens on a GPU.

``axial`` (random weights, so every learned stage does real work) is checked against the naive
float64 oracle ``proxykv.align.reference.axial_reference`` and compared with that oracle run in
float32 (the plain-torch way: convolutions for the window sums, einsum for the mixing) as the
baseline. The training-free adapters are timed alongside, for the cost of the learned mapper
relative to them. Each row records the mapper's parameter count against the proxy's ~0.5B.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for  # noqa: E402

from proxykv.align import get_aligner, head_resample_matrix, layer_interp_matrix  # noqa: E402
from proxykv.align.reference import axial_reference  # noqa: E402
from proxykv.testing import assert_close  # noqa: E402

PROXY, TARGET = (24, 2), (28, 4)        # Qwen2.5-0.5B -> Qwen2.5-7B, KV heads
PROXY_PARAMETERS = 494_032_768          # Qwen2.5-0.5B


def _random_axial(device: torch.device):
    axial = get_aligner("axial", PROXY, TARGET)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in axial.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return axial.to(device).eval()


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    cuda = device.type == "cuda"
    lengths = [8192] if quick else ([8192, 32768, 131072] if cuda else [8192, 32768])
    axial = _random_axial(device)
    parameters = sum(p.numel() for p in axial.parameters())
    size = {"params": parameters, "params_vs_proxy": parameters / PROXY_PARAMETERS}
    print(f"# axial {PROXY} -> {TARGET}: {parameters} parameters = "
          f"{100 * size['params_vs_proxy']:.4f}% of Qwen2.5-0.5B", flush=True)
    for length in lengths:
        _measure(recorder, axial, length, dict(size))


def _measure(recorder: Recorder, axial, length: int, extra: dict) -> None:
    device = recorder.device
    generator = torch.Generator().manual_seed(length)
    scores = (torch.randn(1, *PROXY, length, generator=generator) * 2 - 8).to(device)
    scores[..., length - length // 16:] = float("-inf")  # padding at the end
    shape = {"B": 1, "Lp": PROXY[0], "Hp": PROXY[1], "Lt": TARGET[0], "Ht": TARGET[1],
             "T": length}
    output_bytes = 4 * length * axial.target_channels

    def check_axial():
        expected = axial_reference(axial, scores).float()
        # fp32 vs fp64 through a ~150-term mixing: 1e-4 relative on log-scores of magnitude ~10.
        assert_close(axial(scores), expected, atol=2e-4, rtol=1e-4, name="axial")

    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            axial(scores)
            extra["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        recorder.measure(
            "align_axial", shape, torch.float32, "torch", lambda: axial(scores), check=check_axial,
            baseline=lambda: axial_reference(axial, scores, dtype=torch.float32),
            baseline_name="plain-torch oracle (fp32)",
            bytes_moved=4 * scores.numel() + output_bytes, extra=extra)
        depth_interp = _depth_interp_reference(scores)
        checks = {
            "depth_interp": lambda out: assert_close(out, depth_interp, name="depth_interp"),
            # untrained, linear starts as depth_interp (up to the standardisation round trip)
            "linear": lambda out: assert_close(out, depth_interp, atol=1e-4, rtol=1e-4,
                                               name="linear"),
            "mean_broadcast": lambda out: assert_close(
                out, scores.mean(dim=(1, 2), keepdim=True).expand_as(out), name="mean_broadcast"),
        }
        for name, compare in checks.items():
            aligner = get_aligner(name, PROXY, TARGET).to(device)
            recorder.measure(f"align_{name}", shape, torch.float32, "torch",
                             lambda aligner=aligner: aligner(scores),
                             check=lambda aligner=aligner, compare=compare:
                             compare(aligner(scores)),
                             bytes_moved=4 * scores.numel() + output_bytes)


def _depth_interp_reference(scores: torch.Tensor) -> torch.Tensor:
    """Target layer x head = convex combination of proxy layers x heads, in float64 (the inputs
    here are -inf only on whole padded tokens, which stay -inf)."""
    matrix = torch.kron(layer_interp_matrix(PROXY[0], TARGET[0]),
                        head_resample_matrix(PROXY[1], TARGET[1])).to(scores.device)
    channels = scores.double().reshape(scores.shape[0], -1, scores.shape[-1])
    invalid = torch.isneginf(channels).any(dim=1, keepdim=True)
    mixed = torch.einsum("oc,bct->bot", matrix, channels.masked_fill(invalid, 0.0))
    return mixed.masked_fill(invalid, float("-inf")).float().view(scores.shape[0], *TARGET, -1)


if __name__ == "__main__":
    sys.exit(main_for(run, "aligner forward benchmark (Qwen2.5-0.5B -> Qwen2.5-7B)"))
