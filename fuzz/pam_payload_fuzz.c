/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* pam_payload_fuzz.c - fuzz the payload parsers of pam_keyhandoff.so (csrc/kh_payload.c).
 *
 * Every input is given to kh_unpad() and kh_last_entry() in a buffer of exactly its size
 * (so ASan sees any read outside it), and each answer is checked against an independent
 * statement of the rules:
 *   - success: the output lies inside the input, 1..2048 bytes, no NUL inside;
 *     kh_unpad: input is 4096 bytes, output starts at byte 2, its length is the big-endian
 *     header, every byte after it is zero;  kh_last_entry: only NULs follow the output and
 *     a NUL (or the start) precedes it;
 *   - failure: the outputs are untouched, and the rules really say "no passphrase".
 *
 * Two builds:
 *   libFuzzer:  clang -fsanitize=fuzzer,address,undefined -Icsrc fuzz/pam_payload_fuzz.c
 *               csrc/kh_payload.c -o pam_payload_fuzz && ./pam_payload_fuzz -max_len=8192
 *   driver:     cc -fsanitize=address,undefined -DKH_FUZZ_DRIVER -Icsrc fuzz/pam_payload_fuzz.c
 *               fuzz/driver.c csrc/kh_payload.c -o pam_payload_fuzz;
 *               ./pam_payload_fuzz COUNT SEED  runs fixed known answers, then COUNT
 *               generated inputs from a deterministic PRNG (fuzz/driver.h; what the test
 *               suite runs).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kh_payload.h"

static const unsigned char SENTINEL[1];

/* The padded rule, written independently of kh_unpad. */
static int ref_padded_ok(const unsigned char *d, size_t len)
{
    size_t n, i;

    if (len != 4096)
        return 0;
    n = (size_t)d[0] * 256 + d[1];
    if (n == 0 || n > 2048)             /* 2049..4094 are well-formed but too long */
        return 0;
    for (i = 0; i < n; i++)
        if (d[2 + i] == 0)
            return 0;
    for (i = 2 + n; i < len; i++)
        if (d[i] != 0)
            return 0;
    return 1;
}

/* The last-entry rule: length of the last non-empty NUL-free run before trailing NULs. */
static size_t ref_last_len(const unsigned char *d, size_t len)
{
    size_t end = len, n = 0;

    while (end > 0 && d[end - 1] == 0)
        end--;
    while (n < end && d[end - 1 - n] != 0)
        n++;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    const unsigned char *out = SENTINEL;
    size_t out_len = 12345, i;
    int rc;

    rc = kh_unpad(data, len, &out, &out_len);
    if (rc == 0) {
        CHECK(ref_padded_ok(data, len));
        CHECK(out == data + 2);
        CHECK(out_len == ((size_t)data[0] << 8 | data[1]));
        CHECK(out_len >= 1 && out_len <= KH_MAX_PASSPHRASE);
        CHECK(memchr(out, 0, out_len) == NULL);
        for (i = 2 + out_len; i < len; i++)
            CHECK(data[i] == 0);
    } else {
        CHECK(rc == -1);
        CHECK(!ref_padded_ok(data, len));
        CHECK(out == SENTINEL && out_len == 12345);
    }

    out = SENTINEL;
    out_len = 12345;
    rc = kh_last_entry(data, len, &out, &out_len);
    if (rc == 0) {
        size_t ref = ref_last_len(data, len);
        CHECK(out >= data && out_len <= len && out + out_len <= data + len);
        CHECK(out_len >= 1 && out_len <= KH_MAX_PASSPHRASE);
        CHECK(out_len == ref);
        CHECK(memchr(out, 0, out_len) == NULL);
        CHECK(out == data || out[-1] == 0);
        for (i = (size_t)(out - data) + out_len; i < len; i++)
            CHECK(data[i] == 0);
    } else {
        size_t ref = ref_last_len(data, len);
        CHECK(rc == -1);
        CHECK(ref == 0 || ref > KH_MAX_PASSPHRASE);
        CHECK(out == SENTINEL && out_len == 12345);
    }
    return 0;
}

#ifdef KH_FUZZ_DRIVER
#include "driver.h"

/* Inputs near the interesting shapes: padded (valid and mutated), entry lists, noise. */
size_t kh_fuzz_generate(uint8_t *buf, size_t cap)
{
    size_t len, i, n;
    unsigned kind = (unsigned)(kh_fuzz_rng() % 4);

    if (kind == 0) {                    /* a padded payload, maybe mutated */
        len = 4096;
        n = 1 + (size_t)(kh_fuzz_rng() % (kh_fuzz_rng() % 2 ? 2048 : 4094));
        memset(buf, 0, len);
        buf[0] = (unsigned char)(n >> 8);
        buf[1] = (unsigned char)n;
        for (i = 0; i < n; i++)
            buf[2 + i] = (unsigned char)(1 + kh_fuzz_rng() % 255);
        switch (kh_fuzz_rng() % 8) {
        case 0: buf[kh_fuzz_rng() % len] ^= (unsigned char)(1 + kh_fuzz_rng() % 255); break;
        case 1: len = 4095 + (size_t)(kh_fuzz_rng() % 3); break;   /* 4095, 4096 or 4097 */
        case 2: buf[2 + kh_fuzz_rng() % n] = 0; break;             /* NUL inside */
        case 3: buf[0] = (unsigned char)(kh_fuzz_rng() % 17); break;
        default: break;                                            /* valid */
        }
        return len;
    }
    if (kind == 1) {                    /* NUL-separated entries */
        len = (size_t)(kh_fuzz_rng() % 6000);
        for (i = 0; i < len; i++)
            buf[i] = kh_fuzz_rng() % 5 == 0 ? 0 : (unsigned char)(1 + kh_fuzz_rng() % 255);
        if (len > 0 && kh_fuzz_rng() % 2)
            for (i = len - 1 - (size_t)(kh_fuzz_rng() % (len < 4 ? len : 4)); i < len; i++)
                buf[i] = 0;             /* trailing NULs */
        return len;
    }
    if (kind == 2) {                    /* one long entry around the 2048 limit */
        n = 2040 + (size_t)(kh_fuzz_rng() % 20);
        len = n + (size_t)(kh_fuzz_rng() % 3);
        for (i = 0; i < len; i++)
            buf[i] = (unsigned char)(1 + kh_fuzz_rng() % 255);
        if (len > n)
            buf[len - n - 1] = 0;
        return len;
    }
    len = (size_t)(kh_fuzz_rng() % (cap + 1)); /* noise */
    for (i = 0; i < len; i++)
        buf[i] = (unsigned char)kh_fuzz_rng();
    return len;
}

/* Before the generated inputs: the cases of the former Python unit test
 * (tests/unit/test_pam_module.py). */
void kh_fuzz_prepare(void)
{
    static const struct { const char *in; size_t len; const char *want; } cases[] = {
        {"a", 1, "a"}, {"a\0b", 3, "b"}, {"wrong\0right\0", 12, "right"}, {"a\0\0", 3, "a"},
        {"", 0, NULL}, {"\0", 1, NULL}, {"\0\0b", 3, "b"},
    };
    unsigned char padded[4096];
    const unsigned char *out;
    size_t out_len, i, len = 0;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = kh_last_entry((const unsigned char *)cases[i].in, cases[i].len, &out, &out_len);
        len = cases[i].len;
        if (cases[i].want == NULL) {
            CHECK(rc == -1);
        } else {
            CHECK(rc == 0 && out_len == strlen(cases[i].want) &&
                  memcmp(out, cases[i].want, out_len) == 0);
        }
        kh_fuzz_run_exact(cases[i].in, cases[i].len);
    }
    memset(padded, 0, sizeof padded);
    padded[1] = 3;
    memcpy(padded + 2, "pw!", 3);
    len = sizeof padded;
    CHECK(kh_unpad(padded, len, &out, &out_len) == 0 && out_len == 3 &&
          memcmp(out, "pw!", 3) == 0);
    CHECK(kh_last_entry(padded, len, &out, &out_len) == 0 && out_len == 4); /* "\3pw!" */
    padded[4095] = 1;
    CHECK(kh_unpad(padded, len, &out, &out_len) == -1);
    padded[4095] = 0;
    padded[0] = 8;                      /* L = 2051: well-formed length, too long */
    CHECK(kh_unpad(padded, len, &out, &out_len) == -1);
}
#endif
