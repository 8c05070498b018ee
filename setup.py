"""Build script.

The package is pure Python today. The CUDA extension (``featadapt._C``) will be
added in ``extension_modules()``: return the ``CUDAExtension`` there when a CUDA
toolkit and a CUDA build of torch are present, and an empty list otherwise, so
that the package always installs without a toolkit.
"""

from setuptools import setup


def extension_modules():
    return []


def build_commands():
    return {}


setup(ext_modules=extension_modules(), cmdclass=build_commands())
