"""Benchmark of the sparse KV gathers: keep 30% of an 8B model's cache (32 layers, 8 KV heads,
D = 128, bf16), with uniform and with per-head (ragged) budgets, all layers per call.

GPU: a 128k-token cache; the target is >= 80% of the H200's 4.8 TB/s (about 2.2 ms for all
layers). CPU: the same at 8k tokens and 4 layers. Each case is checked against plain indexing and
compared with torch's own gather. On the GPU a sweep of tile sizes follows (for the defaults in
``proxykv/kernels/gather/triton_impl.py``), and the cost of ``check_indices=True`` is recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for

from proxykv.cache import RaggedKVCache
from proxykv.kernels import gather_kv, gather_kv_ragged
from proxykv.kernels.gather import triton_impl
from proxykv.kernels.gather.reference import gather_kv_ragged_reference, gather_kv_reference
from proxykv.selection import Selection

KEEP = 0.3
HEADS, HEAD_DIM = 8, 128
DTYPE = torch.bfloat16
SWEEP = [(32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (256, 8)]  # (BLOCK_N, num_warps)


def _cache(layers: int, seq_len: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    return [tuple(torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=generator, device=device,
                              dtype=DTYPE) for _ in range(2)) for _ in range(layers)]


def _gather_bytes(rows: int, element_size: int) -> int:
    """K and V: each kept row read once and written once, plus its int32 index."""
    return rows * (4 * HEAD_DIM * element_size + 4)


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    on_gpu = device.type == "cuda"
    impl = "triton" if on_gpu else "torch"
    if on_gpu:
        layers, seq_len = (4, 16384) if quick else (32, 131072)
    else:
        layers, seq_len = (2, 2048) if quick else (4, 8192)
    cache = _cache(layers, seq_len, device)
    kept = int(KEEP * seq_len)
    shape = {"L": layers, "B": 1, "H_kv": HEADS, "T": seq_len, "D": HEAD_DIM, "keep": KEEP}
    element_size = torch.finfo(DTYPE).bits // 8

    # ------------------------------------------------------------------ uniform budgets
    generator = torch.Generator(device=device).manual_seed(1)
    uniform = [torch.rand(1, HEADS, seq_len, generator=generator, device=device)
               .topk(kept, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
               for _ in range(layers)]
    outs = [(torch.empty(1, HEADS, kept, HEAD_DIM, dtype=DTYPE, device=device),
             torch.empty(1, HEADS, kept, HEAD_DIM, dtype=DTYPE, device=device))
            for _ in range(layers)]

    def uniform_all_layers(check_indices=False):
        for (k, v), indices, out in zip(cache, uniform, outs):
            gather_kv(k, v, indices, out=out, check_indices=check_indices, impl=impl)

    def uniform_verify():
        for layer in (0, layers - 1):
            expected = gather_kv_reference(*cache[layer], uniform[layer])
            assert torch.equal(outs[layer][0], expected[0]), "gather_kv: K differs"
            assert torch.equal(outs[layer][1], expected[1]), "gather_kv: V differs"

    def torch_gather_all_layers():
        for (k, v), indices in zip(cache, uniform):
            rows = indices.long()[..., None].expand(-1, -1, -1, HEAD_DIM)
            k.gather(2, rows), v.gather(2, rows)

    uniform_bytes = layers * _gather_bytes(HEADS * kept, element_size)
    recorder.measure("gather_kv", shape, DTYPE, impl, uniform_all_layers,
                     check=lambda: (uniform_all_layers(True), uniform_verify()),
                     baseline=torch_gather_all_layers, baseline_name="torch.gather",
                     bytes_moved=uniform_bytes)

    # ------------------------------------------------------------------ per-head budgets
    # Each (layer, head) keeps between 10% and 50% of the positions: 30% on average.
    ratios = torch.linspace(0.1, 0.5, layers * HEADS, device=device)
    ratios = ratios[torch.randperm(ratios.numel(), generator=generator, device=device)]
    mask = torch.rand(1, layers, HEADS, seq_len, generator=generator, device=device) < \
        ratios.reshape(1, layers, HEADS, 1)
    selection = Selection.from_mask(mask)
    views = [selection.layer(layer) for layer in range(layers)]
    packed = [(torch.empty(view.indices.numel(), HEAD_DIM, dtype=DTYPE, device=device),
               torch.empty(view.indices.numel(), HEAD_DIM, dtype=DTYPE, device=device))
              for view in views]
    ragged_bytes = _gather_bytes(selection.total_kept, element_size)
    ragged_shape = {**shape, "keep": f"{KEEP} mean, 0.1-0.5 per head"}

    def ragged_all_layers(check_indices=False):
        for (k, v), view, out in zip(cache, views, packed):
            gather_kv_ragged(k, v, view.indices, view.cu_seqlens, out=out,
                             check_indices=check_indices, impl=impl)

    def ragged_verify():
        for layer in (0, layers - 1):
            expected = gather_kv_ragged_reference(*cache[layer], views[layer].indices,
                                                  views[layer].cu_seqlens)
            assert torch.equal(packed[layer][0], expected[0]), "gather_kv_ragged: K differs"
            assert torch.equal(packed[layer][1], expected[1]), "gather_kv_ragged: V differs"

    def torch_index_all_layers():
        for (k, v), layer_mask in zip(cache, mask.unbind(1)):
            k[layer_mask], v[layer_mask]

    recorder.measure("gather_kv_ragged", ragged_shape, DTYPE, impl, ragged_all_layers,
                     check=lambda: (ragged_all_layers(True), ragged_verify()),
                     baseline=torch_index_all_layers,
                     baseline_name="torch boolean-mask indexing", bytes_moved=ragged_bytes)
    recorder.measure("gather_kv_ragged", {**ragged_shape, "check_indices": True}, DTYPE, impl,
                     lambda: ragged_all_layers(True), bytes_moved=ragged_bytes,
                     extra={"note": "with the one-sync-per-call value checks"})

    # The whole compaction into a decode-ready cache (256 spare rows per head, positions).
    def build_cache():
        return RaggedKVCache.from_selection(cache, selection, check_indices=False, impl=impl)

    def build_check():
        built = build_cache()
        keys, values, _, _ = built.to_packed(0)
        assert torch.equal(keys, packed[0][0]) and torch.equal(values, packed[0][1]), \
            "RaggedKVCache.from_selection differs from gather_kv_ragged"

    recorder.measure("RaggedKVCache.from_selection", ragged_shape, DTYPE, impl, build_cache,
                     check=build_check, bytes_moved=ragged_bytes)

    if on_gpu and not quick:
        _tile_sweep(recorder, cache, uniform, outs, views, packed, shape, ragged_shape,
                    uniform_bytes, ragged_bytes, uniform_verify, ragged_verify)


def _tile_sweep(recorder, cache, uniform, outs, views, packed, shape, ragged_shape, uniform_bytes,
                ragged_bytes, uniform_verify, ragged_verify) -> None:
    """Each (BLOCK_N, num_warps) of ``SWEEP`` on both kernels, to check the launcher defaults."""
    for block_n, num_warps in SWEEP:
        tag = f"triton[BLOCK_N={block_n},warps={num_warps}]"

        def uniform_tile(block_n=block_n, num_warps=num_warps):
            for (k, v), indices, out in zip(cache, uniform, outs):
                triton_impl.gather_kv_triton(k, v, indices, out, block_n=block_n,
                                             num_warps=num_warps)

        def ragged_tile(block_n=block_n, num_warps=num_warps):
            for (k, v), view, out in zip(cache, views, packed):
                triton_impl.gather_kv_ragged_triton(k, v, view.indices, view.cu_seqlens, out,
                                                    None, block_n=block_n, num_warps=num_warps)

        recorder.measure("gather_kv", shape, DTYPE, tag, uniform_tile,
                         check=lambda run=uniform_tile: (run(), uniform_verify()),
                         bytes_moved=uniform_bytes)
        recorder.measure("gather_kv_ragged", ragged_shape, DTYPE, tag, ragged_tile,
                         check=lambda run=ragged_tile: (run(), ragged_verify()),
                         bytes_moved=ragged_bytes)


if __name__ == "__main__":
    sys.exit(main_for(run, "sparse KV gather benchmark"))
