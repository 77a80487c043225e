"""initramfs/: images made by the real generators of this host, with and without our part.

initramfs-tools' ``mkinitramfs`` (with cryptsetup-initramfs's cryptroot, Debian's default)
and dracut (a systemd initramfs) build images for the running kernel; each image is
unpacked and checked: the token plugin ``libcryptsetup-token-keyhandoff-onetime.so`` is at
libcryptsetup's token path, the image's own dynamic loader resolves every library it links,
there is no Python and nothing else of keyhandoff; the image built without our part lacks
it.  The initramfs-tools image is also run: its cryptsetup opens a LUKS2 image file through
the token, and our local-top script asks the token for a crypttab entry, in a chroot.

The image checks run on the real plugin (csrc/build-token) and on a stand-in built here from
a few lines of C with the token ABI (the version node ``CRYPTSETUP_TOKEN_1.0``), linking
libcryptsetup, libcrypto and json-c as the plugin does.  The stand-in answers the passphrase
of the test's own LUKS image without a record, so the tests that run the image's own
cryptsetup use it (the real plugin's answers are tests/integration/test_token_plugin.py's).

Nothing touches /boot, the machine's token directory or its initramfs configuration: the
generators run in a private mount namespace (``unshare -m``) where libcryptsetup's token
directory is a bind mount of a tmp directory holding the plugin, and, when the running
kernel has no ``/boot/config-*`` (mkinitramfs reads it for the compressor), /boot is a bind
mount of a tmp directory holding the kernel's own /proc/config.gz.  mkinitramfs gets a
private configuration directory (``-d``) and dracut a private copy of its module directory
(``dracutbasedir``) and no configuration files.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.luks_images import FAST, cryptsetup, format_image
from support.parts import require, require_binary

from keyhandoff import keyring
from keyhandoff.cache import SystemdCache
from keyhandoff.names import TOKEN_TYPE

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and chroot need root")

REPO = Path(__file__).resolve().parents[2]
INITRAMFS = REPO / "initramfs"
PLUGIN = f"libcryptsetup-token-{TOKEN_TYPE}.so"
STANDIN_PASSPHRASE = b"keyhandoff-initramfs-standin"

STANDIN_C = r"""
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <libcryptsetup.h>
void OPENSSL_cleanse(void *ptr, size_t len);
void *json_tokener_parse(const char *str);
int json_object_put(void *obj);
const char *cryptsetup_token_version(void) { return "stand-in"; }
int cryptsetup_token_open_pin(struct crypt_device *cd, int token, const char *pin,
                              size_t pin_size, char **buffer, size_t *buffer_len, void *usrptr) {
    (void)token; (void)pin; (void)pin_size; (void)usrptr;
    if (crypt_get_uuid(cd) == NULL || (*buffer = strdup(PASSPHRASE)) == NULL) return -ENOENT;
    *buffer_len = strlen(*buffer);
    return 0;
}
int cryptsetup_token_open(struct crypt_device *cd, int token, char **buffer,
                          size_t *buffer_len, void *usrptr) {
    return cryptsetup_token_open_pin(cd, token, NULL, 0, buffer, buffer_len, usrptr);
}
void cryptsetup_token_buffer_free(void *buffer, size_t buffer_len) {
    OPENSSL_cleanse(buffer, buffer_len);
    free(buffer);
}
int cryptsetup_token_validate(struct crypt_device *cd, const char *json) {
    void *o = json_tokener_parse(json);
    (void)cd;
    if (o == NULL) return -EINVAL;
    json_object_put(o);
    return 0;
}
"""
STANDIN_MAP = """CRYPTSETUP_TOKEN_1.0 {
  global: cryptsetup_token_open; cryptsetup_token_open_pin; cryptsetup_token_buffer_free;
          cryptsetup_token_validate; cryptsetup_token_version;
  local: *;
};
"""


# --------------------------------------------------------------------------- host parts


def run(argv: Sequence[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510  # callers check
        [str(a) for a in argv], capture_output=True, text=True, **kwargs,  # type: ignore[call-overload]
    )


def token_dir() -> str:
    """libcryptsetup's compiled-in external token directory, as ``cryptsetup --help`` says."""
    out = cryptsetup("--help").stdout.decode()
    found = re.search(r"^LUKS2 external token plugin path: (.+)\.$", out, re.MULTILINE)
    assert found, "this cryptsetup has no external token plugin support"
    return found.group(1)


def interpreter(binary: str) -> str:
    """The dynamic loader an ELF file asks for (PT_INTERP)."""
    out = run(["readelf", "-l", binary], check=True).stdout
    found = re.search(r"Requesting program interpreter: (\S+)\]", out)
    assert found
    return found.group(1)


def needed(library: Path) -> list[str]:
    out = run(["readelf", "-d", library], check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", out)


def in_namespace(
    binds: Sequence[tuple[Path, str]], argv: Sequence[str | Path], *, env: dict[str, str],
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``argv`` in a private mount namespace where each (source, target) is a bind mount."""
    script = (
        'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 97; shift 2; done; '
        'shift; exec "$@"'
    )
    pairs = [str(p) for bind in binds for p in bind]
    unshare = require_binary("unshare", "apt-get install util-linux")
    return run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", *pairs, "--",
         *argv],
        env=env, timeout=timeout,
    )


@dataclass(frozen=True)
class Host:
    tmp: Path
    kernel: str
    tokendir: str
    binds: tuple[tuple[Path, str], ...]
    """(source, target) bind mounts for a generator: the token directory, maybe /boot"""

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "TMPDIR": str(self.tmp)}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in plugin (module docstring), built with the token ABI's version node."""
    cc = require_binary("cc", "apt-get install build-essential")
    work = tmp_path_factory.mktemp("standin")
    (work / "standin.c").write_text(STANDIN_C)
    (work / "standin.map").write_text(STANDIN_MAP)
    out = work / PLUGIN
    passphrase = STANDIN_PASSPHRASE.decode()
    run([cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared",
         f'-DPASSPHRASE="{passphrase}"', "-Wl,--as-needed",
         f"-Wl,--version-script={work / 'standin.map'}", "-o", out, work / "standin.c",
         "-lcryptsetup", "-l:libcrypto.so.3", "-l:libjson-c.so.5"], check=True)
    assert {"libcryptsetup.so.12", "libcrypto.so.3", "libjson-c.so.5"} <= set(needed(out))
    return out


#: The tests that run the image's own cryptsetup need a plugin that answers without a record:
#: the stand-in (its fixed passphrase); the image checks run with both.
STAND_IN_ONLY = pytest.mark.parametrize("plugin", ["stand-in"], indirect=True)


@pytest.fixture(scope="module", params=["stand-in", "plugin"])
def plugin(request: pytest.FixtureRequest, standin: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in, then the real plugin of csrc/build-token."""
    if request.param == "stand-in":
        return standin
    build = REPO / "csrc" / "build-token"
    out = tmp_path_factory.mktemp("plugin")
    run([build, out], check=True)
    return out / PLUGIN


@pytest.fixture(scope="module")
def host(plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> Host:
    tmp = tmp_path_factory.mktemp("generators")
    tokens = tmp / "tokens"
    tokens.mkdir()
    shutil.copy2(plugin, tokens / PLUGIN)
    binds: list[tuple[Path, str]] = [(tokens, token_dir())]
    kernel = platform.release()
    if not Path(f"/boot/config-{kernel}").exists():
        proc_config = Path("/proc/config.gz")
        if not proc_config.exists():
            pytest.skip(f"kernel {kernel} has neither /boot/config-{kernel} nor /proc/config.gz")
        boot = tmp / "boot"
        boot.mkdir()
        (boot / f"config-{kernel}").write_bytes(gzip.decompress(proc_config.read_bytes()))
        binds.append((boot, "/boot"))
    return Host(tmp, kernel, token_dir(), tuple(binds))


# --------------------------------------------------------------------------- generators


def mkinitramfs(host: Host, out: Path, *, ours: bool) -> Path:
    """An initramfs-tools image from a private configuration directory (Debian's defaults)."""
    binary = require_binary("mkinitramfs", "apt-get install initramfs-tools cryptsetup-initramfs")
    require(Path("/usr/share/initramfs-tools/scripts/local-top/cryptroot").exists(),
            "cryptsetup-initramfs's cryptroot", "apt-get install cryptsetup-initramfs")
    conf = out.with_suffix(".conf")
    (conf / "conf.d").mkdir(parents=True)
    (conf / "initramfs.conf").write_text("MODULES=most\nBUSYBOX=auto\nKEYMAP=n\nCOMPRESS=zstd\n")
    (conf / "modules").write_text("")
    if ours:
        for part in ("hooks/keyhandoff", "scripts/local-top/keyhandoff",
                     "scripts/local-premount/keyhandoff", "scripts/local-bottom/keyhandoff"):
            (conf / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(INITRAMFS / "initramfs-tools" / part, conf / part)
    result = in_namespace(host.binds, [binary, "-d", conf, "-o", out, host.kernel],
                          env=host.env())
    assert result.returncode == 0, result.stderr
    if ours:
        assert "keyhandoff" not in result.stderr, result.stderr  # our hook warned nothing
    return out


def dracut(host: Host, out: Path, *, ours: bool) -> Path:
    """A dracut image (systemd, crypt), generic (--no-hostonly), from a private module copy."""
    binary = require_binary("dracut", "apt-get install dracut-core")
    base = out.with_suffix(".dracut")
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    if ours:
        shutil.copytree(INITRAMFS / "dracut" / "90keyhandoff", base / "modules.d" / "90keyhandoff")
    empty = out.with_suffix(".confdir")
    empty.mkdir()
    env = host.env() | {"dracutbasedir": str(base)}
    # --no-kernel: this host's kernel has no /lib/modules (efivarfs comes from 00systemd)
    result = in_namespace(host.binds, [
        binary, "--force", "--no-hostonly", "--no-kernel", "--conf", "/dev/null",
        "--confdir", empty, "--tmpdir", host.tmp, "--add", "systemd crypt",
        "--kver", host.kernel, out], env=env)
    assert result.returncode == 0, result.stderr
    return out


def unpack(image: Path) -> Path:
    """The image's main archive unpacked (unmkinitramfs: early cpio in early/, main in main/)."""
    binary = require_binary("unmkinitramfs", "apt-get install initramfs-tools-core")
    dest = image.with_suffix(".root")
    run([binary, image, dest], check=True)
    return dest / "main" if (dest / "main").is_dir() else dest


def inside(root: Path, path: str) -> Path:
    """``path`` of the image resolved inside ``root``: symlinks followed, never out of it."""
    parts = [p for p in path.split("/") if p]
    current = root
    for _ in range(40):
        if not parts:
            return current
        name = parts.pop(0)
        candidate = current / name
        if candidate.is_symlink():
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = root
        elif name == "..":
            current = current.parent if current != root else root
        else:
            current = candidate
    raise AssertionError(f"symlink loop at {path}")


def files_named(root: Path, word: str) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if word in p.name.lower()}


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Images:
    generator: str
    plugin: Path
    tokendir: str
    with_ours: Path
    without: Path
    root: Path
    bare: Path


def build(host: Host, plugin: Path, generator: str) -> Images:
    make = mkinitramfs if generator == "initramfs-tools" else dracut
    work = host.tmp / generator
    work.mkdir()
    with_ours = make(host, work / "with.img", ours=True)
    without = make(host, work / "without.img", ours=False)
    return Images(generator, plugin, host.tokendir, with_ours, without, unpack(with_ours),
                  unpack(without))


@pytest.fixture(scope="module")
def built(host: Host, plugin: Path) -> Callable[[str], Images]:
    """Each generator's pair of images for this plugin, built once."""
    cache: dict[str, Images] = {}

    def get(generator: str) -> Images:
        if generator not in cache:
            cache[generator] = build(host, plugin, generator)
        return cache[generator]

    return get


@pytest.fixture(params=["initramfs-tools", "dracut"])
def images(request: pytest.FixtureRequest, built: Callable[[str], Images]) -> Images:
    return built(request.param)


@pytest.fixture
def debian_images(built: Callable[[str], Images], standin: Path, plugin: Path) -> Images:
    """The initramfs-tools images with the stand-in, for the tests that run the image."""
    assert plugin == standin  # the tests below pick the stand-in (indirect parametrize)
    return built("initramfs-tools")


def test_plugin_at_the_token_path(images: Images) -> None:
    found = inside(images.root, f"{images.tokendir}/{PLUGIN}")
    assert found.is_file()
    assert found.stat().st_mode & 0o777 in {0o644, 0o755}
    if images.generator == "initramfs-tools":  # dracut strips what it installs
        assert found.read_bytes() == images.plugin.read_bytes()


def test_image_loader_resolves_every_library(images: Images) -> None:
    """The image's own ld.so lists the plugin's libraries, each found inside the image."""
    loader = interpreter(require_binary("cryptsetup", "apt-get install cryptsetup-bin"))
    assert inside(images.root, loader).is_file()
    result = run(["chroot", images.root, loader, "--list", f"{images.tokendir}/{PLUGIN}"])
    assert result.returncode == 0, result.stderr
    assert "not found" not in result.stdout
    for name in needed(images.plugin):
        line = next(x for x in result.stdout.splitlines() if x.strip().startswith(name))
        resolved = line.split("=>")[1].split("(")[0].strip()
        assert inside(images.root, resolved).is_file(), line


def test_no_python_and_nothing_else_of_ours(images: Images) -> None:
    python = {str(p.relative_to(images.root)) for p in images.root.rglob("*")
              if "python" in p.name.lower() or p.suffix in {".py", ".pyc"}}
    assert python == set()
    plugin = str(inside(images.root, f"{images.tokendir}/{PLUGIN}").relative_to(images.root))
    expected = {plugin}
    if images.generator == "initramfs-tools":
        expected |= {"scripts/local-top/keyhandoff", "scripts/local-premount/keyhandoff",
                     "scripts/local-bottom/keyhandoff"}
    else:  # the keep-typed and kexec-record units, enabled, and their scripts
        expected |= {"usr/lib/keyhandoff", f"usr/lib/systemd/system/{KEEP_TYPED}",
                     f"etc/systemd/system/initrd.target.wants/{KEEP_TYPED}",
                     f"usr/lib/systemd/system/{KEXEC_RECORD}",
                     f"etc/systemd/system/initrd.target.wants/{KEXEC_RECORD}"}
    assert files_named(images.root, "keyhandoff") == expected


def test_image_without_our_part_lacks_it(images: Images) -> None:
    assert not inside(images.bare, f"{images.tokendir}/{PLUGIN}").exists()
    assert files_named(images.bare, "keyhandoff") == set()
    assert images.with_ours.stat().st_size > images.without.stat().st_size


def test_dracut_image_has_what_tries_tokens(built: Callable[[str], Images]) -> None:
    """systemd-cryptsetup and its generator are in the image, and our module is listed."""
    images = built("dracut")
    for path in ("/usr/lib/systemd/systemd-cryptsetup",
                 "/usr/lib/systemd/system-generators/systemd-cryptsetup-generator"):
        assert inside(images.root, path).is_file(), path
    modules = inside(images.root, "/usr/lib/dracut/modules.txt").read_text().split()
    assert "keyhandoff" in modules
    assert "keyhandoff" not in inside(images.bare, "/usr/lib/dracut/modules.txt").read_text()


KEEP_TYPED = "keyhandoff-keep-typed.service"
KEXEC_RECORD = "keyhandoff-kexec-record.service"
DRACUT_MODULE = INITRAMFS / "dracut" / "90keyhandoff"
#: What a loaded kexec segment puts in the initramfs root, and where the initramfs moves it.
SEGMENT_RECORD = "keyhandoff/kexec-record"
MOVED_RECORD = "run/keyhandoff/kexec-record"


def _stage_segment_record(root: Path) -> bytes:
    """The kexec archive's entries as the kernel unpacks them: keyhandoff/ 0700, file 0400."""
    (root / "keyhandoff").mkdir(mode=0o700)
    record = b"KHST\x01\x04 a sealed record, as far as this step cares"
    (root / SEGMENT_RECORD).write_bytes(record)
    (root / SEGMENT_RECORD).chmod(0o400)
    (root / "run").mkdir(exist_ok=True)
    return record


def _check_moved(root: Path, record: bytes) -> None:
    moved = root / MOVED_RECORD
    try:
        assert moved.read_bytes() == record
        assert moved.stat().st_mode & 0o777 == 0o400
        assert (root / "run/keyhandoff").stat().st_mode & 0o777 == 0o700
        assert not (root / "keyhandoff").exists()  # nothing left in the initramfs root
    finally:
        shutil.rmtree(root / "run/keyhandoff", ignore_errors=True)
        shutil.rmtree(root / "keyhandoff", ignore_errors=True)


def test_dracut_image_moves_a_kexec_record_to_run_before_cryptsetup(
    built: Callable[[str], Images],
) -> None:
    """The kexec-record unit is enabled, ordered before cryptsetup-pre.target (which it
    pulls in), and runs only where the segment's file is; its script, run in the unpacked
    image with the image's own sh and mv, moves the file to /run/keyhandoff, root's only.
    The kexec itself is the VM's (tests/vm: the ``kexec`` scenario)."""
    images = built("dracut")
    unit = inside(images.root, f"/usr/lib/systemd/system/{KEXEC_RECORD}")
    assert unit.read_bytes() == (DRACUT_MODULE / KEXEC_RECORD).read_bytes()
    wants = images.root / "etc/systemd/system/initrd.target.wants" / KEXEC_RECORD
    assert inside(images.root, os.readlink(wants)).samefile(unit)
    lines = set(unit.read_text().splitlines())
    assert {"DefaultDependencies=no", "Wants=cryptsetup-pre.target",
            "Before=cryptsetup-pre.target", "ConditionPathExists=/keyhandoff/kexec-record",
            "ExecStart=/usr/lib/keyhandoff/kexec-record"} <= lines
    script = inside(images.root, "/usr/lib/keyhandoff/kexec-record")
    assert script.read_bytes() == (DRACUT_MODULE / "keyhandoff-kexec-record.sh").read_bytes()
    none = run(["chroot", images.root, "/usr/lib/keyhandoff/kexec-record"])
    assert (none.returncode, none.stdout + none.stderr) == (0, "")  # no record: nothing
    assert not (images.root / "run/keyhandoff").exists()
    record = _stage_segment_record(images.root)
    done = run(["chroot", images.root, "/usr/lib/keyhandoff/kexec-record"])
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    _check_moved(images.root, record)


def test_dracut_image_keeps_what_was_typed_until_the_switch(
    built: Callable[[str], Images],
) -> None:
    """The keep-typed unit is in the image, enabled for initrd.target, with keyctl.

    It runs the same script at start (after cryptsetup.target: the volumes are open) and at
    stop (the isolation to initrd-switch-root.target, ordered before the switch); the
    script, run in the unpacked image with the image's own sh and keyctl on this kernel's
    keyring, gives systemd's ``cryptsetup`` key the seconds it is given (150 by default).
    The boot itself is the VM's (tests/vm: the root scenarios' capture).
    """
    images = built("dracut")
    unit = inside(images.root, f"/usr/lib/systemd/system/{KEEP_TYPED}")
    assert unit.read_bytes() == (DRACUT_MODULE / KEEP_TYPED).read_bytes()
    wants = images.root / "etc/systemd/system/initrd.target.wants" / KEEP_TYPED
    # systemctl --root enable: a link to dracut's systemdsystemunitdir (/lib/... on Debian 12)
    assert inside(images.root, os.readlink(wants)).samefile(unit)
    lines = unit.read_text().splitlines()
    assert "ExecStart=/usr/lib/keyhandoff/keep-typed 150" in lines  # the volumes are open
    assert "ExecStop=/usr/lib/keyhandoff/keep-typed 300" in lines   # the switch
    assert {"RemainAfterExit=yes", "After=cryptsetup.target", "KeyringMode=shared",
            "Before=initrd-switch-root.target initrd-switch-root.service"} <= set(lines)
    script = inside(images.root, "/usr/lib/keyhandoff/keep-typed")
    assert script.read_bytes() == (DRACUT_MODULE / "keyhandoff-keep-typed.sh").read_bytes()
    assert inside(images.root, "/usr/bin/keyctl").is_file()
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    SystemdCache().clear()  # the one "cryptsetup" key the script finds
    added = run([keyctl, "padd", "user", "cryptsetup", "@u"], input="typed", check=True)
    serial = added.stdout.strip()

    def shown() -> str:  # the timeout /proc/keys shows: 120-179 s is "2m"
        return next(info.expiry for info in keyring.proc_keys({int(serial)}))

    try:
        # from 30 s each time; "x1" is not a number: nothing changes
        for args, after in (([], {"2m"}), (["150"], {"2m"}), (["300"], {"4m", "5m"}),
                            (["x1"], {"29s", "30s"})):
            run([keyctl, "timeout", serial, "30"], check=True)
            done = run(["chroot", images.root, "/usr/lib/keyhandoff/keep-typed", *args])
            assert (done.returncode, done.stdout + done.stderr) == (0, ""), args
            assert shown() in after, args
    finally:
        run([keyctl, "unlink", serial, "@u"])


def test_dracut_module_without_keyctl_installs_no_keep_typed_unit(tmp_path: Path) -> None:
    """No keyutils: the module installs the plugin and the kexec-record step, says why there
    is no keep-typed unit."""
    calls = tmp_path / "calls"
    shim = f"""
dinfo() {{ echo "dinfo $*" >> {calls}; }}
inst_libdir_file() {{ echo "inst_libdir_file $*" >> {calls}; }}
inst_multiple() {{ echo "inst_multiple $*" >> {calls}; }}
inst_script() {{ echo "inst_script $*" >> {calls}; }}
inst_simple() {{ echo "inst_simple $*" >> {calls}; }}
find_binary() {{ command -v "$1"; }}
SYSTEMCTL=false
source "$1"
install
"""
    script = DRACUT_MODULE / "module-setup.sh"
    done = run(["/bin/bash", "-c", shim, "sh", str(script)], env={"PATH": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    said = calls.read_text().splitlines()
    assert said[0] == "inst_libdir_file cryptsetup/libcryptsetup-token-keyhandoff-onetime.so"
    # the kexec-record step needs no keyctl: it always comes along
    assert said[1:4] == [
        "inst_multiple mkdir chmod mv rmdir",
        # $moddir and $systemdsystemunitdir are dracut's, unset in this shim
        "inst_script /keyhandoff-kexec-record.sh /usr/lib/keyhandoff/kexec-record",
        f"inst_simple /{KEXEC_RECORD} /{KEXEC_RECORD}",
    ], said
    assert len(said) == 5, said
    assert said[4].startswith("dinfo keyhandoff: no keyctl"), said


# --------------------------------------------------------------------------- running the image


@pytest.fixture
def volume(debian_images: Images, tmp_path: Path) -> Iterator[str]:
    """A LUKS2 image file in the unpacked image (path inside it) with our token for slot 0."""
    path = format_image(tmp_path / "volume.img", STANDIN_PASSPHRASE, pbkdf=FAST)
    cryptsetup("token", "import", str(path),
               stdin=f'{{"type":"{TOKEN_TYPE}","keyslots":["0"]}}'.encode())
    for root in (debian_images.root, debian_images.bare):
        shutil.copy2(path, root / "volume.img")
    yield "/volume.img"
    for root in (debian_images.root, debian_images.bare):
        (root / "volume.img").unlink()


def in_chroot(root: Path, argv: Sequence[str], *, mounts: str = "dev",
              trace: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``argv`` chrooted in ``root``, in a private mount namespace with /dev (and proc, sys).

    ``trace``: strace writes every execve of the chrooted processes there.
    """
    setup = f'mount --rbind /dev "{root}/dev"'
    if mounts == "all":
        setup += f' && mount -t proc proc "{root}/proc" && mount -t sysfs sysfs "{root}/sys"'
    for d in ("dev", "proc", "sys"):
        (root / d).mkdir(exist_ok=True)
    strace: list[str | Path] = []
    if trace is not None:
        binary = require_binary("strace", "apt-get install strace")
        strace = [binary, "-f", "-qq", "-s", "256", "-e", "trace=execve", "-o", trace]
    unshare = require_binary("unshare", "apt-get install util-linux")
    return run([unshare, "-m", "--propagation", "private", "sh", "-c",
                f'{setup} && exec "$@"', "sh", *strace, "chroot", root, *argv],
               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=120, input=stdin)


@STAND_IN_ONLY
def test_image_cryptsetup_opens_through_the_token(debian_images: Images, volume: str) -> None:
    """The image's cryptsetup and libcryptsetup load the plugin from the image and use it."""
    argv = ["/sbin/cryptsetup", "open", "--test-passphrase", "--token-only",
            "--token-type", TOKEN_TYPE, volume]
    opened = in_chroot(debian_images.root, argv)
    assert opened.returncode == 0, opened.stderr
    refused = in_chroot(debian_images.bare, [*argv[:1], "--debug", *argv[1:]])
    assert refused.returncode != 0
    assert f"Trying to load {debian_images.tokendir}/{PLUGIN}" in refused.stdout


@STAND_IN_ONLY
def test_image_cryptsetup_tries_tokens_even_with_a_key_file(
    debian_images: Images, volume: str,
) -> None:
    """cryptroot's own unlock (``--key-file=-`` fed by askpass) would take the token too.

    cryptsetup 2.6.1 tries tokens before the key file: a wrong passphrase on stdin still
    opens.  In cryptroot askpass is the other end of that pipe and prompts meanwhile, which is
    why the local-top script opens first, with ``--token-only`` and no prompt.
    """
    result = in_chroot(debian_images.root, [
        "/sbin/cryptsetup", "-T1", "--type=luks", "--key-file=-", "open", "--test-passphrase",
        volume], stdin="not the passphrase")
    assert result.returncode == 0, result.stderr
    refused = in_chroot(debian_images.bare, [
        "/sbin/cryptsetup", "-T1", "--type=luks", "--key-file=-", "open", "--test-passphrase",
        volume], stdin="not the passphrase")
    assert refused.returncode == 2  # cryptsetup: no key available with this passphrase


@STAND_IN_ONLY
def test_local_top_runs_before_cryptroot(debian_images: Images) -> None:
    order = (debian_images.root / "scripts/local-top/ORDER").read_text().splitlines()
    scripts = [line.split()[0] for line in order if line.startswith("/scripts/")]
    assert scripts.index("/scripts/local-top/keyhandoff") < scripts.index(
        "/scripts/local-top/cryptroot")


def write_crypttab(root: Path, line: str) -> None:
    tab = root / "cryptroot" / "crypttab"
    tab.parent.mkdir(exist_ok=True)
    tab.write_text(line)


def cryptsetup_runs(trace: Path) -> list[str]:
    """The argument lists of every cryptsetup the traced processes started."""
    return [line.split("[", 1)[1].split("]", 1)[0] for line in trace.read_text().splitlines()
            if 'execve("/sbin/cryptsetup"' in line and "= 0" in line]


@STAND_IN_ONLY
def test_local_top_asks_the_token_for_each_luks_entry(
    debian_images: Images, volume: str, tmp_path: Path,
) -> None:
    """The script, in the image's own shell, asks our token (only) for a LUKS crypttab entry.

    Activation needs device-mapper, which this host's kernel lacks (libcryptsetup then stops
    before it asks the token): what is checked here is the cryptsetup the script starts, and
    that its failure leaves the entry to cryptroot (exit 0, nothing printed).  The VM
    scenarios open the root volume for real.
    """
    root = debian_images.root
    write_crypttab(root, f"khtest {volume} none luks,discard\n")
    trace = tmp_path / "luks.trace"
    result = in_chroot(root, ["/scripts/local-top/keyhandoff"], mounts="all", trace=trace)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    expected = (f'"/sbin/cryptsetup", "--token-only", "--token-type={TOKEN_TYPE}", '
                f'"--allow-discards", "open", "--", "{volume}", "khtest"')
    assert cryptsetup_runs(trace) == [expected]
    # an entry that is not LUKS, and an empty crypttab, never reach cryptsetup
    for n, line in enumerate((f"plain {volume} none plain,cipher=aes-xts-plain64,size=512\n",
                              "")):
        write_crypttab(root, line)
        trace = tmp_path / f"other{n}.trace"
        result = in_chroot(root, ["/scripts/local-top/keyhandoff"], mounts="all", trace=trace)
        assert result.returncode == 0, result.stderr
        assert cryptsetup_runs(trace) == [], line


@STAND_IN_ONLY
def test_local_top_moves_a_kexec_record_to_run_first(debian_images: Images) -> None:
    """With no crypttab at all (a data volume only, opened in the real root) the script
    still moves the record the kexec segment carried, before anything else, in the image's
    own shell."""
    root = debian_images.root
    write_crypttab(root, "")
    record = _stage_segment_record(root)
    result = in_chroot(root, ["/scripts/local-top/keyhandoff"], mounts="all")
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    _check_moved(root, record)


@pytest.mark.parametrize(("own_module", "expected"), [
    (False, "crypt systemd"),                      # dracut 059 (Debian 12): in 90crypt
    (True, "crypt systemd systemd-cryptsetup"),    # dracut 102+ (Debian 13's 106): its own
])
def test_dracut_module_depends_on_what_runs_the_plugin(
    tmp_path: Path, own_module: bool, expected: str,  # parametrized
) -> None:
    (tmp_path / "modules.d").mkdir()
    if own_module:
        (tmp_path / "modules.d" / "01systemd-cryptsetup").mkdir()
    script = REPO / "initramfs" / "dracut" / "90keyhandoff" / "module-setup.sh"
    proc = subprocess.run(["bash", "-c", 'dracutbasedir="$1"; source "$2"; depends', "sh",
                           str(tmp_path), str(script)],
                          capture_output=True, text=True, check=True, timeout=30)
    assert proc.stdout.split() == expected.split()
