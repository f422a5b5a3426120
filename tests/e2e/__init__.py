"""The e2e tests: see tests/__init__.py."""
