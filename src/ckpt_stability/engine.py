"""The evaluation engine: a process that keeps a model loaded from one evaluation job to the next.

A cold ``ckpt-stability evaluate`` imports torch and transformers and builds the model, which costs more
than the inference of a small model, and a vLLM engine takes 30-60 s to start. With ``--engine`` the
command instead hands its job (``evaluation_job.EvaluationJob``) to the engine of its slot and relays
what the engine logs; the engine runs it on its ``LoadedModel``, which swaps the weights in place when
the model differs from the last one only in its weights. The workflow's DAG is unchanged: one job per
model, each with its own log and outputs.

* **Slots.** A job on a GPU uses the engine of its GPU (jobs of one GPU queue for it); a CPU job the
  first engine no other job is using, so there is one engine per concurrent job. A job holds its slot's
  lock file while its engine works for it; an engine ends only while holding it, after letting go of its
  model, so that a slot never has two engines at once (an engine of older code is stopped first).
* **Privacy.** Engines listen on Unix sockets in a directory only the user can enter (0700, checked), one
  directory per host, working directory and Slurm job, and within it per interpreter and package code:
  two workflows, two users or two versions of the code never share an engine.
* **Lifetime.** An engine ends after ``idle_timeout`` seconds without a job, when the workflow ends
  (``stop_engines``), or with its Slurm job. It is started in a session of its own, so that cancelling
  one job does not kill the engine of the others.
* **Failures.** A job's error is that job's (its exit code and message, as the cold command would give).
  An engine that crashes or is killed fails only the job in flight: the job says so and a rerun starts a
  new engine. A job killed while its engine works is noticed at the engine's next log line: the engine
  stops working for it and serves the next one.
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

from ckpt_stability.atomic import publishing_only_while
from ckpt_stability.errors import InputError, reported
from ckpt_stability.evaluation_job import EvaluationJob

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
DEFAULT_IDLE_TIMEOUT = 60.0
ENVIRONMENT = "CKPT_STABILITY_ENGINE"
"""Where the workflow puts its engine settings for its evaluation jobs (``settings_from_environment``):
in the environment rather than on the command line, because the engine changes no result and so must
not be among what makes Snakemake redo a job."""
START_TIMEOUT = 120.0
"""seconds a job waits for a new engine to listen (it listens before it loads anything)"""
SOCKET_PATH_LIMIT = 100
"""bytes a Unix socket path may have on Linux and macOS (108 and 104, less a margin)"""
SLOT_NAME_LIMIT = 16
"""the longest slot name (``slot_name``)"""


def environment_value(idle_timeout: float, vllm: bool) -> str:
    """The value of ENVIRONMENT that turns the engine on with these settings."""
    return json.dumps({"idle_timeout": idle_timeout, "vllm": vllm})


def settings_from_environment() -> dict:
    """The engine settings that ENVIRONMENT holds ({} where it is unset: the engine is off by default)."""
    text = os.environ.get(ENVIRONMENT)
    if not text:
        return {}
    try:
        settings = json.loads(text)
        return {"idle_timeout": float(settings["idle_timeout"]), "vllm": bool(settings["vllm"])}
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{ENVIRONMENT}={text!r}: not the engine settings the workflow writes "
                         f"({environment_value(DEFAULT_IDLE_TIMEOUT, False)})") from None


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
    return list(dict.fromkeys(roots))


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
    """The private directory of the engines serving jobs run in ``directory`` (default: the current one):
    the slots' lock files, and one directory of sockets per interpreter and package code."""
    key = _workflow_key(directory or Path.cwd())
    problems = []
    for root in _runtime_roots():
        candidate = root / key / ("x" * 12) / f"{'x' * SLOT_NAME_LIMIT}.sock"
        if len(str(candidate).encode()) > SOCKET_PATH_LIMIT:
            problems.append(f"{root}: too long a path for a Unix socket")
            continue
        try:
            _private_directory(root)
            return _private_directory(root / key)
        except OSError as error:  # e.g. XDG_RUNTIME_DIR of the login node, absent on a compute node
            problems.append(f"{root}: {error.strerror}")
    raise InputError("no directory for the evaluation engines: " + "; ".join(problems))


# ---------------------------------------------------------------- messages: JSON lines on the socket


def _send(stream, message: dict) -> None:
    # ASCII JSON: a path that is not valid UTF-8 (surrogate escapes) travels as \udcxx and comes back intact
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _receive(stream) -> dict | None:
    line = stream.readline()
    return json.loads(line) if line else None


# ---------------------------------------------------------------- the job's side


def slot_name(gpu: str | None, number: int = 0) -> str:
    """A slot's file name: its GPU's, whatever the GPU's id looks like (an index, a UUID, a MIG id with
    slashes), or the CPU slot's number."""
    if gpu is None:
        return f"cpu{number:03d}"
    return f"gpu{gpu}" if gpu.isdigit() else f"gpu-{hashlib.sha256(gpu.encode()).hexdigest()[:12]}"


class Slot:
    """A slot taken by this process: its lock (shared by every engine version) is held until ``release``
    (or this process ends); its socket is that of this interpreter and package code."""

    def __init__(self, name: str, lock_path: Path, lock_fd: int):
        self.name = name
        self.lock_path = lock_path
        self.socket_path = _private_directory(lock_path.parent / _code_stamp()) / f"{name}.sock"
        self._lock_fd = lock_fd

    def others(self) -> list[Path]:
        """The sockets of this slot's engines of other interpreters or code (an edit during the run)."""
        return [path for path in self.lock_path.parent.glob(f"*/{self.name}.sock") if path != self.socket_path]

    def release(self) -> None:
        os.close(self._lock_fd)


def _lock(path: Path, wait: bool) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_slot(directory: Path, gpu: str | None) -> Slot:
    """The slot of this job in ``directory`` (``workflow_directory``): its GPU's (waiting while another job
    uses it), or the first free CPU slot."""
    if gpu is not None:
        lock_path = directory / f"{slot_name(gpu)}.lock"
        return Slot(slot_name(gpu), lock_path, _lock(lock_path, wait=True))
    for number in range(10_000):
        lock_path = directory / f"{slot_name(None, number)}.lock"
        fd = _lock(lock_path, wait=False)
        if fd is not None:
            return Slot(slot_name(None, number), lock_path, fd)
    raise InputError(f"{directory}: no free engine slot among 10000")


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):  # none yet, or a dead engine's socket
        client.close()
        return None
    return client


def _stop(socket_path: Path) -> bool:
    """Ask the engine on ``socket_path`` to end (the caller holds its slot's lock); True if one was there.
    It answers once it has let go of its model (and GPU memory)."""
    connection = _connect(socket_path)
    if connection is None:
        socket_path.unlink(missing_ok=True)  # a dead engine's
        return False
    with connection, connection.makefile("rwb") as stream:
        _send(stream, {"stop": True})
        _receive(stream)
    return True


def _start_engine(slot: Slot, idle_timeout: float, log_dir: Path) -> socket.socket:
    for other in slot.others():  # one engine per slot: an engine of older code would hold the same GPU
        _stop(other)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{socket.gethostname()}.{slot.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.log"
    slot.socket_path.unlink(missing_ok=True)  # a dead engine's: this job holds the slot's lock
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
    slot = take_slot(workflow_directory(), gpu)
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
              f"{job.model} (killed, or it crashed: see its log under {log_dir}); a rerun starts a new one",
              file=sys.stderr, flush=True)
        return 1
    finally:
        slot.release()


def stop_engines(directory: Path | None = None, wait: float = 10.0) -> int:
    """Ask every engine serving jobs in ``directory`` (default: the current one) on this host to end, once
    its current job is done (waiting up to ``wait`` seconds for it; one still busy then ends after its idle
    timeout); returns how many were asked. Every directory an engine may use is looked at."""
    key = _workflow_key(directory or Path.cwd())
    stopped = 0
    for root in _runtime_roots():
        for lock_path in sorted((root / key).glob("*.lock")):
            deadline = time.monotonic() + wait
            while (lock_fd := _lock(lock_path, wait=False)) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if lock_fd is None:
                continue
            try:
                stopped += sum(_stop(path) for path in sorted(root.glob(f"{key}/*/{lock_path.stem}.sock")))
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
            line = self.format(record)
        except Exception:  # a malformed log call: reported as logging reports it, the job goes on
            self.handleError(record)
            return
        try:
            _send(self.stream, {"log": line})
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


class Engine:
    """The engine's side: listens on its slot's socket and runs the jobs sent there, one at a time."""

    def __init__(self, socket_path: Path, lock_path: Path, idle_timeout: float):
        from ckpt_stability.backends import LoadedModel

        self.socket_path, self.lock_path, self.idle_timeout = socket_path, lock_path, idle_timeout
        self.loaded = LoadedModel()
        self.served = 0
        self._socket_inode = None

    def serve(self) -> None:
        """Run jobs until idle for ``idle_timeout`` seconds (and no job holds the slot's lock) or asked to
        stop. The model (and its GPU memory) is let go of before the slot is: the next engine of the slot
        finds the GPU free."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._socket_inode = self.socket_path.stat().st_ino
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
                    try:  # holding the lock: no job can be on its way
                        self._end()
                    finally:
                        os.close(lock_fd)
                    log.info("idle for %.0f s: ended", self.idle_timeout)
                    break
                connection.settimeout(None)
                if not self._answer(connection):
                    log.info("asked to stop: ended")
                    break
        finally:
            listener.close()
            self._end()
            log.info("served %d jobs", self.served)

    def _end(self) -> None:
        """No more jobs: the socket goes (if still this engine's), then the model."""
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.stat().st_ino == self._socket_inode:  # not a newer engine's, after a cleanup
                self.socket_path.unlink()
        self.loaded.close()

    def _answer(self, connection: socket.socket) -> bool:
        """Answer one request; False when asked to stop (answered once the model is let go of)."""
        stream = connection.makefile("rwb")
        try:
            request = _receive(stream)
            if request is None:
                return True
            if request.get("stop"):
                self._end()
                _send(stream, {"exit": 0, "error": None})
                return False
            self._run(EvaluationJob.from_json(request["job"]), request["cwd"], connection, stream)
            return True
        except (OSError, ValueError, KeyError, TypeError) as error:  # a request that is not one: the engine goes on
            log.warning("a malformed request or a vanished job: %s: %s", type(error).__name__, error)
            return True
        finally:
            with contextlib.suppress(OSError):  # the job may be gone, with bytes still buffered for it
                stream.close()
            connection.close()

    def _run(self, job: EvaluationJob, cwd: str, connection: socket.socket, stream) -> None:
        """Run one job, relaying its log lines and then its outcome to it. A job that is gone is noticed at
        its next log line, and before any of its outputs is put in place: the engine stops working for it
        (outputs already in place are an interrupted job's, which Snakemake deletes or redoes) and serves
        the next one."""

        def job_still_there(target: Path) -> None:
            try:
                if connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    raise JobGone()
            except BlockingIOError:  # nothing to read: the job is waiting for its outcome
                pass
            except OSError:
                raise JobGone() from None

        os.chdir(cwd)
        relay = _Relay(stream)
        package_log = logging.getLogger("ckpt_stability")
        package_log.addHandler(relay)
        started = time.perf_counter()
        try:
            log.info("evaluation engine %d (slot %s): job %d", os.getpid(), self.socket_path.stem, self.served + 1)
            with publishing_only_while(job_still_there):
                code, error = _job_outcome(job, self.loaded)
            package_log.removeHandler(relay)
            _send(stream, {"exit": code, "error": error})
        except (JobGone, OSError):
            package_log.removeHandler(relay)
            log.warning("the job evaluating %s is gone: stopped working for it", job.model)
            return
        self.served += 1
        log.info("served %s (%s): exit %d in %.2f s%s", job.model, json.dumps(job.meta), code,
                 time.perf_counter() - started, f": {error.splitlines()[-1]}" if error else "")
