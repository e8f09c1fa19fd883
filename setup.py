"""Build script for the optional Cython extension ``miniattn._kernels``.

All package metadata lives in pyproject.toml. This file only adds the
extension, and makes it optional: when Cython, NumPy headers or a C compiler
are missing, or the compile fails, the install still succeeds and miniattn
runs on its NumPy reference kernels (``miniattn.core.kernels.backend()``
then reports "numpy").
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but warn instead of failing when a build breaks.

    When a build fails, a compiled extension left in the source tree by an
    earlier build (an editable install or build_ext --inplace) is removed.
    miniattn then runs on its NumPy kernels, as the warning states, instead
    of loading a stale build of older sources.
    """

    def run(self):
        self.failed = []
        try:
            super().run()
        except Exception as error:  # compiler missing, headers missing, ...
            self._warn(error)
            self._remove_stale_copies(self.extensions)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:
            self.failed.append(ext)
            self._warn(error)
            self._remove_stale_copies([ext])

    def copy_extensions_to_source(self):
        # An extension that failed to build has nothing to copy into the tree.
        built = [ext for ext in self.extensions if ext not in self.failed]
        if built:
            extensions, self.extensions = self.extensions, built
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = extensions

    def _remove_stale_copies(self, extensions):
        for ext in extensions:
            package_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), *ext.name.split(".")[:-1])
            for path in glob.glob(os.path.join(package_dir, ext.name.split(".")[-1] + ".*")):
                if path.endswith((".so", ".pyd")):
                    os.remove(path)
                    sys.stderr.write(f"WARNING: removed {path}, an earlier build of {ext.name}.\n")

    def _warn(self, error):
        sys.stderr.write(
            "\nWARNING: the optional extension miniattn._kernels was not built "
            f"({error}).\nminiattn will use its NumPy reference kernels.\n\n"
        )


def openmp_flags():
    """Return (compile, link) flags for OpenMP, or none where it is disabled."""
    if os.environ.get("MINIATTN_NO_OPENMP") or sys.platform == "darwin":
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def extensions():
    """Describe the Cython extension, or return no extensions without Cython."""
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as error:
        sys.stderr.write(
            f"\nWARNING: {error}; building miniattn without its Cython extension.\n\n"
        )
        return []

    compile_args, link_args = openmp_flags()
    if sys.platform != "win32":
        compile_args = compile_args + ["-O3"]
    extension = Extension(
        "miniattn._kernels",
        sources=["csrc/_kernels.pyx"],
        depends=sorted(glob.glob("csrc/*.pxi")),
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    return cythonize(
        [extension],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
