"""Build hook for the one compiled module (metadata lives in pyproject.toml).

``kacl_cli.stages.radiomics.backends.fast._texture`` is the counting pass of the fast radiomics
backend. It uses
only the Python C API (no numpy headers), so pip's isolated build needs just setuptools and
the C compiler that pyradiomics' own build already requires. Without it the fast backend
falls back to its numpy path (same values, about 2-3x slower); see docs/radiomics-fast.md.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kacl_cli.stages.radiomics.backends.fast._texture",
            sources=["kacl_cli/stages/radiomics/backends/fast/_texture.c"],
            extra_compile_args=["-O3"],
        )
    ]
)
