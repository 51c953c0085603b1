"""Test-suite set-up. Triton kernels run on CPU tensors through Triton's interpreter, which is
chosen when a kernel is decorated, so the variable must be set before any kernel module loads."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DDFAST_NO_PROGRESS", "1")
