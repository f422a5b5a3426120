"""SIGKILL between a drop and its effects: a restart converges to the same end state, with no
drop file lost and none applied twice."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.sites import (
    SYNCED,
    Daemon,
    cmlab,
    inbox_files,
    query,
    states,
    temporaries,
)
from tests.helpers.waiting import wait_until

EXPECTED = SYNCED


def converged(site: Path) -> bool:
    """Every sync finished, the states reached, and no work left anywhere: no drop file, and
    no change SMSDBMon has still to turn into one (files looked at on both sides of the
    database, since a file is durable before its row goes). A CI run once saw a CAS.SCU appear
    after an older form of this check had passed."""
    return (
        not inbox_files(site)
        and query(site, "SELECT COUNT(*) FROM SyncHistory WHERE Finished IS NULL")[0][0] == 0
        and not query(site, "SELECT 1 FROM TableChangeNotifications LIMIT 1")
        and states(site) == EXPECTED
        and not inbox_files(site)
    )


def assert_clean_end_state(site: Path) -> None:
    assert states(site) == EXPECTED
    assert inbox_files(site) == []
    assert not list(site.rglob("BAD")), "nothing may be quarantined by a crash"
    # Each .SMX was recorded once (a replay is ignored); every sync that ran produced 0..4 or
    # was re-run whole, so state 4 was recorded at least once.
    rows = query(site, "SELECT FileName, StateID FROM StateMessages")
    assert len({r[0] for r in rows}) == len(rows)
    assert 4 in {r[1] for r in rows}
    assert query(site, "SELECT Result FROM SyncHistory ORDER BY ID DESC LIMIT 1")[0][0] == "success"
    assert (site / "CMUStaging" / "Manifest.xml").is_file()
    assert not temporaries(site)


CRASHPOINTS = [
    "smsdbmon.after_drop",
    "statesys.after_record",
    "statesys.after_record:5",
    "dmp.after_download",
    "dmp.after_move",
    "hman.after_forward",
    "hman.after_extract",
    "hman.after_applicability",
    "hman.before_scu_delete",
]


@pytest.mark.parametrize("point", CRASHPOINTS)
def test_sigkill_at_crash_point_then_restart_converges(site: Path, point: str) -> None:
    with Daemon(site) as daemon:
        daemon.start(CMLAB_CRASHPOINTS=point)
        cmlab("sync", str(site))
        rc = daemon.wait_exit(timeout=60)
        assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {daemon.stderr()}"
        daemon.start()
        wait_until(lambda: converged(site), timeout=60, what=f"convergence after {point}")
        assert daemon.stop() == 0
    assert_clean_end_state(site)


def test_sigkill_at_random_moments_converges(site: Path) -> None:
    rng = random.Random(20261121)
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        for _ in range(4):
            # The delay is the test's input (when the kill lands), not a wait for a condition.
            time.sleep(rng.uniform(0.0, 0.4))
            daemon.kill()
            daemon.start()
            cmlab("sync", str(site))
        wait_until(lambda: converged(site), timeout=60, what="convergence after random kills")
        assert daemon.stop() == 0
    assert_clean_end_state(site)
