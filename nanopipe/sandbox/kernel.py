"""
Kernel isolation, through libc (ctypes): the launcher drops to `nobody` (when root) and enters new user,
mount, PID, network and IPC namespaces; the init of the new PID namespace then isolates the filesystem and
drops every capability before the program runs (setup_init). The judge only makes itself undumpable.
"""

from __future__ import annotations

import os
import signal

from . import NOBODY_GID, NOBODY_UID

MAX_TMP_BYTES = 64 * 1024 * 1024         # size of the private tmpfs working directory
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # scratch space and daemons' sockets, emptied

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SYS_MOUNT_SETATTR = 442                 # the same number on every architecture (added in Linux 5.12)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def drop_privileges() -> bool:
    try:
        os.setgroups([])
        os.setgid(NOBODY_GID)
        os.setuid(NOBODY_UID)
    except PermissionError:  # root without CAP_SETUID (some containers): the other layers still hold
        return False
    return True


def enter_namespaces() -> list[str]:
    """Unshare user+mount+PID+network+IPC namespaces (the next fork becomes the PID namespace's init), mapping
    only our own uid and gid into it; where that fails, user+network alone. The protections made."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC) != 0:
        return ["user-namespace", "network-namespace"] if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0 else []
    # after a setuid the process is not dumpable and its /proc files belong to root: dumpable while mapping
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:  # unmapped, the namespace cannot mount anything: isolation is incomplete
        return ["network-namespace", "ipc-namespace"]
    finally:
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return ["user-namespace", "mount-namespace", "pid-namespace", "network-namespace", "ipc-namespace"]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()
    _check(_libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _make_read_only_recursively(path: str) -> None:
    """mount_setattr(2) with AT_RECURSIVE: every mount under `path` read-only and nosuid, in this namespace."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(_libc().syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
                           ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path} read-only")


def _isolate_filesystem(work_dir: str) -> list[str]:
    """In the init of the new namespaces: fresh /proc, scratch directories emptied, everything read-only,
    then a private tmpfs as the working directory. The protections made, in order, until one fails."""
    made = []
    nosuid_nodev_noexec = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing done here propagates back to the host
    try:
        _mount("proc", "/proc", "proc", nosuid_nodev_noexec)
        made.append("private-proc")
    except OSError:  # e.g. a container's /proc has masked paths: hide the host's processes instead
        _mount("tmpfs", "/proc", "tmpfs", nosuid_nodev_noexec | _MS_RDONLY, "size=4k")
    for path in HIDDEN_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", nosuid_nodev_noexec, "size=1m,mode=0755")
    os.makedirs(work_dir, exist_ok=True)  # inside an emptied /tmp the working directory is made again
    _make_read_only_recursively("/")
    made.append("read-only-filesystem")
    _mount("tmpfs", work_dir, "tmpfs", nosuid_nodev_noexec,
           f"size={MAX_TMP_BYTES},nr_inodes=4096,mode=0700,uid={os.getuid()},gid={os.getgid()}")
    os.chdir(work_dir)  # the old directory is underneath the tmpfs now
    made.append("private-tmp")
    return made


def _drop_capabilities() -> None:
    """Give up every capability in the namespace (permitted, effective, inheritable, ambient, bounding) and
    set no_new_privs, so no exec gets them back and the mounts above cannot be undone."""
    import ctypes
    libc = _libc()
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def setup_init(work_dir: str) -> tuple[list[str], str | None]:
    """In the init, before the program: tie it to the launcher, isolate the filesystem, drop capabilities.
    (The protections made, what failed.)"""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the launcher, and its namespace too
    os.setsid()  # signals to "my process group" stay inside the namespace
    made, errors = [], []
    try:
        made += _isolate_filesystem(work_dir)
    except OSError as e:
        errors.append(str(e))
    try:  # whatever the mounts came to, the program gets no capability to change them
        _drop_capabilities()
        made.append("no-capabilities")
    except OSError as e:
        errors.append(str(e))
    return made, "; ".join(errors) or None


def make_undumpable() -> None:
    """No process of the same user may read or write this one's memory or descriptors (ptrace, /proc/<pid>/mem,
    /proc/<pid>/fd): it matters where the sandbox is the weaker one, sharing our user and PID namespace."""
    try:
        _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the sandbox there is the weaker one anyway
        pass
