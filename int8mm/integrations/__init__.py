"""Integrations with other libraries: ``int8mm.integrations.accelerate`` (``Int8Hook``) and
``int8mm.integrations.transformers`` (the ``"int8mm"`` quantization method). Each imports its library, so
neither is imported here.

``import int8mm`` calls ``register_with_transformers_when_imported``: loading a saved int8mm checkpoint with
``from_pretrained`` needs the method registered, but importing transformers' quantizer registry costs about two
seconds, which ``import int8mm`` should not pay for users who never touch transformers. So the method is
registered right away if that registry is loaded already, and otherwise right after it loads, by an import
hook that watches for that one module and then removes itself.
"""
import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger("int8mm")

_REGISTRY_MODULE = "transformers.quantizers.auto"


def register_with_transformers_when_imported() -> None:
    """Register the ``"int8mm"`` method with transformers now or when its registry is imported; no-op
    without transformers."""
    if _REGISTRY_MODULE in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport())


def _register() -> None:
    own = sys.modules.get(__name__ + ".transformers")
    if own is not None and not hasattr(own, "register"):
        return  # importing int8mm.integrations.transformers set this off; that module registers itself at its end
    try:
        from . import transformers as integration

        integration.register()
    except Exception as exc:  # an old or broken transformers must not break importing transformers itself
        log.warning("int8mm: the 'int8mm' quantization method was not registered with transformers: %s", exc)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers' quantizer registry to register after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, name)
