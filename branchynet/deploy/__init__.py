"""Deploy without the model's Python code: one exported graph per exit and the engine's
loop around them.

- :func:`export`: stage n + branch n + the exit score as one graph per exit, with a
  dynamic batch dimension (ONNX, ``torch.export``, AOTInductor), and ``manifest.json``.
- :func:`load`: a runner with the engine's call and result, checked against the manifest.

See docs/export.md.
"""

from .exporter import FORMATS, ExportError, export
from .manifest import FORMAT_VERSION, ManifestError, read_manifest
from .runner import Runner, load

__all__ = ["export", "ExportError", "FORMAT_VERSION", "FORMATS", "load", "ManifestError", "read_manifest",
           "Runner"]
