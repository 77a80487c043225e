"""keyhandoff.askpass, .cescape, .reply: the pure protocol (ask files, Ids, C escapes, datagrams).

The I/O edge (read_ask_file, list_ask_files) is tested here on a private directory; the
socket checks of send_reply and the real systemd querier are in tests/integration.
"""

from __future__ import annotations

import inspect
import os
import re
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.passphrases import make

from keyhandoff import askpass, reply
from keyhandoff import cescape as cescape_module
from keyhandoff.askpass import (
    MAX_ASK_FILE,
    AskRequest,
    CryptsetupPrompt,
    HostileAskFile,
    InvalidEscape,
    NoIdPrompt,
    OtherPrompt,
    VerificationPrompt,
    classify_id,
    list_ask_files,
    parse_ask_file,
    read_ask_file,
)
from keyhandoff.cescape import cescape, cunescape
from keyhandoff.errors import KeyhandoffError
from keyhandoff.reply import cancel_datagram, reply_datagram
from keyhandoff.secret import Secret, SecretError

SOCK = "/run/systemd/ask-password/sck.a40583849376d20"

# What systemd 252 writes (ask_password_agent's fprintf order).
SYSTEMD_FILE = (
    b"[Ask]\n"
    b"PID=12091\n"
    b"Socket=" + SOCK.encode() + b"\n"
    b"AcceptCached=1\n"
    b"Echo=0\n"
    b"NotAfter=1381672946\n"
    b"Silent=0\n"
    b"Message=Please enter passphrase for disk foo:\n"
    b"Icon=drive-harddisk\n"
    b"Id=cryptsetup:/dev/disk/by-uuid/1234\n"
)
MINIMAL = b"[Ask]\nPID=7\nSocket=" + SOCK.encode() + b"\n"


def with_lines(*lines: bytes, base: bytes = MINIMAL) -> bytes:
    return base + b"".join(line + b"\n" for line in lines)


# --- accepted files ------------------------------------------------------------------------


def test_systemd_file_parses_to_every_field():
    request = parse_ask_file(SYSTEMD_FILE)
    assert request == AskRequest(
        socket=SOCK,
        pid=12091,
        not_after=1381672946,
        accept_cached=True,
        echo=False,
        silent=False,
        message="Please enter passphrase for disk foo:",
        icon="drive-harddisk",
        id="cryptsetup:/dev/disk/by-uuid/1234",
    )
    assert request.prompt == CryptsetupPrompt("/dev/disk/by-uuid/1234")


def test_minimal_file_gets_systemd_defaults():
    request = parse_ask_file(MINIMAL)
    assert (request.not_after, request.accept_cached, request.echo, request.silent) == (
        0,
        False,
        False,
        False,
    )
    assert (request.message, request.icon, request.id) == (None, None, None)
    assert request.prompt == NoIdPrompt()


def test_last_line_without_newline_is_accepted():
    assert parse_ask_file(SYSTEMD_FILE.rstrip(b"\n")).id == "cryptsetup:/dev/disk/by-uuid/1234"


def test_comments_blank_lines_and_unknown_keys_are_ignored():
    data = with_lines(
        b"",
        b"# Socket=/evil/sck.1",
        b"; PID=1",
        b"#",
        b"FutureKey=whatever",
        b"socket=/lowercase/is/another/key",
        b"Message=hello",
    )
    request = parse_ask_file(data)
    assert request.socket == SOCK
    assert request.pid == 7
    assert request.message == "hello"


def test_value_splits_at_first_equals_and_keeps_spaces():
    request = parse_ask_file(with_lines(b"Message= a=b = c ", b"Icon=x=y"))
    assert request.message == " a=b = c "
    assert request.icon == "x=y"


@pytest.mark.parametrize(
    "separator", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_only_newline_ends_a_line(separator):
    # str.splitlines() would break here and turn the tail into a second Socket=.
    message = f"Message=a{separator}Socket=/evil/sck.1".encode()
    request = parse_ask_file(with_lines(message))
    assert request.socket == SOCK
    assert request.message == f"a{separator}Socket=/evil/sck.1"


def test_trailing_backslash_does_not_join_lines():
    request = parse_ask_file(with_lines(b"Message=ends in \\", b"Icon=drive-harddisk"))
    assert request.message == "ends in \\"
    assert request.icon == "drive-harddisk"


def test_file_of_exactly_the_cap_is_accepted():
    padding = MAX_ASK_FILE - len(MINIMAL) - 1
    data = MINIMAL + b"#" + b"x" * (padding - 1) + b"\n"
    assert len(data) == MAX_ASK_FILE
    assert parse_ask_file(data).pid == 7


@pytest.mark.parametrize(
    ("spelling", "value"),
    [
        *[(s, True) for s in ["1", "yes", "YES", "Yes", "y", "Y", "true", "TRUE", "t", "T", "on"]],
        *[(s, True) for s in ["On", "oN", "ON"]],
        *[(s, False) for s in ["0", "no", "NO", "n", "N", "false", "False", "f", "F", "off"]],
        *[(s, False) for s in ["Off", "OFF"]],
    ],
)
@pytest.mark.parametrize("key", ["AcceptCached", "Echo", "Silent"])
def test_booleans_follow_systemd_parse_boolean(key, spelling, value):
    request = parse_ask_file(with_lines(f"{key}={spelling}".encode()))
    attribute = {"AcceptCached": "accept_cached", "Echo": "echo", "Silent": "silent"}[key]
    assert getattr(request, attribute) is value


@pytest.mark.parametrize("pid", ["1", "4194304", "0012"])
def test_pid_in_range_is_accepted(pid):
    data = b"[Ask]\nPID=" + pid.encode() + b"\nSocket=" + SOCK.encode() + b"\n"
    assert parse_ask_file(data).pid == int(pid)


@pytest.mark.parametrize("not_after", ["0", "1", str(2**64 - 1)])
def test_not_after_is_a_u64(not_after):
    assert parse_ask_file(with_lines(b"NotAfter=" + not_after.encode())).not_after == int(not_after)


def test_v257_double_slash_socket_is_kept_as_given():
    data = b"[Ask]\nPID=7\nSocket=//run/systemd/ask-password//sck.1\n"
    assert parse_ask_file(data).socket == "//run/systemd/ask-password//sck.1"


# --- refused files -------------------------------------------------------------------------

HOSTILE = {
    # newline injection through an unescaped value: every injected known key is a duplicate
    "injected second Socket": (with_lines(b"Message=hi", b"Socket=/evil/sck.1"), "Socket="),
    "duplicate Socket first": (with_lines(b"Socket=/evil/sck.1"), "Socket="),
    "duplicate PID": (with_lines(b"PID=8"), "PID="),
    "duplicate Id": (with_lines(b"Id=cryptsetup:/a", b"Id=cryptsetup:/b"), "Id="),
    "duplicate NotAfter": (with_lines(b"NotAfter=0", b"NotAfter=0"), "NotAfter="),
    "duplicate unknown key": (with_lines(b"Foo=1", b"Foo=1"), "duplicated"),
    "NUL": (with_lines(b"Message=a\x00b"), "NUL"),
    "NUL ending the Socket": (b"[Ask]\nPID=7\nSocket=/run/x/sck.1\x00/evil\n", "NUL"),
    "CR": (with_lines(b"Message=a\rSocket=/evil/sck.1"), "carriage return"),
    "CRLF endings": (MINIMAL.replace(b"\n", b"\r\n"), "carriage return"),
    "invalid UTF-8": (with_lines(b"Message=\xff\xfe"), "UTF-8"),
    "overlong UTF-8 slash": (with_lines(b"Message=\xc0\xaf"), "UTF-8"),
    "UTF-8 surrogate": (with_lines(b"Message=\xed\xa0\x80"), "UTF-8"),
    "oversized": (MINIMAL + b"#" * MAX_ASK_FILE, "larger"),
    "empty file": (b"", "[Ask]"),
    "no section": (b"PID=7\nSocket=" + SOCK.encode() + b"\n", "[Ask]"),
    "comment before section": (b"# hi\n" + MINIMAL, "[Ask]"),
    "lower-case section": (MINIMAL.replace(b"[Ask]", b"[ask]"), "[Ask]"),
    "section with space": (MINIMAL.replace(b"[Ask]", b"[Ask] "), "[Ask]"),
    "BOM before section": (b"\xef\xbb\xbf" + MINIMAL, "[Ask]"),
    "second section": (with_lines(b"[Other]", b"Socket=/evil/sck.1"), "second section"),
    "repeated [Ask]": (with_lines(b"[Ask]"), "second section"),
    "line without =": (with_lines(b"Socket"), "without '='"),
    "empty key": (with_lines(b"=value"), "malformed key"),
    "space before =": (with_lines(b"Socket =/evil/sck.1"), "malformed key"),
    "leading space": (with_lines(b" Socket=/evil/sck.1"), "malformed key"),
    "leading tab": (with_lines(b"\tPID=1"), "malformed key"),
    "missing Socket": (b"[Ask]\nPID=7\n", "no Socket="),
    "empty Socket": (b"[Ask]\nPID=7\nSocket=\n", "no Socket="),
    "relative Socket": (b"[Ask]\nPID=7\nSocket=sck.1\n", "absolute"),
    "lower-case socket only": (b"[Ask]\nPID=7\nsocket=" + SOCK.encode() + b"\n", "no Socket="),
    "missing PID": (b"[Ask]\nSocket=" + SOCK.encode() + b"\n", "no PID="),
    "bad Id escape": (with_lines(b"Id=cryptsetup:/dev/\\q"), "escape"),
    "empty cryptsetup source": (with_lines(b"Id=cryptsetup:"), "empty"),
}


def pid_file(value: bytes) -> bytes:
    return b"[Ask]\nPID=" + value + b"\nSocket=" + SOCK.encode() + b"\n"


for _pid in [b"", b"0", b"-1", b"+5", b" 5", b"5 ", b"1_0", b"\xd9\xa3", b"0x10", b"1e3"]:
    HOSTILE[f"PID={_pid!r}"] = (pid_file(_pid), "PID=")
HOSTILE["PID above PID_MAX_LIMIT"] = (pid_file(b"4194305"), "PID=")
HOSTILE["PID of 30 digits"] = (pid_file(b"9" * 30), "PID=")
for _na in [b"", b"-1", b"1.5", b"+1", str(2**64).encode(), b"\xef\xbc\x91"]:
    HOSTILE[f"NotAfter={_na!r}"] = (with_lines(b"NotAfter=" + _na), "NotAfter=")
for _flag in [b"", b"2", b"yes please", b"tru", b"ON ", b" on", b"\xc4\xb0", b"\xe2\x84\xaa"]:
    HOSTILE[f"Echo={_flag!r}"] = (with_lines(b"Echo=" + _flag), "Echo=")


@pytest.mark.parametrize(("data", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_file_is_refused_with_a_reason(data, reason):
    with pytest.raises(HostileAskFile) as caught:
        parse_ask_file(data)
    assert reason in str(caught.value)
    assert caught.value.reason == str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, KeyhandoffError)


@pytest.mark.parametrize(
    "line",
    [
        b"Message={m}\nSocket=/evil/sck.1",  # duplicate
        b"Message={m}\x00",  # NUL
        b"Message={m}\r",  # CR
        b"{m}=1\n{m}=2",  # duplicated unknown key: its name is content too
        b"Echo={m}",  # bad boolean
        b"NotAfter={m}",
        b"Id=cryptsetup:{m}\\q",
        b"[{m}]",
        b"{m}",  # no '='
        b"Message={m}\xff",
    ],
)
def test_refusal_text_never_quotes_the_file(line):
    marker = make("askfile").replace(b"-", b"_")  # "_" keeps it a valid key name
    data = with_lines(line.replace(b"{m}", marker))
    with pytest.raises(HostileAskFile) as caught:
        parse_ask_file(data)
    assert marker.decode() not in str(caught.value)
    assert marker.decode() not in repr(caught.value)


def test_pid_message_injection_is_refused_even_after_all_keys():
    # A Message= injecting a *new* PID= must not win over the real one.
    data = SYSTEMD_FILE.replace(
        b"Message=Please enter passphrase for disk foo:",
        b"Message=Please enter passphrase for disk foo:\nPID=1\nSocket=/tmp/sck.evil",
    )
    with pytest.raises(HostileAskFile, match="duplicated PID="):
        parse_ask_file(data)


# --- Id classes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("id_", "prompt"),
    [
        (None, NoIdPrompt()),
        ("cryptsetup:/dev/disk/by-uuid/1234", CryptsetupPrompt("/dev/disk/by-uuid/1234")),
        ("cryptsetup:/dev/block/253:1", CryptsetupPrompt("/dev/block/253:1")),
        ("cryptsetup:/var/disk\\040image.luks", CryptsetupPrompt("/var/disk image.luks")),
        (
            "cryptsetup:/dev/disk/by-label/caf\\303\\251",
            CryptsetupPrompt("/dev/disk/by-label/café"),
        ),
        (
            "cryptsetup-verification:/dev/disk/by-uuid/1234",
            VerificationPrompt("/dev/disk/by-uuid/1234"),
        ),
        ("cryptsetup", OtherPrompt("cryptsetup")),
        ("Cryptsetup:/dev/sda", OtherPrompt("Cryptsetup:/dev/sda")),
        ("cryptsetup-verify:/dev/sda", OtherPrompt("cryptsetup-verify:/dev/sda")),
        ("", OtherPrompt("")),
        ("home:/dev/sda\\q", OtherPrompt("home:/dev/sda\\q")),  # not ours: never unescaped
    ],
)
def test_classify_id(id_, prompt):
    assert classify_id(id_) == prompt


def test_non_utf8_source_round_trips_through_fsencode():
    prompt = classify_id("cryptsetup:/dev/disk/by-label/\\377x")
    assert isinstance(prompt, CryptsetupPrompt)
    assert os.fsencode(prompt.source) == b"/dev/disk/by-label/\xffx"


@pytest.mark.parametrize(
    "id_", ["cryptsetup:", "cryptsetup:\\", "cryptsetup:\\000", "cryptsetup-verification:\\?"]
)
def test_classify_id_refuses_bad_cryptsetup_sources(id_):
    with pytest.raises(InvalidEscape):
        classify_id(id_)


# --- C escapes -----------------------------------------------------------------------------

UNESCAPE = [
    ("plain/path", b"plain/path"),
    ("\\a\\b\\f\\n\\r\\t\\v", b"\a\b\f\n\r\t\v"),
    ("\\\\\\\"\\'", b"\\\"'"),
    ("\\s", b" "),
    ("\\x41\\x7f\\xFf\\xfF", b"A\x7f\xff\xff"),
    ("\\101\\177\\377\\001", b"A\x7f\xff\x01"),
    ("\\0012", b"\x012"),  # three octal digits, then a literal
    ("\\x412", b"A2"),
    ("\\u00e9", "é".encode()),
    ("\\u20AC", "€".encode()),
    ("\\uD800", b"\xed\xa0\x80"),  # systemd does not validate \u: a surrogate's 3 bytes
    ("\\uFFFE", b"\xef\xbf\xbe"),
    ("\\U0001F600", "😀".encode()),
    ("\\U0010FFFD", "\U0010fffd".encode()),
    ("é literal", "é literal".encode()),
    ("", b""),
]


@pytest.mark.parametrize(("escaped", "raw"), UNESCAPE)
def test_cunescape_table(escaped, raw):
    assert cunescape(escaped) == raw
    assert cunescape(escaped.encode()) == raw


@pytest.mark.parametrize(
    "escaped",
    [
        "\\",
        "abc\\",
        "\\q",
        "\\?",
        "\\e",
        "\\x",
        "\\x4",
        "\\xg1",
        "\\x00",
        "\\000",
        "\\00",
        "\\08",
        "\\400",
        "\\777",
        "\\8",
        "\\u",
        "\\u00e",
        "\\u0000",
        "\\u00g0",
        "\\U0000000",
        "\\U00000000",
        "\\U00110000",
        "\\U0000D800",
        "\\U0000DFFF",
        "\\U0000FDD0",
        "\\U0000FDEF",
        "\\U0000FFFE",
        "\\U0001FFFF",
        "\\UFFFFFFFF",
        "a\x00b",
    ],
)
def test_cunescape_refuses(escaped):
    with pytest.raises(InvalidEscape):
        cunescape(escaped)


def test_cescape_table():
    assert cescape(b"\a\b\f\n\r\t\v\\\"'") == "\\a\\b\\f\\n\\r\\t\\v\\\\\\\"\\'"
    assert cescape(b"\x01\x1b\x7f\x80\xff") == "\\001\\033\\177\\200\\377"
    assert cescape(b" ?~/dev/disk/by-uuid/x") == " ?~/dev/disk/by-uuid/x"
    assert cescape("é".encode()) == "\\303\\251"
    for byte in range(0x20, 0x7F):
        if byte not in b"\\\"'":
            assert cescape(bytes([byte])) == chr(byte)


no_nul_bytes = st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b""))


@given(no_nul_bytes)
def test_cescape_cunescape_round_trip(raw):
    escaped = cescape(raw)
    assert escaped.isascii()
    assert escaped.isprintable()
    assert cunescape(escaped) == raw


@given(st.text(max_size=80).filter(lambda s: "\x00" not in s))
def test_round_trip_of_text_paths(text):
    raw = text.encode("utf-8", "surrogatepass")
    assert cunescape(cescape(raw)) == raw
    prompt = classify_id("cryptsetup:" + cescape(raw)) if raw else None
    if prompt is not None:
        assert prompt == CryptsetupPrompt(os.fsdecode(raw))


escape_alphabet = st.sampled_from(
    ["\\", "x", "u", "U", "0", "3", "7", "8", "a", "s", "?", "f", "F", "D", "e", "1", "\x00"]
)


@given(st.one_of(st.text(max_size=40), st.lists(escape_alphabet, max_size=30).map("".join)))
def test_cunescape_raises_only_invalid_escape(text):
    try:
        out = cunescape(text)
    except InvalidEscape:
        return
    assert isinstance(out, bytes)
    assert b"\x00" not in out


# --- the parser on arbitrary input ---------------------------------------------------------

KEYS = [b"PID", b"Socket", b"AcceptCached", b"Echo", b"NotAfter", b"Silent", b"Message", b"Id"]
line_strategy = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.binary(max_size=30)).map(lambda kv: kv[0] + b"=" + kv[1]),
    st.sampled_from([b"", b"#x", b";y", b"[Ask]", b"[X]", b"Socket", b"=", b" PID=1"]),
    st.binary(max_size=30),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(line_strategy, max_size=12).map(lambda lines: b"[Ask]\n" + b"\n".join(lines)),
    )
)
def test_parser_raises_only_hostile_ask_file(data):
    try:
        request = parse_ask_file(data)
    except HostileAskFile:
        return
    assert 0 < request.pid <= 4 * 1024 * 1024
    assert request.socket.startswith("/")
    request.prompt  # noqa: B018  # an accepted file's Id always classifies


value_text = st.text(
    alphabet=st.characters(blacklist_characters="\n\r\x00", blacklist_categories=["Cs"]),
    max_size=40,
)


@given(
    st.fixed_dictionaries(
        {
            "pid": st.integers(1, 4 * 1024 * 1024),
            "socket": value_text.map(lambda s: "/" + s),
            "not_after": st.integers(0, 2**64 - 1),
            "accept_cached": st.booleans(),
            "echo": st.booleans(),
            "silent": st.booleans(),
            "message": st.none() | value_text,
            "icon": st.none() | value_text,
        }
    ),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\x00", b"") or b"/"),
)
def test_what_systemd_writes_parses_back(fields, source):
    # Built exactly like ask_password_agent's fprintf, with a cescape'd cryptsetup Id.
    lines = [
        "[Ask]",
        f"PID={fields['pid']}",
        f"Socket={fields['socket']}",
        f"AcceptCached={int(fields['accept_cached'])}",
        f"Echo={int(fields['echo'])}",
        f"NotAfter={fields['not_after']}",
        f"Silent={int(fields['silent'])}",
    ]
    if fields["message"] is not None:
        lines.append(f"Message={fields['message']}")
    if fields["icon"] is not None:
        lines.append(f"Icon={fields['icon']}")
    lines.append("Id=cryptsetup:" + cescape(source))
    request = parse_ask_file(("\n".join(lines) + "\n").encode())
    assert request == AskRequest(**fields, id="cryptsetup:" + cescape(source))
    assert request.prompt == CryptsetupPrompt(os.fsdecode(source))


# --- datagrams -----------------------------------------------------------------------------


def test_reply_datagram_is_plus_and_passphrase_without_nul():
    passphrase = make("reply")
    with Secret.passphrase(passphrase) as secret, reply_datagram(secret) as datagram:
        assert isinstance(datagram, Secret)
        assert bytes(datagram.view()) == b"+" + passphrase
        assert bytes(secret.view()) == passphrase  # the caller's secret is untouched
        assert datagram.buffer() is not secret.buffer()
        assert passphrase.decode() not in repr(datagram)


def test_reply_datagram_of_2048_bytes_fits_the_querier_buffer():
    with Secret.passphrase(b"k" * 2048) as secret, reply_datagram(secret) as datagram:
        assert len(datagram) == 2049


@pytest.mark.parametrize("bad", [b"k" * 2049, b"a\x00b"])
def test_reply_datagram_refuses_what_systemd_would_mangle(bad):
    secret = Secret(bad)
    with pytest.raises(SecretError):
        reply_datagram(secret)


def test_reply_datagram_refuses_a_wiped_secret():
    secret = Secret.passphrase(make("wiped"))
    secret.wipe()
    with pytest.raises(SecretError):
        reply_datagram(secret)


def test_cancel_datagram():
    assert cancel_datagram() == b"-"


# --- list_ask_files and read_ask_file on a private directory -------------------------------


@pytest.fixture
def ask_dir(tmp_path):
    path = tmp_path / "ask-password"
    path.mkdir(mode=0o755)
    return path


def test_list_ask_files_matches_the_prefix_only(ask_dir):
    for name in ["ask.Xy12Ab", "ask.18446744073709551615", "sck.abc", ".ask.tmp", "ask", "askx"]:
        (ask_dir / name).write_bytes(MINIMAL)
    assert list(list_ask_files(ask_dir)) == ["ask.18446744073709551615", "ask.Xy12Ab"]


def test_list_ask_files_of_a_missing_directory_is_empty(tmp_path):
    assert list(list_ask_files(tmp_path / "absent")) == []


def test_read_ask_file_parses_a_regular_file(ask_dir):
    (ask_dir / "ask.abc123").write_bytes(SYSTEMD_FILE)
    assert read_ask_file(ask_dir, "ask.abc123") == parse_ask_file(SYSTEMD_FILE)


def test_read_ask_file_refuses_a_symlink(ask_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(SYSTEMD_FILE)
    (ask_dir / "ask.link").symlink_to(target)
    with pytest.raises(HostileAskFile, match="symlink"):
        read_ask_file(ask_dir, "ask.link")


def test_read_ask_file_refuses_a_fifo_without_blocking(ask_dir):
    os.mkfifo(ask_dir / "ask.fifo")
    with pytest.raises(HostileAskFile, match="not a regular file"):
        read_ask_file(ask_dir, "ask.fifo")


def test_read_ask_file_refuses_a_directory(ask_dir):
    (ask_dir / "ask.dir").mkdir()
    with pytest.raises(HostileAskFile, match="not a regular file"):
        read_ask_file(ask_dir, "ask.dir")


def test_read_ask_file_refuses_an_oversized_file_unread(ask_dir):
    (ask_dir / "ask.big").write_bytes(MINIMAL + b"#" * (MAX_ASK_FILE + 10))
    with pytest.raises(HostileAskFile, match="larger"):
        read_ask_file(ask_dir, "ask.big")


@pytest.mark.parametrize("name", ["../ask.x", "ask.x/..", "sck.x", "ask.", "x"])
def test_read_ask_file_refuses_names_outside_the_pattern(ask_dir, name):
    with pytest.raises(HostileAskFile):
        read_ask_file(ask_dir, name)


def test_read_ask_file_of_a_gone_file_is_file_not_found(ask_dir):
    with pytest.raises(FileNotFoundError):
        read_ask_file(ask_dir, "ask.gone")


def test_read_ask_file_ignores_the_mode(ask_dir):
    path = ask_dir / "ask.mode"
    path.write_bytes(MINIMAL)
    path.chmod(stat.S_IRUSR)
    assert read_ask_file(ask_dir, "ask.mode").pid == 7


def _has_doc_comment(module, name: str) -> bool:
    """``name`` is assigned at the top of ``module`` under a ``#:`` comment (Sphinx's form).

    A constant has no docstring of its own: ``CANCEL.__doc__`` is the docstring of bytes.
    """
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(name)}\s*[:=]", line):
            return i > 0 and lines[i - 1].startswith("#: ")
    return False


@pytest.mark.parametrize("module", [askpass, cescape_module, reply], ids=lambda m: m.__name__)
def test_module_exports_what_it_documents(module):
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = value.__doc__ or ""
            # a dataclass without a docstring gets its signature as __doc__: not documentation
            assert doc.strip(), name
            assert not doc.startswith(f"{value.__name__}("), name
        else:  # a constant or a type alias
            assert _has_doc_comment(module, name), name
