"""The crash tests: see tests/__init__.py."""
