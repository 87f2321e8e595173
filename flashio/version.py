"""flashio's version, in a module of its own: the artifact writer and the registry record it in
lineage without importing the package's top level (flashio/__init__.py reaches the runtime)."""

__version__ = "0.1.0"
