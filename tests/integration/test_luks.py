"""keyhandoff.luks against real LUKS headers made by the cryptsetup binary (image files)."""

from __future__ import annotations

import errno
import secrets

import pytest
from support.luks_images import (
    add_key,
    cryptsetup,
    dump_volume_key,
    format_image,
    metadata,
    opens,
    uuid_of,
)
from support.passphrases import make

from keyhandoff.luks import (
    LuksError,
    LuksHeader,
    NoSuchDevice,
    NotLuks,
    WrongPassphrase,
    WrongVolumeKey,
    _debug_log,
)
from keyhandoff.secret import Secret

# person, image: support.luks_images (keyslot 0 opened by person)


def test_reads_uuid_version_keyslots(image):
    with LuksHeader.open(image) as header:
        assert header.uuid == uuid_of(image).lower()
        assert header.luks_version == 2
        assert header.keyslots == [0]
        assert header.tokens == {}
        assert header.keyslot_pbkdf(0) == ("pbkdf2", 1000)


def test_keyslots_follow_luksaddkey(image, person):
    add_key(image, person, make("second"))
    with LuksHeader.open(image) as header:
        assert header.keyslots == sorted(int(n) for n in metadata(image)["keyslots"]) == [0, 1]


def test_luks1_header(tmp_path, person):
    image = format_image(tmp_path / "luks1.img", person, luks="luks1")
    with LuksHeader.open(image) as header:
        assert header.luks_version == 1
        assert header.uuid == uuid_of(image).lower()
        assert header.keyslots == [0]
        assert header.tokens == {}
        assert header.verify(Secret.passphrase(person)) == 0


def test_verify_returns_the_keyslot(image, person):
    second = make("second")
    add_key(image, person, second)
    with LuksHeader.open(image) as header:
        assert header.verify(Secret.passphrase(person)) == 0
        assert header.verify(Secret.passphrase(second)) == 1
        assert header.verify(Secret.passphrase(second), keyslot=1) == 1


def test_wrong_passphrase_is_one_detail_free_error(image, person):
    wrong = make("wrong")
    with LuksHeader.open(image) as header:
        with pytest.raises(WrongPassphrase) as any_slot:
            header.verify(Secret.passphrase(wrong))
        # The right passphrase aimed at an empty slot looks exactly like a wrong one.
        with pytest.raises(WrongPassphrase) as empty_slot:
            header.verify(Secret.passphrase(person), keyslot=5)
        with pytest.raises(WrongPassphrase) as for_key:
            header.volume_key(Secret.passphrase(wrong))
    for exc in (any_slot.value, empty_slot.value, for_key.value):
        text = f"{exc} {exc!r} {exc.args}"
        assert wrong.decode() not in text
        assert person.decode() not in text
        assert str(exc) == str(any_slot.value)  # same words whatever the reason
        assert "slot" not in text.lower()
        assert exc.errno == errno.EPERM


def test_volume_key_is_the_volume_key(image, person):
    with LuksHeader.open(image) as header:
        slot, key = header.volume_key(Secret.passphrase(person))
    with key:
        assert slot == 0
        assert isinstance(key.buffer(), bytearray)
        assert bytes(key.view()) == dump_volume_key(image, person)
    assert key.wiped


def test_onetime_keyslot_opens_and_is_destroyed(image, person):
    onetime = make("onetime")  # a marker passphrase stands in for the random key
    with LuksHeader.open(image) as header:
        slot, volume_key = header.volume_key(Secret.passphrase(person))
        with volume_key:
            new = header.add_onetime_keyslot(volume_key, Secret.passphrase(onetime))
        assert new != slot
        assert header.keyslots == [0, new]
        assert header.keyslot_pbkdf(new) == ("pbkdf2", 1000)
    assert opens(image, onetime, keyslot=new)
    assert not opens(image, person, keyslot=new)
    assert opens(image, person, keyslot=0)
    with LuksHeader.open(image) as header:
        header.destroy_keyslot(new)
        assert header.keyslots == [0]
    assert not opens(image, onetime)
    assert opens(image, person)


def test_onetime_keyslot_with_argon2id(image, person):
    onetime = make("argon")
    with LuksHeader.open(image) as header:
        _, volume_key = header.volume_key(Secret.passphrase(person))
        with volume_key:
            new = header.add_onetime_keyslot(
                volume_key, Secret.passphrase(onetime), pbkdf="argon2id", iterations=4
            )
        assert header.keyslot_pbkdf(new) == ("argon2id", 4)
    assert opens(image, onetime, keyslot=new)


def test_onetime_keyslot_needs_the_right_volume_key(image):
    with LuksHeader.open(image) as header:
        with pytest.raises(WrongVolumeKey):
            header.add_onetime_keyslot(Secret(secrets.token_bytes(64)), Secret.passphrase(b"x"))
        assert header.keyslots == [0]


def test_arming_runs_the_persons_pbkdf_once(tmp_path, person):
    """volume_key + add_onetime_keyslot open exactly one existing keyslot (one PBKDF).

    Counted in libcryptsetup's own debug log, where "Trying to open LUKS2 keyslot N"
    precedes every unlocking key derivation.  The person's slot is 1 here, so an
    unrestricted search opens slot 0 first: ``keyslot=`` avoids that wasted PBKDF.
    """
    other = make("other")
    image = format_image(tmp_path / "two.img", other)
    add_key(image, other, person)  # the person's passphrase sits in keyslot 1
    with LuksHeader.open(image) as header:
        with _debug_log() as log:
            slot, vk = header.volume_key(Secret.passphrase(person), keyslot=1)
            with vk:
                new = header.add_onetime_keyslot(vk, Secret(secrets.token_bytes(32)))
        opened = [m for m in log if m.startswith("Trying to open LUKS2 keyslot")]
        assert opened == ["Trying to open LUKS2 keyslot 1."]
        assert (slot, new) == (1, 2)
        # Two derivations in all: the person's slot, and the new slot's (cheap) key.
        assert log.count("Running keyslot key derivation.") == 2

        with _debug_log() as log:
            header.volume_key(Secret.passphrase(person))[1].wipe()
        opened = [m for m in log if m.startswith("Trying to open LUKS2 keyslot")]
        assert opened == ["Trying to open LUKS2 keyslot 0.", "Trying to open LUKS2 keyslot 1."]


def test_tokens_set_assign_remove(image):
    with LuksHeader.open(image) as header:
        token = header.set_token({"type": "keyhandoff-onetime", "keyslots": [], "not_after": 42})
        header.assign_token(token, 0)
        assert header.token_assigned(token, 0)
        assert not header.token_assigned(token, 1)
        assert header.tokens == {
            token: {"type": "keyhandoff-onetime", "keyslots": ["0"], "not_after": 42}
        }
    dumped = metadata(image)["tokens"]
    assert dumped[str(token)]["type"] == "keyhandoff-onetime"
    assert dumped[str(token)]["keyslots"] == ["0"]
    with LuksHeader.open(image) as header:
        header.remove_token(token)
        assert header.tokens == {}
    assert metadata(image)["tokens"] == {}


def test_token_json_must_be_valid(image):
    with LuksHeader.open(image) as header, pytest.raises(LuksError) as info:
        header.set_token({"no-type": True})
    assert info.value.errno == errno.EINVAL


def test_not_luks(tmp_path):
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1024 * 1024))
    with pytest.raises(NotLuks):
        LuksHeader.open(plain)


def test_missing_device(tmp_path):
    with pytest.raises(NoSuchDevice):
        LuksHeader.open(tmp_path / "absent.img")
    with pytest.raises(NoSuchDevice):
        LuksHeader.open(tmp_path)


def test_libcryptsetup_prints_nothing(tmp_path, capfd):
    """Our log callback replaces libcryptsetup's default printing to stdout/stderr."""
    with pytest.raises(NoSuchDevice) as info:
        LuksHeader.open(tmp_path / "absent.img")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert "does not exist" in str(info.value)  # the message came through our callback


def test_closed_header_refuses(image):
    with LuksHeader.open(image) as header:
        pass
    with pytest.raises(LuksError) as info:
        _ = header.uuid
    assert info.value.errno == errno.EBADF
    header.close()  # idempotent


def test_destroy_inactive_keyslot(image):
    with LuksHeader.open(image) as header, pytest.raises(LuksError):
        header.destroy_keyslot(5)


def test_cryptsetup_still_reads_our_header(image, person):
    """After our writes the header is still valid for the real tool."""
    with LuksHeader.open(image) as header:
        _, vk = header.volume_key(Secret.passphrase(person))
        with vk:
            header.add_onetime_keyslot(vk, Secret(secrets.token_bytes(32)))
        header.set_token({"type": "keyhandoff-onetime", "keyslots": ["1"]})
    assert cryptsetup("isLuks", "--type", "luks2", str(image)).returncode == 0
    cryptsetup("luksDump", str(image))


@pytest.mark.parametrize("uuid_field", [
    b"\xff\xfe" + b"not-ascii" + bytes(29),
    b"8595BA97-12B3-46AF-86E0-B04DF85DB25A".lower()[:35] + b"x" + bytes(4),
    b"{8595ba97-12b3-46af-86e0-b04df85db25a}" + bytes(2),
])
def test_a_malformed_header_uuid_is_a_luks_error(tmp_path, person, uuid_field):
    """LUKS1 keeps the UUID in a fixed 40-byte field with no checksum: anyone can edit it."""
    image = format_image(tmp_path / "l1.img", person, luks="luks1")
    with image.open("r+b") as f:
        f.seek(168)
        f.write(uuid_field)
    with LuksHeader.open(image) as header, pytest.raises(LuksError) as info:
        _ = header.uuid
    assert info.value.errno == errno.EINVAL


def test_upper_case_uuid_reads_in_lower_case(tmp_path, person):
    upper = "8595BA97-12B3-46AF-86E0-B04DF85DB25A"
    image = format_image(tmp_path / "upper.img", person, options=("--uuid", upper))
    with LuksHeader.open(image) as header:
        assert header.uuid == upper.lower()


def test_tokens_that_are_not_utf8_json_are_left_out(image):
    cryptsetup("token", "import", "--json-file=-", str(image),
               stdin=b'{"type":"other","keyslots":[],"x":"\xff"}')
    cryptsetup("token", "import", "--json-file=-", str(image),
               stdin=b'{"type":"fine","keyslots":[]}')
    with LuksHeader.open(image) as header:
        assert sorted(header.token_texts) == [0, 1]
        assert b"\xff" in header.token_texts[0]
        assert header.tokens == {1: {"type": "fine", "keyslots": []}}
