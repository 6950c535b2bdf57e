"""The server tests' fixtures live in servers.py (importable by the tests too)."""
from servers import checkpoint, engine_path, served  # noqa: F401  (fixtures)
