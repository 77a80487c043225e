"""The ``kexec`` channel: one-time keys across ``systemctl kexec``, never in firmware or flash.

``arm(reboot="kexec")`` does what the ``efi`` channel does (reads each volume key: one PBKDF;
adds a one-time LUKS2 keyslot with its bound token; seals a record of only the one-time keys
under a record key kept beside the keyslots), with one difference: the sealed record is not
written to an EFI variable.  It becomes one file, ``keyhandoff/kexec-record`` (mode 0400,
in a 0700 directory), of a small cpio archive appended to the next kernel's initrd in a
sealed memfd (:func:`keyhandoff.kexec.combined_initrd`), and the kernel is loaded with
``kexec_file_load`` (:func:`keyhandoff.kexec.load`).  The record then lives in the loaded
image's pages only: nothing touches a file system, NVRAM or flash, and a power loss or a
full reboot destroys it (the next boot's restore sweeps the one-time keyslots no record
claims).  A runner or the person then runs ``systemctl kexec``.

The next kernel is the one the boot loader would start (:func:`keyhandoff.kexec.next_kernel`:
Debian's ``/vmlinuz`` and ``/initrd.img``), or the one a runner names
(``update.arm(kernel=...)``).  Where kexec is not possible (no ``kexec_file_load``, kexec
disabled, no CAP_SYS_BOOT, no kernel image) arming is refused with the reason, before anyone
is asked; under Secure Boot lockdown the kernel itself checks the image's signature and an
unsigned one is refused by the load.

In the new kernel the initramfs unpacks the archive into its root.  keyhandoff's initramfs
step (the dracut module's ``keyhandoff-kexec-record.service``, the initramfs-tools
``local-top`` script) moves the file to ``/run/keyhandoff/kexec-record`` (root's, 0600)
before any volume is opened: ``/run`` goes along to the real root, the initramfs root does
not.  The token plugin takes it from there for a volume the initramfs opens (published in our
keyring as ``keyhandoff:record``, the file removed), and the real root's ``restore`` takes
whichever copy is left (:func:`keyhandoff.channels.efi._take_record`).  From there on it is
the ``efi`` channel's restore and finish, with the record's channel byte ``kexec``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING, ClassVar

from keyhandoff import journal, names
from keyhandoff.chain import CHAIN_KEY, Reboot
from keyhandoff.channels import Availability, Work
from keyhandoff.channels.efi import EfiChannel
from keyhandoff.errors import ChannelUnavailable, KexecError
from keyhandoff.journal import Event

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.chain import Target
    from keyhandoff.host import Host

__all__ = ["KexecChannel"]

#: The archive the loaded initrd carries besides the distribution's (mode bits included).
_SEGMENT_DIR = names.KEXEC_SEGMENT_RECORD.rsplit("/", 1)[0]


class KexecChannel(EfiChannel):
    """One-time keys in a sealed record in the loaded kernel's initrd, across kexec."""

    name: ClassVar[str] = "kexec"
    reboot: ClassVar[Reboot] = "kexec"
    keeps_keyring: ClassVar[bool] = False
    cold_restore: ClassVar[bool] = False  # efi's restore takes this channel's records too
    record_channel: ClassVar[str] = "KEXEC"
    carrier: ClassVar[str] = "the loaded kernel's RAM-only record"

    def availability(self) -> Availability:
        """Whether a kernel could be loaded, and which (reads files only: no load)."""
        from keyhandoff import kexec

        state = kexec.state()
        if not state.possible:
            return Availability(available=False, detail=state.reason)
        try:
            kernel = kexec.next_kernel()
        except KexecError as exc:
            return Availability(available=False, detail=str(exc))
        detail = f"kexec_file_load can load {kernel.kernel} with {kernel.initrd}"
        return Availability(available=True,
                            detail=f"{detail} ({state.reason})" if state.reason else detail)

    def refuse(self, work: Work, targets: Sequence[Target]) -> None:
        """Refuse before asking: no kexec here, no kernel to load, or a LUKS1 volume."""
        from keyhandoff import kexec

        state = kexec.state()
        if not state.possible:
            raise ChannelUnavailable(f"cannot carry a record across kexec: {state.reason}")
        if work.kernel is None:  # a kernel a runner named was checked when it was named
            try:
                kexec.next_kernel()
            except KexecError as exc:
                raise ChannelUnavailable(f"cannot carry a record across kexec: {exc}") from None
        self._refuse_luks1(targets)

    def _store(self, work: Work, blob: bytes) -> None:
        """Load the next kernel with the record in a RAM-only initrd segment; mark it ours."""
        from keyhandoff import kexec

        kernel = work.kernel if work.kernel is not None else kexec.next_kernel()
        work.say(f"loading {kernel.kernel} for kexec, the record in its initrd's RAM-only "
                 "segment")
        initrd = kexec.combined_initrd(kernel.initrd, {
            _SEGMENT_DIR: (stat.S_IFDIR | 0o700, b""),
            names.KEXEC_SEGMENT_RECORD: (0o400, blob),
        })
        try:
            try:
                image = os.open(kernel.kernel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                raise KexecError(exc.errno or 0, f"cannot read the kernel image "
                                 f"{kernel.kernel}: {exc.strerror}") from None
            try:
                kexec.load(image, initrd, kernel.cmdline)
            finally:
                os.close(image)
        finally:
            os.close(initrd)
        try:
            _mark_loaded(work.host)
        except BaseException:
            kexec.unload()  # ours, and unmarked: disarm could not find it again
            raise

    def _unstore(self, work: Work, *, stored: bool) -> None:
        """After a failed arm: unload what this arm loaded (a failed load replaced nothing)."""
        if not stored:
            return  # kexec_file_load swaps the image in only when it succeeds
        with contextlib.suppress(KexecError, OSError):
            _unload_ours(work.host)
        work.cache.forget_key(CHAIN_KEY)
        journal.log(Event.WIPED, "the kexec image could not be armed: nothing is armed now",
                    priority=journal.WARNING)

    def discard(self, host: Host) -> int:
        """Unload the kexec image keyhandoff loaded, and drop a kexec record not yet taken."""
        count = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.kexec_record_path)
            count += 1
        return count + _unload_ours(host)


def _unload_ours(host: Host) -> int:
    """Unload the loaded image if keyhandoff loaded it (the mark says so); how many.

    The mark lives in ``/run``, which a kexec or a reboot empties, so it names an image
    loaded in this boot (a soft reboot keeps both).  An image someone else loaded after ours
    replaced it in the kernel and is unloaded too: ``disarm`` means nothing of keyhandoff's
    may survive, and the kernel cannot tell whose image it holds.
    """
    from keyhandoff import kexec

    try:
        os.unlink(host.kexec_mark_path)
    except FileNotFoundError:
        return 0  # not ours: someone else's kexec image is not keyhandoff's to unload
    return int(kexec.unload())


def _mark_loaded(host: Host) -> None:
    """Say in root's runtime directory that the loaded image is keyhandoff's (no secret)."""
    path = host.kexec_mark_path
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(host.boot_id() + "\n")
    os.replace(tmp, path)
