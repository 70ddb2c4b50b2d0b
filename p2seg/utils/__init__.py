"""Small shared utilities (atomic file and folder writes)."""
from .atomic import atomic_directory, write_json_atomic, write_text_atomic  # noqa: F401
