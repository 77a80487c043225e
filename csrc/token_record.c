/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_record.c - the handoff record (see token_record.h; the token is token_json.c).
 *
 * Crypto: OpenSSL's EVP only (HKDF-SHA256, ChaCha20-Poly1305, SHA-256).  Every derived key
 * and every plaintext byte lives in a buffer of ours that is OPENSSL_cleanse()d before the
 * function returns, whatever the outcome.
 */
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include "token_record.h"

static const char MAGIC[4] = {'K', 'H', 'S', 'T'};
static const char INFO_AEAD[] = "keyhandoff record v1 aead";
static const char INFO_KEY_ID[] = "keyhandoff record v1 key-id";
#define ENTRY_HEAD_LEN 19       /* volume (16), kind (1), length (u16) */
#define KIND_ONETIME_KEY 1
#define KIND_SEALED_PASSPHRASE 2
#define HALF_RANGE (UINT64_C(1) << 63)

const char *khr_verdict_name(enum khr_verdict verdict)
{
    switch (verdict) {
    case KHR_OK: return "ok";
    case KHR_UNKNOWN_FORMAT: return "unknown-format";
    case KHR_MALFORMED: return "malformed";
    case KHR_FOREIGN: return "foreign";
    case KHR_TAMPERED: return "tampered";
    case KHR_EXHAUSTED: return "exhausted";
    case KHR_EXPIRED: return "expired";
    case KHR_NOT_YET_VALID: return "not-yet-valid";
    case KHR_SAME_BOOT: return "same-boot";
    case KHR_NO_ENTRY: return "no-entry";
    case KHR_INTERNAL: return "internal";
    }
    return "?";
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

enum khr_verdict khr_parse_header(const uint8_t *blob, size_t len, struct khr_header *out)
{
    size_t head = len < 4 ? len : 4;

    memset(out, 0, sizeof *out);
    if (len > KHR_MAX_RECORD)
        return KHR_MALFORMED;                           /* oversized */
    if (len == 0 || memcmp(blob, MAGIC, head) != 0)
        return KHR_UNKNOWN_FORMAT;                      /* no keyhandoff magic */
    if (len > 4 && blob[4] != KHR_VERSION)
        return KHR_UNKNOWN_FORMAT;                      /* another version */
    if (len < KHR_MIN_RECORD)
        return KHR_MALFORMED;                           /* truncated */
    out->version = blob[4];
    out->channel = blob[5];
    out->boots_left = blob[6];
    out->created = be64(blob + 7);
    out->not_after = be64(blob + 15);
    memcpy(out->boot_id, blob + 23, KHR_UUID_LEN);
    memcpy(out->key_id, blob + 39, KHR_KEY_ID_LEN);
    memcpy(out->nonce, blob + 47, KHR_NONCE_LEN);
    if (out->channel < 1 || out->channel > 4)
        return KHR_MALFORMED;                           /* unknown channel */
    return KHR_OK;
}

/* HKDF-SHA256(ikm, no salt, info) into out[out_len]. */
static int hkdf(const uint8_t *ikm, size_t ikm_len, const char *info, uint8_t *out,
                size_t out_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    size_t got = out_len;
    int ok;

    if (ctx == NULL)
        return -1;
    ok = EVP_PKEY_derive_init(ctx) > 0 &&
         EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
         EVP_PKEY_CTX_set1_hkdf_key(ctx, ikm, (int)ikm_len) > 0 &&
         EVP_PKEY_CTX_add1_hkdf_info(ctx, (const unsigned char *)info, (int)strlen(info)) > 0 &&
         EVP_PKEY_derive(ctx, out, &got) > 0 && got == out_len;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

int khr_key_id(const uint8_t key[KHR_KEY_LEN], uint8_t out[KHR_KEY_ID_LEN])
{
    return hkdf(key, KHR_KEY_LEN, INFO_KEY_ID, out, KHR_KEY_ID_LEN);
}

/* ChaCha20-Poly1305 open: 1 authentic (plaintext in out), 0 not authentic, -1 failure. */
static int aead_open(const uint8_t key[32], const uint8_t *nonce, const uint8_t *aad,
                     size_t aad_len, const uint8_t *ct, size_t ct_len, const uint8_t *tag,
                     uint8_t *out)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, fin = 0, rc = -1;

    if (ctx == NULL)
        return -1;
    if (EVP_DecryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, NULL, NULL) <= 0 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, KHR_NONCE_LEN, NULL) <= 0 ||
        EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) <= 0 ||
        EVP_DecryptUpdate(ctx, NULL, &n, aad, (int)aad_len) <= 0 ||
        EVP_DecryptUpdate(ctx, out, &n, ct, (int)ct_len) <= 0 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, KHR_TAG_LEN, (void *)tag) <= 0)
        goto done;
    rc = EVP_DecryptFinal_ex(ctx, out + n, &fin) > 0 ? 1 : 0;
done:
    EVP_CIPHER_CTX_free(ctx);          /* frees (and cleanses) the key schedule */
    return rc;
}

/* record._check_authenticated_header. */
static enum khr_verdict check_header(const struct khr_header *h, int64_t now,
                                     const uint8_t boot_id[KHR_UUID_LEN])
{
    if (h->created >= HALF_RANGE || h->not_after >= HALF_RANGE)
        return KHR_MALFORMED;                           /* times out of range */
    if (h->not_after <= h->created)
        return KHR_MALFORMED;                           /* deadline not after arming */
    if (h->not_after - h->created > KHR_MAX_LIFETIME)
        return KHR_MALFORMED;                           /* deadline too far */
    if (h->boots_left == 0)
        return KHR_EXHAUSTED;
    if (now > (int64_t)h->not_after)
        return KHR_EXPIRED;
    if (now < (int64_t)h->created - KHR_CLOCK_SKEW)
        return KHR_NOT_YET_VALID;
    if (memcmp(h->boot_id, boot_id, KHR_UUID_LEN) == 0)
        return KHR_SAME_BOOT;
    return KHR_OK;
}

/* record._parse_entries, then the ONETIME_KEY entry of `volume` (its offset in *found). */
static enum khr_verdict parse_entries(const uint8_t *pt, size_t len,
                                      const uint8_t volume[KHR_UUID_LEN], size_t *found)
{
    size_t offset = 1, starts[KHR_MAX_ENTRIES];
    unsigned count = pt[0], i, j;

    *found = 0;
    if (count < 1 || count > KHR_MAX_ENTRIES)
        return KHR_MALFORMED;
    for (i = 0; i < count; i++) {
        unsigned kind;
        size_t length;

        if (offset + ENTRY_HEAD_LEN > len)
            return KHR_MALFORMED;                       /* entry table truncated */
        kind = pt[offset + 16];
        length = (size_t)pt[offset + 17] << 8 | pt[offset + 18];
        if (kind == KIND_ONETIME_KEY) {
            if (length != KHR_ONETIME_LEN)
                return KHR_MALFORMED;
        } else if (kind == KIND_SEALED_PASSPHRASE) {
            if (length <= KHR_SEALED_OVERHEAD ||
                length > KHR_SEALED_OVERHEAD + KHR_MAX_PASSPHRASE)
                return KHR_MALFORMED;
        } else {
            return KHR_MALFORMED;                       /* unknown entry kind */
        }
        if (offset + ENTRY_HEAD_LEN + length > len)
            return KHR_MALFORMED;                       /* entry payload truncated */
        starts[i] = offset;
        offset += ENTRY_HEAD_LEN + length;
    }
    if (offset != len)
        return KHR_MALFORMED;                           /* bytes after the last entry */
    for (i = 0; i < count; i++)                         /* duplicate (volume, kind) */
        for (j = i + 1; j < count; j++)
            if (memcmp(pt + starts[i], pt + starts[j], 17) == 0)
                return KHR_MALFORMED;
    for (i = 0; i < count; i++)
        if (pt[starts[i] + 16] == KIND_ONETIME_KEY &&
            memcmp(pt + starts[i], volume, KHR_UUID_LEN) == 0) {
            *found = starts[i] + ENTRY_HEAD_LEN;
            return KHR_OK;
        }
    return KHR_NO_ENTRY;
}

enum khr_verdict khr_open(const uint8_t *blob, size_t len, const uint8_t key[KHR_KEY_LEN],
                          int64_t now, const uint8_t boot_id[KHR_UUID_LEN],
                          const uint8_t volume[KHR_UUID_LEN], uint8_t onetime[KHR_ONETIME_LEN])
{
    struct khr_header h;
    uint8_t id[KHR_KEY_ID_LEN], aead_key[32];
    uint8_t plaintext[KHR_MAX_RECORD];
    size_t pt_len, at = 0;
    enum khr_verdict v;
    int auth;

    memset(onetime, 0, KHR_ONETIME_LEN);
    v = khr_parse_header(blob, len, &h);
    if (v != KHR_OK)
        return v;
    if (h.channel != KHR_CHANNEL_EFI && h.channel != KHR_CHANNEL_KEXEC)
        return KHR_FOREIGN;                             /* not a one-time key record */
    if (khr_key_id(key, id) != 0)
        return KHR_INTERNAL;
    if (CRYPTO_memcmp(id, h.key_id, KHR_KEY_ID_LEN) != 0)
        return KHR_FOREIGN;                             /* another record key */
    if (hkdf(key, KHR_KEY_LEN, INFO_AEAD, aead_key, sizeof aead_key) != 0) {
        OPENSSL_cleanse(aead_key, sizeof aead_key);
        return KHR_INTERNAL;
    }
    pt_len = len - KHR_HEADER_LEN - KHR_TAG_LEN;
    auth = aead_open(aead_key, h.nonce, blob, KHR_HEADER_LEN, blob + KHR_HEADER_LEN, pt_len,
                     blob + len - KHR_TAG_LEN, plaintext);
    OPENSSL_cleanse(aead_key, sizeof aead_key);
    if (auth != 1) {
        v = auth == 0 ? KHR_TAMPERED : KHR_INTERNAL;
        goto out;
    }
    v = check_header(&h, now, boot_id);
    if (v == KHR_OK)
        v = parse_entries(plaintext, pt_len, volume, &at);
    if (v == KHR_OK)
        memcpy(onetime, plaintext + at, KHR_ONETIME_LEN);
out:
    OPENSSL_cleanse(plaintext, pt_len);
    return v;
}
