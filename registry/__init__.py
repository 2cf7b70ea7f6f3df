"""The adapter registry (MLflow), the data home and base models: what every other package uses.

Importing this package is cheap; MLflow, torch and transformers load only when needed.
"""

from registry.base_model import BaseModel, resolve_base_model
from registry.errors import LoraplexError
from registry.home import Home, setup_environment
from registry.lineage import Lineage
from registry.refs import AdapterRef, parse_ref
from registry.resolve import ResolvedAdapter, resolve_adapter
from registry.store import AdapterRegistry

__all__ = [
    "AdapterRef",
    "AdapterRegistry",
    "BaseModel",
    "Home",
    "Lineage",
    "LoraplexError",
    "ResolvedAdapter",
    "parse_ref",
    "resolve_adapter",
    "resolve_base_model",
    "setup_environment",
]
