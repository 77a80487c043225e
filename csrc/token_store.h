/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_store.h - the token plugin's I/O (token_store.c). */
#ifndef TOKEN_STORE_H
#define TOKEN_STORE_H

#include <stdint.h>

#include <libcryptsetup.h>

#include "token_record.h"

/* crypt_log at debug level, "keyhandoff-onetime: <what>": fixed words only, never a secret. */
void kh_say(struct crypt_device *cd, const char *what);

/* The record into buf (KHR_MAX_RECORD + 1 bytes): from the trusted keyring copy, else taken
 * from the EFI variable (published, then deleted; not used when the delete fails).  Its
 * length; 0 when there is none; -EPERM, -EINVAL or -ENOMEM when it cannot be used. */
long kh_take_record(struct crypt_device *cd, uint8_t *buf);

/* The running boot's id (/proc/sys/kernel/random/boot_id): 0, or -1. */
int kh_boot_id(uint8_t out[KHR_UUID_LEN]);

/* Unix time. */
int64_t kh_now(void);

#endif
