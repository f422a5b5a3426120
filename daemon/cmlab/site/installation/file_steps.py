"""The install steps that change files of the site: the site control file (6
SAVE_SITE_CONTROL, 11 UPDATE_SITE_CONTROL), the installation folder (10 INSTALL_FILES) and
the Admin console (15 UPDATE_ADMIN_CONSOLE).

What they promise: a file is backed up before its first change (files.record_backup), and
the installation folder changes only when every file of the step matches update.map: each
file is copied next to its destination under a temporary name while it is hashed, and all of
them are renamed into place only after the last one verified. A tampered or still-empty
(placeholder) file fails the step with the folder untouched.

Crash points: `siteinstall.install_files_staged` (every file copied and verified, none
renamed), `siteinstall.during_install_files` (after each rename).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import fsync_dir, write_atomic
from cmlab.core.hashing import EMPTY_SHA256
from cmlab.site.formats.install_map import InstallStep
from cmlab.site.formats.payload_layout import MAP_ROOT
from cmlab.site.formats.sample_binary import sample_binary, sample_build_number
from cmlab.site.formats.site_control import (
    render_site_control,
    set_site_control_properties,
    site_control_properties,
)
from cmlab.site.formats.update_map import MapComponent
from cmlab.site.installation import files, server_state
from cmlab.site.installation.context import InstallStepError
from cmlab.site.installation.layout import (
    CONSOLE_COMPONENT,
    CONSOLE_DIR,
    CONSOLE_EXE,
    CONSOLE_SIZE,
    SITE_CONTROL,
)
from cmlab.site.installation.session import InstallSession
from cmlab.site.sitedb import site_server

__all__ = ["install_files", "save_site_control", "update_admin_console", "update_site_control"]


# -- 6 SAVE_SITE_CONTROL, 11 UPDATE_SITE_CONTROL ------------------------------------------


def _site_control(install: InstallSession) -> Path:
    return files.safe_dir(install.root, SITE_CONTROL[:-1], install.show) / SITE_CONTROL[-1]


def _recreate_site_control(install: InstallSession, path: Path) -> None:
    """A site without its site control file (made before it existed, or a trainee
    deleted it) gets it back from the site database."""
    with install.db() as conn:
        _, full_version, build = server_state.local_site(conn, install.code)
        server, _ = site_server.server_and_folder(conn, install.code)
    install.say(
        f"WARNING: The site control file {install.show(path)} is missing; recreated from the "
        "site database."
    )
    write_atomic(
        path, render_site_control(install.code, server, build, full_version, str(install.root))
    )


def save_site_control(install: InstallSession, step: InstallStep) -> None:
    path = _site_control(install)
    if not os.path.lexists(path):
        _recreate_site_control(install, path)
    install.say(f"INFO: Saving site control settings {install.show(path)}...")
    made = install.record_backup(SITE_CONTROL)
    saved = install.backup.joinpath("files", *SITE_CONTROL)
    install.say(
        f"INFO: Saved site control settings to {install.show(saved)}"
        if made
        else f"INFO: Site control settings were already saved to {install.show(saved)}"
    )


def update_site_control(install: InstallSession, step: InstallStep) -> None:
    path = _site_control(install)
    if not os.path.lexists(path):
        _recreate_site_control(install, path)
    install.record_backup(SITE_CONTROL)
    fd = files.open_read(path, install.show)
    if fd is None:
        raise InstallStepError(f"the site control file {install.show(path)} vanished; retry")
    try:
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    old = site_control_properties(text)
    values = {
        "Build Number": str(install.ctx.target_build),
        "Full Version": install.ctx.target_version,
    }
    new = set_site_control_properties(text, values)
    if new is None:
        raise InstallStepError(
            f"the site control file {install.show(path)} has no BEGIN_SITE_DEFINITION ... "
            "END_SITE_DEFINITION block; roll back (which restores the saved copy) and "
            "install again"
        )
    install.say(
        f"INFO: Updating site control settings: Build Number {old.get('Build Number')} -> "
        f"{values['Build Number']}, Full Version {old.get('Full Version')} -> "
        f"{values['Full Version']}"
    )
    if new != text:
        write_atomic(path, new)
    install.say(f"INFO: Updated site control settings in {install.show(path)}")


# -- 10 INSTALL_FILES ------------------------------------------------------------------------


def install_files(install: InstallSession, step: InstallStep) -> None:
    files.safe_parts(step.param("map", r"SMSSetup\update.map"), "install.map map parameter")
    _install_component(install, step.param("component", "SITE_SERVER"), step.param("redist"))


def _install_component(install: InstallSession, name: str, redist: str = "") -> None:
    component = install.ctx.update_map.component(name)
    if component is None:
        raise InstallStepError(
            f"update.map has no component {name}; the update package is incomplete "
            "(download it again)"
        )
    jobs = _file_jobs(component)
    src_root = install.staging / MAP_ROOT
    install.say(
        f"INFO: Installing {len(jobs)} file(s) of component {name} from "
        f"{install.show(src_root)} to {install.show(install.root)}"
    )
    todo = _files_to_install(install, jobs)
    if not todo:
        install.say(f"INFO: Every file of component {name} is already installed.")
        return
    made = sum(install.record_backup([*job.parts, job.name]) for job, _ in todo)
    shown = install.show(install.backup / "files")
    install.say(f"INFO: Backed up {made} installed file(s) to {shown}")
    staged: list[Path] = []
    try:
        for job, dst in todo:
            src = src_root.joinpath(*job.parts, job.name)
            tmp, actual = _stage_file(install, src_root, src, job, dst)
            staged.append(tmp)
            if actual != job.expected:
                _hash_mismatch(install, src, job, actual, name, redist)
        crashpoint("siteinstall.install_files_staged")
        for (job, dst), tmp in zip(todo, staged, strict=True):
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
            install.say(f"INFO: Installed {install.show(dst)} (hash {job.expected})")
            crashpoint("siteinstall.during_install_files")
    except BaseException:
        for tmp in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    install.say(
        f"INFO: Installed {len(todo)} file(s) of component {name}; "
        f"{len(jobs) - len(todo)} already up to date."
    )


@dataclass(frozen=True)
class _FileJob:
    parts: tuple[str, ...]  # folder below SMSSetup (staging) and below the site root
    name: str
    expected: str
    size: int


def _file_jobs(component: MapComponent) -> list[_FileJob]:
    """The files update.map lists for `component`; InstallStepError for a path that could
    escape, a name that is not plain or a hash that is not SHA-256."""
    jobs: list[_FileJob] = []
    for directory in component.directories:
        parts = tuple(files.safe_parts(directory.path, "update.map directory"))
        for f in directory.files:
            if f.algorithm != "SHA256":
                raise InstallStepError(f"update.map lists {f.name} with {f.algorithm}")
            if len(files.safe_parts(f.name, "update.map file name")) != 1:
                raise InstallStepError(f"update.map file name {f.name!r} is not a plain name")
            jobs.append(_FileJob(parts, f.name, f.hash, f.size))
    return jobs


def _files_to_install(install: InstallSession, jobs: list[_FileJob]) -> list[tuple[_FileJob, Path]]:
    """The jobs whose installed file does not have the expected hash yet, with their
    destinations; the temporaries of a killed run are swept from each folder first."""
    swept: set[tuple[str, ...]] = set()
    todo: list[tuple[_FileJob, Path]] = []
    for job in jobs:
        dst_dir = files.safe_dir(install.root, job.parts, install.show)
        if job.parts not in swept:
            files.sweep(dst_dir)
            swept.add(job.parts)
        dst = dst_dir / job.name
        if files.file_hash(dst, install.show) == job.expected:
            install.say(f"INFO: {install.show(dst)} already has hash {job.expected}; skipped.")
            continue
        todo.append((job, dst))
    return todo


def _stage_file(
    install: InstallSession, src_root: Path, src: Path, job: _FileJob, dst: Path
) -> tuple[Path, str]:
    """Copy the staging folder's `src` next to `dst` under a temporary name; returns the
    temporary and the hash of what was read."""
    fd = (
        None
        if files.existing_dir(src_root, job.parts, install.show) is None
        else files.open_read(src, install.show)
    )
    if fd is None:
        raise InstallStepError(
            f"{install.show(src)} is missing from the staging folder; the installation "
            "folder was not changed. Run RetryContentReplication (cmlab "
            "retry-replication) and install again."
        )
    try:
        return files.copy_to_tmp(fd, dst, "install", job.size)
    finally:
        os.close(fd)


def _hash_mismatch(
    install: InstallSession, src: Path, job: _FileJob, actual: str, name: str, redist: str
) -> None:
    """Log the guide's hash mismatch lines and raise the step's error."""
    install.say(f"INFO: Verifying hash for file '{install.show(src)}'")
    install.say(f"Expected hash:{job.expected}, Actual hash:{actual}")
    install.say(f"WARNING: File hash mismatch for {install.show(src)}")
    hint = (
        " It is still a 0-byte redist placeholder: the media check must replace "
        f"it from {install.show(install.staging / (redist or 'redist'))} first."
        if actual == EMPTY_SHA256
        else ""
    )
    raise InstallStepError(
        f"{install.show(src)} ({job.name}, component {name}) has hash {actual}, "
        f"but update.map expects {job.expected}; the installation folder was "
        f"not changed.{hint} Repair the update content (cmlab retry-replication, "
        "or cmlab reset and download it again), roll back, then install again."
    )


# -- 15 UPDATE_ADMIN_CONSOLE ----------------------------------------------------------------


def update_admin_console(install: InstallSession, step: InstallStep) -> None:
    name = step.param("component", CONSOLE_COMPONENT)
    if install.ctx.update_map.component(name) is not None:
        install.say(f"INFO: Updating the Admin console binaries from update.map component {name}")
        _install_component(install, name)
        return
    # The sample payloads ship no console files: the console binary is regenerated for
    # the new build, so its header shows the console was updated.
    console_dir = files.safe_dir(install.root, CONSOLE_DIR, install.show)
    files.sweep(console_dir)
    path = console_dir / CONSOLE_EXE
    install.say(f"INFO: Updating the Admin console binaries in {install.show(console_dir)}")
    try:
        current: int | None = sample_build_number(path)
    except (OSError, CmlabError):
        current = None
    if current == install.ctx.target_build:
        install.say(f"INFO: {install.show(path)} is already build {current}; skipped.")
        return
    install.record_backup([*CONSOLE_DIR, CONSOLE_EXE])
    write_atomic(
        path,
        sample_binary(
            CONSOLE_EXE, install.ctx.target_build, install.ctx.target_version, CONSOLE_SIZE
        ),
    )
    target = install.ctx.target_build
    install.say(f"INFO: Updated {install.show(path)} from build {current} to {target}")
