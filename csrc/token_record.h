/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_record.h - the handoff record and the keyhandoff-onetime token, parsed in C.
 *
 * The C side of two formats the Python code defines: the sealed handoff record
 * (keyhandoff/record.py; its module docstring is the byte layout) and the JSON of a LUKS2
 * "keyhandoff-onetime" token (keyhandoff/onetime.py parse_token).  Pure: bytes in, values
 * out; no I/O, no allocation except OpenSSL's own contexts, no static state.  Used by
 * token_keyhandoff_onetime.c (the libcryptsetup token plugin) and fuzz/token_record_fuzz.c.
 *
 * Every refusal the Python side makes is made here too, for the same reason and in the
 * same order (tests/integration/test_token_plugin.py runs both on the same inputs):
 * the verdict names map one to one onto keyhandoff.errors' record refusals.
 */
#ifndef TOKEN_RECORD_H
#define TOKEN_RECORD_H

#include <stddef.h>
#include <stdint.h>

#define KHR_VERSION 1
#define KHR_CHANNEL_EFI 2
#define KHR_CHANNEL_KEXEC 4
#define KHR_HEADER_LEN 59
#define KHR_NONCE_LEN 12
#define KHR_TAG_LEN 16
#define KHR_KEY_LEN 32          /* record key (record.RECORD_KEY_LEN) */
#define KHR_ONETIME_LEN 32      /* one-time key (record.ONETIME_KEY_LEN) */
#define KHR_KEY_ID_LEN 8
#define KHR_UUID_LEN 16
#define KHR_MAX_ENTRIES 16
#define KHR_MAX_LIFETIME (7 * 24 * 3600)
#define KHR_CLOCK_SKEW 300
#define KHR_MAX_RECORD 16384
/* header + the smallest plaintext (count, one entry head, a 32-byte key) + tag */
#define KHR_MIN_RECORD (KHR_HEADER_LEN + 1 + 19 + KHR_ONETIME_LEN + KHR_TAG_LEN)
/* keyhandoff.sealing.SEALED_OVERHEAD and keyhandoff.secret.MAX_PASSPHRASE */
#define KHR_SEALED_OVERHEAD 45
#define KHR_MAX_PASSPHRASE 2048

#define KHT_MAX_TOKEN_BYTES 1024 /* onetime.MAX_TOKEN_BYTES */
#define KHT_MAX_KEYSLOTS 32

/* Why a record was refused; KHR_OK = opened and the volume's one-time key found. */
enum khr_verdict {
    KHR_OK = 0,
    KHR_UNKNOWN_FORMAT,     /* RecordUnknownFormat: magic, version */
    KHR_MALFORMED,          /* RecordMalformed: size, channel byte, fields, entries */
    KHR_FOREIGN,            /* RecordForeign: another channel, another record key */
    KHR_TAMPERED,           /* RecordTampered: authentication failed */
    KHR_EXHAUSTED,          /* RecordExhausted: boots_left 0 */
    KHR_EXPIRED,            /* RecordExpired: past not_after */
    KHR_NOT_YET_VALID,      /* RecordNotYetValid: clock before created - CLOCK_SKEW */
    KHR_SAME_BOOT,          /* RecordSameBoot: armed in the running boot */
    KHR_NO_ENTRY,           /* opened, but no one-time key for this volume */
    KHR_INTERNAL,           /* the crypto library failed (out of memory) */
};

/* A short word for a verdict ("tampered", "expired", ...): not secret, for logs. */
const char *khr_verdict_name(enum khr_verdict verdict);

/* The cleartext header (authenticated only by khr_open). */
struct khr_header {
    uint8_t version, channel, boots_left;
    uint64_t created, not_after;
    uint8_t boot_id[KHR_UUID_LEN];
    uint8_t key_id[KHR_KEY_ID_LEN];
    uint8_t nonce[KHR_NONCE_LEN];
};

/* record.parse_header: framing checks and the header; KHR_OK or the refusal. */
enum khr_verdict khr_parse_header(const uint8_t *blob, size_t len, struct khr_header *out);

/* record.record_key_id: HKDF-SHA256(key, no salt, "keyhandoff record v1 key-id"), 8 bytes.
 * 0, or -1 when the crypto library failed. */
int khr_key_id(const uint8_t key[KHR_KEY_LEN], uint8_t out[KHR_KEY_ID_LEN]);

/* record.open_record(channel=EFI) followed by the lookup of the ONETIME_KEY entry for
 * `volume`.  On KHR_OK the 32-byte key is in `onetime` (the caller wipes it); on any
 * refusal `onetime` is zero.  `now` is unix time, `boot_id` the running boot's id.  Every
 * buffer that held plaintext or a derived key is wiped before return. */
enum khr_verdict khr_open(const uint8_t *blob, size_t len, const uint8_t key[KHR_KEY_LEN],
                          int64_t now, const uint8_t boot_id[KHR_UUID_LEN],
                          const uint8_t volume[KHR_UUID_LEN], uint8_t onetime[KHR_ONETIME_LEN]);

/* A keyhandoff-onetime token as onetime.parse_token accepts it. */
struct kht_token {
    int keyslot;
    int64_t not_after;
    char boot_id[37];                   /* canonical lower-case UUID text */
    uint8_t record_key[KHR_KEY_LEN];    /* secret: wipe with kht_token_wipe */
    char binding[65];                   /* 64 lower-case hex digits */
};

/* onetime.parse_token: 0 and *out filled for exactly our token's shape, else -1 (and *out
 * zeroed).  `text` need not be NUL-terminated; at most KHT_MAX_TOKEN_BYTES bytes. */
int kht_parse_token(const char *text, size_t len, struct kht_token *out);
void kht_token_wipe(struct kht_token *token);

/* onetime.binding: SHA-256 over the context, the keyslot number (u32 big-endian) and the
 * keyslot's KDF salt, as lower-case hex into out[65].  0, or -1 on a crypto failure. */
int kht_binding(int keyslot, const uint8_t *salt, size_t salt_len, char out[65]);

/* A UUID's text (8-4-4-4-12 hex digits, either case) to its 16 bytes: 0, or -1. */
int kh_uuid_parse(const char *text, size_t len, uint8_t out[KHR_UUID_LEN]);

/* Strict standard base64 (length a multiple of 4, '=' only as padding): the decoded length,
 * or -1 (also when it would not fit in `cap`). */
long kh_base64_decode(const char *text, size_t len, uint8_t *out, size_t cap);

/* The keyslot passphrase of a one-time key (onetime.key_text): 64 lower-case hex digits. */
void kh_key_text(const uint8_t key[KHR_ONETIME_LEN], char out[2 * KHR_ONETIME_LEN]);

#endif
