/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* kh_payload.c - see kh_payload.h. */
#include <string.h>

#include "kh_payload.h"

int kh_unpad(const unsigned char *payload, size_t len,
             const unsigned char **out, size_t *out_len)
{
    size_t secret_len, i;

    if (payload == NULL || len != KH_PADDED_SIZE)
        return -1;
    secret_len = ((size_t)payload[0] << 8) | payload[1];
    if (secret_len < 1 || secret_len > KH_PADDED_MAX)
        return -1;                      /* malformed */
    for (i = 2 + secret_len; i < KH_PADDED_SIZE; i++)
        if (payload[i] != 0)
            return -1;                  /* malformed: padding must be zero */
    if (secret_len > KH_MAX_PASSPHRASE)
        return -1;                      /* well-formed, but not a passphrase systemd takes */
    if (memchr(payload + 2, 0, secret_len) != NULL)
        return -1;                      /* cannot be a C string (PAM_AUTHTOK) */
    *out = payload + 2;
    *out_len = secret_len;
    return 0;
}

int kh_last_entry(const unsigned char *payload, size_t len,
                  const unsigned char **out, size_t *out_len)
{
    size_t end = len, start;

    if (payload == NULL)
        return -1;
    while (end > 0 && payload[end - 1] == 0)
        end--;
    start = end;
    while (start > 0 && payload[start - 1] != 0)
        start--;
    if (start == end || end - start > KH_MAX_PASSPHRASE)
        return -1;
    *out = payload + start;
    *out_len = end - start;
    return 0;
}
