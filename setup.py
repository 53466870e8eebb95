"""Build of the optional C reduction kernels; all other metadata is in pyproject.toml.

``optional=True``: where no C compiler is found the package installs without them and reduces
tensors through torch and NumPy instead (slower on the CPU, same results).
"""

import sys

from setuptools import Extension, setup

unix_flags = ["-O3", "-std=c99"] if sys.platform != "win32" else []

setup(
    ext_modules=[
        Extension(
            "lightning_inspect.core._kernels",
            sources=["lightning_inspect/core/_kernels.c"],
            extra_compile_args=unix_flags,
            optional=True,
        )
    ]
)
