"""The one thing pyproject.toml cannot yet say in a stable form: the C extensions.

proxy/core/_fastframe.c is the framer's inner loop, proxy/io/_forward.c a plain channel's
forwarding step (see their headers); building them needs a C compiler and Python's headers
(Debian: gcc, python3-dev).
"""

from setuptools import Extension, setup

WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension(
            "proxy.core._fastframe",
            sources=["proxy/core/_fastframe.c"],
            extra_compile_args=WARNINGS,
        ),
        Extension(
            "proxy.io._forward", sources=["proxy/io/_forward.c"], extra_compile_args=WARNINGS
        ),
    ]
)
