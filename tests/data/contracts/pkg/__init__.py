"""The fixture package for the import contracts test: see ../README.md."""
