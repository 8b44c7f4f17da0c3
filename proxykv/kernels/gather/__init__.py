from proxykv.kernels.gather.api import gather_kv, gather_kv_ragged

__all__ = ["gather_kv", "gather_kv_ragged"]
