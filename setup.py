"""Builds mxtools' native kernels (project metadata lives in pyproject.toml)."""
from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so float results match llama.cpp's baseline-x86 build bit for bit.
FLAGS = ["-O3", "-Wall", "-Wno-psabi", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]

setup(ext_modules=[Extension(
    "mxtools.native._lib",
    sources=["mxtools/native/module.c", "mxtools/native/quants.c", "mxtools/native/cast.c",
             "mxtools/native/iq4.c", "mxtools/native/iq3.c", "mxtools/native/iq2.c", "mxtools/native/iq1.c",
             "mxtools/native/iq2_avx2.c", "mxtools/native/iq1_avx2.c", "mxtools/native/iq_tables.c",
             "mxtools/native/iq_snap.c"],
    depends=["mxtools/native/common.h", "mxtools/native/search.h", "mxtools/native/scalar.h",
             "mxtools/native/iq34.h", "mxtools/native/iq_levels.h", "mxtools/native/iq3_grids.h",
             "mxtools/native/iq.h", "mxtools/native/iq2_grids.h", "mxtools/native/iq1_grids.h",
             "mxtools/native/iq1_split.h"],
    extra_compile_args=FLAGS,
)])
