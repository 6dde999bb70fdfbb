"""The one thing pyproject.toml cannot yet say in a stable form: the C extensions.

proxy/core/_fastframe.c is the framer's inner loop, proxy/io/_forward.c a linked channel's
forwarding step (see their headers); building them needs a C compiler, Python's headers and
OpenSSL's (Debian: gcc, python3-dev, libssl-dev).
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
            "proxy.io._forward",
            sources=["proxy/io/_forward.c"],
            extra_compile_args=WARNINGS,
            libraries=["ssl", "crypto"],  # the OpenSSL that Python's ssl module uses
        ),
    ]
)
