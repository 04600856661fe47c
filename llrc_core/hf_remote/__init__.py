"""The modeling file shipped into every export folder (``auto_map`` target).

``modeling_llrc.py`` is self-contained: it imports only torch, transformers and safetensors,
never ``llrc_core``, because it runs inside stock transformers in another environment.
"""
from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_llrc.py")

