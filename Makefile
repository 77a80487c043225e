# keyhandoff: the two entry points the README promises, on a fresh Debian 12 machine as root.
#   make demo   the end-to-end demonstration: offline updates with automatic login in a UEFI VM
#   make test   lint, type checks and the whole test suite (including the UEFI VM tests), then
#               the unit and integration suites again on Debian's own Python stack
PY := .venv/bin/python
LOG := build/test-output.log
DEBIAN_LOG := build/test-output-debian-stack.log

.PHONY: setup setup-vm lint test debian-stack demo pam token install-token install-initramfs clean

setup:
	scripts/setup-host

setup-vm:
	scripts/setup-host --vm

lint: setup
	$(PY) -m ruff check keyhandoff tests bench cffi_build fuzz
	$(PY) -m mypy

test: setup-vm lint
	mkdir -p build
	bash -o pipefail -c "$(PY) -m pytest $(PYTEST_ARGS) 2>&1 | tee $(LOG)"
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

# pam_keyhandoff.so (plain C, csrc/): needs cc, libpam0g-dev and libkeyutils-dev only.
pam:
	csrc/build-pam build

# libcryptsetup-token-keyhandoff-onetime.so (plain C, csrc/), the LUKS2 token plugin for the
# initramfs: needs cc, libcryptsetup-dev, libssl-dev and libjson-c-dev only.
token:
	csrc/build-token build

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
	csrc/build-token build
	install -D -m 0644 build/libcryptsetup-token-keyhandoff-onetime.so \
		$(DESTDIR)$(TOKENDIR)/libcryptsetup-token-keyhandoff-onetime.so

install-initramfs:
	install -D -m 0755 initramfs/dracut/90keyhandoff/module-setup.sh \
		$(DESTDIR)$(DRACUTMODULESDIR)/90keyhandoff/module-setup.sh
	install -D -m 0755 initramfs/initramfs-tools/hooks/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/hooks/keyhandoff
	install -D -m 0755 initramfs/initramfs-tools/scripts/local-top/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/scripts/local-top/keyhandoff
	install -D -m 0755 initramfs/initramfs-tools/scripts/local-bottom/keyhandoff \
		$(DESTDIR)$(INITRAMFSTOOLSDIR)/scripts/local-bottom/keyhandoff

clean:
	rm -rf build .venv keyhandoff/_bindings/*.so keyhandoff/_bindings/*.c
