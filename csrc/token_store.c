/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_store.c - where the token plugin finds the handoff record: our kernel keyring, else
 * the kexec channel's file in /run, else the EFI variable (either taken: published in the
 * keyring, then removed).  See
 * token_keyhandoff_onetime.c for the rules; this file is their I/O: keyring calls by
 * syscall(2) (no libkeyutils), the efivarfs file, the boot id and the clock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/fs.h>
#include <linux/keyctl.h>

#include <libcryptsetup.h>
#include <openssl/crypto.h>

#include "token_record.h"
#include "token_store.h"

#define TOKEN_TYPE "keyhandoff-onetime"
#define KEYRING_NAME "keyhandoff"                       /* names.KEYRING_NAME */
#define RECORD_KEY "keyhandoff:record"                  /* names.RECORD_BLOB_KEY */
#define KEY_PERM 0x3f010000UL                           /* names.KEY_PERM */
#define RECORD_TIMEOUT 600                              /* at most, seconds */
#define EFI_RECORD_FILE "KeyHandoffStash-7ec2927b-59f1-4933-8945-01041e7137eb"
#define EFIVARS_DEFAULT "/sys/firmware/efi/efivars/"
#define KEXEC_RECORD_DEFAULT "/run/keyhandoff/kexec-record"   /* names.KEXEC_RECORD */
#define BOOT_ID_PATH "/proc/sys/kernel/random/boot_id"
#define EFI_ATTR_LEN 4

/* ------------------------------------------------------------------------- logging */

void kh_say(struct crypt_device *cd, const char *what)
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

/* A record's kernel timeout in our keyring: min(not_after - now, RECORD_TIMEOUT), >= 1. */
static long kh_record_timeout(const struct khr_header *header)
{
    int64_t left = header->not_after >= (UINT64_C(1) << 63)
                   ? RECORD_TIMEOUT : (int64_t)header->not_after - kh_now();

    return left > RECORD_TIMEOUT ? RECORD_TIMEOUT : left < 1 ? 1 : (long)left;
}

/* Publish a record taken from its source, then remove the source (remove(source)); when
 * the removal fails, invalidate the key and answer nothing: a record is never used while
 * its source remains.  0 or -EPERM, said in the words given for the two failures. */
static int kh_publish_and_remove(struct crypt_device *cd, const uint8_t *buf, size_t len,
                                 const struct khr_header *header,
                                 int (*remove)(const void *), const void *source,
                                 const char *unpublished, const char *unremoved)
{
    int32_t serial = kh_publish(buf, len, kh_record_timeout(header));

    if (serial < 0) {
        kh_say(cd, unpublished);
        return -EPERM;
    }
    if (remove(source) != 0) {
        kh_keyctl(KEYCTL_INVALIDATE, (unsigned long)serial, 0, 0, 0);
        kh_say(cd, unremoved);
        return -EPERM;
    }
    return 0;
}

/* ------------------------------------------------------------------------- kexec file */

static int kh_unlink_path(const void *path)
{
    return unlink((const char *)path);
}

/* The kexec channel's record: the file the initramfs moved out of the loaded initrd segment
 * ($KEYHANDOFF_KEXEC_RECORD, default /run/keyhandoff/kexec-record).  Read only when it is a
 * regular file owned by root with no group or other permission, framed as ours and sealed
 * for the kexec channel; then published in the keyring and unlinked (the key invalidated
 * and nothing used when the unlink fails).  An flock on the file makes two volumes take it
 * once.  Its length into buf; 0 none; -EPERM / -EINVAL refused (the file left as it is). */
static long kh_take_kexec_file(struct crypt_device *cd, uint8_t *buf)
{
    const char *path = secure_getenv("KEYHANDOFF_KEXEC_RECORD");
    struct khr_header header;
    struct stat st;
    size_t got = 0;
    ssize_t n;
    long rc;
    int fd;

    if (path == NULL || *path == '\0')
        path = KEXEC_RECORD_DEFAULT;
    fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        kh_say(cd, "kexec record refused: it cannot be opened (a link?)");
        return -EPERM;
    }
    if (flock(fd, LOCK_EX) != 0) {
        rc = -EPERM;
        goto out;
    }
    rc = kh_keyring_record(buf, KHR_MAX_RECORD + 1);   /* taken meanwhile by another volume */
    if (rc > 0)
        goto out;
    if (fstat(fd, &st) != 0 || st.st_nlink == 0) {
        rc = 0;                                         /* gone meanwhile: no record here */
        goto out;
    }
    if (!S_ISREG(st.st_mode) || st.st_uid != 0 || (st.st_mode & 077) != 0 ||
        st.st_size > KHR_MAX_RECORD) {
        kh_say(cd, "kexec record refused: not root's private file of a record's size");
        rc = -EPERM;
        goto out;
    }
    while (got < KHR_MAX_RECORD + 1) {
        n = read(fd, buf + got, KHR_MAX_RECORD + 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got > KHR_MAX_RECORD || khr_parse_header(buf, got, &header) != KHR_OK ||
        header.channel != KHR_CHANNEL_KEXEC) {
        kh_say(cd, "kexec record refused: not a kexec record of ours (left for keyhandoff "
               "restore)");
        rc = -EINVAL;
        goto out;
    }
    rc = kh_publish_and_remove(cd, buf, got, &header, kh_unlink_path, path,
                               "cannot publish the kexec record in the keyring: not used",
                               "cannot remove the kexec record file: record not used");
    if (rc != 0)
        goto out;
    kh_say(cd, "record taken from the kexec segment's file");
    rc = (long)got;
out:
    if (rc <= 0)
        OPENSSL_cleanse(buf, KHR_MAX_RECORD + 1);
    close(fd);                                          /* releases the flock */
    return rc;
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

static int kh_delete_variable_at(const void *dirfd)
{
    return kh_delete_variable(*(const int *)dirfd);
}

int64_t kh_now(void)
{
    return (int64_t)time(NULL);
}

/* The record, into buf (KHR_MAX_RECORD + 1 bytes): its length; 0 none; -EPERM / -EINVAL. */
long kh_take_record(struct crypt_device *cd, uint8_t *buf)
{
    uint8_t *raw;
    char dir[4096];
    struct khr_header header;
    enum khr_verdict framing;
    char line[128];
    long n;
    int dirfd, rc;

    n = kh_keyring_record(buf, KHR_MAX_RECORD + 1);
    if (n > 0) {
        kh_say(cd, "record from the keyring");
        return n;
    }
    n = kh_take_kexec_file(cd, buf);
    if (n != 0)
        return n;
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
        kh_say(cd, "record from the keyring");
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
    if (framing == KHR_OK && header.channel != KHR_CHANNEL_EFI)
        framing = KHR_FOREIGN;                          /* only efi records travel there */
    if (framing != KHR_OK) {
        snprintf(line, sizeof line, "record refused: %s (left in the EFI variable for "
                 "keyhandoff restore)", khr_verdict_name(framing));
        kh_say(cd, line);
        rc = -EINVAL;
        goto out;
    }
    n -= EFI_ATTR_LEN;
    memcpy(buf, raw + EFI_ATTR_LEN, (size_t)n);
    rc = kh_publish_and_remove(cd, buf, (size_t)n, &header, kh_delete_variable_at, &dirfd,
                               "cannot publish the record in the keyring: not used",
                               "cannot delete the EFI variable: record not used");
    if (rc != 0)
        goto out;
    kh_say(cd, "record taken from the EFI variable");
    rc = (int)n;
out:
    OPENSSL_cleanse(raw, EFI_ATTR_LEN + KHR_MAX_RECORD + 1);
    free(raw);
    close(dirfd);                                       /* releases the flock */
    return rc;
}

int kh_boot_id(uint8_t out[KHR_UUID_LEN])
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

