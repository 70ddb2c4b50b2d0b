"""Small shared utilities: atomic file and folder writes (atomic.py), narrow filters for the
dependencies' import-time warnings (quiet_imports.py), pictures of results (visualize.py)."""
from .atomic import atomic_directory, write_json_atomic, write_text_atomic  # noqa: F401
