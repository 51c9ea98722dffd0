"""`ckd submit --address http://HEAD:8265 JOB`: the job runs on the cluster through the Ray Jobs API.

The working folder (default: the current one) is shipped as the job's ``working_dir`` (without
``.venv``, ``.git``, ``runs/``, ``stores/``, ``reports/`` and what ``.gitignore`` leaves out), the job
file must lie inside it, and the cluster runs ``python -m continual_kd.cli submit <job file>
--address auto``: the same driver as a local submit, joined to that cluster. Relative paths in the job
file (``source.store``, ``snapshots.dir``) resolve inside the job's copy of the working folder on
the head; give absolute ones (shared storage on a real cluster) to keep the output.

Token authentication: every request carries ``Authorization: Bearer <token>`` (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CkdError
from .local_cluster import auth_headers

EXCLUDES = [".venv", ".git", "runs", "stores", "reports", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
            ".ruff_cache"]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def jobs_client(address: str):
    """A JobSubmissionClient with the token; an unreachable dashboard or a refused token → one sentence."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise CkdError(f"--address {address}: the cluster refused the token; use its token in ~/.ray/auth_token "
                       f"(or RAY_AUTH_TOKEN)") from None
    except ConnectionError as e:
        raise CkdError(f"--address {address}: no Ray Jobs API answers there ({str(e).splitlines()[0][:200]}); "
                       f"start a head (`ckd cluster up`, cluster/README.md) or check the address") from None
    except RuntimeError as e:
        text = str(e)
        if "401" in text or "403" in text or "uthentication" in text:
            raise CkdError(f"--address {address}: the cluster refused the token; use its token in ~/.ray/auth_token "
                           f"(or RAY_AUTH_TOKEN)") from None
        raise CkdError(f"--address {address}: {text.splitlines()[0][:200]}") from None


@dataclass
class Submitted:
    job_id: str
    entrypoint: str
    working_dir: Path
    notes: list[str]


def runtime_env(working_dir: Path, env_vars: dict[str, str] | None = None) -> dict:
    env = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def submit_job(address: str, job_file: Path, working_dir: Path = Path("."), extra_args: list[str] = (),
               job_name: str = "", relative_outputs: list[str] = (), env_vars: dict[str, str] | None = None,
               agent_wait_s: float = 180.0) -> Submitted:
    """Ship ``working_dir`` and run the job file in it on the cluster; returns the Ray submission id."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise CkdError(f"--working-dir {working_dir}: not a folder")
    try:
        rel = Path(job_file).resolve().relative_to(wd)
    except ValueError:
        raise CkdError(f"{job_file}: the job file must lie inside the working folder shipped to the cluster ({wd}); "
                       f"move it there or pass --working-dir") from None
    entrypoint = " ".join(["python", "-m", "continual_kd.cli", "submit", shlex.quote(rel.as_posix()), "--address",
                           "auto", *map(shlex.quote, extra_args)])
    client = jobs_client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(wd, env_vars),
                                       metadata={"ckd_job": job_name, "job_file": rel.as_posix()})
            break
        except (RuntimeError, ValueError) as e:
            text = str(e).splitlines()[0][:300]
            # a head that just started has no job agent registered yet: Ray asks to try again later
            if "No available agent" in text and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise CkdError(f"--address {address}: the Jobs API refused the job ({text})") from None
    notes = [f"{field} {value} is relative: it resolves inside the job's copy of the working folder on the cluster; "
             f"give an absolute path (shared storage) to keep it" for field, value in relative_outputs]
    return Submitted(job_id, entrypoint, wd, notes)


def follow_job(address: str, job_id: str, write: Callable[[str], None]) -> dict:
    """Print the job's logs as they come until it ends; returns its final info (status, exit code, message)."""
    client = jobs_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    return job_info(address, job_id, client)


def job_info(address: str, job_id: str, client=None) -> dict:
    client = client or jobs_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise CkdError(f"--address {address}: no job {job_id} ({str(e).splitlines()[0][:200]})") from None
    return _row(info)


def exit_status(info: dict) -> int:
    """The exit code ``ckd submit`` returns for a finished job: the driver's own, else 0 / 1."""
    if info["status"] == "SUCCEEDED":
        return 0
    code = info.get("driver_exit_code")
    if code is None:  # not recorded (yet): Ray's message names it
        m = re.search(r"exit code (\d+)", info.get("message") or "")
        code = int(m.group(1)) if m else None
    return code if isinstance(code, int) and code > 0 else 1


def short_message(message: str | None) -> str:
    """Ray's job message without the driver's log it appends (the log was followed already)."""
    return (message or "").split(", last available logs", 1)[0].strip()


def _row(d) -> dict:
    status = getattr(d.status, "value", str(d.status))
    return {"job_id": d.submission_id or d.job_id, "status": status, "entrypoint": d.entrypoint,
            "start_time": d.start_time, "end_time": d.end_time, "message": d.message,
            "driver_exit_code": getattr(d, "driver_exit_code", None), "metadata": dict(d.metadata or {})}


def list_jobs(address: str) -> list[dict]:
    """Every job the cluster knows, running ones first, then newest first."""
    rows = [_row(d) for d in jobs_client(address).list_jobs()]
    rows.sort(key=lambda r: (r["status"] in FINAL, -(r["start_time"] or 0)))
    return rows
