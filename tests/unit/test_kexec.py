"""keyhandoff.kexec: state() and running_kernel() over scratch roots, the sealed initrd memfd,
load()/unload() through a stand-in binding (no kernel is ever loaded by these tests)."""

from __future__ import annotations

import errno
import fcntl
import gzip
import os
import stat
import subprocess

import pytest
from support.parts import require_binary
from support.passphrases import make

from keyhandoff import kexec, names, status
from keyhandoff._bindings._linux import ffi, lib
from keyhandoff.errors import (
    InvalidArchiveEntry,
    InvalidArgument,
    KexecError,
    KexecRefused,
    SecretError,
)
from keyhandoff.newc import Archive
from keyhandoff.secret import Secret

RELEASE = "6.1.0-28-amd64"
CAP_ALL = "000001ffffffffff"
CAP_NO_SYS_BOOT = f"{0x1FFFFFFFFFF & ~(1 << 22):016x}"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _root(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def _text(path):
    with open(path) as f:
        return f.read()


def _kexec_host(tmp_path, **overrides):
    """A scratch root where kexec is possible; ``overrides`` replace or (None) drop files."""
    files = {
        "sys/kernel/kexec_loaded": "0\n",
        "proc/sys/kernel/kexec_load_disabled": "0\n",
        "proc/sys/kernel/kexec_load_limit_reboot": "-1\n",
        "proc/sys/kernel/osrelease": f"{RELEASE}\n",
        "proc/self/status": f"Name:\tpython3\nCapInh:\t0\nCapEff:\t{CAP_ALL}\n",
        "sys/kernel/security/lockdown": "[none] integrity confidentiality\n",
        f"boot/config-{RELEASE}": "CONFIG_KEXEC=y\nCONFIG_KEXEC_FILE=y\nCONFIG_KEXEC_SIG=y\n",
    }
    files.update(overrides)
    return _root(tmp_path, {k: v for k, v in files.items() if v is not None})


# --- state() ---------------------------------------------------------------------------------


def test_a_kernel_with_kexec_and_nothing_in_the_way_is_possible(tmp_path):
    assert kexec.state(root=_kexec_host(tmp_path)) == kexec.KexecState(
        possible=True, reason="", needs_signed_kernel=False, loaded=False)


def test_a_loaded_image_is_reported(tmp_path):
    assert kexec.state(root=_kexec_host(tmp_path, **{"sys/kernel/kexec_loaded": "1\n"})).loaded


def test_without_kexec_loaded_there_is_no_kexec(tmp_path):
    now = kexec.state(root=_kexec_host(tmp_path, **{"sys/kernel/kexec_loaded": None}))
    assert not now.possible
    assert "no kexec support" in now.reason
    assert kexec.KEXEC_LOADED in now.reason


@pytest.mark.parametrize(("path", "text", "why"), [
    ("proc/sys/kernel/kexec_load_disabled", "1\n", "kernel.kexec_load_disabled = 1"),
    ("proc/sys/kernel/kexec_load_limit_reboot", "0\n", "kernel.kexec_load_limit_reboot = 0"),
    ("proc/self/status", f"CapEff:\t{CAP_NO_SYS_BOOT}\n", "CAP_SYS_BOOT"),
    (f"boot/config-{RELEASE}", "CONFIG_KEXEC=y\n# CONFIG_KEXEC_FILE is not set\n",
     "CONFIG_KEXEC_FILE"),
])
def test_each_refusal_of_the_kernel_is_named(tmp_path, path, text, why):
    now = kexec.state(root=_kexec_host(tmp_path, **{path: text}))
    assert not now.possible
    assert why in now.reason


@pytest.mark.parametrize("path", ["proc/sys/kernel/kexec_load_limit_reboot", "proc/self/status",
                                  f"boot/config-{RELEASE}", "sys/kernel/security/lockdown",
                                  "proc/sys/kernel/kexec_load_disabled"])
def test_an_absent_optional_file_refuses_nothing_and_raises_nothing(tmp_path, path):
    assert kexec.state(root=_kexec_host(tmp_path, **{path: None})).possible


def test_a_limit_of_loads_left_is_not_a_refusal(tmp_path):
    root = _kexec_host(tmp_path, **{"proc/sys/kernel/kexec_load_limit_reboot": "3\n"})
    assert kexec.state(root=root).possible


@pytest.mark.parametrize("mode", ["none [integrity] confidentiality",
                                  "none integrity [confidentiality]"])
def test_lockdown_needs_a_signed_kernel(tmp_path, mode):
    now = kexec.state(root=_kexec_host(tmp_path, **{"sys/kernel/security/lockdown": mode}))
    assert now.possible
    assert now.needs_signed_kernel
    assert now.reason == "Secure Boot lockdown: needs a signed kernel"


def test_forced_signature_checks_need_a_signed_kernel(tmp_path):
    config = "CONFIG_KEXEC_FILE=y\nCONFIG_KEXEC_SIG=y\nCONFIG_KEXEC_SIG_FORCE=y\n"
    now = kexec.state(root=_kexec_host(tmp_path, **{f"boot/config-{RELEASE}": config}))
    assert (now.possible, now.needs_signed_kernel) == (True, True)
    assert "CONFIG_KEXEC_SIG_FORCE" in now.reason


def test_a_refusal_still_says_a_signed_kernel_would_be_needed(tmp_path):
    now = kexec.state(root=_kexec_host(tmp_path, **{
        "proc/sys/kernel/kexec_load_disabled": "1\n",
        "sys/kernel/security/lockdown": "none [integrity] confidentiality\n"}))
    assert (now.possible, now.needs_signed_kernel) == (False, True)


def test_state_of_this_host_is_an_answer():
    now = kexec.state()
    assert isinstance(now, kexec.KexecState)
    assert now.possible or now.reason
    assert now.loaded == (os.path.exists(kexec.KEXEC_LOADED)
                          and _text(kexec.KEXEC_LOADED).strip() == "1")


# --- running_kernel() ------------------------------------------------------------------------


def _debian(tmp_path, cmdline):
    return _kexec_host(tmp_path, **{
        f"boot/vmlinuz-{RELEASE}": "MZ kernel", f"boot/initrd.img-{RELEASE}": "initrd",
        "proc/cmdline": cmdline})


def test_the_running_kernel_is_debians_image_and_initrd_of_this_release(tmp_path):
    root = _debian(tmp_path, f"BOOT_IMAGE=/boot/vmlinuz-{RELEASE} root=UUID=1234 ro quiet\n")
    found = kexec.running_kernel(root=root)
    assert found == kexec.RunningKernel(
        release=RELEASE, kernel=f"{root}/boot/vmlinuz-{RELEASE}",
        initrd=f"{root}/boot/initrd.img-{RELEASE}", cmdline="root=UUID=1234 ro quiet")


@pytest.mark.parametrize(("cmdline", "expected"), [
    ('BOOT_IMAGE="/boot/my kernel" ro', "ro"),
    ("initrd=\\EFI\\debian\\initrd.img  ro   quiet\n", "ro quiet"),
    ('ro foo="a b  c" BOOT_IMAGE=/vmlinuz', 'ro foo="a b  c"'),
    ("ro -- BOOT_IMAGE=kept initrd=kept", "ro -- BOOT_IMAGE=kept initrd=kept"),
    ("ro xBOOT_IMAGE=kept", "ro xBOOT_IMAGE=kept"),
    ("", ""),
])
def test_the_next_command_line_drops_the_boot_loaders_file_names(tmp_path, cmdline, expected):
    assert kexec.running_kernel(root=_debian(tmp_path, cmdline)).cmdline == expected


@pytest.mark.parametrize(("missing", "what"), [(f"boot/vmlinuz-{RELEASE}", "image"),
                                               (f"boot/initrd.img-{RELEASE}", "initrd")])
def test_an_absent_kernel_or_initrd_is_a_clear_error(tmp_path, missing, what):
    root = _debian(tmp_path, "ro\n")
    os.unlink(tmp_path / missing)
    with pytest.raises(KexecError) as info:
        kexec.running_kernel(root=root)
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith(f"the kernel's {what} {root}/{missing} is absent")
    assert "[Errno" not in str(info.value)


def test_a_directory_is_not_a_kernel_image(tmp_path):
    root = _debian(tmp_path, "ro\n")
    os.unlink(tmp_path / f"boot/vmlinuz-{RELEASE}")
    os.mkdir(tmp_path / f"boot/vmlinuz-{RELEASE}")
    with pytest.raises(KexecError, match="is not a file"):
        kexec.running_kernel(root=root)


# --- next_kernel() and named_kernel() ---------------------------------------------------------

NEWER = "6.1.0-29-amd64"


def _with_links(tmp_path, *, relative=True):
    """Debian after a kernel update: /vmlinuz and /initrd.img link to the newer kernel."""
    root = _debian(tmp_path, f"BOOT_IMAGE=/boot/vmlinuz-{RELEASE} root=UUID=1234 ro\n")
    for name in (f"boot/vmlinuz-{NEWER}", f"boot/initrd.img-{NEWER}"):
        (tmp_path / name).write_text("newer")
    prefix = "" if relative else "/"
    os.symlink(f"{prefix}boot/vmlinuz-{NEWER}", tmp_path / "vmlinuz")
    os.symlink(f"{prefix}boot/initrd.img-{NEWER}", tmp_path / "initrd.img")
    return root


@pytest.mark.parametrize("relative", [True, False])
def test_the_next_kernel_is_the_one_debians_links_name(tmp_path, relative):
    root = _with_links(tmp_path, relative=relative)
    found = kexec.next_kernel(root=root)
    assert found.release == NEWER
    assert os.path.samefile(found.kernel, tmp_path / f"boot/vmlinuz-{NEWER}")
    assert os.path.samefile(found.initrd, tmp_path / f"boot/initrd.img-{NEWER}")
    assert found.cmdline == "root=UUID=1234 ro"


def test_without_the_links_the_next_kernel_is_the_running_one(tmp_path):
    root = _debian(tmp_path, "ro\n")
    assert kexec.next_kernel(root=root) == kexec.running_kernel(root=root)


def test_a_vmlinuz_link_to_a_file_of_another_name_is_refused(tmp_path):
    root = _debian(tmp_path, "ro\n")
    os.symlink(f"boot/initrd.img-{RELEASE}", tmp_path / "vmlinuz")
    with pytest.raises(KexecError, match="not named vmlinuz-<release>"):
        kexec.next_kernel(root=root)


def test_a_dangling_vmlinuz_link_is_a_clear_error(tmp_path):
    root = _debian(tmp_path, "ro\n")
    os.symlink(f"boot/vmlinuz-{NEWER}", tmp_path / "vmlinuz")
    with pytest.raises(KexecError, match=r"the kernel's image .* is absent"):
        kexec.next_kernel(root=root)


def test_a_named_kernel_finds_its_initrd_and_takes_this_command_line(tmp_path):
    root = _debian(tmp_path, f"BOOT_IMAGE=/boot/vmlinuz-{RELEASE} ro quiet\n")
    image = str(tmp_path / f"boot/vmlinuz-{RELEASE}")
    found = kexec.named_kernel(image, root=root)
    assert (found.release, found.initrd, found.cmdline) == (
        RELEASE, f"{root}/boot/initrd.img-{RELEASE}", "ro quiet")
    other = tmp_path / "custom.img"
    other.write_text("initrd")
    assert kexec.named_kernel(image, str(other), "ro", root=root).initrd == str(other)


def test_a_named_kernel_of_no_release_needs_its_initrd(tmp_path):
    root = _debian(tmp_path, "ro\n")
    image = tmp_path / "bzImage"
    image.write_text("MZ")
    with pytest.raises(KexecError, match="no initrd named"):
        kexec.named_kernel(str(image), root=root)


# --- combined_initrd() -----------------------------------------------------------------------


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("size", [1000, 1001, 1002, 1003])
def test_the_initrd_is_followed_by_our_archive_at_a_4_byte_boundary(tmp_path, size):
    initrd = tmp_path / "initrd.img"
    content = os.urandom(size)
    initrd.write_bytes(content)
    extra = {"keyhandoff/x": (0o600, b"extra")}
    fd = kexec.combined_initrd(initrd, extra)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    offset = size + (-size % 4)
    assert data[:size] == content
    assert data[size:offset] == bytes(offset - size)  # zeros: skipped by the kernel
    assert offset % 4 == 0
    assert data[offset:] == Archive(extra).to_bytes()


def test_the_memfd_is_sealed_closed_on_exec_and_unpacks_after_the_initrd(tmp_path):
    cpio = require_binary("cpio", "apt-get install cpio")
    initrd = tmp_path / "initrd.img"
    distribution = gzip.compress(b"the distribution's archive" * 100, mtime=0)
    initrd.write_bytes(distribution)
    pw = make("kexec")
    before = _fds()
    with Secret(bytearray(pw)) as secret:
        fd = kexec.combined_initrd(str(initrd), {"keyhandoff/passphrase": (0o600, secret),
                                                 "keyhandoff/volume": (0o644, b"uuid")})
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
        assert not os.get_inheritable(fd)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        with pytest.raises(PermissionError):
            os.write(fd, b"more")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
        data = os.pread(fd, os.fstat(fd).st_size + 1, 0)
    finally:
        os.close(fd)
    assert _fds() == before
    assert data.startswith(distribution)
    offset = len(distribution) + (-len(distribution) % 4)
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"], input=data[offset:],
                   cwd=out, check=True, timeout=60)
    assert (out / "keyhandoff/passphrase").read_bytes() == pw
    assert stat.S_IMODE(os.stat(out / "keyhandoff/passphrase").st_mode) == 0o600
    assert (out / "keyhandoff/volume").read_bytes() == b"uuid"


def test_the_archive_is_checked_before_the_initrd_is_opened(tmp_path):
    before = _fds()
    with pytest.raises(InvalidArchiveEntry, match=r"'\.\.' component"):
        kexec.combined_initrd(tmp_path / "absent", {"../escape": (0o600, b"x")})
    assert _fds() == before


@pytest.mark.parametrize(("make_initrd", "why", "code"), [
    (lambda _p: None, "cannot read the initrd", errno.ENOENT),
    (lambda p: p.write_bytes(b""), "is empty", errno.EINVAL),
    (lambda p: p.mkdir(), "is not a file", errno.EINVAL),
])
def test_a_missing_empty_or_odd_initrd_is_a_clear_error(tmp_path, make_initrd, why, code):
    initrd = tmp_path / "initrd.img"
    make_initrd(initrd)
    pw = make("kexec-error")
    before = _fds()
    with Secret(bytearray(pw)) as secret, pytest.raises(KexecError) as info:
        kexec.combined_initrd(initrd, {"pw": (0o600, secret)})
    assert why in str(info.value)
    assert str(initrd) in str(info.value)
    assert info.value.errno == code
    assert pw.decode() not in str(info.value) + repr(info.value)
    assert _fds() == before


def test_a_failure_while_writing_closes_the_memfd(tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    secret = Secret(bytearray(make("kexec-wiped")))
    extra = {"pw": (0o600, secret)}
    Archive(extra)  # a valid archive ...
    secret.wipe()  # ... whose Secret is gone by the time it is written
    before = _fds()
    with pytest.raises(SecretError):
        kexec.combined_initrd(initrd, extra)
    assert _fds() == before


# --- load() and unload(), through a stand-in for the binding ---------------------------------


class _Binding:
    """Records kh_kexec_file_load calls; answers -1 with ``errno`` when one is set."""

    KEXEC_FILE_UNLOAD = lib.KEXEC_FILE_UNLOAD
    KEXEC_FILE_NO_INITRAMFS = lib.KEXEC_FILE_NO_INITRAMFS

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def kh_kexec_file_load(self, kernel_fd, initrd_fd, cmdline, flags):
        self.calls.append((kernel_fd, initrd_fd, cmdline, flags))
        if self.fail is None:
            return 0
        ffi.errno = self.fail
        return -1


@pytest.fixture
def binding(monkeypatch):
    fake = _Binding()
    monkeypatch.setattr(kexec, "lib", fake)
    return fake


def test_the_binding_has_the_kernels_flags():
    assert (lib.KEXEC_FILE_UNLOAD, lib.KEXEC_FILE_NO_INITRAMFS) == (1, 4)  # <linux/kexec.h>


def test_load_passes_both_descriptors_and_the_command_line(binding):
    kexec.load(7, 8, "root=UUID=1 ro")
    assert binding.calls == [(7, 8, b"root=UUID=1 ro", 0)]


def test_load_without_an_initrd_says_so_to_the_kernel(binding):
    kexec.load(7, None, "")
    assert binding.calls == [(7, -1, b"", lib.KEXEC_FILE_NO_INITRAMFS)]


def test_a_nul_in_the_command_line_is_refused_before_the_call(binding):
    with pytest.raises(InvalidArgument, match="NUL"):
        kexec.load(7, 8, "ro\0init=/bin/sh")
    assert binding.calls == []


@pytest.mark.parametrize(("code", "cls", "text"), [
    (errno.ENOEXEC, KexecError, "not a kernel image"),
    (errno.EBUSY, KexecError, "another kexec load or unload is under way"),
    (errno.ENOSYS, KexecError, "CONFIG_KEXEC_FILE"),
    (errno.ETXTBSY, KexecError, "open for writing"),
    (errno.EKEYREJECTED, KexecRefused, "signature was refused"),
    (errno.EBADMSG, KexecRefused, "signature was refused"),
    (errno.ENODATA, KexecRefused, "signature was refused"),
    (errno.EPERM, KexecRefused, "not permitted"),
    (errno.EIO, KexecError, os.strerror(errno.EIO)),
])
def test_load_errors_are_sentences_with_the_errno(monkeypatch, code, cls, text):
    monkeypatch.setattr(kexec, "lib", _Binding(fail=code))
    with pytest.raises(KexecError) as info:
        kexec.load(7, 8, "ro")
    assert type(info.value) is cls
    assert info.value.errno == code
    assert text in str(info.value)
    assert "[Errno" not in str(info.value)


@pytest.mark.parametrize(("overrides", "why"), [
    ({"sys/kernel/security/lockdown": "none [integrity] confidentiality\n"},
     "Secure Boot lockdown: needs a signed kernel"),
    ({"proc/self/status": f"CapEff:\t{CAP_NO_SYS_BOOT}\n"}, "CAP_SYS_BOOT (root)"),
    ({"proc/sys/kernel/kexec_load_disabled": "1\n"}, "kexec_load_disabled = 1"),
    ({}, "a system call filter"),
])
def test_eperm_says_which_rule_of_this_machine_refused(tmp_path, overrides, why):
    exc = kexec._kexec_error(errno.EPERM, "load", root=_kexec_host(tmp_path, **overrides))
    assert isinstance(exc, KexecRefused)
    assert why in str(exc)


@pytest.mark.parametrize("loaded", [None, "0\n"])
def test_unload_with_nothing_loaded_makes_no_call(tmp_path, binding, loaded):
    root = _kexec_host(tmp_path, **{"sys/kernel/kexec_loaded": loaded})
    assert kexec.unload(root=root) is False
    assert binding.calls == []


def test_unload_of_a_loaded_image(tmp_path, binding):
    assert kexec.unload(root=_kexec_host(tmp_path, **{"sys/kernel/kexec_loaded": "1\n"}))
    assert binding.calls == [(-1, -1, ffi.NULL, lib.KEXEC_FILE_UNLOAD)]


def test_a_failed_unload_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kexec, "lib", _Binding(fail=errno.EBUSY))
    with pytest.raises(KexecError, match="under way"):
        kexec.unload(root=_kexec_host(tmp_path, **{"sys/kernel/kexec_loaded": "1\n"}))


# --- the real system call, only where it cannot load anything --------------------------------


def test_the_real_kernel_refuses_a_memfd_of_zeros_and_keeps_what_was_loaded():
    # Zeros are no kernel image: every loader probes a magic first (x86's bzImage64_probe()
    # wants "HdrS"; kimage_file_prepare_segments() probes before it reads the initrd), so
    # the answer is ENOEXEC, or EPERM before that.  Only where the kernel has kexec at all,
    # and not where a load limit would be used up.
    if not os.path.exists(kexec.KEXEC_LOADED):
        pytest.skip(f"this kernel has no kexec ({kexec.KEXEC_LOADED} is absent): load() "
                    "is not called here")
    limit = "/proc/sys/kernel/kexec_load_limit_reboot"
    if os.path.exists(limit) and _text(limit).strip() != "-1":
        pytest.skip("kernel.kexec_load_limit_reboot is set: a call would use one up")
    before = _text(kexec.KEXEC_LOADED)
    fd = os.memfd_create("zeros", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(KexecError) as info:
            kexec.load(fd, None, "")
    finally:
        os.close(fd)
    assert info.value.errno in {errno.ENOEXEC, errno.EPERM, errno.ENOSYS}
    assert _text(kexec.KEXEC_LOADED) == before  # nothing loaded, nothing to unload


# --- keyhandoff status: the kexec section ---------------------------------------------------


def test_status_names_the_kernel_kexec_would_load_without_its_command_line(tmp_path):
    root = _debian(tmp_path, "root=UUID=1234 ro kh-secret-looking-arg=1\n")
    section = status._kexec_section(root)
    assert section == {
        "possible": True, "reason": None, "needs_signed_kernel": False, "loaded": False,
        "loaded_by_keyhandoff": False,
        "next_kernel": {"release": RELEASE, "kernel": f"{root}/boot/vmlinuz-{RELEASE}",
                        "initrd": f"{root}/boot/initrd.img-{RELEASE}"}}
    assert "kh-secret-looking-arg" not in repr(section)


@pytest.mark.parametrize(("loaded", "marked", "ours"), [
    ("1", True, True), ("1", False, False), ("0", True, False)])
def test_status_says_whether_the_loaded_image_is_keyhandoffs(tmp_path, loaded, marked, ours):
    root = _debian(tmp_path, "ro\n")
    (tmp_path / "sys/kernel/kexec_loaded").write_text(loaded + "\n")
    if marked:
        mark = tmp_path / names.KEXEC_LOADED_MARK.lstrip("/")
        mark.parent.mkdir(parents=True)
        mark.write_text("boot\n")
    section = status._kexec_section(root)
    assert (section["loaded"], section["loaded_by_keyhandoff"]) == (loaded == "1", ours)


def test_status_says_why_kexec_is_not_possible(tmp_path):
    section = status._kexec_section(_kexec_host(tmp_path, **{
        "proc/sys/kernel/kexec_load_disabled": "1\n"}))
    assert section["possible"] is False
    assert "kexec_load_disabled = 1" in section["reason"]
    assert section["next_kernel"] is None


def test_status_says_what_is_missing_for_the_next_kernel(tmp_path):
    root = _kexec_host(tmp_path, **{f"boot/vmlinuz-{RELEASE}": "MZ kernel",
                                    "proc/cmdline": "ro\n"})
    section = status._kexec_section(root)
    assert section["possible"] is True
    assert section["next_kernel"] is None
    assert f"initrd.img-{RELEASE}" in section["next_kernel_problem"]


def test_status_has_a_kexec_section_on_this_machine():
    report = status.collect()
    section = report.sections["kexec"]
    assert "error" not in section, section
    assert section["possible"] is kexec.state().possible
    assert "kexec" in report.as_text()
