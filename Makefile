# keyhandoff: the two entry points the README promises, on a fresh Debian 12 machine as root.
#   make demo   the end-to-end demonstration: offline updates with automatic login in a UEFI VM
#   make test   lint, type checks and the whole test suite (including the UEFI VM tests), then
#               the unit and integration suites again on Debian's own Python stack
PY := .venv/bin/python
LOG := build/test-output.log
DEBIAN_LOG := build/test-output-debian-stack.log

.PHONY: setup setup-vm lint test debian-stack demo pam token clean

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

clean:
	rm -rf build .venv keyhandoff/_bindings/*.so keyhandoff/_bindings/*.c
