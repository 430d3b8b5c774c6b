"""The Triton backend's tests run its kernels in Triton's interpreter, on CPU tensors.

The interpreter needs TRITON_INTERPRET=1 before triton is first imported, and other tests import
it (torch.compile does), so it is set here, while tests are collected, before any of them runs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
