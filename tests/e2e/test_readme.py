"""The pages whose commands a user copies, run as written (tests/helpers/doc_blocks.py has the
convention), so they can never walk a user into an error. Another page is one more line in
PAGES.

One test per page, its blocks in order: they depend on each other (a later block uses the
site an earlier one made, while the daemon it started serves), so the first failure stops the
page, and its report names the block's line and shows its output."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmlab.site.site_lock import daemon_running
from tests.helpers.doc_blocks import (
    BackgroundJob,
    BlockFailed,
    DocBlockError,
    DocSession,
    read_blocks,
)

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "README.md",
    "docs/testing.md",
]


def cmlab_daemon_serves(job: BackgroundJob) -> bool:
    """A `cmlab run SITE` left running serves once it holds its site's lock; any other command
    left running is taken as serving at once."""
    argv = job.argv()
    if argv is None:  # not exec'd yet
        return False
    for i, word in enumerate(argv[:-2]):
        if Path(word).name == "cmlab" and argv[i + 1] == "run":
            return daemon_running(job.cwd() / argv[i + 2] / "db")
    return True


@pytest.mark.parametrize("page", PAGES)
def test_the_page_runs_as_written(page: str, tmp_path: Path) -> None:
    report = ""
    try:
        blocks = read_blocks(ROOT / page, page)
        with DocSession(tmp_path, ready=cmlab_daemon_serves) as session:
            for block in blocks:
                # Printed as they pass: pytest shows them above a failure's report.
                print(session.run(block))
    except (BlockFailed, DocBlockError) as failed:
        report = str(failed)
    if report:  # the report is the whole story: no traceback, no chained exception
        pytest.fail(report, pytrace=False)
