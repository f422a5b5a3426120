"""Shared by the tests: lab sites made by `cmlab init`, the daemon as a subprocess, waiting
with a deadline, signed CABs (imported as `tests.helpers.<module>`)."""
