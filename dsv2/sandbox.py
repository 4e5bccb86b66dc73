"""Run untrusted Python (a model's code completion and its unit tests) in a sandboxed process.

GRPO's "unit tests pass" reward and the evaluation harness's HumanEval pass@k both execute model
output. Whatever that code does (loops forever, forks, allocates, reads or writes host files, opens
sockets), it is stopped or denied, reported as a failed run, and never takes the caller down.

The host side starts a fresh interpreter (`python -I -S -B`, a minimal environment, its own
session) on this very file, which acts as the bootstrap: it reads its instructions, puts up the
layers below and then runs the code in-process. A bootstrap rather than `preexec_fn`, because the
callers are threaded (a trainer, a thread pool of evaluations) and running Python between fork and
exec in a threaded process can deadlock. The layers, each left out where the kernel refuses it
while the others stay (`isolation()` names those this machine gives, every result its own):

- namespaces: network (no interface but a downed loopback), PID (the code sees only itself, and
  killing the namespace's first process kills every process in it), IPC, mount (the scratch
  directory becomes a size-limited tmpfs, so nothing lands on the host's disk). As root they are
  made directly, otherwise inside a new user namespace that maps the caller's own uid.
- an unprivileged identity: root is exempt from RLIMIT_NPROC, so a root caller's sandbox runs as
  a throwaway uid (_UID_BASE + the bootstrap's pid, unique while it runs, so concurrent sandboxes
  do not share a process budget). It keeps CAP_DAC_READ_SEARCH only where the interpreter or the
  scratch directory sits below a directory others cannot enter (pyenv under /root is 0700).
- rlimits: CPU seconds, address space, file size, no core files, and processes + threads where
  the count is private to the sandbox (a user namespace or the throwaway uid) and a trial fork
  shows that the kernel enforces it.
- no_new_privs, then Landlock: read/execute below the interpreter's prefixes and the system
  library directories, everything in the scratch directory, nothing else; TCP bind/connect denied
  (ABI >= 4); abstract unix sockets and signals scoped to the sandbox (ABI >= 6).
- seccomp: socket() and io_uring_setup() fail with EACCES. Landlock does not cover connecting
  to a pathname unix socket, and io_uring would reach sockets around the socket() filter.

The wall limit is the host's: it kills the whole process group with SIGKILL (and with it the PID
namespace). Output is read as it comes, stdout up to its limit from the start, stderr its end
(where a traceback is).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10               # RLIMIT_CPU, whole seconds, per process
    memory_bytes: int = 1 << 30         # RLIMIT_AS: address space, not resident memory
    max_processes: int = 8              # processes + threads, the code's own main thread included
    max_output_bytes: int = 1 << 20     # each of stdout and stderr
    max_file_bytes: int = 16 << 20      # RLIMIT_FSIZE
    scratch_bytes: int = 64 << 20       # the scratch tmpfs, where a mount namespace is available


@dataclass(frozen=True)
class SandboxResult:
    status: str        # "ok", "error" (nonzero exit), "timeout" (wall or CPU), "memory", "killed" (a signal)
    returncode: int    # negative: the signal that ended it
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float
    truncated: bool    # stdout or stderr went past max_output_bytes
    isolation: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run `code` as the main module of a sandboxed interpreter, with `stdin` as its input."""
    return _run(code, limits, stdin, nonce=None)


def run_tests(program: str, tests: str, entry_point: str | None = None,
              limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """A completion and its unit tests (HumanEval's form: `tests` defines check(candidate), called
    with `entry_point`; without one, `tests` asserts by itself). Passed only if the tests ran to
    their end: a program that exits early (sys.exit(0), os._exit(0)) has not passed. The bootstrap
    proves the end by reporting a nonce the code never sees in its files, argv or environment."""
    source = f"{program}\n\n{tests}\n"
    if entry_point:
        source += f"\ncheck({entry_point})\n"
    return _run(source, limits, "", nonce=secrets.token_hex(16))


@functools.cache
def isolation() -> tuple[str, ...]:
    """The layers a sandbox gets on this machine, from one probe run."""
    return run_python("pass").isolation


# ---------------------------------------------------------------------------------------------
# host side

_REPORT_BYTES = 1 << 16


def _run(code: str, limits: SandboxLimits, stdin: str, nonce: str | None) -> SandboxResult:
    scratch = tempfile.mkdtemp(prefix="dsv2-sandbox-")
    report_r, report_w = os.pipe()
    try:
        config = os.path.join(scratch, ".sandbox.json")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"code": code, "limits": asdict(limits), "report_fd": report_w, "nonce": nonce}, f)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-X", "utf8", os.path.abspath(__file__), config],
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=scratch, env=env,
                start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        return _watch(proc, report_r, limits, nonce)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        # with the tmpfs it is empty; without, a non-root caller cannot remove what the code made
        # unreadable (chmod 0), and chmod-ing it back would follow the code's symlinks
        shutil.rmtree(scratch, ignore_errors=True)


def _watch(proc: subprocess.Popen, report_r: int, limits: SandboxLimits, nonce: str | None) -> SandboxResult:
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    out, err, report = bytearray(), bytearray(), bytearray()
    truncated = exited = False
    # a pidfd says the process ended without reaping it: while it is unreaped its pid, hence its
    # process group id, cannot be reused, so killing the group never hits a stranger
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            sel.register(report_r, selectors.EVENT_READ, report)
            sel.register(pidfd, selectors.EVENT_READ, None)
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    if key.data is None:
                        exited = True
                        sel.unregister(pidfd)
                        _kill_group(proc.pid)  # what it left behind outside a PID namespace
                        continue
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fileobj)
                    elif key.data is err:  # keep the end, where the traceback is
                        err += data
                        if len(err) > limits.max_output_bytes:
                            truncated = True
                            del err[:len(err) - limits.max_output_bytes]
                    else:
                        cap = limits.max_output_bytes if key.data is out else _REPORT_BYTES
                        room = cap - len(key.data)
                        truncated |= key.data is out and len(data) > room
                        key.data.extend(data[:max(room, 0)])
        if not exited:
            _kill_group(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    stderr = err.decode(errors="replace")
    lines = [_json(line) for line in report.decode(errors="replace").splitlines()]
    layers = next((tuple(x["isolation"]) for x in lines if isinstance(x.get("isolation"), list)), ())
    if not exited or (code == -signal.SIGKILL and cpu >= limits.cpu_seconds - 0.05):
        status = "timeout"
    elif code < 0:
        status = "killed"
    elif code > 0:
        tail = stderr.rstrip().rpartition("\n")[2]
        status = "memory" if tail.startswith("MemoryError") else "error"
    elif nonce is not None and not any(x.get("passed") == nonce for x in lines):
        status = "error"
        stderr += "\nsandbox: the program exited before its tests finished\n"
    else:
        status = "ok"
    return SandboxResult(status, code, out.decode(errors="replace"), stderr, wall, cpu, truncated, layers)


def _json(line: str) -> dict:
    # the report pipe stays open to the code in tests mode: anything but the nonce may be forged
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# sandbox side: this file run as the bootstrap, standard library only

_UID_BASE = 1 << 30  # far above real users and the usual subuid ranges; + a pid (< 2**22)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAP_AMBIENT = 8, 38, 22, 47
PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, SECCOMP_MODE_FILTER = 2, 2, 2

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE, FS_IOCTL_DEV = 1, 2, 4, 8, 1 << 14, 1 << 15
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

# seccomp: (AUDIT_ARCH, socket, io_uring_setup) per machine; elsewhere the layer is left out
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
EACCES = 13

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _sandbox_main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    os.unlink(config_path)
    scratch = os.path.dirname(config_path)
    limits = SandboxLimits(**config["limits"])
    report = os.fdopen(config["report_fd"], "w", buffering=1)
    # root of a container's user namespace is an ordinary uid to the kernel: the non-root path
    with open("/proc/self/uid_map") as f:
        root = os.geteuid() == 0 and f.read().split() == ["0", "0", "4294967295"]
    uid = _UID_BASE + os.getpid() if root else os.getuid()
    gid = uid if root else os.getgid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    layers = _unshare(root)
    if "pid-ns" in layers:
        child = os.fork()  # the first process of the new PID namespace
        if child:
            _relay(child)
    if "mount-ns" in layers and _mount_scratch(scratch, limits.scratch_bytes, uid, gid):
        layers.append("tmpfs-scratch")
    readable = _readable_paths()
    if root and _drop_root(uid, gid, keep_dac=not all(map(_world_searchable, readable + [scratch])),
                           scratch=None if "tmpfs-scratch" in layers else scratch):
        layers.append("uid")
    elif "user-ns" in layers:
        _set_caps(0)  # the new user namespace gave it every capability inside
    # before RLIMIT_FSIZE, which the code's own size must not count against
    main = os.path.join(scratch, "main.py")
    with open(main, "w") as f:
        f.write(config["code"])

    # a count shared with the caller's other processes would make the limit meaningless
    process_limit = ("uid" in layers or "user-ns" in layers) and _nproc_enforced()
    _set_rlimits(limits, process_limit, counted_parent=not root and "pid-ns" in layers)
    layers.append("rlimits")
    if process_limit:
        layers.append("process-limit")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    layers.append("no-new-privs")
    layers += _landlock(readable, scratch)
    layers += _seccomp()
    os.chdir(scratch)  # the inherited cwd is the directory the tmpfs now covers
    report.write(json.dumps({"isolation": layers}) + "\n")
    if config["nonce"] is None:
        report.close()
    _run_main(main, config["code"], report, config["nonce"])


def _unshare(root: bool) -> list[str]:
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS
    uid, gid = os.getuid(), os.getgid()
    try:
        _check(_libc.unshare(flags if root else flags | CLONE_NEWUSER))
    except OSError:
        return []
    if root:
        return ["net-ns", "pid-ns", "ipc-ns", "mount-ns"]
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return ["user-ns", "net-ns", "pid-ns", "ipc-ns", "mount-ns"]


def _relay(child: int) -> None:
    """The bootstrap's first process waits outside the namespace and ends as its child did."""
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if code != -signal.SIGKILL:  # the one signal that has no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _mount_scratch(scratch: str, size: int, uid: int, gid: int) -> bool:
    try:
        # private first: with shared propagation the tmpfs would appear in the host's namespace
        _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None))
        data = f"size={size},mode=0700,uid={uid},gid={gid}".encode()
        _check(_libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), data))
    except OSError:
        return False
    return True


def _drop_root(uid: int, gid: int, keep_dac: bool, scratch: str | None) -> bool:
    """Become `uid`, giving it `scratch` (unless the tmpfs already belongs to it); False, still
    root, where that cannot be done (no CAP_SETUID, or a kept capability not held to begin with)."""
    with open("/proc/self/status") as f:
        held = int(next(line for line in f if line.startswith("CapPrm:")).split()[1], 16)
    if keep_dac and not held >> CAP_DAC_READ_SEARCH & 1:  # Docker's default set lacks it
        return False
    try:
        if scratch is not None:
            os.chown(scratch, uid, gid)
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0))
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError:  # no CAP_SETUID: stays root, without a process limit
        return False
    _set_caps(1 << CAP_DAC_READ_SEARCH if keep_dac else 0)
    if keep_dac:  # ambient, so that a subprocess of the interpreter still reaches its prefix
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0))
    return True


def _set_caps(mask: int) -> None:
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)(_CapData(mask, mask, mask), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data))


def _world_searchable(path: str) -> bool:
    """Whether anyone may walk to `path`: search permission on every directory down to it."""
    path = os.path.realpath(path)
    if not os.path.isdir(path):
        path = os.path.dirname(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _nproc_enforced() -> bool:
    """Whether RLIMIT_NPROC binds this process. The kernel exempts kernel uid 0, and from inside a
    user namespace nothing tells whether the uid maps to it (`unshare --map-root-user` run by root
    does), so rather than infer it: a fork against a limit of one."""
    old = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, old[1]))
    try:
        pid = os.fork()
    except BlockingIOError:
        pid = None
    if pid == 0:
        os._exit(0)
    resource.setrlimit(resource.RLIMIT_NPROC, old)
    if pid is None:
        return True
    os.waitpid(pid, 0)
    return False


def _set_rlimits(limits: SandboxLimits, process_limit: bool, counted_parent: bool) -> None:
    cpu = max(1, int(limits.cpu_seconds))
    # soft == hard: the kernel sends SIGKILL at the limit; SIGXCPU would be ignored by the first
    # process of a PID namespace, and the host tells a CPU kill by the CPU time it took
    for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits.memory_bytes),
                       (resource.RLIMIT_FSIZE, limits.max_file_bytes)):
        resource.setrlimit(res, (value, value))
    if process_limit:
        # a user namespace also counts the waiting first process (_relay) against the limit
        n = limits.max_processes + (1 if counted_parent else 0)
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _readable_paths() -> list[str]:
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.realpath(sys.executable))}
    system = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/dev/urandom", "/dev/zero",
              os.path.realpath("/proc/self")]
    return [p for p in sorted(prefixes) + system if os.path.exists(p)]


def _landlock(readable: list[str], scratch: str) -> list[str]:
    try:  # fails where the kernel lacks Landlock or it is disabled at boot
        abi = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return []
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) \
        | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    rules = [(p, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR) for p in readable]
    rules += [(scratch, fs), ("/dev/null", FS_READ_FILE | FS_WRITE_FILE)]
    try:  # nothing applies unless every rule went in
        size = ctypes.sizeof(attr)
        ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0))
        try:
            for path, access in rules:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    if not stat.S_ISDIR(os.fstat(fd).st_mode):
                        access &= FS_FILE_RIGHTS  # a rule on a file may grant only file rights
                    rule = _PathBeneath(access & fs, fd)
                    _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH,
                                         ctypes.byref(rule), 0))
                finally:
                    os.close(fd)
            _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0))
        finally:
            os.close(ruleset)
    except OSError:
        return []
    return ["landlock-fs"] + (["landlock-tcp"] if net else []) + (["landlock-scope"] if scoped else [])


def _seccomp() -> list[str]:
    arch = SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return []
    audit_arch, nr_socket, nr_io_uring_setup = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    program = [
        (ld, 0, 0, 4),                      # seccomp_data.arch
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, deny),                  # another ABI (int 0x80 on x86_64)
        (ld, 0, 0, 0),                      # seccomp_data.nr
        (jge, 3, 0, 0x40000000),            # x32 syscalls
        (jeq, 2, 0, nr_socket),
        (jeq, 1, 0, nr_io_uring_setup),
        (ret, 0, 0, allow),
        (ret, 0, 0, deny),
    ]
    filters = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    fprog = _SockFprog(len(program), filters)
    try:
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0))
    except OSError:
        return []
    return ["seccomp"]


def _run_main(path: str, source: str, report, nonce: str | None) -> None:
    import builtins
    import traceback
    import types

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    sys.modules["__main__"] = main  # pickling and dataclasses find the code's classes there
    sys.argv = [path]
    try:
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit:
        if nonce is None:
            raise
        print("sandbox: SystemExit before the tests finished", file=sys.stderr)
        raise SystemExit(1)
    except BaseException as e:
        main.__dict__.clear()  # frees what a MemoryError left allocated, so the traceback can print
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the code's first frame
        raise SystemExit(1)
    if nonce is not None:
        report.write(json.dumps({"passed": nonce}) + "\n")


if __name__ == "__main__":
    _sandbox_main(sys.argv[1])
