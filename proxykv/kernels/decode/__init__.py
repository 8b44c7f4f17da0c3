from proxykv.kernels.decode.api import ragged_decode_attention

__all__ = ["ragged_decode_attention"]
