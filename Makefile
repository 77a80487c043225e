# keyhandoff: the two entry points the README promises, on a fresh Debian 12 machine as root.
#   make demo   the end-to-end demonstration: offline updates with automatic login in a UEFI VM
#   make test   lint, type checks and the whole test suite (including the UEFI VM tests), then
#               the unit and integration suites again on Debian's own Python stack
PY := .venv/bin/python
# `make` alone builds (what dh_auto_build and a packager's `make` expect); it installs nothing
# on the host, unlike `make setup`.
.DEFAULT_GOAL := all
LOG := build/test-output.log
DEBIAN_LOG := build/test-output-debian-stack.log

.PHONY: setup setup-vm lint test debian-stack demo all dist pam token install install-python \
	install-units install-config install-pam install-token install-initramfs install-man \
	install-completion install-doc clean

setup:
	scripts/setup-host

setup-vm:
	scripts/setup-host --vm

lint: setup
	$(PY) -m ruff check keyhandoff tests bench cffi_build fuzz
	$(PY) -m mypy

# The UEFI VM tests run on VM_WORKERS pytest-xdist workers, one QEMU each: a guest is one
# single-threaded TCG process (tests/vm/machine.py), so two of them use both cores for the
# 40-odd minutes the VM suite takes in a row.  VM_WORKERS=0 runs them in this process.
VM_WORKERS ?= 2

test: setup-vm lint
	mkdir -p build
	bash -o pipefail -c "$(PY) -m pytest -m 'not vm' $(PYTEST_ARGS) 2>&1 | tee $(LOG)"
	bash -o pipefail -c "$(PY) -m pytest -m vm -n $(VM_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS) tests/vm 2>&1 | tee -a $(LOG)"
	scripts/scan-leaks $(LOG)
	$(MAKE) --no-print-directory debian-stack

# The unit and integration suites on /usr/bin/python3 with Debian's python3-cryptography,
# -cffi, -pyudev, -systemd, -pytest, -hypothesis: no venv, no pip package (issue 10).
debian-stack: setup
	mkdir -p build
	bash -o pipefail -c "scripts/debian-stack-test 2>&1 | tee $(DEBIAN_LOG)"
	scripts/scan-leaks $(DEBIAN_LOG)

demo: setup-vm
	$(PY) -m tests.vm.demo

# ---- the build and the install (a plain Makefile: one file, no generator; DESTDIR honoured) --
#   make                                the sdist, a wheel built from it, the PAM module, the plugin
#   make install DESTDIR=<root> PREFIX=/usr
# Debian 12's own tools only: python3-build, -setuptools, -wheel, -cffi, -installer, cc.
# Every directory can be overridden on the command line (make install PAMDIR=/lib/...).
PREFIX ?= /usr
# Debian's interpreter, not whatever python3 comes first on PATH (pyenv, a venv): the console
# script's #! line and the bindings' ABI are taken from it.
PYTHON ?= /usr/bin/python3
BUILDDIR ?= build
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' keyhandoff/__init__.py)
MULTIARCH ?= $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null)
# Debian: /usr/lib/<triplet>/security.  Without a triplet (Fedora), PAM's own libdir.
PAMDIR ?= $(if $(MULTIARCH),$(PREFIX)/lib/$(MULTIARCH),$(shell pkg-config --variable=libdir pam 2>/dev/null || echo $(PREFIX)/lib))/security
# Where this systemd reads units and presets (Debian 12's systemd.pc says /lib/systemd/...;
# merged /usr makes that /usr/lib/systemd/...).
SYSTEMDUNITDIR ?= $(or $(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null),/usr/lib/systemd/system)
SYSTEMDPRESETDIR ?= $(or $(shell pkg-config --variable=systemdsystempresetdir systemd 2>/dev/null),/usr/lib/systemd/system-preset)
BASHCOMPLETIONDIR ?= $(or $(shell pkg-config --variable=completionsdir bash-completion 2>/dev/null),$(PREFIX)/share/bash-completion/completions)
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/keyhandoff
# Where python3-installer puts the package.  With --prefix=/usr, Debian's sysconfig picks its
# "posix_local" scheme: /usr/local/lib/python3.11/dist-packages and /usr/local/bin, which is
# not where Debian's packages live nor where the units call /usr/bin/keyhandoff.  Debian's
# own scheme for /usr is "deb_system" (/usr/lib/python3/dist-packages, /usr/bin), chosen by
# DEB_PYTHON_INSTALL_LAYOUT=deb_system, as pybuild does; other distributions ignore the
# variable and their default scheme under /usr is already theirs (Fedora:
# /usr/lib64/python3.X/site-packages, /usr/bin).  Any other PREFIX keeps the default scheme.
PY_LAYOUT := $(if $(filter /usr,$(PREFIX)),deb_system,posix_local)
# a package build passes --no-compile-bytecode (py3compile / brp-python-bytecompile do it)
PY_INSTALL_FLAGS ?=
WHEEL = $(BUILDDIR)/dist/keyhandoff-$(VERSION)-*.whl

all: dist pam token

# `python3 -m build` without --sdist/--wheel: the sdist, then a wheel built from the unpacked
# sdist, so every install proves the sdist complete.  --no-isolation: Debian's setuptools 66,
# wheel and cffi, no download.
dist: $(BUILDDIR)/dist/.stamp
# (rebuilt when any file the sdist carries changes)
SDIST_INPUTS := $(shell find keyhandoff cffi_build csrc units initramfs man completion scripts \
	tests fuzz bench rpm -type f ! -name '*.py[co]' ! -name '*.so' ! -name '*.o' 2>/dev/null) \
	$(shell find debian -type f ! -path 'debian/tmp/*' ! -path 'debian/.debhelper/*' \
	! -path 'debian/*keyhandoff/*' ! -name '*.substvars' ! -name '*.debhelper*' \
	! -name files ! -name debhelper-build-stamp 2>/dev/null)
$(BUILDDIR)/dist/.stamp: pyproject.toml setup.py MANIFEST.in README.md SECURITY.md CHANGELOG.md \
		LICENSE COPYRIGHT Makefile $(SDIST_INPUTS)
	rm -rf $(BUILDDIR)/dist
	$(PYTHON) -m build --no-isolation --outdir $(BUILDDIR)/dist .
	touch $@

# pam_keyhandoff.so (plain C, csrc/): needs cc, libpam0g-dev and libkeyutils-dev only.
pam:
	csrc/build-pam $(BUILDDIR)

# libcryptsetup-token-keyhandoff-onetime.so (plain C, csrc/), the LUKS2 token plugin for the
# initramfs: needs cc, libcryptsetup-dev, libssl-dev and libjson-c-dev only.
token:
	csrc/build-token $(BUILDDIR)

install: install-python install-units install-config install-pam install-token \
	install-initramfs install-man install-completion install-doc

install-python: dist
	DEB_PYTHON_INSTALL_LAYOUT=$(PY_LAYOUT) $(PYTHON) -m installer --destdir=$(DESTDIR)/ \
		--prefix=$(PREFIX) $(PY_INSTALL_FLAGS) $(WHEEL)

# Every unit in units/ (globs: a new .service, .path, .timer or .socket is installed without
# an edit here), the prefix drop-in keyhandoff-.service.d/, the drop-ins for other packages'
# units (units/dropins/<unit>.d-<name>.conf -> <unit>.d/<name>.conf: a no-op where that
# unit is not installed) and the preset, which enables each unit by name.
install-units:
	install -d -m 0755 $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSTEMDPRESETDIR)
	install -m 0644 $(wildcard units/*.service units/*.path units/*.timer units/*.socket) \
		$(DESTDIR)$(SYSTEMDUNITDIR)/
	for d in units/*.d; do \
		install -d -m 0755 $(DESTDIR)$(SYSTEMDUNITDIR)/$${d#units/} && \
		install -m 0644 $$d/*.conf $(DESTDIR)$(SYSTEMDUNITDIR)/$${d#units/}/ || exit 1; \
	done
	for f in units/dropins/*.conf; do \
		b=$${f#units/dropins/}; \
		install -D -m 0644 $$f $(DESTDIR)$(SYSTEMDUNITDIR)/$${b%%.d-*}.d/$${b#*.d-} || exit 1; \
	done
	install -m 0644 units/80-keyhandoff.preset $(DESTDIR)$(SYSTEMDPRESETDIR)/

# The vendor defaults, every setting written out, in /usr/lib/keyhandoff (the path
# keyhandoff/config.py reads, whatever PREFIX is).  Nothing goes to /etc: the
# administrator's /etc/keyhandoff/keyhandoff.conf and keyhandoff.conf.d/*.conf drop-ins
# are theirs alone (keyhandoff.conf(5)); no package prompts about a file nobody edited.
VENDORCONFDIR ?= /usr/lib/keyhandoff
install-config:
	install -D -m 0644 units/keyhandoff.conf $(DESTDIR)$(VENDORCONFDIR)/keyhandoff.conf

install-pam: pam
	install -D -m 0644 $(BUILDDIR)/pam_keyhandoff.so $(DESTDIR)$(PAMDIR)/pam_keyhandoff.so

install-man:
	install -D -m 0644 man/keyhandoff.8 $(DESTDIR)$(MANDIR)/man8/keyhandoff.8
	install -D -m 0644 man/pam_keyhandoff.8 $(DESTDIR)$(MANDIR)/man8/pam_keyhandoff.8
	install -D -m 0644 man/keyhandoff.conf.5 $(DESTDIR)$(MANDIR)/man5/keyhandoff.conf.5

install-completion:
	install -D -m 0644 completion/keyhandoff.bash $(DESTDIR)$(BASHCOMPLETIONDIR)/keyhandoff

# The PAM lines are for other packages' stacks (the admin adds them to the display manager's
# autologin file): examples, not files of ours under /etc/pam.d.
install-doc:
	install -d -m 0755 $(DESTDIR)$(DOCDIR)/examples/pam
	install -m 0644 README.md SECURITY.md CHANGELOG.md LICENSE COPYRIGHT $(DESTDIR)$(DOCDIR)/
	install -m 0644 initramfs/README.md $(DESTDIR)$(DOCDIR)/README.initramfs.md
	install -m 0644 units/pam/* $(DESTDIR)$(DOCDIR)/examples/pam/

# The LUKS2 token plugin into libcryptsetup's token directory (the path compiled into
# libcryptsetup, as `cryptsetup --help` prints it), and the initramfs parts (initramfs/):
# the dracut module and the initramfs-tools hook and local-top script.  Both honour DESTDIR;
# regenerate the initramfs afterwards (update-initramfs -u, or dracut --force).
TOKENDIR ?= $(shell LC_ALL=C cryptsetup --help 2>/dev/null | \
	sed -n 's/^LUKS2 external token plugin path: \(.*\)\.$$/\1/p')
DRACUTMODULESDIR ?= /usr/lib/dracut/modules.d
INITRAMFSTOOLSDIR ?= /usr/share/initramfs-tools

install-token:
	@test -n "$(TOKENDIR)" || { echo "cryptsetup has no external token plugin path" >&2; exit 1; }
	csrc/build-token $(BUILDDIR)
	install -D -m 0644 $(BUILDDIR)/libcryptsetup-token-keyhandoff-onetime.so \
		$(DESTDIR)$(TOKENDIR)/libcryptsetup-token-keyhandoff-onetime.so

install-initramfs:
	install -D -m 0755 initramfs/dracut/90keyhandoff/module-setup.sh \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/module-setup.sh
	install -D -m 0755 initramfs/dracut/90keyhandoff/keyhandoff-keep-typed.sh \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/keyhandoff-keep-typed.sh
	install -D -m 0644 initramfs/dracut/90keyhandoff/keyhandoff-keep-typed.service \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/keyhandoff-keep-typed.service
	install -D -m 0755 initramfs/dracut/90keyhandoff/keyhandoff-kexec-record.sh \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/keyhandoff-kexec-record.sh
	install -D -m 0644 initramfs/dracut/90keyhandoff/keyhandoff-kexec-record.service \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/keyhandoff-kexec-record.service
	install -D -m 0755 initramfs/initramfs-tools/hooks/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/hooks/keyhandoff
	install -D -m 0755 initramfs/initramfs-tools/scripts/local-top/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/scripts/local-top/keyhandoff
	install -D -m 0755 initramfs/initramfs-tools/scripts/local-premount/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/scripts/local-premount/keyhandoff
	install -D -m 0755 initramfs/initramfs-tools/scripts/local-bottom/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/scripts/local-bottom/keyhandoff

clean:
	rm -rf build dist keyhandoff.egg-info .venv keyhandoff/_bindings/*.so keyhandoff/_bindings/*.c
