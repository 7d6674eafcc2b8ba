"""Deploy without the model's Python code: one exported graph per exit and the engine's
loop around them.

- :func:`export`: stage n + branch n + the exit score as one graph per exit, with a
  dynamic batch dimension (ONNX, ``torch.export``, AOTInductor), and ``manifest.json``.
- :func:`load`: a runner with the engine's call and result, checked against the manifest.

See docs/export.md.
"""

from .manifest import FORMAT_VERSION, ManifestError, read_manifest

# Imported on first use: the CLI registers ``branchynet export`` from .cli without
# loading the engine and the exit op for every other command.
_LAZY = {"export": ".exporter", "ExportError": ".exporter", "FORMATS": ".exporter", "load": ".runner",
         "Runner": ".runner"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = ["export", "ExportError", "FORMAT_VERSION", "FORMATS", "load", "ManifestError", "read_manifest",
           "Runner"]
