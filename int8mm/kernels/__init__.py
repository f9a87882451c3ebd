"""The kernel sources, as the ``int8mm.kernels`` package.

The sources live at the top of the repository, in ``kernels/triton`` (``@triton.jit`` functions),
``kernels/cuda`` (CUDA C++) and ``kernels/cpu`` (C). setup.py maps those folders to ``int8mm.kernels.triton``,
``int8mm.kernels.cuda`` and ``int8mm.kernels.cpu`` (``package_dir``), so a wheel ships them here and an editable install
(``pip install -e .``) imports them in place. ``kernels/`` itself has no ``__init__.py`` on purpose: from the
repository root it must not shadow another distribution's top-level ``kernels`` package.
"""
