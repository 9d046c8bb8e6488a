"""Build dirtytrack: Python sources from service/, the compiled core from ext/.

Options (environment):
  DIRTYTRACK_ANNOTATE=1  write Cython's HTML annotation next to the sources
  DIRTYTRACK_DEBUG=1     build with -O0 -g and Cython line tracing off
"""
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

if not sys.platform.startswith("linux"):
    sys.exit("dirtytrack tracks Linux processes: it builds only on Linux")
if platform.machine() not in ("x86_64", "aarch64"):
    sys.exit(f"dirtytrack supports x86_64 and aarch64, not {platform.machine()}")

from Cython.Build import cythonize  # noqa: E402  (after the platform checks)

debug = os.environ.get("DIRTYTRACK_DEBUG") == "1"
extra = ["-O0", "-g"] if debug else ["-O2"]

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs():
    """The gRPC stubs are generated at build time, never committed (proto/README.md)."""
    import runpy
    runpy.run_path(os.path.join(HERE, "proto", "build_stubs.py"))["generate"](
        os.path.join(HERE, "service"))


class BuildPy(build_py):
    def run(self):
        generate_stubs()
        super().run()


class BuildExt(build_ext):
    # `setup.py build_ext --inplace` (the development build) gets the stubs too.
    def run(self):
        generate_stubs()
        super().run()


extensions = [
    Extension(
        "dirtytrack._core",
        ["ext/dirtytrack/_core.pyx"],
        include_dirs=["ext/dirtytrack"],
        extra_compile_args=extra + ["-Wno-unused-function"],
        depends=["ext/dirtytrack/kernel_abi.h"] + [
            os.path.join("ext/dirtytrack", name)
            for name in os.listdir("ext/dirtytrack") if name.endswith((".pxi", ".pxd"))
        ],
    ),
]

setup(
    cmdclass={"build_py": BuildPy, "build_ext": BuildExt},
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": 3, "embedsignature": True},
        annotate=os.environ.get("DIRTYTRACK_ANNOTATE") == "1",
    ),
)
