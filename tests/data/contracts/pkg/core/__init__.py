"""The bottom layer of the fixture: it must import nothing above it."""
