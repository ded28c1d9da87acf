"""The evaluation engine: a process that keeps a model loaded from one evaluation job to the next.

A cold ``ckpt-stability evaluate`` imports torch and transformers and builds the model, which costs more
than the inference of a small model, and a vLLM engine takes 30-60 s to start. With ``--engine`` the
command instead hands its job (``evaluation_job.EvaluationJob``) to the engine of its slot and relays
what the engine logs; the engine runs it on its ``LoadedModel``, which swaps the weights in place when
the model differs from the last one only in its weights. The workflow's DAG is unchanged: one job per
model, each with its own log and outputs.

* **Slots.** A job on a GPU uses the engine of its GPU (jobs of one GPU queue for it); a CPU job the
  first engine no other job is using, so there is one engine per concurrent job. A job holds its slot's
  lock file while its engine works for it.
* **Privacy.** Engines listen on Unix sockets in a directory only the user can enter (0700, checked), one
  directory per host, working directory and Slurm job, and within it per interpreter and package code:
  two workflows, two users or two versions of the code never share an engine.
* **Lifetime.** An engine ends after ``idle_timeout`` seconds without a job, when the workflow ends
  (``stop_engines``), or with its Slurm job. It is started in a session of its own, so that cancelling
  one job does not kill the engine of the others.
* **Failures.** A job's error is that job's (its exit code and message, as the cold command would give).
  An engine that crashes or is killed fails only the job in flight: the job says so and a rerun starts a
  new engine. A job killed while its engine works is noticed at the engine's next log line: the engine
  stops, deletes what it wrote for that job, and serves the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ckpt_stability.errors import InputError, reported
from ckpt_stability.evaluation_job import EvaluationJob

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
DEFAULT_IDLE_TIMEOUT = 60.0
START_TIMEOUT = 120.0
"""seconds a job waits for a new engine to listen (it listens before it loads anything)"""
SOCKET_PATH_LIMIT = 100
"""bytes a Unix socket path may have on Linux and macOS (108 and 104, less a margin)"""


# ---------------------------------------------------------------- where engines listen


def _private_directory(path: Path) -> Path:
    """``path``, created 0700 where missing, refused unless it is a directory of this user that no one else
    may enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise InputError(f"{path}: the evaluation engines' directory must be a directory of yours that only you "
                         f"may enter (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); remove it, or "
                         f"set TMPDIR to a directory of your own")
    return path


def _runtime_roots() -> list[Path]:
    roots = []
    if os.environ.get("XDG_RUNTIME_DIR"):  # per user, 0700, in memory, emptied at logout
        roots.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "ckpt-stability")
    roots.append(Path(tempfile.gettempdir()) / f"ckpt-stability-{os.getuid()}")
    roots.append(Path("/tmp") / f"ckpt-stability-{os.getuid()}")  # where TMPDIR is too long for a socket
    return roots


def _code_stamp() -> str:
    """Changes with the interpreter and with any change of this package's code: an engine runs the code
    the job would run."""
    package = Path(__file__).parent
    digest = hashlib.sha256(f"{sys.executable}\0{package}".encode())
    for path in sorted(package.rglob("*.py")):
        info = path.stat()
        digest.update(f"\0{path.relative_to(package)}\0{info.st_mtime_ns}\0{info.st_size}".encode())
    return digest.hexdigest()[:12]


def _workflow_key(directory: Path) -> str:
    """One per host, working directory and Slurm job: engines of a Slurm job end with it, and the jobs of
    two allocations on one node do not share one."""
    return hashlib.sha256("\0".join([socket.gethostname(), str(directory.resolve()),
                                     os.environ.get("SLURM_JOB_ID", "")]).encode()).hexdigest()[:16]


def workflow_directory(directory: Path | None = None) -> Path:
    """The private directory of the engines serving jobs run in ``directory`` (default: the current one)."""
    key = _workflow_key(directory or Path.cwd())
    problems = []
    for root in _runtime_roots():
        candidate = root / key / ("x" * 12) / "cpu000.sock"
        if len(str(candidate).encode()) > SOCKET_PATH_LIMIT:
            problems.append(f"{root}: too long a path for a Unix socket")
            continue
        try:
            _private_directory(root)
            return _private_directory(root / key)
        except OSError as error:  # e.g. XDG_RUNTIME_DIR of the login node, absent on a compute node
            problems.append(f"{root}: {error.strerror}")
    raise InputError("no directory for the evaluation engines: " + "; ".join(problems))


def engine_directory() -> Path:
    """The private directory of the engines this interpreter and code may use in the current directory."""
    return _private_directory(workflow_directory() / _code_stamp())


# ---------------------------------------------------------------- messages: JSON lines on the socket


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
    stream.flush()


def _receive(stream) -> dict | None:
    line = stream.readline()
    return json.loads(line) if line else None


# ---------------------------------------------------------------- the job's side


class Slot:
    """A slot taken by this process: its lock is held until ``release`` (or this process ends)."""

    def __init__(self, directory: Path, name: str, lock_fd: int):
        self.name = name
        self.socket_path = directory / f"{name}.sock"
        self.lock_path = directory / f"{name}.lock"
        self._lock_fd = lock_fd

    def release(self) -> None:
        os.close(self._lock_fd)


def _lock(path: Path, wait: bool) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def take_slot(directory: Path, gpu: str | None) -> Slot:
    """The slot of this job: its GPU's (waiting while another job uses it), or the first free CPU slot."""
    if gpu is not None:
        name = f"gpu{gpu}"
        return Slot(directory, name, _lock(directory / f"{name}.lock", wait=True))
    for number in range(10_000):
        name = f"cpu{number:03d}"
        fd = _lock(directory / f"{name}.lock", wait=False)
        if fd is not None:
            return Slot(directory, name, fd)
    raise InputError(f"{directory}: no free engine slot among 10000")


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):  # none yet, or a dead engine's socket
        client.close()
        return None
    return client


def _start_engine(slot: Slot, idle_timeout: float, log_dir: Path) -> socket.socket:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{socket.gethostname()}.{slot.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.log"
    with contextlib.suppress(FileNotFoundError):
        slot.socket_path.unlink()  # a dead engine's: this job holds the slot's lock, no engine listens on it
    with open(log_path, "ab") as engine_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ckpt_stability", "engine", "serve", "--socket", str(slot.socket_path),
             "--lock", str(slot.lock_path), "--idle-timeout", str(idle_timeout)],
            stdin=subprocess.DEVNULL, stdout=engine_log, stderr=subprocess.STDOUT, start_new_session=True)
    log.info("started evaluation engine %d (slot %s, log %s)", process.pid, slot.name, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        connection = _connect(slot.socket_path)
        if connection is not None:
            return connection
        if process.poll() is not None:
            raise InputError(f"the evaluation engine exited ({process.returncode}) before listening; see {log_path}")
        time.sleep(0.02)
    process.kill()
    raise InputError(f"the evaluation engine did not listen within {START_TIMEOUT:.0f} s; see {log_path}")


def evaluate_in_engine(job: EvaluationJob, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                       log_dir: Path = Path("logs/engine"), gpu: str | None = None) -> int:
    """Run ``job`` in the engine of this job's slot, starting one where none listens; the engine's log lines
    for the job go to stderr. Returns the exit code the job would have had in its own process."""
    slot = take_slot(engine_directory(), gpu)
    try:
        connection = _connect(slot.socket_path) or _start_engine(slot, idle_timeout, log_dir)
        with connection, connection.makefile("rwb") as stream:
            _send(stream, {"job": job.to_json(), "cwd": os.getcwd()})
            while (message := _receive(stream)) is not None:
                if "log" in message:
                    print(message["log"], file=sys.stderr, flush=True)
                    continue
                if message["error"]:
                    print(f"ckpt-stability evaluate: error: {message['error']}", file=sys.stderr, flush=True)
                return message["exit"]
        print(f"ckpt-stability evaluate: error: the evaluation engine of slot {slot.name} ended while evaluating "
              f"{job.model} (killed, or it crashed: see its log under the engine log directory); a rerun "
              f"starts a new one", file=sys.stderr, flush=True)
        return 1
    finally:
        slot.release()


def stop_engines(directory: Path | None = None, wait: float = 10.0) -> int:
    """Ask every engine serving jobs in ``directory`` (default: the current one) on this host to end, once
    its current job is done; returns how many were asked."""
    root = workflow_directory(directory)
    stopped = 0
    for socket_path in sorted(root.glob("*/*.sock")):
        lock_fd = _lock(socket_path.with_suffix(".lock"), wait=False)
        deadline = time.monotonic() + wait
        while lock_fd is None and time.monotonic() < deadline:
            time.sleep(0.1)
            lock_fd = _lock(socket_path.with_suffix(".lock"), wait=False)
        if lock_fd is None:
            continue  # still serving a job after `wait`: it ends after its idle timeout
        try:
            connection = _connect(socket_path)
            if connection is not None:
                with connection, connection.makefile("rwb") as stream:
                    _send(stream, {"stop": True})
                    _receive(stream)
                stopped += 1
        finally:
            os.close(lock_fd)
    return stopped


# ---------------------------------------------------------------- the engine's side


class JobGone(BaseException):
    """The job that the engine works for is gone (killed): stop working for it. A BaseException, so that no
    handler of ordinary errors on the way mistakes it for a problem of the model."""


class _Relay(logging.Handler):
    """Sends each log line of the job to the job, as the job's own process would have written it."""

    def __init__(self, stream):
        super().__init__(logging.INFO)
        self.stream = stream
        self.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send(self.stream, {"log": self.format(record)})
        except OSError:
            raise JobGone() from None


def _job_outcome(job: EvaluationJob, loaded) -> tuple[int, str | None]:
    """Run the job; its exit status and error message, as its own process would report them."""
    from ckpt_stability.evaluation_job import run_job

    try:
        run_job(job, loaded)
        return 0, None
    except (InputError, OSError) as error:
        return reported(error)
    except Exception as error:  # a bug, or out of memory: the loaded model is not trusted any more
        loaded.close()
        return 1, "".join(traceback.format_exception(error)).rstrip()


def _forget_outputs(job: EvaluationJob) -> None:
    """Delete what the engine wrote for a job that is gone (its outputs are not trusted without the job)."""
    from ckpt_stability.evaluation_job import load_settings

    with contextlib.suppress(Exception):
        names = [task.name for task in load_settings(job).tasks]
        for path in job.outputs(names):
            path.unlink(missing_ok=True)


class Engine:
    """The engine's side: listens on its slot's socket and runs the jobs sent there, one at a time."""

    def __init__(self, socket_path: Path, lock_path: Path, idle_timeout: float):
        from ckpt_stability.backends import LoadedModel

        self.socket_path, self.lock_path, self.idle_timeout = socket_path, lock_path, idle_timeout
        self.loaded = LoadedModel()
        self.served = 0

    def serve(self) -> None:
        """Run jobs until idle for ``idle_timeout`` seconds (and no job holds the slot's lock) or asked to
        stop."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        listener.listen(4)
        listener.settimeout(self.idle_timeout)
        log.info("engine %d listening on %s (idle timeout %.0f s)", os.getpid(), self.socket_path,
                 self.idle_timeout)
        try:
            while True:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    lock_fd = _lock(self.lock_path, wait=False)
                    if lock_fd is None:
                        continue  # a job holds the slot: it is about to connect
                    self.socket_path.unlink(missing_ok=True)  # holding the lock: no job can be on its way
                    os.close(lock_fd)
                    log.info("idle for %.0f s: ending", self.idle_timeout)
                    break
                connection.settimeout(None)
                if not self._answer(connection):
                    log.info("asked to stop: ending")
                    self.socket_path.unlink(missing_ok=True)
                    break
        finally:
            listener.close()
            self.loaded.close()
            log.info("served %d jobs", self.served)

    def _answer(self, connection: socket.socket) -> bool:
        """Answer one request; False when asked to stop."""
        stream = connection.makefile("rwb")
        try:
            request = _receive(stream)
            if request is None:
                return True
            if request.get("stop"):
                _send(stream, {"exit": 0, "error": None})
                return False
            self._run(EvaluationJob.from_json(request["job"]), request["cwd"], stream)
            return True
        finally:
            with contextlib.suppress(OSError):  # the job may be gone, with bytes still buffered for it
                stream.close()
            connection.close()

    def _run(self, job: EvaluationJob, cwd: str, stream) -> None:
        """Run one job, relaying its log lines and then its outcome to it."""
        os.chdir(cwd)
        relay = _Relay(stream)
        package_log = logging.getLogger("ckpt_stability")
        package_log.addHandler(relay)
        started = time.perf_counter()
        try:
            log.info("evaluation engine %d (slot %s): job %d", os.getpid(), self.socket_path.stem, self.served + 1)
            code, error = _job_outcome(job, self.loaded)
            package_log.removeHandler(relay)
            _send(stream, {"exit": code, "error": error})
        except (JobGone, OSError):
            package_log.removeHandler(relay)
            _forget_outputs(job)
            log.warning("the job evaluating %s is gone; its outputs were deleted", job.model)
            return
        self.served += 1
        log.info("served %s (%s): exit %d in %.2f s%s", job.model, json.dumps(job.meta), code,
                 time.perf_counter() - started, f": {error.splitlines()[-1]}" if error else "")
