"""SMS_LAN_SENDER (docs/hierarchy.md, step 4): on `<JobID>.SRQ` from the Scheduler, copies
the job's package file into the destination site's `inboxes/despoolr.box/receive` (reached at
its address, `ServerData.SiteFolder`) as `ds_<jobid>.pkg`, and then the instruction as
`<JobID>.INS`, last: the child's despooler wakes only on `*.INS`, so it never sees half a
delivery.

The copy is resumable. It is written as `ds_<jobid>.pkg.part`, a name the despooler does not
match and that the child's start-up sweep of temporaries (names starting `.~cmlab-`) keeps,
so a retry after a network failure or a crash of either daemon continues from the bytes
already there. Whatever happened to those bytes, the whole file's SHA-256 decides: a damaged
part is thrown away and sent again. Only a whole, verified copy is renamed to its real name.

A destination that cannot be reached (no address, folder missing, not a folder, an error while
writing) is retried every `replication.sender_retry_delay` seconds; after
`replication.sender_retries` retries the job is Failed and, for a package, the destination's
content replication with it (CONTENT_REPLICATION_FAILED). The Sender never creates the
destination's folders: a site folder that is not there is not a site."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import BadInput, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    READ,
    copy_hashing,
    fsync_dir,
    open_nofollow,
    read_regular_file,
    remove_path,
    write_atomic,
)
from cmlab.site.component import Component
from cmlab.site.file_replication import (
    DamagedPackage,
    package_file_ok,
    package_file_path,
    verify_package_file,
)
from cmlab.site.formats.replication import (
    SRQ_MAX,
    SWD,
    Instruction,
    ReplicationFormatError,
    build_instruction,
    delivered_package_name,
    idb_name,
    ins_name,
    parse_send_request,
    read_instruction,
)
from cmlab.site.inbox import InboxSpec, Outcome
from cmlab.site.sitedb import hierarchy, scheduler_jobs
from cmlab.site.sitedb.scheduler_jobs import SchedulerJob

RECEIVE = ("inboxes", "despoolr.box", "receive")


class Unreachable(WorkFailed):
    """The destination cannot be written now; a later attempt may succeed."""


class SourceDamaged(WorkFailed):
    """This site's own package file is not what the job says: resending cannot help."""


@dataclass(frozen=True)
class Delivery:
    receive: Path
    pkg: Path  # ds_<jobid>.pkg
    part: Path  # ds_<jobid>.pkg.part
    ins: Path  # <JobID>.INS


def delivery_for(receive: Path, job: str) -> Delivery:
    return Delivery(
        receive=receive,
        pkg=receive / delivered_package_name(job),
        part=receive / (delivered_package_name(job) + ".part"),
        ins=receive / ins_name(job),
    )


def _read_send_request(path: Path) -> bytes:
    try:
        return read_regular_file(path, SRQ_MAX)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def despoolr_receive_folder(site_root: Path, address: str) -> Path:
    """`<address>/inboxes/despoolr.box/receive`, which must exist: Unreachable otherwise. A
    relative address is taken from this site's folder."""
    if not address:
        raise Unreachable("no address (ServerData.SiteFolder) is recorded for it")
    base = Path(address)
    if not base.is_absolute():
        base = site_root / base
    receive = base.joinpath(*RECEIVE)
    try:
        st = os.stat(receive)  # the address itself may be a link (a mounted share)
    except FileNotFoundError:
        raise Unreachable(f"{receive} does not exist") from None
    except OSError as exc:
        raise Unreachable(f"{receive}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Unreachable(f"{receive} is not a folder")
    return receive


def resume_offset(d: Delivery, size: int) -> int:
    """How many bytes of the part file can be kept: its size, unless it is not a regular
    file or longer than the package (then it goes, and the copy starts over)."""
    try:
        st = os.lstat(d.part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_size > size:
        remove_path(d.part)
        fsync_dir(d.receive)
        return 0
    return st.st_size


def copy_resumable(source: Path, d: Delivery, size: int, sha256: str, offset: int) -> bool:
    """Append `source[offset:]` to the part file, fsync, and check the whole part's SHA-256.
    True when it is the package (then renamed to ds_<jobid>.pkg, folder fsynced); False when
    the kept bytes were damaged (the part is removed: the caller sends again from byte 0).
    SourceDamaged when this site's package file is not `size` bytes long."""
    src = open_nofollow(source, READ)
    try:
        if os.fstat(src).st_size != size:
            raise SourceDamaged(f"{source.name} is {os.fstat(src).st_size} bytes, not {size}")
        out = open_nofollow(d.part, os.O_RDWR | os.O_CREAT)
        try:
            # The kept bytes count in the hash as they are, not as the source has them.
            copied = copy_hashing(
                src,
                out,
                resume=offset,
                fsync=True,
                on_chunk=lambda _n: crashpoint("sender.mid_copy"),
            )
        finally:
            os.close(out)
    finally:
        os.close(src)
    if copied.sha256 != sha256.upper():
        remove_path(d.part)
        fsync_dir(d.receive)
        return False
    os.replace(d.part, d.pkg)
    fsync_dir(d.receive)
    return True


class Sender(Component):
    component = "SMS_LAN_SENDER"
    log_file = "sender.log"

    def inboxes(self) -> list[InboxSpec]:
        specs = super().inboxes()
        for spec in specs:
            # A send that failed is offered again after the sender's retry delay.
            spec.retry_after = self.config.replication.sender_retry_delay
        return specs

    async def on_send_request(self, path: Path) -> Outcome:
        job_id = parse_send_request(path.name, await self.in_thread(_read_send_request, path))
        name = f"{job_id:08X}"
        job = await self.db.read(scheduler_jobs.scheduler_job, job_id)
        if job is None:
            self.say(f"~Job {name} is not in the job source; the send request is dropped.")
            return Outcome.DONE
        if job.state in scheduler_jobs.ENDED_STATES:
            self.say(f"~Job {name} is {job.state}; nothing to send.")
            return Outcome.DONE
        idb = self.paths.schedule_tosend / idb_name(name)
        try:
            source = package_file_path(self.paths.root, job.package_file)
            instr = await self.in_thread(read_instruction, idb)
            self._check(instr, job)
            data = build_instruction(instr)
        except (BadInput, ReplicationFormatError, ValueError, FileNotFoundError) as exc:
            return await self._give_up(job, f"the instruction {self.show(idb)} is unusable: {exc}")
        self.say(f"~Package file = {self.show(source)}")
        self.say(f"~Instruction file = {self.show(idb)}")
        site = await self.db.read(hierarchy.site_by_code, job.dest_site)
        try:
            if site is None:
                raise Unreachable("this site database does not know it (ServerData)")
            # Another site's folder, perhaps on a share: every look at it is off the loop.
            receive = await self.in_thread(despoolr_receive_folder, self.paths.root, site.folder)
            d = delivery_for(receive, name)
            self.say(f"~Sending Started [{self.show(source)}]")
            await self._deliver(source, d, job, data)
        except SourceDamaged as exc:
            return await self._give_up(job, f"the package file is damaged: {exc}")
        except (Unreachable, OSError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.filename:
                text = f"{exc.filename}: {text}"
            return await self._retry_or_fail(job, text)
        if job.job_type == SWD:
            what = f"SWD package {job.pkg_id} version {job.version}"
        else:
            what = f"site recovery package of site {job.pkg_id} (request {job.version})"
        self.say(f"~Finished sending {what} to site {job.dest_site}")
        await self.db.tx(scheduler_jobs.complete_job, job_id)
        self.say("~Sending completed successfully")
        return Outcome.DONE

    @staticmethod
    def _check(instr: Instruction, job: SchedulerJob) -> None:
        mine = (job.name, job.job_type, job.dest_site, job.pkg_id, job.version)
        theirs = (instr.job, instr.job_type, instr.dest_site, instr.package_id, instr.version)
        if mine != theirs or (instr.file_size, instr.file_hash) != (job.file_size, job.file_hash):
            raise ValueError("it does not describe the job in the job source")

    async def _deliver(self, source: Path, d: Delivery, job: SchedulerJob, data: bytes) -> None:
        if await self.in_thread(os.path.lexists, d.ins):
            return  # the INS is written last: the delivery was made before a crash
        if not await self.in_thread(package_file_ok, d.pkg, job.file_size, job.file_hash):
            await self.in_thread(remove_path, d.pkg)  # if a damaged one is there
            for attempt in range(2):
                offset = await self.in_thread(resume_offset, d, job.file_size)
                if offset:
                    self.say(f"~Resuming sending [{self.show(d.part)}] from byte {offset}")
                ok = await self.in_thread(
                    copy_resumable, source, d, job.file_size, job.file_hash, offset
                )
                if ok:
                    break
                if offset == 0 or attempt == 1:
                    # A fresh copy does not match: this site's package file changed.
                    await self.in_thread(self._source_check, source, job)
                    raise OSError(errno.EIO, "the copy does not match its hash", str(d.part))
                self.say(
                    f"~The partly sent file {self.show(d.part)} is damaged (its SHA-256 does "
                    "not match); sending it again from the start.",
                    level="warning",
                )
        crashpoint("sender.before_ins")
        await self.in_thread(write_atomic, d.ins, data)

    @staticmethod
    def _source_check(source: Path, job: SchedulerJob) -> None:
        try:
            verify_package_file(source, job.file_size, job.file_hash)
        except DamagedPackage as exc:
            raise SourceDamaged(str(exc)) from None

    async def _retry_or_fail(self, job: SchedulerJob, error: str) -> Outcome:
        retries = self.config.replication.sender_retries
        delay = self.config.replication.sender_retry_delay
        attempts = await self.db.tx(scheduler_jobs.count_attempt, job.job_id, error)
        if attempts <= retries:
            self.say(
                f"~Cannot send to site {job.dest_site}: {error}. Will retry in {delay:g} seconds "
                f"(attempt {attempts} of {retries + 1})",
                level="warning",
            )
            return Outcome.RETRY
        self.say(
            f"~Cannot send to site {job.dest_site}: {error}. Giving up after {attempts} attempts.",
            level="warning",
        )
        return await self._give_up(job, f"Cannot send to site {job.dest_site}: {error}")

    async def _give_up(self, job: SchedulerJob, error: str) -> Outcome:
        await self.db.tx(scheduler_jobs.fail_job, job, error)
        if job.job_type == SWD:
            consequence = (
                f"Content replication of package {job.pkg_id} version {job.version} to site "
                f"{job.dest_site} failed (CONTENT_REPLICATION_FAILED). Fix the cause, then run "
                "RetryContentReplication (`cmlab retry-replication`)."
            )
        else:
            consequence = f"The recovery of site {job.pkg_id} was not sent."
        self.say(f"ERROR: Job {job.name} failed: {error}. {consequence}", level="error")
        return Outcome.DONE
