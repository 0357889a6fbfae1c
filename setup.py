"""Only the C extension lives here; everything else is in pyproject.toml.

`storage/_planes.c` is the byte-plane kernel of the tensor codec (storage/codec.py). It needs
a C compiler and the Python headers at install time (`pip install -e .`, `make`), as zipnn does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "adapterdb.storage._planes",
            ["storage/_planes.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["m"],
        )
    ]
)
