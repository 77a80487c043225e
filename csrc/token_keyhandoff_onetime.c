/* token_keyhandoff_onetime.c - libcryptsetup token plugin for keyhandoff's one-time keyslots.
 *
 * libcryptsetup-token-keyhandoff-onetime.so answers libcryptsetup's token open for a LUKS2
 * token of type "keyhandoff-onetime" (keyhandoff/onetime.py): the one-time keyslot an
 * `arm reboot=full` made, whose key travels in the sealed handoff record in an EFI
 * variable.  It runs inside libcryptsetup (systemd-cryptsetup in the initramfs,
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
 *      0x3f010000).  Else the EFI variable KeyHandoffStash-<vendor GUID> (in
 *      $EFIVARFS_PATH, default /sys/firmware/efi/efivars/): read it, publish its record
 *      (without the 4 attribute bytes, unpadded: it is ciphertext) as "keyhandoff:record"
 *      with a kernel timeout of min(not_after - now, 600) s, then delete the variable
 *      (clearing its immutable flag first).  If the delete fails, the key is invalidated
 *      and nothing is answered: a record is never used without being deleted first.  The
 *      whole step holds an flock on the efivars directory, so two volumes opened at once
 *      take the variable once.  A record whose framing is not ours stays where it is, for
 *      the real root's `keyhandoff restore` to refuse and log.
 *   3. The check: khr_open, exactly record.open_record (channel efi) with the token's record
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
 * Build: csrc/build-token OUTDIR.  Tests: tests/integration/test_token_plugin.py (real
 * libcryptsetup on LUKS2 image files in a private mount namespace), fuzz/token_record_fuzz.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/fs.h>
#include <linux/keyctl.h>

#include <json-c/json.h>
#include <libcryptsetup.h>
#include <openssl/crypto.h>

#include "token_record.h"

#define KH_PUBLIC __attribute__((visibility("default")))

#define TOKEN_TYPE "keyhandoff-onetime"
#define KEYRING_NAME "keyhandoff"                       /* names.KEYRING_NAME */
#define RECORD_KEY "keyhandoff:record"                  /* names.RECORD_BLOB_KEY */
#define KEY_PERM 0x3f010000UL                           /* names.KEY_PERM */
#define RECORD_TIMEOUT 600                              /* at most, seconds */
#define EFI_RECORD_FILE "KeyHandoffStash-7ec2927b-59f1-4933-8945-01041e7137eb"
#define EFIVARS_DEFAULT "/sys/firmware/efi/efivars/"
#define BOOT_ID_PATH "/proc/sys/kernel/random/boot_id"
#define ONETIME_PBKDF "pbkdf2"
#define ONETIME_ITERATIONS 1000
#define EFI_ATTR_LEN 4

/* ------------------------------------------------------------------------- logging */

static void say(struct crypt_device *cd, const char *what)
{
    char line[160];

    snprintf(line, sizeof line, TOKEN_TYPE ": %s\n", what);
    crypt_log(cd, CRYPT_LOG_DEBUG, line);
}

/* ------------------------------------------------------------------------- keyring */

static long kh_keyctl(int cmd, unsigned long a2, unsigned long a3, unsigned long a4,
                      unsigned long a5)
{
    return syscall(SYS_keyctl, cmd, a2, a3, a4, a5);
}

static int32_t kh_add_key(const char *type, const char *desc, const void *payload,
                          size_t len, int32_t ring)
{
    return (int32_t)syscall(SYS_add_key, type, desc, payload, len, ring);
}

static int32_t kh_search(int32_t ring, const char *type, const char *desc)
{
    return (int32_t)kh_keyctl(KEYCTL_SEARCH, (unsigned long)ring, (unsigned long)type,
                              (unsigned long)desc, 0);
}

/* Whether keyctl_describe says: this type, owned by uid 0, exactly `perm`, this description
 * ("type;uid;gid;perm;description"; the description may hold ';'). */
static int kh_trusted(int32_t serial, const char *type, unsigned long perm, const char *desc)
{
    char text[256], *field[5], *p, *end;
    unsigned long got;
    long n;
    int i;

    n = kh_keyctl(KEYCTL_DESCRIBE, (unsigned long)serial, (unsigned long)text, sizeof text, 0);
    if (n < 0 || (size_t)n > sizeof text)
        return 0;
    text[sizeof text - 1] = '\0';
    p = text;
    for (i = 0; i < 4; i++) {
        field[i] = p;
        p = strchr(p, ';');
        if (p == NULL)
            return 0;
        *p++ = '\0';
    }
    field[4] = p;
    errno = 0;
    got = strtoul(field[3], &end, 16);
    return errno == 0 && *field[3] != '\0' && *end == '\0' && got == perm &&
           strcmp(field[0], type) == 0 && strcmp(field[1], "0") == 0 &&
           strcmp(field[4], desc) == 0;
}

/* Our keyring in @u (created when `create` and missing, as cache.PassphraseCache makes it):
 * its serial, or -1. */
static int32_t kh_our_keyring(int create)
{
    int32_t ring = kh_search(KEY_SPEC_USER_KEYRING, "keyring", KEYRING_NAME);

    if (ring < 0 && create)
        ring = kh_add_key("keyring", KEYRING_NAME, NULL, 0, KEY_SPEC_USER_KEYRING);
    if (ring < 0)
        return -1;
    if (create && kh_keyctl(KEYCTL_SETPERM, (unsigned long)ring, KEY_PERM, 0, 0) < 0)
        return -1;
    return kh_trusted(ring, "keyring", KEY_PERM, KEYRING_NAME) ? ring : -1;
}

/* The trusted keyring copy of the record into buf: its length, 0 when there is none. */
static long kh_keyring_record(uint8_t *buf, size_t cap)
{
    int32_t ring = kh_our_keyring(0), serial;
    long n;

    if (ring < 0)
        return 0;
    serial = kh_search(ring, "user", RECORD_KEY);
    if (serial < 0 || !kh_trusted(serial, "user", KEY_PERM, RECORD_KEY))
        return 0;
    n = kh_keyctl(KEYCTL_READ, (unsigned long)serial, (unsigned long)buf, cap, 0);
    if (n < 0 || (size_t)n > cap)
        return 0;                       /* unreadable, or larger than any record: not ours */
    return n;
}

/* keys.publish, unpadded: born in the thread keyring, permissions and timeout set, then
 * linked into our keyring.  Its serial, or -1 (nothing left behind). */
static int32_t kh_publish(const uint8_t *blob, size_t len, long timeout)
{
    int32_t ring = kh_our_keyring(1), serial;
    int ok;

    if (ring < 0)
        return -1;
    serial = kh_add_key("user", RECORD_KEY, blob, len, KEY_SPEC_THREAD_KEYRING);
    if (serial < 0)
        return -1;
    ok = kh_keyctl(KEYCTL_SETPERM, (unsigned long)serial, KEY_PERM, 0, 0) == 0 &&
         kh_keyctl(KEYCTL_SET_TIMEOUT, (unsigned long)serial, (unsigned long)timeout, 0, 0) == 0 &&
         kh_keyctl(KEYCTL_LINK, (unsigned long)serial, (unsigned long)ring, 0, 0) == 0;
    if (!ok)
        kh_keyctl(KEYCTL_INVALIDATE, (unsigned long)serial, 0, 0, 0);
    kh_keyctl(KEYCTL_UNLINK, (unsigned long)serial, (unsigned long)KEY_SPEC_THREAD_KEYRING, 0, 0);
    return ok ? serial : -1;
}

/* ------------------------------------------------------------------------- EFI variable */

/* The efivars directory (with a trailing '/') into out. */
static int kh_efivars_dir(char *out, size_t cap)
{
    const char *dir = secure_getenv("EFIVARFS_PATH");
    size_t n;

    if (dir == NULL || *dir == '\0')
        dir = EFIVARS_DEFAULT;
    n = strlen(dir);
    if (snprintf(out, cap, "%s%s", dir, n > 0 && dir[n - 1] == '/' ? "" : "/") >= (int)cap)
        return -1;
    return 0;
}

/* Read the variable file (attributes + data) into buf: its length, 0 when missing, -1. */
static long kh_read_variable(int dirfd, uint8_t *buf, size_t cap)
{
    int fd = openat(dirfd, EFI_RECORD_FILE, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    size_t got = 0;
    ssize_t n;

    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    while (got < cap) {
        n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    return (long)got;
}

/* Delete the variable: clear efivarfs' immutable flag (where there is one), unlink. */
static int kh_delete_variable(int dirfd)
{
    int fd = openat(dirfd, EFI_RECORD_FILE, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), flags;

    if (fd >= 0) {
        if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0 && (flags & FS_IMMUTABLE_FL)) {
            flags &= ~FS_IMMUTABLE_FL;
            ioctl(fd, FS_IOC_SETFLAGS, &flags);         /* unlinkat tells whether it worked */
        }
        close(fd);
    }
    return unlinkat(dirfd, EFI_RECORD_FILE, 0);
}

static int64_t kh_now(void)
{
    return (int64_t)time(NULL);
}

/* The record, into buf (KHR_MAX_RECORD + 1 bytes): its length; 0 none; -EPERM / -EINVAL. */
static long kh_take_record(struct crypt_device *cd, uint8_t *buf)
{
    uint8_t *raw;
    char dir[4096];
    struct khr_header header;
    enum khr_verdict framing;
    char line[128];
    int64_t left;
    long n, timeout;
    int dirfd, rc;

    n = kh_keyring_record(buf, KHR_MAX_RECORD + 1);
    if (n > 0) {
        say(cd, "record from the keyring");
        return n;
    }
    if (kh_efivars_dir(dir, sizeof dir) != 0)
        return 0;
    dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return 0;                                       /* no EFI variables: no record */
    raw = malloc(EFI_ATTR_LEN + KHR_MAX_RECORD + 1);
    if (raw == NULL) {
        close(dirfd);
        return -ENOMEM;
    }
    if (flock(dirfd, LOCK_EX) != 0) {
        rc = -EPERM;
        goto out;
    }
    n = kh_keyring_record(buf, KHR_MAX_RECORD + 1);    /* taken meanwhile by another volume */
    if (n > 0) {
        say(cd, "record from the keyring");
        rc = (int)n;
        goto out;
    }
    n = kh_read_variable(dirfd, raw, EFI_ATTR_LEN + KHR_MAX_RECORD + 1);
    if (n <= 0) {
        rc = n == 0 ? 0 : -EPERM;
        goto out;
    }
    framing = n <= EFI_ATTR_LEN ? KHR_UNKNOWN_FORMAT
              : khr_parse_header(raw + EFI_ATTR_LEN, (size_t)n - EFI_ATTR_LEN, &header);
    if (framing != KHR_OK) {
        snprintf(line, sizeof line, "record refused: %s (left in the EFI variable for "
                 "keyhandoff restore)", khr_verdict_name(framing));
        say(cd, line);
        rc = -EINVAL;
        goto out;
    }
    n -= EFI_ATTR_LEN;
    memcpy(buf, raw + EFI_ATTR_LEN, (size_t)n);
    left = header.not_after >= (UINT64_C(1) << 63) ? RECORD_TIMEOUT
                                                   : (int64_t)header.not_after - kh_now();
    timeout = left > RECORD_TIMEOUT ? RECORD_TIMEOUT : left < 1 ? 1 : (long)left;
    {
        int32_t serial = kh_publish(buf, (size_t)n, timeout);

        if (serial < 0) {
            say(cd, "cannot publish the record in the keyring: not used");
            rc = -EPERM;
            goto out;
        }
        if (kh_delete_variable(dirfd) != 0) {
            /* delete before use: a record that stays in NVRAM is never answered from */
            kh_keyctl(KEYCTL_INVALIDATE, (unsigned long)serial, 0, 0, 0);
            say(cd, "cannot delete the EFI variable: record not used");
            rc = -EPERM;
            goto out;
        }
    }
    say(cd, "record taken from the EFI variable");
    rc = (int)n;
out:
    OPENSSL_cleanse(raw, EFI_ATTR_LEN + KHR_MAX_RECORD + 1);
    free(raw);
    close(dirfd);                                       /* releases the flock */
    return rc;
}

static int kh_boot_id(uint8_t out[KHR_UUID_LEN])
{
    char text[64];
    ssize_t n;
    int fd = open(BOOT_ID_PATH, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -1;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n < 36)
        return -1;
    return kh_uuid_parse(text, 36, out);
}

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
        say(cd, "token refused: not a well-formed keyhandoff-onetime token");
        return -EINVAL;
    }
    if (kh_not_ours(cd, token, &t) != 0) {
        say(cd, "token refused: not bound to the keyslot it names");
        rc = -EINVAL;
        goto out;
    }
    uuid = crypt_get_uuid(cd);
    if (uuid == NULL || kh_uuid_parse(uuid, strlen(uuid), volume) != 0 ||
        kh_boot_id(boot_id) != 0) {
        say(cd, "no volume UUID or no boot id");
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
            say(cd, "no handoff record");
        rc = n == 0 ? -ENOENT : (int)n;
        goto out;
    }
    v = khr_open(blob, (size_t)n, t.record_key, kh_now(), boot_id, volume, onetime);
    if (v != KHR_OK) {
        snprintf(line, sizeof line, "record refused: %s", khr_verdict_name(v));
        say(cd, line);
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
    say(cd, "one-time key answered");
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
        say(cd, "this token takes no PIN");
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
        say(cd, "token refused: not a well-formed keyhandoff-onetime token");
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
