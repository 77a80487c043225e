import copy
import pickle

import pytest
from support.passphrases import make

from keyhandoff.errors import KeyhandoffError
from keyhandoff.secret import MAX_PASSPHRASE, Secret, SecretError


def test_repr_and_str_never_show_the_bytes():
    pw = make("repr")
    s = Secret.passphrase(pw)
    assert pw.decode() not in repr(s)
    assert repr(s) == f"<Secret {len(pw)} bytes>"
    with pytest.raises(TypeError):
        str(s)
    with pytest.raises(TypeError):
        f"{s}"


def test_wipe_zeroes_the_taken_over_buffer():
    buf = bytearray(make("wipe"))
    s = Secret(buf)
    with s:
        assert bytes(s.view()) == bytes(buf)
    assert s.wiped
    assert buf == b""  # the caller's bytearray was the storage and is now empty
    with pytest.raises(SecretError):
        s.view()


def test_wipe_with_a_live_view_zeroes_in_place_and_marks_wiped():
    buf = bytearray(make("view"))
    n = len(buf)
    view = memoryview(buf)  # a live export pins the storage: it cannot be shrunk now
    s = Secret(buf)
    s.wipe()  # must neither raise nor leave the secret marked unwiped
    assert s.wiped
    assert not s
    assert len(s) == 0
    assert bytes(view) == b"\0" * n  # overwritten in place, seen through the old view
    with pytest.raises(SecretError):
        s.view()
    with pytest.raises(SecretError):
        s.buffer()
    assert repr(s) == "<Secret wiped>"
    s.wipe()  # idempotent
    view.release()
    s.wipe()
    assert buf == b""  # released once nothing pins it


def test_wipe_with_a_view_from_secret_view():
    s = Secret.passphrase(make("own-view"))
    kept = s.view()  # what a careless caller might hold on to
    with s:
        pass
    assert s.wiped
    assert set(bytes(kept)) == {0}


def test_no_pickle_no_copy():
    s = Secret.passphrase(make("pickle"))
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        copy.copy(s)
    with pytest.raises(TypeError):
        copy.deepcopy(s)
    c = s.copy()
    assert c == s
    s.wipe()
    assert not c.wiped


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"x" * (MAX_PASSPHRASE + 1), "longer than 2048"),
        (b"ab\0cd", "NUL"),
    ],
)
def test_passphrase_rules(data, reason):
    with pytest.raises(SecretError, match=reason) as info:
        Secret.passphrase(data)
    assert isinstance(info.value, KeyhandoffError)
    assert data[:4].decode(errors="replace") not in str(info.value) or not data


def test_max_length_is_accepted():
    assert len(Secret.passphrase(b"y" * MAX_PASSPHRASE)) == MAX_PASSPHRASE


def test_equality_is_by_content_and_unhashable():
    a, b = Secret(b"same"), Secret(b"same")
    assert a == b
    assert a != Secret(b"other")
    with pytest.raises(TypeError):
        hash(a)
