"""cmlab's tests, a package so that every test imports its helpers as `tests.helpers.<name>`
(pytest puts the repository root on the path for a package's test modules: no helper path is
inserted by hand). The folders are the kinds of test, each marked by tests/conftest.py:

- unit/: functions, libraries, the database and the CLI on real files, without the daemon
  running end to end; `pytest tests/unit` (or `-m unit`) is the quick run;
- e2e/: the real daemon (or several, a hierarchy) taking an update through its stages;
- crash/: SIGKILL campaigns, each a restart that must converge;
- faults/: bad input and failures on running sites, each ending in the guide's recovery.

`slow` marks single long tests within any of them."""
