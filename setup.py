"""Builds ddfast._C (C++ CPU kernels with OpenMP) from csrc/ and ships kernels/ as ddfast.kernels.

CUDA sources in csrc/ are compile-checked by the tests with nvcc; they are not linked here because
the CPU torch wheel cannot build a CUDAExtension.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))

setup(
    packages=["ddfast", "ddfast.ops", "ddfast.reference", "ddfast.methods", "ddfast.kernels"],
    package_dir={"ddfast.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "ddfast._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
