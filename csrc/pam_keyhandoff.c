/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* pam_keyhandoff.c - hand a passphrase cached in the kernel keyring to PAM_AUTHTOK.
 *
 * What it does (auth stack only; it never prompts, like gdm's pam_gdm):
 *   keyctl_search() the caller's session keyring for a "user" key named by keyname=, check
 *   that the key is trusted, read it, invalidate it (one-shot, unless "keep"), take the
 *   passphrase out of the payload and pam_set_item(PAM_AUTHTOK) it, for the modules after
 *   us (pam_gnome_keyring, pam_kwallet5) to unlock the login keyring after autologin.
 *
 * Trust rule (the whole security of this module):
 *   A key is read only when it is (a) found by keyctl_search() from the session keyring,
 *   i.e. possessed: no find_key_by_type_and_desc(), no /proc/keys, no request_key() upcall;
 *   (b) of type "user" with exactly the description asked for; (c) owned by uid 0; (d) its
 *   permissions are exactly 0x3f010000 (possessor all, owner view), what keyhandoff and
 *   systemd set.  Anything else is "no key".  Any user can create a key with our name and
 *   open permissions in its own keyrings: such a key is never possessed by root's stack,
 *   and if someone links it there it fails (c).  Only root can make a key pass (c)/(d).
 *
 * Payload formats:
 *   keyname "keyhandoff:*" (the default keyhandoff:login): keyhandoff's padded payload,
 *     4096 bytes, big-endian u16 length L, secret, zero padding (kh_payload.h);
 *   any other keyname (keyname=cryptsetup, systemd's cache): NUL-separated entries, the
 *     last one is the passphrase (as pam_gdm takes it).
 *   A malformed or empty payload, or a passphrase over 2048 bytes, is "no key": never a
 *   partial token.
 *
 * Options:
 *   keyname=<description>  the key to read (default keyhandoff:login)
 *   keep                   do not invalidate the key (systemd's key belongs to others too);
 *                          without it a trusted key is invalidated right after it is read,
 *                          whatever it holds, and before anything is handed over
 *   Anything else is a configuration error (a typo must not silently read another key).
 *
 * Return codes of pam_sm_authenticate:
 *   PAM_SUCCESS           PAM_AUTHTOK is set
 *   PAM_AUTHINFO_UNAVAIL  no trusted key, or no usable passphrase in it (as pam_gdm)
 *   PAM_SERVICE_ERR       unknown option, the key could not be invalidated, out of memory,
 *                         pam_set_item failed, a keyctl error other than "no usable key"
 *                         (ENOKEY, EKEYEXPIRED, EKEYREVOKED, EKEYREJECTED, EACCES, EPERM,
 *                         ENOSYS, EOPNOTSUPP give PAM_AUTHINFO_UNAVAIL)
 *   setcred: PAM_SUCCESS; acct_mgmt, open/close_session: PAM_IGNORE; chauthtok:
 *   PAM_SERVICE_ERR.
 *
 * Logging: pam_syslog with key descriptions and serials only, never a payload.  Every
 * buffer that held the secret is explicit_bzero()ed before it is freed.  The key is read
 * with one keyctl_read() into a buffer that fits any user key, not keyctl_read_alloc(),
 * whose retry loop frees a partly filled buffer without wiping it.
 *
 * Build: csrc/build-pam OUTDIR (the flags; only pam_sm_* exported, pam_keyhandoff.map).
 * Tests: tests/integration/test_pam.py (Linux-PAM + pamtester), fuzz/pam_payload_fuzz.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include <keyutils.h>

#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT
#define PAM_SM_SESSION
#define PAM_SM_PASSWORD
#include <security/pam_ext.h>
#include <security/pam_modules.h>

#include "kh_payload.h"

#define KH_DEFAULT_KEYNAME "keyhandoff:login"
#define KH_OUR_PREFIX "keyhandoff:"
#define KH_KEY_PERM 0x3f010000UL
/* The largest payload of a "user" key (the kernel's limit is 32767 bytes). */
#define KH_READ_MAX 32768

struct kh_options {
    const char *keyname;
    int keep;
};

static int kh_parse_options(pam_handle_t *pamh, int argc, const char **argv,
                            struct kh_options *opt)
{
    int i;

    opt->keyname = KH_DEFAULT_KEYNAME;
    opt->keep = 0;
    for (i = 0; i < argc; i++) {
        if (strcmp(argv[i], "keep") == 0) {
            opt->keep = 1;
        } else if (strncmp(argv[i], "keyname=", 8) == 0) {
            opt->keyname = argv[i] + 8;
            if (opt->keyname[0] == '\0') {
                pam_syslog(pamh, LOG_ERR, "configuration error: keyname= needs a key description");
                return -1;
            }
        } else {
            pam_syslog(pamh, LOG_ERR, "configuration error: unknown option '%s'", argv[i]);
            return -1;
        }
    }
    return 0;
}

/* The kernel answers these when there is simply no usable key (missing, expired, revoked,
   rejected, not permitted, no keyring support): "nothing to hand over". */
static int kh_unavailable_errno(int err)
{
    return err == ENOKEY || err == EKEYEXPIRED || err == EKEYREVOKED || err == EKEYREJECTED ||
           err == EACCES || err == EPERM || err == ENOSYS || err == EOPNOTSUPP;
}

static int kh_errno_result(pam_handle_t *pamh, const char *what, const char *keyname, int err)
{
    const char *name = strerrorname_np(err);

    if (kh_unavailable_errno(err)) {
        pam_syslog(pamh, LOG_DEBUG, "no usable key '%s' (%s: %s)", keyname, what,
                   name ? name : "?");
        return PAM_AUTHINFO_UNAVAIL;
    }
    pam_syslog(pamh, LOG_ERR, "key '%s': %s failed (%s)", keyname, what, name ? name : "?");
    return PAM_SERVICE_ERR;
}

/* Whether the key is one we trust: keyctl_describe gives "type;uid;gid;perm;description"
   (perm in hex; the description itself may contain ';').  Logs why a key is refused. */
static int kh_trusted(pam_handle_t *pamh, key_serial_t serial, const char *keyname)
{
    char *desc = NULL, *field[5], *p, *end;
    unsigned long perm;
    int i, ok;

    if (keyctl_describe_alloc(serial, &desc) < 0)
        return -1;                      /* errno set: the caller decides */
    p = desc;
    for (i = 0; i < 4 && p != NULL; i++) {
        field[i] = p;
        p = strchr(p, ';');
        if (p != NULL)
            *p++ = '\0';
    }
    if (p == NULL) {                    /* not the kernel's format: never trust it */
        pam_syslog(pamh, LOG_ERR, "key %d: unexpected description format", (int)serial);
        free(desc);
        return 0;
    }
    field[4] = p;
    errno = 0;
    perm = strtoul(field[3], &end, 16);
    ok = errno == 0 && *field[3] != '\0' && *end == '\0' &&
         strcmp(field[0], "user") == 0 && strcmp(field[1], "0") == 0 &&
         perm == KH_KEY_PERM && strcmp(field[4], keyname) == 0;
    if (!ok)
        pam_syslog(pamh, LOG_WARNING,
                   "key %d named '%s' is not trusted (owner uid %.16s, permissions %.16s; "
                   "only a user key owned by uid 0 with permissions %08lx is read): ignored",
                   (int)serial, keyname, field[1], field[3], KH_KEY_PERM);
    free(desc);
    return ok;
}

static int kh_authenticate(pam_handle_t *pamh, const struct kh_options *opt)
{
    key_serial_t serial;
    unsigned char *payload = NULL;
    char *token = NULL;
    const unsigned char *pass = NULL;
    size_t pass_len = 0;
    long got;
    int rc, parsed, err, trusted;

    /* (a) possession: search from our session keyring only, link nothing (dest 0). */
    serial = keyctl_search(KEY_SPEC_SESSION_KEYRING, "user", opt->keyname, 0);
    if (serial < 0)
        return kh_errno_result(pamh, "search", opt->keyname, errno);

    /* (b)-(d): type, exact description, owner root, exact permissions. */
    trusted = kh_trusted(pamh, serial, opt->keyname);
    if (trusted < 0)
        return kh_errno_result(pamh, "describe", opt->keyname, errno);
    if (!trusted)
        return PAM_AUTHINFO_UNAVAIL;

    /* One read into a buffer that fits any user key (see the top of this file). */
    payload = malloc(KH_READ_MAX);
    if (payload == NULL) {
        pam_syslog(pamh, LOG_ERR, "out of memory");
        return PAM_SERVICE_ERR;
    }
    got = keyctl_read(serial, (char *)payload, KH_READ_MAX);
    err = errno;
    if (got < 0) {
        rc = kh_errno_result(pamh, "read", opt->keyname, err);
        goto out;
    }
    if (got > KH_READ_MAX) {            /* larger than any user key: not ours */
        pam_syslog(pamh, LOG_WARNING, "key '%s' is too large: not used", opt->keyname);
        rc = PAM_AUTHINFO_UNAVAIL;
        goto out;
    }

    /* One-shot: destroy the key before anything is handed over.  If it cannot be destroyed,
       nothing is handed over, so the key is never used twice. */
    if (!opt->keep && keyctl_invalidate(serial) < 0) {
        err = errno;
        pam_syslog(pamh, LOG_ERR, "cannot invalidate key %d (%s): not used", (int)serial,
                   strerrorname_np(err) ? strerrorname_np(err) : "?");
        rc = PAM_SERVICE_ERR;
        goto out;
    }

    if (strncmp(opt->keyname, KH_OUR_PREFIX, sizeof KH_OUR_PREFIX - 1) == 0)
        parsed = kh_unpad(payload, (size_t)got, &pass, &pass_len);
    else
        parsed = kh_last_entry(payload, (size_t)got, &pass, &pass_len);
    if (parsed != 0) {
        pam_syslog(pamh, LOG_WARNING, "key '%s' holds no usable passphrase", opt->keyname);
        rc = PAM_AUTHINFO_UNAVAIL;
        goto out;
    }

    token = malloc(pass_len + 1);
    if (token == NULL) {
        pam_syslog(pamh, LOG_ERR, "out of memory");
        rc = PAM_SERVICE_ERR;
        goto out;
    }
    memcpy(token, pass, pass_len);
    token[pass_len] = '\0';
    /* libpam keeps its own copy (and wipes it at pam_end). */
    if (pam_set_item(pamh, PAM_AUTHTOK, token) != PAM_SUCCESS) {
        pam_syslog(pamh, LOG_ERR, "cannot set PAM_AUTHTOK");
        rc = PAM_SERVICE_ERR;
        goto out;
    }
    pam_syslog(pamh, LOG_INFO, "passphrase from key '%s' handed to PAM_AUTHTOK%s",
               opt->keyname, opt->keep ? "" : " (key invalidated)");
    rc = PAM_SUCCESS;

out:
    if (token != NULL) {
        explicit_bzero(token, pass_len + 1);
        free(token);
    }
    explicit_bzero(payload, KH_READ_MAX);
    free(payload);
    return rc;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    struct kh_options opt;

    (void)flags;  /* PAM_SILENT changes nothing: we never prompt and print nothing */
    if (kh_parse_options(pamh, argc, argv, &opt) != 0)
        return PAM_SERVICE_ERR;
    return kh_authenticate(pamh, &opt);
}

/* Like pam_gdm: this auth module has no credentials to establish. */
PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}

/* Not an account module: no opinion, and PAM_IGNORE can never make a stack succeed. */
PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

/* Nothing to do at session open/close; ignoring keeps a shared include harmless. */
PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

/* We cannot change a password: a line in a password stack is a configuration error. */
PAM_EXTERN int pam_sm_chauthtok(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)flags; (void)argc; (void)argv;
    pam_syslog(pamh, LOG_ERR, "pam_keyhandoff cannot change passwords (password stack)");
    return PAM_SERVICE_ERR;
}
