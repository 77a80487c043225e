/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* kh_payload.h - find the passphrase inside a key payload (no I/O, no allocation).
 *
 * Used by pam_keyhandoff.c and by fuzz/pam_payload_fuzz.c.  Both functions take the whole
 * payload of a "user" key and, on success, return 0 and point *out at the passphrase INSIDE
 * the payload (no copy): 1 <= *out_len <= KH_MAX_PASSPHRASE and no NUL byte in it, so the
 * caller can hand it to PAM as a C string after copying it out.  Anything else returns -1
 * and leaves *out / *out_len untouched: there is no partial result.
 */
#ifndef KH_PAYLOAD_H
#define KH_PAYLOAD_H

#include <stddef.h>

/* systemd accepts passphrases of up to 2048 bytes (keyhandoff/secret.py MAX_PASSPHRASE). */
#define KH_MAX_PASSPHRASE 2048

/* keyhandoff's padded payload (keys "keyhandoff:..."): exactly 4096 bytes, bytes 0-1 the
 * secret's length L (big-endian, 1 <= L <= 4094), then the secret, then zero bytes only. */
#define KH_PADDED_SIZE 4096
#define KH_PADDED_MAX (KH_PADDED_SIZE - 2)

int kh_unpad(const unsigned char *payload, size_t len,
             const unsigned char **out, size_t *out_len);

/* systemd's format (its "cryptsetup" key, any other keyname): NUL-separated entries, the
 * passphrase is the LAST entry (what pam_gdm hands over).  Trailing NULs (older writers)
 * are skipped; an empty last entry is "no passphrase". */
int kh_last_entry(const unsigned char *payload, size_t len,
                  const unsigned char **out, size_t *out_len);

#endif
