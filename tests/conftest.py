"""Test configuration shared by the whole suite.

Switches (environment variables):

* ``PROXYKV_TEST_BACKEND`` — ``interpret`` (default): Triton kernels run under the interpreter on
  CPU tensors (``TRITON_INTERPRET=1`` is set here, before any kernel is defined).
  ``compiled``: Triton kernels are compiled and the tests run on CUDA tensors (needs a GPU; this is
  what ``perf/gpu_check.sh`` uses).
* ``PROXYKV_HYPOTHESIS_PROFILE`` — ``ci`` (default; bounded, derandomised so runs are
  reproducible), ``dev`` (fewer examples, random), ``gpu`` (a few derandomised examples: each
  new shape costs a JIT compile on the lent GPU) or ``thorough`` (many examples).
"""

import os

TEST_BACKEND = os.environ.get("PROXYKV_TEST_BACKEND", "interpret")
if TEST_BACKEND == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"
elif TEST_BACKEND == "compiled":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    raise RuntimeError(f"PROXYKV_TEST_BACKEND must be 'interpret' or 'compiled', got {TEST_BACKEND!r}")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from proxykv.testing import poison_empty_allocations  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
# perf/gpu_check.sh: compiled kernels on a lent GPU, where every new shape is a JIT compile
settings.register_profile("gpu", max_examples=6, derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("PROXYKV_HYPOTHESIS_PROFILE", "ci"))


def _test_device() -> torch.device:
    if TEST_BACKEND == "compiled":
        if not torch.cuda.is_available():
            raise RuntimeError("PROXYKV_TEST_BACKEND=compiled needs a CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


DEVICE = _test_device()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests put their tensors: CPU (interpreted Triton) or CUDA (compiled)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    with poison_empty_allocations():
        yield


@pytest.fixture(scope="session")
def gemma():
    """The real Gemma 3 270M (float32, eval mode) and its tokenizer, from the registry package
    (``proxykv.hf.checkpoints``: converted once, then cached); loaded once per session."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxykv.hf.checkpoints import get

    folder = get("gemma3-270m", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)
