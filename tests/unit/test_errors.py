"""cmlab.core.errors: one tree in which bad input and a failure of the work are two families."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
from pathlib import Path

import pytest

import cmlab
from cmlab.admin.payload import load_package
from cmlab.core import errors
from cmlab.core.errors import BadInput, CmlabError, UnsafeFile, WorkFailed
from cmlab.core.fs import read_regular_file, read_regular_file_stat
from cmlab.core.hashing import folder_hash
from cmlab.site.config import load_config
from cmlab.site.file_replication import build_package_file
from cmlab.site.formats.manifest import parse_manifest
from cmlab.site.formats.replication import parse_instruction
from cmlab.site.formats.sample_binary import sample_binary, sample_build_number
from cmlab.site.formats.update_map import parse_update_map
from cmlab.site.sitedb import connected, create_site_db
from cmlab.site.sitedb.recovery import local_version


def every_error_class() -> set[type[CmlabError]]:
    """Every subclass of CmlabError in the package, once every module is imported."""
    for module in pkgutil.walk_packages(cmlab.__path__, "cmlab."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: set[type[CmlabError]] = set()
    pending: list[type[CmlabError]] = [CmlabError]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    return found


def by_name(qualified: str) -> type[BaseException]:
    module, _, name = qualified.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, BaseException)
    return cls


# Every parser's and verifier's error: CAB, signature, manifest, update.map, config, the
# prerequisite facts, trust stores and signers, the lab CA, state messages, replication
# instructions and package files, a GUID argument, and read_regular_file's refusal.
BAD_INPUT = [
    "cmlab.core.errors.UnsafeFile",
    "cmlab.core.errors.CabError",
    "cmlab.core.errors.CabLimitError",
    "cmlab.core.errors.CabPathError",
    "cmlab.site.trust.cab_layout.NotACabError",
    "cmlab.core.errors.SignatureFormatError",
    "cmlab.core.errors.ManifestError",
    "cmlab.core.errors.UpdateMapError",
    "cmlab.core.errors.ConfigError",
    "cmlab.site.config.SiteNotFound",
    "cmlab.core.errors.PrereqError",
    "cmlab.site.trust.authenticode.SigningError",
    "cmlab.site.trust.authenticode.TrustStoreError",
    "cmlab.site.trust.lab_ca.LabCAError",
    "cmlab.site.file_replication.DamagedPackage",
    "cmlab.site.formats.replication.ReplicationFormatError",
    "cmlab.site.formats.state_message.StateMessageError",
    "cmlab.site.formats.cmu.CmuError",
    "cmlab.site.formats.notifications.NotificationError",
    "cmlab.admin.reset.BadGuid",
]

WORK_FAILED = [
    "cmlab.core.errors.ContentLibError",
    "cmlab.site.installation.InstallStepError",
    "cmlab.components.cmupdate.install.InstallFailed",
    "cmlab.components.cmupdate.cmupdate.StageFailed",
    "cmlab.components.cmupdate.redist_media.MediaError",
    "cmlab.components.dmpdownloader.dmpdownloader.DownloadError",
    "cmlab.components.dmpdownloader.setupdl.RedistError",
    "cmlab.components.sender.Unreachable",
    "cmlab.components.sender.SourceDamaged",
    "cmlab.components.hman.postinstall.ClientFilesError",
]


@pytest.mark.parametrize("name", BAD_INPUT)
def test_every_parser_and_verifier_error_is_bad_input(name: str) -> None:
    cls = by_name(name)
    assert issubclass(cls, BadInput) and not issubclass(cls, WorkFailed)


@pytest.mark.parametrize("name", WORK_FAILED)
def test_every_failure_of_the_work_is_work_failed_and_not_bad_input(name: str) -> None:
    cls = by_name(name)
    assert issubclass(cls, WorkFailed) and not issubclass(cls, BadInput)


def test_every_error_of_the_package_is_in_exactly_one_family_and_drawn_in_the_docstring() -> None:
    classes = every_error_class() - {BadInput, WorkFailed}
    assert {by_name(n) for n in BAD_INPUT + WORK_FAILED} <= classes
    for cls in classes:
        assert issubclass(cls, BadInput) != issubclass(cls, WorkFailed), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is not in the tree drawn"
    # `except CmlabError` (the inbox engine's, the CLI's) still catches both families.
    assert issubclass(BadInput, CmlabError) and issubclass(WorkFailed, CmlabError)


def test_the_inbox_engine_and_the_handlers_share_the_one_bad_input_class() -> None:
    from cmlab.site import inbox

    assert inbox.BadInput is BadInput


def test_parsers_raise_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        parse_manifest(b"<not xml")
    with pytest.raises(BadInput):
        parse_update_map("BEGIN_COMPONENT_FILELIST\nnonsense")
    with pytest.raises(BadInput):
        parse_instruction(b"{}")
    with pytest.raises(BadInput):
        load_config(tmp_path)  # no site.toml


def test_read_regular_file_refuses_a_link_a_fifo_and_an_oversized_file_as_unsafe_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "real").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would hang the reader
    cases = {
        "link": "link: is a symbolic link; not followed",
        "fifo": "fifo: not a regular file",
        "real": "real: larger than 4 bytes",
    }
    for name, reason in cases.items():
        for read in (read_regular_file, read_regular_file_stat):
            with pytest.raises(UnsafeFile) as caught:
                read(tmp_path / name, 4)
            assert str(caught.value) == reason
            # Still the ValueError its callers have always caught.
            assert isinstance(caught.value, ValueError)
    assert read_regular_file(tmp_path / "real", 5) == b"12345"


def test_a_folder_hash_refuses_a_special_file_as_unsafe_file(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    os.mkfifo(tmp_path / "tree" / "fifo")
    with pytest.raises(UnsafeFile, match="not a regular file or folder"):
        folder_hash(tmp_path / "tree")


# Modules whose `raise CmlabError(...)` has not been given its family yet: none; keep it so.
ROOT_RAISED_IN: tuple[str, ...] = ()


def test_every_raise_names_its_family_not_the_root() -> None:
    """`raise CmlabError(...)` says neither whose fault it is nor what to do next: every
    error cmlab raises is a BadInput or a WorkFailed (or a class below them)."""
    package = Path(cmlab.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith(ROOT_RAISED_IN):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            exc = node.exc if isinstance(node, ast.Raise) else None
            if isinstance(exc, ast.Call):
                exc = exc.func
            if isinstance(exc, ast.Name) and exc.id == "CmlabError":
                found.append(f"{rel}:{node.lineno}")
    assert found == []


def test_a_bad_sample_package_or_binary_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"package\.toml"):
        load_package(tmp_path)  # no package.toml
    (tmp_path / "package.toml").write_text("[other]\n", encoding="utf-8")
    with pytest.raises(BadInput, match=r"package\.toml: missing \[package\]"):
        load_package(tmp_path)
    with pytest.raises(BadInput, match="is smaller than its header"):
        sample_binary("smsexec.exe", 9135, "5.00.9135.1000", 10)
    (tmp_path / "plain.exe").write_bytes(b"MZ not a sample")
    with pytest.raises(BadInput, match="not a cmlab sample binary"):
        sample_build_number(tmp_path / "plain.exe")


def test_work_that_cannot_be_done_on_the_sites_own_files_or_rows_is_work_failed(
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkFailed, match="no files to pack"):
        build_package_file(tmp_path / "empty", tmp_path / "out.cab")
    db_file = tmp_path / "db" / "site.db"
    create_site_db(
        db_file, site_code="PR1", role="primary", server="pr1.lab", build=9135, minor_build=0
    )
    with connected(db_file, "PR1") as conn:
        conn.execute("DELETE FROM Sites")
        with pytest.raises(WorkFailed, match="no Sites row for this site PR1"):
            local_version(conn)
