"""The faults tests: see tests/__init__.py."""
