"""Only declares the cffi extension modules; everything else is in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=[
        "cffi_build/keyutils.py:ffibuilder",
        "cffi_build/linux.py:ffibuilder",
        "cffi_build/efivar.py:ffibuilder",
        "cffi_build/cryptsetup.py:ffibuilder",
    ],
)
