"""Test-session setup: on machines without CUDA, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any module defines a kernel (triton.jit reads it then), so it
is set here, before the test modules import ossrl. `tests/test_kernels_interpreter.py` uses it to
check the GPU kernels' logic on CPU tensors; every other CPU test runs the PyTorch paths as before.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.runtime.interpreter as _interpreter
    except ImportError:  # triton is a test extra on Linux x86-64 only
        _interpreter = None
    if _interpreter is not None and hasattr(_interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter converts a scalar kernel argument with int(array of shape (1,)),
        # which numpy >= 2.3 refuses: `range(0, n, CH)` over an argument fails. Use .item().
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patched(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        _interpreter._patch_lang_tensor = _patched
