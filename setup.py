"""Builds ddfast._C (C++ CPU kernels with OpenMP) from csrc/ and ships kernels/ as ddfast.kernels.

CUDA sources in csrc/ are compile-checked by the tests with nvcc; they are not linked here because
the CPU torch wheel cannot build a CUDAExtension.
"""
import glob
import os

from multiprocessing.pool import ThreadPool

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))

class ParallelBuildExtension(BuildExtension):
    """BuildExtension that compiles the sources on every core: without ninja (which pip's build here does not
    have) distutils compiles one file after another, ~9 minutes for ddfast._C on 2 cores."""

    def build_extensions(self) -> None:
        serial = self.compiler.compile

        def parallel(sources, output_dir=None, **kwargs):
            for obj in self.compiler.object_filenames(sources, output_dir=output_dir):
                os.makedirs(os.path.dirname(obj), exist_ok=True)  # before the threads: no mkdir races
            with ThreadPool(os.cpu_count() or 1) as pool:
                parts = pool.map(lambda source: serial([source], output_dir=output_dir, **kwargs), sources)
            return [obj for objs in parts for obj in objs]

        self.compiler.compile = parallel
        super().build_extensions()


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
    cmdclass={"build_ext": ParallelBuildExtension.with_options(use_ninja=False)},
)
