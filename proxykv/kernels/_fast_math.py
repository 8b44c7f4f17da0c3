"""Fast float32 math shared by the Triton kernels, in the mode the kernels are defined in.

``_fast_div(x, y)``: ``x / y`` as ``div.approx.f32`` on the GPU (``MUFU.RCP`` and a multiply, 2
ulp; 0 for ``|y| > 2**126``, inf included) — what soft-capping's ``tanh`` needs, where the
IEEE division costs a dozen instructions per logit. libdevice does not run under the
interpreter, so there it is a plain division. Triton fixes the mode when kernels are defined
(``proxykv._backend``), and so does this module, imported with them.
"""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (the jit needs it in the module's globals)

from proxykv._backend import interpreter_enabled

if interpreter_enabled():
    @triton.jit
    def _fast_div(x, y):
        return x / y
else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _fast_div(x, y):
        return libdevice.fast_dividef(x, y)
