"""The man pages, the bash completion and the shipped config cannot go stale.

keyhandoff(8) names every subcommand of the parser and, in that subcommand's section, every
one of its options; keyhandoff.conf(5) names every setting of keyhandoff/config.py in its
section; pam_keyhandoff(8) names every argument csrc/pam_keyhandoff.c accepts; the bash
completion offers every subcommand and option; units/keyhandoff.conf (the vendor file) writes
out every setting with its real default.  The pages pass groff's warnings and mandoc's lint.
Each check is also shown failing on a page with one name taken out.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from support.parts import require_binary

from keyhandoff import cli, config

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"
PAGES = sorted(MAN.glob("*.[1-8]"))
COMPLETION = REPO / "completion" / "keyhandoff.bash"


def commands() -> dict[str, list[str]]:
    """Every command path of the parser ("", "status", "cache put", ...) -> its options."""
    found: dict[str, list[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        found[path] = [s for a in parser._actions for s in a.option_strings
                       if s.startswith("--")]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())

    walk(cli.build_parser(), "")
    return found


def leaves() -> dict[str, list[str]]:
    """The commands a person runs (not "" or "cache", which only lead to others)."""
    paths = commands()
    return {p: o for p, o in paths.items()
            if p and not any(q.startswith(p + " ") for q in paths)}


def roff_text(page: Path) -> str:
    r"""The page's source without comments, with roff's \- as a plain hyphen."""
    lines = [ln for ln in page.read_text().splitlines() if not ln.startswith('.\\"')]
    return "\n".join(lines).replace("\\-", "-").replace("\\&", "")


def sections(text: str, macro: str) -> dict[str, str]:
    """Heading -> body for each ``.SS`` (or ``.SH``) of a page."""
    parts = re.split(rf"^\{macro} +(.*)$", text, flags=re.MULTILINE)
    return {parts[i].strip('"'): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def missing_from_keyhandoff8(text: str) -> list[str]:
    """What keyhandoff(8) lacks: a command without its section, an option not in it."""
    subsections = sections(text, ".SS")
    problems = []
    for path, options in leaves().items():
        body = next((b for h, b in subsections.items()
                     if h == path or h.startswith(path + " ")), None)
        if body is None:
            problems.append(f"no section for {path!r}")
            continue
        # --help of every command is described once, under OPTIONS
        problems += [f"{path} {o}" for o in options if o != "--help" and o not in body]
    problems += [o for o in commands()[""] if o not in sections(text, ".SH").get("OPTIONS", "")]
    return problems


def test_keyhandoff8_names_every_command_and_option():
    assert missing_from_keyhandoff8(roff_text(MAN / "keyhandoff.8")) == []


def test_the_keyhandoff8_check_sees_a_missing_option():
    text = roff_text(MAN / "keyhandoff.8").replace("--if-armed", "--if-set")
    assert missing_from_keyhandoff8(text) == ["rearm --if-armed"]
    text = roff_text(MAN / "keyhandoff.8").replace('.SS "capture-initrd', '.SS "capture')
    assert missing_from_keyhandoff8(text) == ["no section for 'capture-initrd'"]


def missing_from_conf5(text: str) -> list[str]:
    subsections = sections(text, ".SS")
    return [f"{section}.{key}" for section, key in config._SCHEMA
            if f"{key}=" not in subsections.get(f"[{section}]", "")]


def test_keyhandoff_conf5_names_every_setting_in_its_section():
    assert len(config._SCHEMA) >= 5
    assert missing_from_conf5(roff_text(MAN / "keyhandoff.conf.5")) == []


def test_the_conf5_check_sees_a_missing_setting():
    text = roff_text(MAN / "keyhandoff.conf.5").replace("retain=", "keep=")
    assert missing_from_conf5(text) == ["capture.retain"]


def pam_arguments() -> set[str]:
    """The arguments kh_parse_options accepts, read from the C source."""
    source = (REPO / "csrc" / "pam_keyhandoff.c").read_text()
    return set(re.findall(r'strn?cmp\(argv\[i\], "([^"]+)"', source))


def test_pam_keyhandoff8_names_every_module_argument():
    arguments = pam_arguments()
    assert arguments == {"keep", "keyname="}  # the parse found them (and nothing new unseen)
    options = sections(roff_text(MAN / "pam_keyhandoff.8"), ".SH")["OPTIONS"]
    unlisted = [a for a in sorted(arguments)
                if not re.search(rf"^\.BI? {a}", options, re.MULTILINE)]
    assert unlisted == []


def completion_table(script: str) -> dict[str, set[str]]:
    """Command path -> the options the completion offers for it."""
    table: dict[str, set[str]] = {}
    top = re.search(r'^ +local commands="([^"]*)"', script, re.MULTILINE)
    cache = re.search(r'^ +local cache_commands="([^"]*)"', script, re.MULTILINE)
    assert top is not None
    assert cache is not None
    table["<commands>"] = set(top.group(1).split())
    table["<cache commands>"] = set(cache.group(1).split())
    prefix = ""
    for line in script.splitlines():
        if re.match(r"^ {8}cache\)$", line):
            prefix = "cache "
        elif re.match(r"^ {8}\S", line):
            prefix = ""
        m = re.match(r'^ +([a-z-]+)\) opts="([^"]*)"', line)
        if m:
            table[prefix + m.group(1)] = set(m.group(2).split())
    return table


def missing_from_completion(script: str) -> list[str]:
    table = completion_table(script)
    paths = commands()
    problems = [f"command {c}" for c in sorted(
        {p.split()[0] for p in paths if p} - table["<commands>"])]
    problems += [f"command cache {c}" for c in sorted(
        {p.split()[1] for p in paths if p.startswith("cache ")} - table["<cache commands>"])]
    for path, options in leaves().items():
        problems += [f"{path} {o}" for o in options if o not in table.get(path, set())]
    return problems


def test_the_completion_offers_every_command_and_option():
    assert missing_from_completion(COMPLETION.read_text()) == []


def test_the_completion_check_sees_a_missing_option():
    script = COMPLETION.read_text().replace("--no-ask ", "")
    assert missing_from_completion(script) == ["arm --no-ask"]


def complete(*words: str) -> list[str]:
    """What bash offers after ``words`` (the last one is being typed), from the script."""
    bash = require_binary("bash", "apt-get install bash")
    quoted = " ".join(f"'{w}'" for w in words)
    probe = (f"source {COMPLETION}\nCOMP_WORDS=({quoted})\n"
             "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n_keyhandoff\n"
             'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", probe], capture_output=True,
                          text=True, check=True, timeout=30)
    return proc.stdout.split()


def test_bash_completes_commands_options_and_values():
    # in the parser's order
    assert complete("keyhandoff", "") == [p for p in commands() if p and " " not in p]
    assert complete("keyhandoff", "ca") == ["cache", "capture-initrd"]
    assert complete("keyhandoff", "cache", "") == ["put", "list", "forget"]
    assert complete("keyhandoff", "cache", "put", "--") == ["--help", "--volume", "--timeout"]
    assert complete("keyhandoff", "arm", "--reboot", "") == ["soft", "full", "kexec"]
    assert complete("keyhandoff", "rearm", "--if") == ["--if-armed"]
    assert complete("keyhandoff", "--v") == ["--version"]
    assert complete("keyhandoff", "agent", "--config", str(REPO / "units" / "keyhandoff.co")) \
        == [str(REPO / "units" / "keyhandoff.conf")]


def commented_settings(text: str) -> list[str]:
    """The ``#key = value`` lines of units/keyhandoff.conf (a vendor file writes them out)."""
    return re.findall(r"^#\s*(\w+\s*=.*)$", text, flags=re.MULTILINE)


def test_the_vendor_config_writes_out_every_setting_with_its_default():
    text = (REPO / "units" / "keyhandoff.conf").read_text()
    live = tomllib.loads(text)
    assert {(s, k) for s, table in live.items() for k in table} == set(config._SCHEMA)
    assert config.parse(live) == config.Config()
    assert commented_settings(text) == []


def test_the_config_check_sees_a_wrong_or_commented_default():
    text = (REPO / "units" / "keyhandoff.conf").read_text()
    assert config.parse(tomllib.loads(text.replace("retain = 600", "retain = 60"))) \
        != config.Config()
    assert commented_settings(text.replace("retain = 600", "#retain = 600")) == ["retain = 600"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_has_no_warning(page):
    man = require_binary("man", "apt-get install man-db groff-base")
    proc = subprocess.run([man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                          capture_output=True, text=True, check=False, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80"})
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout  # groff's intermediate output: the page was formatted


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_is_clean(page):
    mandoc = require_binary("mandoc", "apt-get install mandoc")
    proc = subprocess.run([mandoc, "-T", "lint", str(page)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_the_lint_sees_a_broken_page(tmp_path):
    mandoc = require_binary("mandoc", "apt-get install mandoc")
    broken = tmp_path / "broken.8"
    broken.write_text((MAN / "keyhandoff.8").read_text().replace(".SH NAME\n", ".SH NAME\n.XX\n"))
    proc = subprocess.run([mandoc, "-T", "lint", str(broken)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode != 0
    assert "XX" in proc.stdout + proc.stderr


def test_every_page_is_installed_by_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    assert [p.name for p in PAGES] == ["keyhandoff.8", "keyhandoff.conf.5", "pam_keyhandoff.8"]
    assert [p.name for p in PAGES if f"man/{p.name} " not in makefile] == []
