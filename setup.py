"""The one thing pyproject.toml cannot yet say in a stable form: the C extension.

proxy/core/_fastframe.c is the framer's inner loop (see its header); building it needs a C
compiler and Python's headers (Debian: gcc, python3-dev).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy.core._fastframe",
            sources=["proxy/core/_fastframe.c"],
            extra_compile_args=[
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
