import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dsv2.sandbox import SandboxLimits, isolation, run_python, run_tests

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=2.0, cpu_seconds=5, memory_bytes=512 << 20)


def needs(*layers):
    """Skip unless this machine's sandbox has at least one of `layers`, naming what is missing."""
    have = isolation()
    if not set(layers) & set(have):
        pytest.skip(f"no {' or '.join(layers)} here (sandbox layers: {', '.join(have)})")


@pytest.fixture
def sandbox_processes(tmp_path, monkeypatch):
    """Scratch directories under tmp_path; the returned function lists the live processes whose
    command line names tmp_path (every sandbox process: the bootstrap's argv holds its scratch path)
    or one of `markers`."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))

    def live(*markers):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(m in cmdline for m in (str(root), *markers)):
                found.append(int(pid))
        return found
    return live


def test_ok_with_stdin_and_stdout():
    code = "import sys\nprint(sys.stdin.read().upper(), flush=True)\nsys.stdout.buffer.write(b'\\xff')"
    r = run_python(code, stdin="abc")
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("ok", 0, "ABC\n\ufffd", "")
    assert r.passed and not r.truncated
    assert set(r.isolation) >= {"rlimits", "no-new-privs"}  # applied everywhere


def test_exception_is_an_error_with_the_code_s_traceback():
    r = run_python("def f():\n    raise ValueError('boom')\n\nf()\n")
    assert (r.status, r.returncode) == ("error", 1)
    assert 'main.py", line 2, in f' in r.stderr and r.stderr.rstrip().endswith("ValueError: boom")
    assert "sandbox.py" not in r.stderr  # the bootstrap's frames are left out
    assert run_python("import sys\nsys.exit(3)").returncode == 3
    assert run_python("def (:").stderr.rstrip().rpartition("\n")[2].startswith("SyntaxError")


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_wall_limit_kills_and_leaves_nothing(code, sandbox_processes):
    t = time.monotonic()
    r = run_python(code, SandboxLimits(wall_seconds=1.0))
    assert r.status == "timeout" and r.returncode == -9
    assert 1.0 <= r.wall_seconds < 1.5 and time.monotonic() - t < 2.0
    assert sandbox_processes() == []


def test_cpu_limit_stops_a_busy_loop_before_the_wall():
    r = run_python("while True:\n    pass", SandboxLimits(wall_seconds=10.0, cpu_seconds=1))
    assert r.status == "timeout" and r.returncode == -9
    assert r.cpu_seconds >= 0.95 and r.wall_seconds < 3.0


def test_fork_bomb_hits_the_process_limit(sandbox_processes):
    needs("process-limit")
    code = textwrap.dedent("""
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError as e:
                print(n, type(e).__name__, flush=True)
                break
            if pid == 0:
                time.sleep(60)  # each child keeps its slot
            n += 1
    """)
    r = run_python(code, SandboxLimits(wall_seconds=5.0, max_processes=4))
    n, error = r.stdout.split()
    assert r.status == "ok" and error == "BlockingIOError" and 1 <= int(n) <= 3
    assert r.wall_seconds < 2.0  # the sleeping children did not hold the run up
    assert sandbox_processes() == []


@pytest.mark.parametrize("spawn", ["os.fork()", "subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(60)', '{marker}'])"])
def test_unbounded_fork_bombs_are_stopped(spawn, sandbox_processes):
    needs("process-limit")
    marker = uuid.uuid4().hex
    code = f"import os, subprocess, sys\nwhile True:\n    {spawn.format(marker=marker)}\n"
    r = run_python(code, SandboxLimits(wall_seconds=3.0, max_processes=16))
    assert r.status in ("error", "timeout") and "BlockingIOError" in r.stderr
    assert r.wall_seconds < 4.0
    assert sandbox_processes(marker) == []


@pytest.mark.parametrize("code", ["bytearray(8 << 30)",
                                  "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"])
def test_large_allocations_are_memory_failures(code):
    r = run_python(code, SandboxLimits(wall_seconds=2.0, memory_bytes=256 << 20))
    assert r.status == "memory" and not r.passed
    assert r.stderr.rstrip().endswith("MemoryError")


def test_writes_outside_the_scratch_directory_are_denied(tmp_path):
    needs("landlock-fs")
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # so that only the sandbox, not file permissions, stands in the way
    existing = outside / "existing.txt"
    existing.write_text("original")
    existing.chmod(0o666)
    new_in_repo = REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    targets = [outside / "new.txt", existing, new_in_repo, REPO / "pyproject.toml", "/tmp/sandbox-escape.txt"]
    code = textwrap.dedent(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "a").close()  # append: creates a missing file, changes no content
                print("opened", path)
            except PermissionError:
                print("denied", path)
    """)
    before = (REPO / "pyproject.toml").stat().st_mtime_ns
    try:
        r = run_python(code, FAST)
        assert r.status == "ok" and r.stdout.split("\n")[:-1] == [f"denied {t}" for t in targets]
        assert not (outside / "new.txt").exists() and not new_in_repo.exists()
        assert existing.read_text() == "original" and (REPO / "pyproject.toml").stat().st_mtime_ns == before
    finally:
        new_in_repo.unlink(missing_ok=True)


def test_host_files_cannot_be_read(tmp_path):
    needs("landlock-fs")
    secret_value = uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(secret_value)
    secret.chmod(0o644)
    targets = [secret, "/etc/passwd", "/proc/self/root/etc/passwd", REPO / "pyproject.toml", "/"]
    code = textwrap.dedent(f"""
        import os
        for path in {[str(t) for t in targets]!r}:
            try:
                print("read", path, os.listdir(path) if os.path.isdir(path) else open(path).read())
            except PermissionError:
                print("denied", path)
    """)
    r = run_python(code, FAST)
    assert r.status == "ok" and r.stdout.split("\n")[:-1] == [f"denied {t}" for t in targets]
    assert secret_value not in r.stdout + r.stderr


def test_the_scratch_directory_is_usable_and_bounded():
    code = textwrap.dedent("""
        import os, tempfile
        with open("a.txt", "w") as f:
            f.write("hello")
        fd, path = tempfile.mkstemp()
        os.write(fd, b"world")
        os.close(fd)
        print(open("a.txt").read(), open(path).read(), os.path.dirname(path) == os.getcwd())
        try:
            open("big", "wb").write(b"x" * (2 << 20))
        except OSError as e:
            print(e.strerror)
    """)
    r = run_python(code, SandboxLimits(wall_seconds=2.0, max_file_bytes=1 << 20))
    assert r.status == "ok" and r.stdout == "hello world True\nFile too large\n"


def test_the_scratch_tmpfs_is_size_limited():
    needs("tmpfs-scratch")
    code = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))"
    r = run_python(code, SandboxLimits(wall_seconds=2.0, scratch_bytes=4 << 20))
    assert r.status == "error" and "No space left on device" in r.stderr


def test_output_floods_are_truncated():
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    r = run_python(flood, SandboxLimits(wall_seconds=1.0, max_output_bytes=1000))
    assert r.status == "timeout" and r.stdout == "x" * 1000 and r.truncated
    r = run_python("import sys\nsys.stderr.write('y' * (5 << 20))\nraise KeyError('end')",
                   SandboxLimits(wall_seconds=2.0, max_output_bytes=1000))
    assert r.status == "error" and len(r.stderr) == 1000 and r.stderr.rstrip().endswith("KeyError: 'end'")
    assert r.truncated


# the layers that each stop a kind of connection on their own
SOCKET_LAYERS = {"tcp": ("net-ns", "landlock-tcp", "seccomp"), "udp": ("net-ns", "seccomp"),
                 "unix": ("seccomp",)}  # Landlock ABI <= 7 does not cover connect() on a path


@pytest.mark.parametrize("kind", SOCKET_LAYERS)
def test_sockets_reach_nothing_of_the_host(kind, tmp_path):
    """A server of the host's own (a unix socket anyone may connect to) receives nothing."""
    needs(*SOCKET_LAYERS[kind])
    if kind == "unix":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(tmp_path / "host.sock"))
        (tmp_path / "host.sock").chmod(0o777)
        attempt = f"socket.socket(socket.AF_UNIX).connect({str(tmp_path / 'host.sock')!r})"
    elif kind == "tcp":
        server = socket.create_server(("127.0.0.1", 0))
        attempt = f"socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)"
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        attempt = f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', {port}))"
    with server:
        if kind != "udp":
            server.listen()
        r = run_python(f"import socket\n{attempt}\nprint('reached')", FAST)
        assert r.status == "error" and r.stdout == ""
        assert r.stderr.rstrip().rpartition("\n")[2].startswith(("PermissionError", "OSError"))
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(16) if kind == "udp" else server.accept()


def test_host_processes_cannot_be_signalled():
    needs("pid-ns", "landlock-scope", "uid")
    r = run_python(f"import os\nos.kill({os.getpid()}, 0)", FAST)
    assert r.status == "error"
    assert "ProcessLookupError" in r.stderr or "PermissionError" in r.stderr


def test_layers_on_their_own():
    """Each layer stops its part without the others: Landlock alone denies a host file and a TCP
    connection, the network namespace alone leaves nothing to connect to."""
    probe = textwrap.dedent("""
        import os, socket, sys, tempfile
        from dsv2 import sandbox as sb
        server = socket.create_server(("127.0.0.1", 0))
        layer = sys.argv[1]
        if layer == "landlock":
            sb._libc.prctl(sb.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            print(sb._landlock(sb._readable_paths(), tempfile.mkdtemp()))
        else:
            print(sb._unshare(os.geteuid() == 0))
        address = server.getsockname()
        for attempt in (lambda: open("/etc/passwd"), lambda: socket.create_connection(address, 1)):
            try:
                attempt()
                print("allowed")
            except OSError as e:
                print(type(e).__name__)
    """)
    out = {}
    for layer in ("landlock", "namespaces"):
        r = subprocess.run([sys.executable, "-c", probe, layer], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        out[layer] = r.stdout.split("\n")[:-1]
    if "landlock-fs" in isolation():
        assert out["landlock"][1] == "PermissionError"
    if "landlock-tcp" in isolation():
        assert out["landlock"][2] == "PermissionError"
    if "net-ns" in isolation():
        assert out["namespaces"][1:] == ["allowed", "OSError"]  # files untouched, network unreachable
    if not {"landlock-fs", "net-ns"} & set(isolation()):
        pytest.skip("neither Landlock nor namespaces here")


def test_many_sandboxes_in_parallel():
    def one(i):
        return run_python(f"import time\ntime.sleep(0.2)\nprint({i} * {i})", FAST)
    t = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert [(r.status, r.stdout) for r in results] == [("ok", f"{i * i}\n") for i in range(16)]
    assert time.monotonic() - t < 10


HUMANEVAL = dict(
    program="def add(a, b):\n    return a + b\n",
    tests="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    entry_point="add",
)


def test_run_tests_passes_a_correct_completion():
    r = run_tests(**HUMANEVAL, limits=FAST)
    assert r.passed and r.status == "ok"
    assert run_tests(HUMANEVAL["program"], "assert add(1, 1) == 2", limits=FAST).passed


@pytest.mark.parametrize("program", [
    "def add(a, b):\n    return a - b\n",                          # wrong
    "def add(a, b):\n    import sys; sys.exit(0)\n",               # leaves before the asserts
    "def add(a, b):\n    import os; os._exit(0)\n",                # the same, below Python's exit
    "import sys\nsys.exit(0)\n",                                     # before the tests are defined
    "def add(a, b):\n    while True: pass\n",                       # never returns
])
def test_run_tests_fails_a_wrong_or_evasive_completion(program):
    r = run_tests(program, HUMANEVAL["tests"], "add", SandboxLimits(wall_seconds=1.0))
    assert not r.passed and r.status in ("error", "timeout")
