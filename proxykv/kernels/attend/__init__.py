from proxykv.kernels.attend.api import ragged_attention, ragged_decode_attention

__all__ = ["ragged_attention", "ragged_decode_attention"]
