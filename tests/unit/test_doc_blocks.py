"""The runner of a page's command blocks (tests/helpers/doc_blocks.py): what it runs, how it
reports a failure, and what it refuses, on small pages written here."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.doc_blocks import (
    DEFAULT_TIMEOUT,
    BackgroundJob,
    BlockFailed,
    DocBlockError,
    Kind,
    Mode,
    ReadyCheck,
    parse_markdown,
    run_markdown,
)
from tests.helpers.waiting import wait_until

FENCE = "```"


def page(text: str) -> str:
    return textwrap.dedent(text).replace("'''", FENCE)


def run_page(
    tmp_path: Path, text: str, *, timeout: float = DEFAULT_TIMEOUT, ready: ReadyCheck | None = None
) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "PAGE.md"
    path.write_text(page(text))
    return [str(o) for o in run_markdown(path, tmp_path / "run", timeout=timeout, ready=ready)]


# A command that serves until SIGTERM, then exits 0, as `cmlab run` does; "served" says it is
# ready (its handler is in place) and holds its pid, whole (written, then renamed).
SERVER = """\
'''sh
cat > server.py <<'EOF'
import os, pathlib, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
pathlib.Path("served.tmp").write_text(str(os.getpid()))
os.replace("served.tmp", "served")
signal.pause()
EOF
'''
"""


def served(job: BackgroundJob) -> bool:
    return (job.cwd() / "served").exists()


def test_the_blocks_that_run_are_found_with_their_lines_and_prompts_stripped() -> None:
    blocks = parse_markdown(
        page("""\
        # Title

        '''sh
        echo one
        '''

        '''
        a tree, not a command
        '''

        '''toml
        [site]
        '''

        <!-- doc-test: skip (it needs a Windows host) -->
        '''console
        $ cmlab status lab/CAS
        output, not run
        $ echo two \\
        > three
        '''

        '''python
        print("four")
        '''
        """),
        "PAGE.md",
    )
    assert [(b.line, b.kind, b.mode) for b in blocks] == [
        (3, Kind.SHELL, Mode.RUN),
        (16, Kind.CONSOLE, Mode.SKIP),
        (23, Kind.PYTHON, Mode.RUN),
    ]
    assert blocks[1].reason == "it needs a Windows host"
    assert blocks[1].lines() == ["cmlab status lab/CAS", "", "echo two \\", "three"]
    # Padded so that the script's line numbers are the page's.
    assert blocks[0].script().split("\n")[3] == "echo one"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<!-- doc-test: skip -->\n'''sh\ntrue\n'''\n",
            "PAGE.md:1: `doc-test: skip` needs a reason",
        ),
        ("<!-- doc-test: skip () -->\n'''sh\ntrue\n'''\n", "needs a reason"),
        ("<!-- doc-test: skipp (typo) -->\n'''sh\ntrue\n'''\n", "unknown annotation"),
        ("<!-- doc-test: expect-exit one -->\n'''sh\ntrue\n'''\n", "unknown annotation"),
        (
            "<!-- doc-test: skip (why) -->\n\n'''sh\ntrue\n'''\n",
            "PAGE.md:1: a doc-test annotation must be right before",
        ),
        ("<!-- doc-test: skip (why)\n-->\n'''sh\ntrue\n'''\n", "one comment on one line"),
        ("<!-- doc-test: skip (why) -->\n'''text\ntrue\n'''\n", "never runs"),
        ("<!-- doc-test: pytest -->\n'''sh\ntrue\n'''\n", "is for python blocks"),
        ("<!-- doc-test: background -->\n'''sh\nsleep 1\nsleep 2\n'''\n", "one shell command"),
        ("text\n'''sh\ntrue\n", "PAGE.md:2: the fence opened here is never closed"),
    ],
)
def test_a_page_that_breaks_the_convention_is_refused_before_anything_runs(
    text: str, message: str
) -> None:
    with pytest.raises(DocBlockError, match=re.escape(message)):
        parse_markdown(text.replace("'''", FENCE), "PAGE.md")


def test_blocks_share_a_working_directory_with_the_venv_under_test_first_on_path(
    tmp_path: Path,
) -> None:
    outcomes = run_page(
        tmp_path,
        f"""\
        '''sh
        mkdir lab && echo made > lab/site.txt
        '''

        <!-- doc-test: skip (shown, not run) -->
        '''sh
        false
        '''

        '''console
        $ test "$(cat lab/site.txt)" = made
        this line is output, so it is not run
        $ test "$(command -v python)" = {sys.prefix}/bin/python
        $ test -x .venv/bin/python && test "$HOME" != {Path.home()}
        '''

        '''python
        import pathlib, sys
        assert pathlib.Path("lab/site.txt").read_text() == "made\\n"
        assert sys.prefix == {sys.prefix!r}
        '''
        """,
    )
    assert outcomes[0].startswith("PAGE.md:1: shell block passed in ")
    assert outcomes[1] == "PAGE.md:6: shell block skipped (shown, not run)"
    assert outcomes[2].startswith("PAGE.md:10: console block passed")
    assert outcomes[3].startswith("PAGE.md:17: python block passed")


def test_a_failing_block_names_its_page_and_line_and_shows_its_output(tmp_path: Path) -> None:
    with pytest.raises(BlockFailed) as failed:
        run_page(
            tmp_path,
            """\
            '''sh
            true
            '''

            '''sh
            echo "about to fail"
            ls no-such-folder
            echo "never printed"
            '''

            '''sh
            echo "not reached" > reached
            '''
            """,
        )
    report = str(failed.value)
    assert report.startswith("PAGE.md:5: the shell block exited 2 (expected 0)\n")
    assert "    7 | ls no-such-folder" in report
    assert "no-such-folder" in report.split("--- stderr ---\n")[1].split("--- stdout ---")[0]
    assert report.endswith("--- stdout ---\nabout to fail")
    assert not (tmp_path / "run" / "work" / "reached").exists()


def test_bash_and_python_errors_give_the_page_line(tmp_path: Path) -> None:
    with pytest.raises(BlockFailed, match=r"PAGE\.md: line 3: no-such-command: command not found"):
        run_page(tmp_path, "'''sh\ntrue\nno-such-command\n'''\n")
    with pytest.raises(BlockFailed, match=r'PAGE_L1\.py", line 3, in <module>'):
        run_page(tmp_path / "py", "'''python\nx = 1\nraise SystemExit(x / 0)\n'''\n")


def test_expect_exit_checks_the_status_a_block_ends_with(tmp_path: Path) -> None:
    outcomes = run_page(tmp_path, "<!-- doc-test: expect-exit 3 -->\n'''sh\nexit 3\n'''\n")
    assert outcomes[0].startswith("PAGE.md:2: shell block passed")
    with pytest.raises(BlockFailed, match=r"PAGE\.md:2: the shell block exited 0 \(expected 3\)"):
        run_page(tmp_path / "b", "<!-- doc-test: expect-exit 3 -->\n'''sh\ntrue\n'''\n")


def test_a_block_past_its_deadline_is_killed_and_fails(tmp_path: Path) -> None:
    with pytest.raises(
        BlockFailed, match=r"PAGE\.md:1: the shell block did not finish within 0.5 s"
    ):
        run_page(tmp_path, "'''sh\necho started\nsleep 600\n'''\n", timeout=0.5)


def test_a_background_block_serves_the_later_blocks_then_stops_on_sigterm(tmp_path: Path) -> None:
    outcomes = run_page(
        tmp_path,
        SERVER
        + page("""\

        <!-- doc-test: background -->
        '''sh
        python server.py   # serves until stopped
        '''

        '''sh
        test -s served
        '''
        """),
        ready=served,
    )
    assert [o.split(" block ")[1].split(" in ")[0] for o in outcomes] == ["passed"] * 3


def test_a_command_started_with_an_ampersand_serves_the_later_blocks_too(tmp_path: Path) -> None:
    outcomes = run_page(
        tmp_path,
        SERVER
        + page("""\

        '''sh
        python server.py &
        echo started
        '''

        '''sh
        test -e served
        '''
        """),
        ready=served,
    )
    assert len(outcomes) == 3


def test_a_command_left_running_must_exit_0_on_sigterm(tmp_path: Path) -> None:
    # `sleep` dies of SIGTERM: a daemon that did so would lose its work.
    with pytest.raises(BlockFailed) as failed:
        run_page(tmp_path, "'''sh\nsleep 600 &\n'''\n")
    assert str(failed.value).startswith("PAGE.md:1: the shell block left commands that stopped")
    assert "exited 143 (SIGTERM)" in str(failed.value)
    with pytest.raises(BlockFailed, match=r"exited 143 \(SIGTERM\)"):
        run_page(tmp_path / "b", "<!-- doc-test: background -->\n'''sh\nsleep 600\n'''\n")


def test_a_command_left_running_that_fails_fails_its_block(tmp_path: Path) -> None:
    # It has ended by the block's end (else the end's SIGTERM could be what ends it): the
    # runner still reports its status, whether or not bash lists it as a job any more.
    text = """\
    '''sh
    (echo refused >&2; exit 3) &
    while kill -0 $! 2>/dev/null; do sleep 0.01; done
    '''
    """
    with pytest.raises(BlockFailed, match=r"PAGE\.md:1: the shell block .*exited 3"):
        run_page(tmp_path, text)


def test_an_ampersand_command_that_ends_well_at_once_is_fine(tmp_path: Path) -> None:
    # Not a server: the ready check never sees it serve, and its status 0 is enough. One the
    # block waits for itself is the block's business.
    outcomes = run_page(
        tmp_path,
        "'''sh\n(exit 0) &\necho quick & wait $!\n'''\n",
        ready=served,
    )
    assert outcomes[0].startswith("PAGE.md:1: shell block passed")


def test_a_background_command_that_never_serves_fails_its_block(tmp_path: Path) -> None:
    with pytest.raises(BlockFailed, match=r"started pid \d+, which exited 1"):
        run_page(
            tmp_path,
            SERVER
            + "\n<!-- doc-test: background -->\n'''sh\npython -c 'raise SystemExit(1)'\n'''\n",
            ready=served,
        )


def test_a_pytest_block_runs_as_a_test_module(tmp_path: Path) -> None:
    # One run (pytest starts in seconds here): a failing test shows both that the module was
    # collected and run, and that pytest's report reaches the failure.
    text = (
        "<!-- doc-test: pytest -->\n'''python\ndef test_it() -> None:\n    assert 1 + 1 == 3\n'''\n"
    )
    with pytest.raises(BlockFailed, match=r"(?s)PAGE\.md:2: the python block exited 1 .*1 failed"):
        run_page(tmp_path, text)


def test_what_a_failing_block_started_is_killed_with_it(tmp_path: Path) -> None:
    text = (
        SERVER
        + "\n'''sh\npython server.py &\nuntil test -s served; do sleep 0.01; done\nfalse\n'''\n"
    )
    line = len(SERVER.splitlines()) + 2  # the server's block, a blank line, this block
    with pytest.raises(BlockFailed, match=rf"PAGE\.md:{line}: the shell block exited 1"):
        run_page(tmp_path, text)
    pid = int((tmp_path / "run" / "work" / "served").read_text())
    wait_until(lambda: not _alive(pid), timeout=10, what=f"the server (pid {pid}) to be killed")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
