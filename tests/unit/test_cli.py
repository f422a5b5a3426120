"""The command line: exit codes (0 done, 1 failed, 2 bad usage), payload build and verify."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from cmlab.site.trust import create_lab_ca
from cmlab.testing import LabSite
from tests.helpers.cli import cmlab


def test_payload_build_and_verify(template: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "SMSSetup").mkdir(parents=True)
    (src / "SMSSetup" / "readme.txt").write_text("hello")
    out = tmp_path / "p.cab"
    trust = template / "trust"
    cmlab(
        "payload", "build", str(src), str(out),
        "--key", str(trust / "signing.key"), "--cert", str(trust / "signing.pem"),
        "--chain", str(trust / "intermediate.pem"),
    )  # fmt: skip
    ok = cmlab("payload", "verify", str(out), "--site", str(template))
    assert f"File '{out}' is signed and trusted." in ok.stdout
    assert f"File '{out}' is signed with MS root cert." in ok.stdout
    doc = json.loads(cmlab("payload", "verify", str(out), "--site", str(template), "--json").stdout)
    assert doc["status"] == "TRUSTED" and len(doc["chain"]) == 3

    # osslsigncode, a verifier nobody here wrote, accepts what `payload build` signed.
    proc = subprocess.run(
        ["osslsigncode", "verify", "-CAfile", str(trust / "root.pem"), "-in", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    data = bytearray(out.read_bytes())
    data[100] ^= 1
    out.write_bytes(bytes(data))
    bad = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert bad.returncode == 1 and "DIGEST_MISMATCH" in bad.stdout


def test_payload_signed_by_another_root_is_not_trusted(template: Path, tmp_path: Path) -> None:
    other = create_lab_ca(tmp_path / "other")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    out = tmp_path / "p.cab"
    cmlab(
        "payload", "build", str(src), str(out),
        "--key", str(other.signing_key), "--cert", str(other.signing_cert),
        "--chain", str(other.intermediate_cert),
    )  # fmt: skip
    proc = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert proc.returncode == 1 and "UNTRUSTED_ROOT" in proc.stdout


def test_unsigned_payload_and_bad_usage(template: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    out = tmp_path / "u.cab"
    cmlab("payload", "build", str(src), str(out), "--unsigned")
    proc = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert proc.returncode == 1 and "NOT_SIGNED" in proc.stdout
    assert cmlab("payload", "build", str(src), str(out), check=False).returncode == 2
    assert cmlab("frobnicate", check=False).returncode == 2


def test_init_refuses_an_existing_site_and_a_bad_code(template: Path, tmp_path: Path) -> None:
    proc = cmlab("init", str(template), "--site-code", "CAS", check=False)
    assert proc.returncode == 1 and "already holds a site" in proc.stderr
    proc = cmlab("init", str(tmp_path / "X"), "--site-code", "TOOLONG", check=False)
    assert proc.returncode == 1 and "three letters" in proc.stderr
    proc = cmlab(
        "init", str(tmp_path / "Y"), "--site-code", "PR1", "--role", "primary", check=False
    )
    assert proc.returncode == 1 and "--parent" in proc.stderr


def test_status_of_a_folder_that_is_not_a_site(tmp_path: Path) -> None:
    proc = cmlab("status", str(tmp_path), check=False)
    assert proc.returncode == 1 and "cmlab init" in proc.stderr


def test_a_second_daemon_on_the_same_site_is_refused(
    cmlab_site_factory: Callable[..., LabSite],
) -> None:
    # The first daemon serves (it holds the site's lock) once start() returns; it runs in
    # this process, the second is `cmlab run` in another.
    first = cmlab_site_factory(stage="new")
    second = cmlab("run", str(first.path), check=False)
    assert second.returncode == 1 and "already running" in second.stderr
    assert first.running
    assert first.stop() == 0
