/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_keyhandoff_onetime.c - libcryptsetup token plugin for keyhandoff's one-time keyslots.
 *
 * libcryptsetup-token-keyhandoff-onetime.so answers libcryptsetup's token open for a LUKS2
 * token of type "keyhandoff-onetime" (keyhandoff/onetime.py): the one-time keyslot an
 * `arm reboot=full` (or `reboot=kexec`) made, whose key travels in the sealed handoff
 * record in an EFI variable (or in the loaded kernel's initrd segment).  It runs inside libcryptsetup (systemd-cryptsetup in the initramfs,
 * `cryptsetup open`), with only libcryptsetup, libcrypto and libc beside it.
 *
 * What an open does:
 *   1. The token: parsed strictly (kht_parse_token, the rules of onetime.parse_token) and
 *      checked against its keyslot as onetime.not_ours does: the keyslot is active, the token
 *      is assigned to it, its PBKDF is pbkdf2 with 1000 iterations, and SHA-256 over its
 *      number and its KDF salt (from crypt_dump_json) is the token's binding.
 *   2. The record: the user key "keyhandoff:record" in our "keyhandoff" keyring in root's
 *      @u, read only under the trust rule (found by keyctl_search from @u, which we possess;
 *      a "user" key of exactly that description, owned by uid 0, permissions exactly
 *      0x3f010000).  Else the kexec channel's file, which the initramfs moved out of the
 *      loaded initrd segment ($KEYHANDOFF_KEXEC_RECORD, default
 *      /run/keyhandoff/kexec-record): only root's private regular file holding a record
 *      sealed for the kexec channel is read, published as below, then unlinked (under an
 *      flock on the file).  Else the EFI variable KeyHandoffStash-<vendor GUID> (in
 *      $EFIVARFS_PATH, default /sys/firmware/efi/efivars/): read it, publish its record
 *      (without the 4 attribute bytes, unpadded: it is ciphertext) as "keyhandoff:record"
 *      with a kernel timeout of min(not_after - now, 600) s, then delete the variable
 *      (clearing its immutable flag first).  If the delete fails, the key is invalidated
 *      and nothing is answered: a record is never used without being deleted first.  The
 *      whole step holds an flock on the efivars directory, so two volumes opened at once
 *      take the variable once.  A record whose framing is not ours stays where it is, for
 *      the real root's `keyhandoff restore` to refuse and log; so does one sealed for
 *      another channel than the one it travelled by.
 *   3. The check: khr_open, exactly record.open_record (channel efi or kexec, the record's
 *      own: its source was checked in step 2) with the token's record
 *      key, the running boot id and the real clock, then the one-time key of this volume's
 *      UUID, answered as onetime.key_text gives it (64 lower-case hex digits).
 *   The plugin never deletes "keyhandoff:record": further volumes of the same record find
 *   it there, and the real root's restore consumes it.
 *
 * Answers: 0 with the key; -ENOENT no record, or no key in it for this volume; -EPERM a
 * record refused (foreign, tampered, expired, not yet valid, same boot, exhausted) or one
 * that could not be taken safely; -EINVAL a token that is not ours or a malformed record;
 * -ENOMEM.  cryptsetup_token_open_pin with a PIN: -ENOANO (these keyslots take no PIN).
 *
 * Logging: crypt_log at debug level with fixed words only ("record refused: expired"),
 * never a key, a record byte or a token's record key.  Every buffer that held the record
 * key, the plaintext, a derived key or the answer is wiped (OPENSSL_cleanse) before it is
 * freed or goes out of scope; nothing secret is kept between calls (no static state).
 *
 * Files: this one (the token checks, the ABI), token_store.c (keyring, EFI variable),
 * token_record.c and token_json.c (the parsers).  Build: csrc/build-token OUTDIR.
 * Tests: tests/integration/test_token_plugin.py (real libcryptsetup on LUKS2 image files in
 * a private mount namespace), tests/unit/test_token_plugin_*.py, fuzz/token_record_fuzz.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>
#include <libcryptsetup.h>
#include <openssl/crypto.h>

#include "token_record.h"
#include "token_store.h"

#define KH_PUBLIC __attribute__((visibility("default")))

#define TOKEN_TYPE "keyhandoff-onetime"
#define ONETIME_PBKDF "pbkdf2"
#define ONETIME_ITERATIONS 1000

/* ------------------------------------------------------------------------- the token */

/* The text of the "keyslots" object inside libcryptsetup's dump of the header JSON.  Only
 * that part is parsed: the dump also holds every token, with the record key in ours, and
 * json-c frees the strings it copied without wiping them.  The dump is json-c's own output
 * (strings quoted, '"' and '\\' escaped): a scan that skips strings finds the top-level key
 * and the end of its object. */
static int kh_keyslots_object(const char *text, const char **start, size_t *len)
{
    static const char KEY[] = "\"keyslots\":";
    const char *p, *begin = NULL;
    int depth = 0, in_string = 0;

    for (p = text; *p != '\0'; p++) {
        if (in_string) {
            if (*p == '\\' && p[1] != '\0')
                p++;
            else if (*p == '"')
                in_string = 0;
        } else if (*p == '"') {
            /* the top-level key (depth 1), not a token's own "keyslots" */
            if (depth == 1 && begin == NULL && strncmp(p, KEY, sizeof KEY - 1) == 0) {
                p += sizeof KEY - 2;
                while (p[1] == ' ')
                    p++;
                if (p[1] != '{')
                    return -1;
                begin = p + 1;
                continue;
            }
            in_string = 1;
        } else if (*p == '{') {
            depth++;
        } else if (*p == '}') {
            depth--;
            if (begin != NULL && depth == 1) {
                *start = begin;
                *len = (size_t)(p - begin) + 1;
                return 0;
            }
        }
    }
    return -1;
}

/* The KDF salt of keyslot `keyslot` from libcryptsetup's dump of the header JSON. */
static long kh_keyslot_salt(struct crypt_device *cd, int keyslot, uint8_t *out, size_t cap)
{
    const char *text = NULL, *salt;
    char number[8];
    json_object *root, *slots, *slot, *kdf, *value;
    long n = -1;

    const char *start;
    size_t len;
    json_tokener *tok;

    if (crypt_dump_json(cd, &text, 0) < 0 || text == NULL ||
        kh_keyslots_object(text, &start, &len) != 0)
        return -1;
    tok = json_tokener_new();
    if (tok == NULL)
        return -1;
    slots = json_tokener_parse_ex(tok, start, (int)len);
    json_tokener_free(tok);
    if (slots == NULL)
        return -1;
    root = slots;
    snprintf(number, sizeof number, "%d", keyslot);
    if (json_object_object_get_ex(slots, number, &slot) &&
        json_object_object_get_ex(slot, "kdf", &kdf) &&
        json_object_object_get_ex(kdf, "salt", &value) &&
        json_object_is_type(value, json_type_string)) {
        salt = json_object_get_string(value);
        n = kh_base64_decode(salt, strlen(salt), out, cap);
    }
    json_object_put(root);
    return n;
}

/* onetime.not_ours: 0 when the keyslot the token names is the one it was made for. */
static int kh_not_ours(struct crypt_device *cd, int token, const struct kht_token *t)
{
    struct crypt_pbkdf_type pbkdf;
    crypt_keyslot_info status = crypt_keyslot_status(cd, t->keyslot);
    uint8_t salt[512];
    char bound[65];
    long n;

    if (status != CRYPT_SLOT_ACTIVE && status != CRYPT_SLOT_ACTIVE_LAST)
        return -1;
    if (crypt_token_is_assigned(cd, token, t->keyslot) != 0)
        return -1;
    memset(&pbkdf, 0, sizeof pbkdf);
    if (crypt_keyslot_get_pbkdf(cd, t->keyslot, &pbkdf) < 0 || pbkdf.type == NULL ||
        strcmp(pbkdf.type, ONETIME_PBKDF) != 0 || pbkdf.iterations != ONETIME_ITERATIONS)
        return -1;
    n = kh_keyslot_salt(cd, t->keyslot, salt, sizeof salt);
    if (n < 0 || kht_binding(t->keyslot, salt, (size_t)n, bound) != 0)
        return -1;
    return strcmp(bound, t->binding) == 0 ? 0 : -1;
}

static int kh_open(struct crypt_device *cd, int token, char **buffer, size_t *buffer_len)
{
    struct kht_token t;
    const char *json = NULL, *uuid;
    uint8_t boot_id[KHR_UUID_LEN], volume[KHR_UUID_LEN], onetime[KHR_ONETIME_LEN];
    uint8_t *blob = NULL;
    enum khr_verdict v;
    char line[96];
    long n;
    int rc;

    if (crypt_token_json_get(cd, token, &json) < 0 || json == NULL ||
        kht_parse_token(json, strlen(json), &t) != 0) {
        kh_say(cd, "token refused: not a well-formed keyhandoff-onetime token");
        return -EINVAL;
    }
    if (kh_not_ours(cd, token, &t) != 0) {
        kh_say(cd, "token refused: not bound to the keyslot it names");
        rc = -EINVAL;
        goto out;
    }
    uuid = crypt_get_uuid(cd);
    if (uuid == NULL || kh_uuid_parse(uuid, strlen(uuid), volume) != 0 ||
        kh_boot_id(boot_id) != 0) {
        kh_say(cd, "no volume UUID or no boot id");
        rc = -EINVAL;
        goto out;
    }
    blob = malloc(KHR_MAX_RECORD + 1);
    if (blob == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    n = kh_take_record(cd, blob);
    if (n <= 0) {
        if (n == 0)
            kh_say(cd, "no handoff record");
        rc = n == 0 ? -ENOENT : (int)n;
        goto out;
    }
    v = khr_open(blob, (size_t)n, t.record_key, kh_now(), boot_id, volume, onetime);
    if (v != KHR_OK) {
        snprintf(line, sizeof line, "record refused: %s", khr_verdict_name(v));
        kh_say(cd, line);
        rc = v == KHR_NO_ENTRY ? -ENOENT
             : v == KHR_MALFORMED || v == KHR_UNKNOWN_FORMAT ? -EINVAL
             : v == KHR_INTERNAL ? -ENOMEM : -EPERM;
        goto out;
    }
    *buffer = malloc(2 * KHR_ONETIME_LEN + 1);
    if (*buffer == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    kh_key_text(onetime, *buffer);
    (*buffer)[2 * KHR_ONETIME_LEN] = '\0';
    *buffer_len = 2 * KHR_ONETIME_LEN;
    kh_say(cd, "one-time key answered");
    rc = 0;
out:
    OPENSSL_cleanse(onetime, sizeof onetime);
    if (blob != NULL) {
        OPENSSL_cleanse(blob, KHR_MAX_RECORD + 1);
        free(blob);
    }
    kht_token_wipe(&t);
    return rc;
}

/* ------------------------------------------------------------------------- the ABI */

KH_PUBLIC const char *cryptsetup_token_version(void)
{
    return "1.0";
}

KH_PUBLIC int cryptsetup_token_open(struct crypt_device *cd, int token, char **buffer,
                                    size_t *buffer_len, void *usrptr)
{
    (void)usrptr;
    return kh_open(cd, token, buffer, buffer_len);
}

KH_PUBLIC int cryptsetup_token_open_pin(struct crypt_device *cd, int token, const char *pin,
                                        size_t pin_size, char **buffer, size_t *buffer_len,
                                        void *usrptr)
{
    (void)usrptr;
    if (pin != NULL && pin_size > 0) {
        kh_say(cd, "this token takes no PIN");
        return -ENOANO;
    }
    return kh_open(cd, token, buffer, buffer_len);
}

KH_PUBLIC void cryptsetup_token_buffer_free(void *buffer, size_t buffer_len)
{
    if (buffer == NULL)
        return;
    OPENSSL_cleanse(buffer, buffer_len);
    free(buffer);
}

KH_PUBLIC int cryptsetup_token_validate(struct crypt_device *cd, const char *json)
{
    struct kht_token t;
    int rc;

    if (json == NULL)
        return -EINVAL;
    rc = kht_parse_token(json, strlen(json), &t);
    kht_token_wipe(&t);
    if (rc != 0) {
        kh_say(cd, "token refused: not a well-formed keyhandoff-onetime token");
        return -EINVAL;
    }
    return 0;
}

/* Never the record key: the keyslot, the deadline, the arming boot, the binding. */
KH_PUBLIC void cryptsetup_token_dump(struct crypt_device *cd, const char *json)
{
    struct kht_token t;
    char line[256];

    if (json == NULL || kht_parse_token(json, strlen(json), &t) != 0) {
        crypt_log(cd, CRYPT_LOG_NORMAL, "\tkeyhandoff-onetime: malformed (ignored)\n");
        return;
    }
    snprintf(line, sizeof line,
             "\tkeyslot:    %d\n\tnot after:  %lld\n\tarmed boot: %s\n\tbinding:    %s\n",
             t.keyslot, (long long)t.not_after, t.boot_id, t.binding);
    kht_token_wipe(&t);
    crypt_log(cd, CRYPT_LOG_NORMAL, line);
}
