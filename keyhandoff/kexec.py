"""The kexec channel's primitives: is kexec possible here, the running kernel, a sealed initrd.

Dangerous: :func:`load` replaces the kernel that the next kexec reboot starts
(``systemctl kexec``, ``reboot(LINUX_REBOOT_CMD_KEXEC)``); nothing here starts one.

A kexec boots the next kernel without the firmware.  ``kexec_file_load(2)``
(kernel/kexec_file.c) reads the kernel image and the initrd from descriptors, so the initrd
can be a memfd built in memory (:func:`combined_initrd`: the distribution's initrd followed
by a newc archive of keyhandoff's own files) that never touches a file system.  Under
lockdown the kernel verifies the image's signature itself; ``kexec_load(2)``, which takes
raw segments from user space, is refused there and is not used.

Kernel interfaces read by :func:`state` (each one a reason, never an exception, when it is
absent): ``/sys/kernel/kexec_loaded`` (is an image loaded; absent: no kexec at all),
``/proc/sys/kernel/kexec_load_disabled`` and ``kexec_load_limit_reboot`` and CAP_SYS_BOOT in
``/proc/self/status`` (the three checks of kernel/kexec_core.c ``kexec_load_permitted()``),
``/sys/kernel/security/lockdown``, and ``/boot/config-<release>`` when Debian installed one
(``CONFIG_KEXEC_FILE``, ``CONFIG_KEXEC_SIG_FORCE``).  :func:`running_kernel` reads
``/proc/cmdline`` and Debian's ``/boot/vmlinuz-<release>`` and ``/boot/initrd.img-<release>``.

What this does not protect: a Secret written into the memfd lives in shmem pages, which can
be swapped out; after :func:`load` the kernel holds the initrd in the loaded image's pages
until the kexec or an :func:`unload`, and frees its temporary read buffer without zeroing it
(``kimage_file_post_load_cleanup()``: ``vfree``).  Build, load and close in one short step.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff._bindings._linux import ffi, lib
from keyhandoff.errors import InvalidArgument, KexecError, KexecRefused
from keyhandoff.newc import Archive

if TYPE_CHECKING:
    from collections.abc import Mapping

    from keyhandoff.secret import Secret

__all__ = ["KEXEC_LOADED", "KexecError", "KexecRefused", "KexecState", "RunningKernel",
           "combined_initrd", "load", "named_kernel", "next_kernel", "running_kernel", "state",
           "unload"]

#: "1" while a kexec image is loaded (CONFIG_KEXEC_CORE; absent without kexec support).
KEXEC_LOADED: Final = "/sys/kernel/kexec_loaded"
_LOAD_DISABLED: Final = "/proc/sys/kernel/kexec_load_disabled"
_LOAD_LIMIT: Final = "/proc/sys/kernel/kexec_load_limit_reboot"
_LOCKDOWN: Final = "/sys/kernel/security/lockdown"
_OSRELEASE: Final = "/proc/sys/kernel/osrelease"
_STATUS: Final = "/proc/self/status"
_CMDLINE: Final = "/proc/cmdline"
_CAP_SYS_BOOT: Final = 22
#: Parameters of the boot loader's that name files of this boot, not of the next kernel's.
_DROPPED_PARAMETERS: Final = ("BOOT_IMAGE=", "initrd=")
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
#: Errors of a signature check (kernel/kexec_file.c kimage_validate_signature(), the same
#: set kexec-tools treats as "signature refused").
_SIGNATURE_ERRNOS: Final = frozenset({errno.EKEYREJECTED, errno.EBADMSG, errno.ENOKEY,
                                      errno.ENODATA, errno.ELIBBAD, errno.ENOPKG,
                                      errno.EMSGSIZE})
_LOCKDOWN_SIGNED: Final = "Secure Boot lockdown: needs a signed kernel"
_FORCED_SIGNED: Final = ("the kernel enforces kexec signatures (CONFIG_KEXEC_SIG_FORCE): "
                         "needs a signed kernel")


@dataclass(frozen=True, slots=True)
class KexecState:
    """Whether ``kexec_file_load`` can load a kernel here, and why not.

    ``reason`` says why not when ``possible`` is false; when it is true, ``reason`` is the
    condition (a signed kernel) or empty.  ``loaded``: an image is loaded now.
    """

    possible: bool
    reason: str
    needs_signed_kernel: bool
    loaded: bool


@dataclass(frozen=True, slots=True)
class RunningKernel:
    """What the boot loader starts for the running kernel, and its command line for the next."""

    release: str
    kernel: str
    initrd: str
    cmdline: str


def _under(root: str, path: str) -> str:
    return path if root in {"", "/"} else os.path.join(root, path.lstrip("/"))


def _read(path: str) -> str | None:
    """The file's text, or None when it is absent or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _release(root: str) -> str:
    text = _read(_under(root, _OSRELEASE))
    if text is not None and text.strip():
        return text.strip()
    if root in {"", "/"}:
        return os.uname().release
    raise KexecError(errno.ENOENT, f"{_under(root, _OSRELEASE)} is absent")


def _cap_sys_boot(root: str) -> bool | None:
    """Whether this process has CAP_SYS_BOOT in its effective set (None: cannot tell)."""
    status = _read(_under(root, _STATUS)) or ""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    return None if match is None else bool(int(match.group(1), 16) >> _CAP_SYS_BOOT & 1)


def _kernel_config(root: str) -> set[str] | None:
    """The ``CONFIG_...=y`` lines of Debian's /boot/config-<release>, or None without one."""
    try:
        release = _release(root)
    except KexecError:
        return None
    text = _read(_under(root, f"/boot/config-{release}"))
    return None if text is None else {line for line in text.splitlines() if line.endswith("=y")}


def state(*, root: str = "/") -> KexecState:
    """Whether a kernel could be loaded here; reads files only (cheap, changes nothing).

    No probe call: every ``kexec_file_load``, even one refused for its flags, uses up one of
    ``kexec_load_limit_reboot``, and a unit's system call filter answers it with EPERM.
    ``root`` is a scratch root in tests.
    """
    loaded_text = _read(_under(root, KEXEC_LOADED))
    if loaded_text is None:
        return KexecState(possible=False, loaded=False, needs_signed_kernel=False,
                          reason=f"this kernel has no kexec support ({KEXEC_LOADED} is absent)")
    loaded = loaded_text.strip() == "1"
    config = _kernel_config(root)
    lockdown = re.search(r"\[(\w+)\]", _read(_under(root, _LOCKDOWN)) or "")
    locked = lockdown is not None and lockdown.group(1) in {"integrity", "confidentiality"}
    forced = config is not None and "CONFIG_KEXEC_SIG_FORCE=y" in config
    signed = locked or forced
    refusal = None
    if (_read(_under(root, _LOAD_DISABLED)) or "").strip() == "1":
        refusal = "kexec is disabled until the next boot (kernel.kexec_load_disabled = 1)"
    elif (_read(_under(root, _LOAD_LIMIT)) or "").strip() == "0":
        refusal = "no kexec load is left in this boot (kernel.kexec_load_limit_reboot = 0)"
    elif _cap_sys_boot(root) is False:
        refusal = "loading a kernel needs CAP_SYS_BOOT (root)"
    elif config is not None and "CONFIG_KEXEC_FILE=y" not in config:
        refusal = "this kernel is built without kexec_file_load (CONFIG_KEXEC_FILE is not set)"
    if refusal is not None:
        return KexecState(possible=False, reason=refusal, needs_signed_kernel=signed,
                          loaded=loaded)
    reason = _LOCKDOWN_SIGNED if locked else _FORCED_SIGNED if forced else ""
    return KexecState(possible=True, reason=reason, needs_signed_kernel=signed, loaded=loaded)


def _split_cmdline(text: str) -> list[str]:
    """Words as the kernel's ``next_arg()`` sees them: spaces inside double quotes join."""
    words: list[str] = []
    word: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char.isspace() and not quoted:
            if word:
                words.append("".join(word))
                word = []
            continue
        word.append(char)
    if word:
        words.append("".join(word))
    return words


def _next_cmdline(text: str) -> str:
    """The running command line without the boot loader's file names (before ``--``)."""
    kept: list[str] = []
    for_init = False  # after "--" the words are init's arguments: kept as they are
    for word in _split_cmdline(text):
        if not for_init and word.startswith(_DROPPED_PARAMETERS):
            continue
        for_init = for_init or word == "--"
        kept.append(word)
    return " ".join(kept)


def _regular_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KexecError(exc.errno or errno.ENOENT,
                         f"the kernel's {what} {path} is absent "
                         f"({os.strerror(exc.errno or errno.ENOENT)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KexecError(errno.EINVAL, f"the kernel's {what} {path} is not a file")
    return path


def running_kernel(*, root: str = "/") -> RunningKernel:
    """Debian's kernel image and initrd for the running release, and its command line.

    The command line is ``/proc/cmdline`` without ``BOOT_IMAGE=`` and ``initrd=``: they
    name the boot loader's files, and the next kernel's initrd comes from a descriptor.
    """
    release = _release(root)
    kernel = _regular_file(_under(root, f"/boot/vmlinuz-{release}"), "image")
    initrd = _regular_file(_under(root, f"/boot/initrd.img-{release}"), "initrd")
    text = _read(_under(root, _CMDLINE))
    if text is None:
        raise KexecError(errno.ENOENT, f"{_under(root, _CMDLINE)} cannot be read")
    return RunningKernel(release=release, kernel=kernel, initrd=initrd,
                         cmdline=_next_cmdline(text))


def _link_target(root: str, name: str) -> str | None:
    """Where the link ``/name`` under ``root`` points, under ``root``; None if it is no link."""
    link = _under(root, "/" + name)
    try:
        target = os.readlink(link)
    except OSError:
        return None
    if os.path.isabs(target):
        return _under(root, target)
    return os.path.join(os.path.dirname(link), target)


def next_kernel(*, root: str = "/") -> RunningKernel:
    """The kernel the boot loader would start next, its initrd, and this command line.

    Debian keeps ``/vmlinuz`` and ``/initrd.img`` linking to the newest installed kernel
    (``linux-base``'s ``do_symlinks``, on by default), which is also GRUB's default entry:
    after a kernel update, the new one.  Where there is no ``/vmlinuz`` link, the running
    kernel's files (:func:`running_kernel`).  The command line is the running one without
    the boot loader's file names.
    """
    kernel = _link_target(root, "vmlinuz")
    if kernel is None:
        return running_kernel(root=root)
    base = os.path.basename(kernel)
    if not base.startswith("vmlinuz-") or base == "vmlinuz-":
        raise KexecError(errno.EINVAL, f"/vmlinuz links to {base}, which is not named "
                                       "vmlinuz-<release>")
    release = base.removeprefix("vmlinuz-")
    initrd = _link_target(root, "initrd.img") or _under(root, f"/boot/initrd.img-{release}")
    text = _read(_under(root, _CMDLINE))
    if text is None:
        raise KexecError(errno.ENOENT, f"{_under(root, _CMDLINE)} cannot be read")
    return RunningKernel(release=release, kernel=_regular_file(kernel, "image"),
                         initrd=_regular_file(initrd, "initrd"), cmdline=_next_cmdline(text))


def named_kernel(kernel: str, initrd: str | None = None, cmdline: str | None = None, *,
                 root: str = "/") -> RunningKernel:
    """A kernel a runner names: its image, its initrd, and a command line.

    ``initrd`` defaults to Debian's ``/boot/initrd.img-<release>`` for an image named
    ``vmlinuz-<release>``; ``cmdline`` to the running one without the boot loader's names.
    """
    base = os.path.basename(kernel)
    release = base.removeprefix("vmlinuz-") if base.startswith("vmlinuz-") else ""
    if initrd is None:
        if not release:
            raise KexecError(errno.EINVAL, f"no initrd named for {kernel}, and its name does "
                                           "not say its release (vmlinuz-<release>)")
        initrd = _under(root, f"/boot/initrd.img-{release}")
    if cmdline is None:
        text = _read(_under(root, _CMDLINE))
        if text is None:
            raise KexecError(errno.ENOENT, f"{_under(root, _CMDLINE)} cannot be read")
        cmdline = _next_cmdline(text)
    return RunningKernel(release=release, kernel=_regular_file(kernel, "image"),
                         initrd=_regular_file(initrd, "initrd"), cmdline=cmdline)


def _copy_file(src: int, dst: int) -> int:
    """Copy ``src`` to ``dst`` in the kernel (``sendfile``); return the bytes copied."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        n = os.sendfile(dst, src, offset, size - offset)
        if n == 0:
            break  # the file shrank while we copied: what was there is copied
        offset += n
    return offset


def combined_initrd(initrd_path: str | os.PathLike[str],
                    extra_files: Mapping[str, tuple[int, Secret | bytes]]) -> int:
    """A sealed memfd: the initrd's bytes, zeros to a multiple of 4, then ``extra_files``.

    ``extra_files`` is an :class:`~keyhandoff.newc.Archive`'s input (checked before
    anything is opened); a Secret's bytes go from its own buffer to the memfd.  The kernel
    unpacks concatenated archives (init/initramfs.c ``unpack_to_rootfs()``): after a
    compressed archive it resumes at the byte the decompressor stopped at, skips zeros,
    and reads the next archive as uncompressed cpio only where its offset from the start
    is a multiple of 4 (``!(this_header & 3)``; the magic's ``'0'`` anywhere else goes to
    the decompressor detection and fails as "invalid magic").  Hence the padding: ours
    follows a distribution initrd of any length, compressed (Debian's zstd or gzip) or not.

    The seals (no shrink, grow or write, no more seals) make the bytes final for anyone
    holding the descriptor.  It is the memfd's own descriptor, which the kernel reads
    despite its write mode (``kernel_read_file()`` refuses a file with writers, and a
    memfd is made by ``alloc_file_pseudo()``, which takes no write access); do not reopen
    it writable through /proc.
    The caller closes it.
    """
    archive = Archive(extra_files)
    path = os.fspath(initrd_path)
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise KexecError(exc.errno or errno.EIO,
                         f"cannot read the initrd {path}: {exc.strerror}") from None
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise KexecError(errno.EINVAL, f"the initrd {path} is not a file")
        if info.st_size == 0:
            raise KexecError(errno.EINVAL, f"the initrd {path} is empty")
        return _sealed_memfd(src, archive)
    finally:
        os.close(src)


def _sealed_memfd(src: int, archive: Archive) -> int:
    fd = os.memfd_create("keyhandoff-initrd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = _copy_file(src, fd)
        os.write(fd, bytes(-size % 4))
        archive.write(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kexec_error(err: int, what: str, *, root: str = "/") -> KexecError:
    """The exception for a failed ``kexec_file_load`` of ``what`` ("load", "unload")."""
    if err == errno.EPERM:
        now = state(root=root)
        why = now.reason or (
            "it needs CAP_SYS_BOOT, kexec enabled (kernel.kexec_load_disabled), a load left "
            "(kernel.kexec_load_limit_reboot), a signed kernel under lockdown; or a system "
            "call filter refused the call")
        return KexecRefused(err, f"kexec_file_load ({what}) not permitted: {why}")
    if err in _SIGNATURE_ERRNOS:
        return KexecRefused(err, "the kernel image's signature was refused "
                                 f"({os.strerror(err)}): this kernel verifies kexec images "
                                 "(lockdown or CONFIG_KEXEC_SIG_FORCE) and does not trust it")
    texts = {
        errno.ENOEXEC: "not a kernel image this kernel can load",
        errno.EBUSY: "another kexec load or unload is under way",
        errno.ENOSYS: "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE)",
        errno.ETXTBSY: "the kernel image or the initrd is open for writing somewhere",
        errno.EINVAL: "the kernel refused an argument (an empty image or initrd, a command "
                      "line longer than the new kernel accepts)",
        errno.EFBIG: "the kernel image or the initrd is too large",
        errno.EBADF: "the kernel image or initrd descriptor is not open for reading",
        errno.ENOMEM: "not enough memory to load the new kernel",
        errno.EADDRNOTAVAIL: "no room in memory for the new kernel and its initrd",
    }
    return KexecError(err, f"kexec_file_load ({what}) failed: "
                           f"{texts.get(err, os.strerror(err))}")


def load(kernel_fd: int, initrd_fd: int | None, cmdline: str) -> None:
    """Load the kernel image at ``kernel_fd`` (with ``initrd_fd``; None: no initrd).

    Replaces any image loaded before.  The kernel reads both descriptors completely
    during the call; they can be closed afterwards.
    """
    if "\0" in cmdline:
        raise InvalidArgument("the kernel command line contains a NUL byte")
    flags = 0
    if initrd_fd is None:
        flags |= lib.KEXEC_FILE_NO_INITRAMFS
        initrd_fd = -1
    if lib.kh_kexec_file_load(kernel_fd, initrd_fd, cmdline.encode(), flags) < 0:
        raise _kexec_error(ffi.errno, "load")


def unload(*, root: str = "/") -> bool:
    """Unload the loaded kexec image; False (and no system call) when none is loaded.

    The check first: every ``kexec_file_load`` call, an unload too, uses up one of
    ``kernel.kexec_load_limit_reboot``.
    """
    if (_read(_under(root, KEXEC_LOADED)) or "").strip() != "1":
        return False
    if lib.kh_kexec_file_load(-1, -1, ffi.NULL, lib.KEXEC_FILE_UNLOAD) < 0:
        raise _kexec_error(ffi.errno, "unload", root=root)
    return True
