/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* token_json.c - the keyhandoff-onetime token's JSON, and the small encodings the plugin
 * shares with the Python side (UUID text, base64, the one-time key's hex text, the keyslot
 * binding).  See token_record.h.  Pure: no I/O, no static state.
 */
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "token_record.h"

static const char BINDING_CONTEXT[] = "keyhandoff-onetime keyslot binding v1"; /* + its NUL */
static const char HEX[] = "0123456789abcdef";
#define HALF_RANGE (UINT64_C(1) << 63)

int kh_uuid_parse(const char *text, size_t len, uint8_t out[KHR_UUID_LEN])
{
    size_t i, n = 0;
    int hi = -1;

    if (len != 36)
        return -1;
    for (i = 0; i < len; i++) {
        char c = text[i];
        int d;

        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return -1;
            continue;
        }
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        if (hi < 0) {
            hi = d;
        } else {
            out[n++] = (uint8_t)(hi << 4 | d);
            hi = -1;
        }
    }
    return 0;
}

static int b64_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

long kh_base64_decode(const char *text, size_t len, uint8_t *out, size_t cap)
{
    size_t i, n = 0, pad = 0;

    if (len % 4 != 0)
        return -1;
    if (len > 0 && text[len - 1] == '=')
        pad = len > 1 && text[len - 2] == '=' ? 2 : 1;
    if (len / 4 * 3 - pad > cap)
        return -1;
    for (i = 0; i < len; i += 4) {
        int v[4], k, last = i + 4 == len;
        uint32_t w = 0;

        for (k = 0; k < 4; k++) {
            v[k] = b64_value(text[i + k]);
            if (v[k] < 0 && !(last && text[i + k] == '=' && k >= 4 - (int)pad))
                return -1;
            w = w << 6 | (uint32_t)(v[k] < 0 ? 0 : v[k]);
        }
        out[n++] = (uint8_t)(w >> 16);
        if (!last || pad < 2)
            out[n++] = (uint8_t)(w >> 8);
        if (!last || pad < 1)
            out[n++] = (uint8_t)w;
    }
    return (long)n;
}

void kh_key_text(const uint8_t key[KHR_ONETIME_LEN], char out[2 * KHR_ONETIME_LEN])
{
    size_t i;

    for (i = 0; i < KHR_ONETIME_LEN; i++) {
        out[2 * i] = HEX[key[i] >> 4];
        out[2 * i + 1] = HEX[key[i] & 15];
    }
}

int kht_binding(int keyslot, const uint8_t *salt, size_t salt_len, char out[65])
{
    uint8_t number[4], digest[32];
    unsigned int got = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok, i;

    if (ctx == NULL)
        return -1;
    number[0] = (uint8_t)((unsigned)keyslot >> 24);
    number[1] = (uint8_t)((unsigned)keyslot >> 16);
    number[2] = (uint8_t)((unsigned)keyslot >> 8);
    number[3] = (uint8_t)keyslot;
    ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) > 0 &&
         EVP_DigestUpdate(ctx, BINDING_CONTEXT, sizeof BINDING_CONTEXT) > 0 &&
         EVP_DigestUpdate(ctx, number, sizeof number) > 0 &&
         EVP_DigestUpdate(ctx, salt, salt_len) > 0 &&
         EVP_DigestFinal_ex(ctx, digest, &got) > 0 && got == sizeof digest;
    EVP_MD_CTX_free(ctx);
    if (!ok)
        return -1;
    for (i = 0; i < 32; i++) {
        out[2 * i] = HEX[digest[i] >> 4];
        out[2 * i + 1] = HEX[digest[i] & 15];
    }
    out[64] = '\0';
    return 0;
}

/* The strict JSON reader.  onetime.parse_token accepts only a flat object of six known
 * keys whose values are strings, one integer and a one-string array, all ASCII in the end;
 * so this reader refuses, as "not our token", everything else Python's json would have
 * parsed and the field checks refused afterwards: nested objects, other arrays, true,
 * false, null, floats, NaN, a byte >= 0x80 (outside a string a syntax error, inside one a
 * character no field accepts), an escape giving a non-ASCII character.  What remains is
 * exactly json.loads's grammar: whitespace " \t\n\r", escapes \" \\ \/ \b \f \n \r \t
 * \uXXXX, no raw control character in a string, no trailing data. */
struct reader {
    const char *p, *end;
};

#define FIELD_MAX 96                    /* longer than any accepted value */

static void skip_ws(struct reader *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A JSON string at r->p into out (decoded, NUL-terminated): its length, or -1. */
static long read_string(struct reader *r, char *out, size_t cap)
{
    size_t n = 0;

    if (r->p >= r->end || *r->p != '"')
        return -1;
    r->p++;
    while (r->p < r->end) {
        unsigned char c = (unsigned char)*r->p++;

        if (c == '"') {
            out[n] = '\0';
            return (long)n;
        }
        if (c < 0x20 || c >= 0x80)
            return -1;
        if (c == '\\') {
            if (r->p >= r->end)
                return -1;
            c = (unsigned char)*r->p++;
            switch (c) {
            case '"': case '\\': case '/': break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u': {
                unsigned v = 0;
                int k;

                if (r->end - r->p < 4)
                    return -1;
                for (k = 0; k < 4; k++) {
                    int d = hex_digit(r->p[k]);
                    if (d < 0)
                        return -1;
                    v = v << 4 | (unsigned)d;
                }
                r->p += 4;
                if (v >= 0x80)
                    return -1;                          /* non-ASCII: no field takes it */
                c = (unsigned char)v;
                break;
            }
            default:
                return -1;
            }
        }
        if (n + 1 >= cap)
            return -1;                                  /* longer than any field */
        out[n++] = (char)c;
    }
    return -1;
}

/* A JSON integer for not_after: 0 and *out for 1..2**63-1 written as json.loads reads an
 * int; -1 for anything else (negative, zero, over 19 digits, a fraction or exponent: every
 * one of them refused by onetime.parse_token too). */
static int read_int(struct reader *r, int64_t *out)
{
    int digits = 0;
    uint64_t v = 0;

    if (r->p >= r->end || *r->p < '1' || *r->p > '9')
        return -1;                                      /* '-', '0', not a number */
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') {
        if (++digits > 19)
            return -1;                                  /* _small_int: too long */
        v = v * 10 + (uint64_t)(*r->p++ - '0');
    }
    if (r->p < r->end && (*r->p == '.' || *r->p == 'e' || *r->p == 'E'))
        return -1;                                      /* a float: refused */
    if (v >= HALF_RANGE)
        return -1;
    *out = (int64_t)v;
    return 0;
}

enum { F_TYPE, F_KEYSLOTS, F_NOT_AFTER, F_BOOT_ID, F_RECORD_KEY, F_BINDING, F_COUNT };
static const char *const FIELDS[F_COUNT] = {
    "type", "keyslots", "not_after", "boot_id", "record_key", "binding",
};

static int is_lower_hex(const char *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int canonical_uuid(const char *s, size_t n)
{
    size_t i;

    if (n != 36)
        return 0;
    for (i = 0; i < n; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!is_lower_hex(s + i, 1)) {
            return 0;
        }
    }
    return 1;
}

/* onetime._record_key_ok: the canonical base64 of exactly 32 bytes. */
static int record_key_ok(const char *s, size_t n, uint8_t out[KHR_KEY_LEN])
{
    if (n != 44 || s[43] != '=' || b64_value(s[42]) < 0 || (b64_value(s[42]) & 3) != 0)
        return 0;
    return kh_base64_decode(s, n, out, KHR_KEY_LEN) == KHR_KEY_LEN;
}

static int parse_fields(struct reader *r, struct kht_token *out)
{
    char key[FIELD_MAX], value[FIELD_MAX];
    int seen[F_COUNT] = {0};
    int f, i;
    long n;

    skip_ws(r);
    if (r->p >= r->end || *r->p++ != '{')
        return -1;
    skip_ws(r);
    if (r->p < r->end && *r->p == '}')
        return -1;                                      /* {}: none of our keys */
    for (;;) {
        skip_ws(r);
        n = read_string(r, key, sizeof key);
        if (n < 0)
            return -1;
        for (f = 0; f < F_COUNT; f++)
            if ((size_t)n == strlen(FIELDS[f]) && memcmp(key, FIELDS[f], (size_t)n) == 0)
                break;
        if (f == F_COUNT || seen[f]++)
            return -1;                                  /* unknown or duplicate key */
        skip_ws(r);
        if (r->p >= r->end || *r->p++ != ':')
            return -1;
        skip_ws(r);
        if (f == F_NOT_AFTER) {
            if (read_int(r, &out->not_after) != 0)
                return -1;                              /* 0 < not_after < 2**63 */
        } else if (f == F_KEYSLOTS) {
            if (r->p >= r->end || *r->p++ != '[')
                return -1;
            skip_ws(r);
            n = read_string(r, value, sizeof value);
            if (n < 1 || n > 2 || (n == 2 && value[0] == '0'))
                return -1;                              /* 0|[1-9][0-9]? */
            for (i = 0; i < n; i++)
                if (value[i] < '0' || value[i] > '9')
                    return -1;
            out->keyslot = n == 1 ? value[0] - '0' : (value[0] - '0') * 10 + value[1] - '0';
            if (out->keyslot >= KHT_MAX_KEYSLOTS)
                return -1;
            skip_ws(r);
            if (r->p >= r->end || *r->p++ != ']')
                return -1;                              /* exactly one keyslot */
        } else {
            n = read_string(r, value, sizeof value);
            if (n < 0)
                return -1;
            if (f == F_TYPE && strcmp(value, "keyhandoff-onetime") != 0)
                return -1;
            if (f == F_BOOT_ID) {
                if (!canonical_uuid(value, (size_t)n))
                    return -1;
                memcpy(out->boot_id, value, 37);
            }
            if (f == F_RECORD_KEY) {
                int ok = record_key_ok(value, (size_t)n, out->record_key);
                OPENSSL_cleanse(value, sizeof value);
                if (!ok)
                    return -1;
            }
            if (f == F_BINDING) {
                if (n != 64 || !is_lower_hex(value, 64))
                    return -1;
                memcpy(out->binding, value, 65);
            }
        }
        skip_ws(r);
        if (r->p >= r->end)
            return -1;
        if (*r->p == ',') {
            r->p++;
            continue;
        }
        if (*r->p++ != '}')
            return -1;
        break;
    }
    for (f = 0; f < F_COUNT; f++)
        if (!seen[f])
            return -1;                                  /* a key missing */
    skip_ws(r);
    return r->p == r->end ? 0 : -1;                     /* extra data */
}

int kht_parse_token(const char *text, size_t len, struct kht_token *out)
{
    struct reader r = {text, text + len};
    int rc;

    memset(out, 0, sizeof *out);
    if (len > KHT_MAX_TOKEN_BYTES)
        return -1;
    rc = parse_fields(&r, out);
    if (rc != 0)
        kht_token_wipe(out);
    return rc;
}

void kht_token_wipe(struct kht_token *token)
{
    OPENSSL_cleanse(token, sizeof *token);
}
