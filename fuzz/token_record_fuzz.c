/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_record_fuzz.c - fuzz the token plugin's parsers (csrc/token_record.c, token_json.c).
 *
 * The first input byte picks what the rest is (each in a buffer of exactly its size, so
 * ASan sees any read outside it):
 *   0 mod 3  token JSON for kht_parse_token; an accepted token must have every field in
 *            range (keyslot 0..31, 0 < not_after, canonical boot id, 64 hex digits);
 *   1 mod 3  a raw sealed record for khr_open under a fixed record key: the verdict must
 *            agree with khr_parse_header, and a record that was not sealed under that key
 *            can only be refused before authentication (unknown-format, malformed,
 *            foreign) or as tampered;
 *   2 mod 3  header fields and a plaintext, SEALED here under the fixed key, so khr_open
 *            authenticates them and reaches the header checks and the entry parser; its
 *            verdict and the key it returns are checked against an independent statement
 *            of record.py's rules (reference_verdict below).
 *
 * Two builds:
 *   libFuzzer:  clang -fsanitize=fuzzer,address,undefined -Icsrc fuzz/token_record_fuzz.c
 *               csrc/token_record.c csrc/token_json.c -lcrypto -o token_record_fuzz &&
 *               ./token_record_fuzz
 *   driver:     cc -fsanitize=address,undefined -DKH_FUZZ_DRIVER -Icsrc fuzz/token_record_fuzz.c
 *               fuzz/driver.c csrc/token_record.c csrc/token_json.c -lcrypto;
 *               ./token_record_fuzz COUNT SEED runs COUNT generated inputs from a
 *               deterministic PRNG (fuzz/driver.h; what the test suite runs).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/kdf.h>

#include "check.h"
#include "token_record.h"

#define NOW INT64_C(1700000000)
static const uint8_t KEY[KHR_KEY_LEN] = {
    0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
};
static const uint8_t BOOT[KHR_UUID_LEN] = {0xb0, 0x07, [15] = 1};
static const uint8_t VOLUME[KHR_UUID_LEN] = {0x5e, 0x1f, [15] = 2};

static void fuzz_token(const uint8_t *data, size_t len)
{
    struct kht_token t;
    int i;

    if (kht_parse_token((const char *)data, len, &t) != 0) {
        static const struct kht_token zero;
        CHECK(memcmp(&t, &zero, sizeof t) == 0);       /* nothing half-filled is left */
        return;
    }
    CHECK(len <= KHT_MAX_TOKEN_BYTES);
    CHECK(t.keyslot >= 0 && t.keyslot < KHT_MAX_KEYSLOTS);
    CHECK(t.not_after > 0);
    CHECK(strlen(t.boot_id) == 36 && strlen(t.binding) == 64);
    for (i = 0; i < 36; i++)
        CHECK(i == 8 || i == 13 || i == 18 || i == 23 ? t.boot_id[i] == '-'
              : (t.boot_id[i] >= '0' && t.boot_id[i] <= '9') ||
                (t.boot_id[i] >= 'a' && t.boot_id[i] <= 'f'));
    CHECK(memchr(data, '{', len) != NULL && memchr(data, '}', len) != NULL);
    kht_token_wipe(&t);
}

static void fuzz_raw_record(const uint8_t *data, size_t len)
{
    struct khr_header h;
    uint8_t onetime[KHR_ONETIME_LEN], zero[KHR_ONETIME_LEN] = {0};
    enum khr_verdict framing = khr_parse_header(data, len, &h);
    enum khr_verdict v = khr_open(data, len, KEY, NOW, BOOT, VOLUME, onetime);

    if (framing != KHR_OK) {
        CHECK(v == framing);
    } else {
        /* forging a tag is out of reach: anything past authentication means a bug */
        CHECK(v == KHR_FOREIGN || v == KHR_TAMPERED);
    }
    CHECK(memcmp(onetime, zero, sizeof zero) == 0);
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static void put64(uint8_t *p, uint64_t v)
{
    int i;

    for (i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

/* record.py's rules, restated: header fields, then entries, then this volume's key. */
static enum khr_verdict reference_verdict(const uint8_t *hdr, const uint8_t *pt, size_t n,
                                          size_t *key_at)
{
    uint64_t created = get64(hdr + 7), not_after = get64(hdr + 15);
    size_t pos = 1, k, heads[64], count;
    int found = -1;

    if (created >> 63 || not_after >> 63 || not_after <= created ||
        not_after - created > 7 * 24 * 3600)
        return KHR_MALFORMED;
    if (hdr[6] == 0)
        return KHR_EXHAUSTED;
    if (NOW > (int64_t)not_after)
        return KHR_EXPIRED;
    if (NOW + 300 < (int64_t)created)
        return KHR_NOT_YET_VALID;
    if (memcmp(hdr + 23, BOOT, 16) == 0)
        return KHR_SAME_BOOT;
    count = pt[0];
    if (count == 0 || count > 16)
        return KHR_MALFORMED;
    for (k = 0; k < count; k++) {
        size_t size;

        if (n - pos < 19)
            return KHR_MALFORMED;
        size = (size_t)pt[pos + 17] * 256 + pt[pos + 18];
        if (!((pt[pos + 16] == 1 && size == 32) ||
              (pt[pos + 16] == 2 && size >= 46 && size <= 45 + 2048)))
            return KHR_MALFORMED;
        if (n - pos - 19 < size)
            return KHR_MALFORMED;
        heads[k] = pos;
        pos += 19 + size;
    }
    if (pos != n)
        return KHR_MALFORMED;
    for (k = 0; k < count; k++) {
        size_t j;

        for (j = 0; j < k; j++)
            if (memcmp(pt + heads[j], pt + heads[k], 17) == 0)
                return KHR_MALFORMED;
        if (found < 0 && pt[heads[k] + 16] == 1 && memcmp(pt + heads[k], VOLUME, 16) == 0)
            found = (int)k;
    }
    if (found < 0)
        return KHR_NO_ENTRY;
    *key_at = heads[found] + 19;
    return KHR_OK;
}

static int hkdf32(const char *info, uint8_t *out, size_t out_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    int ok = ctx != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
             EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
             EVP_PKEY_CTX_set1_hkdf_key(ctx, KEY, sizeof KEY) > 0 &&
             EVP_PKEY_CTX_add1_hkdf_info(ctx, (const unsigned char *)info, (int)strlen(info)) > 0 &&
             EVP_PKEY_derive(ctx, out, &out_len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* Input: boots_left, created offset (i16), lifetime (u32), same-boot flag, then the
 * plaintext.  Sealed exactly as record.seal does, under KEY. */
static void fuzz_sealed(const uint8_t *data, size_t len)
{
    static uint8_t blob[KHR_MAX_RECORD + 64];
    uint8_t aead_key[32], onetime[KHR_ONETIME_LEN];
    size_t pt_len, key_at = 0;
    int out_len = 0, fin = 0;
    EVP_CIPHER_CTX *ctx;
    enum khr_verdict want, got;
    int16_t offset;
    uint32_t lifetime;

    if (len < 8 + 1)
        return;
    pt_len = len - 8;
    if (KHR_HEADER_LEN + pt_len + KHR_TAG_LEN > KHR_MAX_RECORD)
        return;
    offset = (int16_t)(data[1] << 8 | data[2]);
    lifetime = (uint32_t)data[3] << 24 | (uint32_t)data[4] << 16 | (uint32_t)data[5] << 8 |
               data[6];
    memcpy(blob, "KHST\x01\x02", 6);
    blob[6] = data[0];
    put64(blob + 7, (uint64_t)(NOW + (int64_t)offset * 8));
    put64(blob + 15, (uint64_t)(NOW + (int64_t)offset * 8) + lifetime);
    if (data[7] & 1)
        memcpy(blob + 23, BOOT, 16);
    else
        memset(blob + 23, 0xee, 16);
    CHECK(khr_key_id(KEY, blob + 39) == 0);
    memset(blob + 47, 0x17, KHR_NONCE_LEN);
    CHECK(hkdf32("keyhandoff record v1 aead", aead_key, sizeof aead_key));
    ctx = EVP_CIPHER_CTX_new();
    CHECK(ctx != NULL);
    CHECK(EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, aead_key, blob + 47) > 0);
    CHECK(EVP_EncryptUpdate(ctx, NULL, &out_len, blob, KHR_HEADER_LEN) > 0);
    CHECK(EVP_EncryptUpdate(ctx, blob + KHR_HEADER_LEN, &out_len, data + 8, (int)pt_len) > 0);
    CHECK(EVP_EncryptFinal_ex(ctx, blob + KHR_HEADER_LEN + out_len, &fin) > 0);
    CHECK(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, KHR_TAG_LEN,
                              blob + KHR_HEADER_LEN + pt_len) > 0);
    EVP_CIPHER_CTX_free(ctx);

    {
        size_t total = KHR_HEADER_LEN + pt_len + KHR_TAG_LEN;
        uint8_t *exact = malloc(total);

        CHECK(exact != NULL);
        memcpy(exact, blob, total);
        got = khr_open(exact, total, KEY, NOW, BOOT, VOLUME, onetime);
        if (total < KHR_MIN_RECORD) {
            want = KHR_MALFORMED;                           /* truncated */
        } else {
            want = reference_verdict(blob, data + 8, pt_len, &key_at);
        }
        CHECK(got == want);
        if (got == KHR_OK)
            CHECK(memcmp(onetime, data + 8 + key_at, KHR_ONETIME_LEN) == 0);
        free(exact);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    uint8_t *copy;
    size_t n;

    if (len == 0)
        return 0;
    n = len - 1;
    copy = malloc(n ? n : 1);                   /* exact size: ASan sees any overread */
    if (copy == NULL)
        abort();
    memcpy(copy, data + 1, n);
    switch (data[0] % 3) {
    case 0: fuzz_token(copy, n); break;
    case 1: fuzz_raw_record(copy, n); break;
    default: fuzz_sealed(copy, n); break;
    }
    free(copy);
    return 0;
}

#ifdef KH_FUZZ_DRIVER
#include "driver.h"

static const char GOOD_TOKEN[] =
    "{\"type\":\"keyhandoff-onetime\",\"keyslots\":[\"1\"],\"not_after\":1767225600,"
    "\"boot_id\":\"0a1b2c3d-0000-4000-8000-00000000abcd\","
    "\"record_key\":\"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=\","
    "\"binding\":\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"}";

/* Inputs near the interesting shapes: our token (mutated), sealed entry tables, noise. */
size_t kh_fuzz_generate(uint8_t *buf, size_t cap)
{
    size_t len, i, n, k;
    unsigned kind = (unsigned)(kh_fuzz_rng() % 3);

    buf[0] = (uint8_t)kind;
    if (kind == 0) {
        len = sizeof GOOD_TOKEN - 1;
        memcpy(buf + 1, GOOD_TOKEN, len);
        for (k = kh_fuzz_rng() % 4; k > 0; k--)
            buf[1 + kh_fuzz_rng() % len] =
                (uint8_t)(kh_fuzz_rng() % 2 ? ' ' + kh_fuzz_rng() % 95 : kh_fuzz_rng());
        return 1 + len;
    }
    if (kind == 2) {                            /* header fields + a plausible entry table */
        for (i = 1; i < 9; i++)
            buf[i] = (uint8_t)kh_fuzz_rng();
        buf[1] = (uint8_t)(kh_fuzz_rng() % 3);
        buf[2] = (uint8_t)(kh_fuzz_rng() % 2 ? 0 : 0xff);
        buf[4] = 0;
        buf[5] = (uint8_t)(kh_fuzz_rng() % 12);
        n = 1 + kh_fuzz_rng() % 4;
        len = 9;
        buf[len++] = (uint8_t)(kh_fuzz_rng() % 8 ? n : kh_fuzz_rng());
        for (k = 0; k < n && len + 19 + 100 < cap; k++) {
            size_t size = kh_fuzz_rng() % 2 ? 32 : 46 + kh_fuzz_rng() % 50;
            int ours = kh_fuzz_rng() % 2 != 0;  /* this volume, or another */
            for (i = 0; i < 16; i++)
                buf[len + i] = ours ? VOLUME[i] : (uint8_t)(kh_fuzz_rng() % 2);
            buf[len + 16] = (uint8_t)(size == 32 ? 1 : 2);
            if (kh_fuzz_rng() % 10 == 0)
                size += kh_fuzz_rng() % 3;
            buf[len + 17] = (uint8_t)(size >> 8);
            buf[len + 18] = (uint8_t)size;
            len += 19;
            for (i = 0; i < size; i++)
                buf[len++] = (uint8_t)kh_fuzz_rng();
        }
        if (kh_fuzz_rng() % 8 == 0)
            len -= kh_fuzz_rng() % 4;
        return len;
    }
    len = 1 + (size_t)(kh_fuzz_rng() % 300);    /* a raw record: mostly framing */
    for (i = 1; i < len; i++)
        buf[i] = (uint8_t)kh_fuzz_rng();
    if (kh_fuzz_rng() % 2)
        memcpy(buf + 1, "KHST\x01\x02", len > 7 ? 6 : len - 1);
    return len;
}

/* Before the generated inputs: the good token parses. */
void kh_fuzz_prepare(void)
{
    struct kht_token t;
    size_t len = sizeof GOOD_TOKEN - 1;

    CHECK(kht_parse_token(GOOD_TOKEN, len, &t) == 0 && t.keyslot == 1);
    kht_token_wipe(&t);
}
#endif
