/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* driver.c - main() of the fuzz targets' deterministic builds (see driver.h). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"

static uint64_t rng_state;

uint64_t kh_fuzz_rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void kh_fuzz_run_exact(const void *bytes, size_t len)
{
    unsigned char *copy = malloc(len ? len : 1);   /* exact size: ASan sees any overread */
    if (copy == NULL)
        abort();
    memcpy(copy, bytes, len);
    LLVMFuzzerTestOneInput(copy, len);
    free(copy);
}

int main(int argc, char **argv)
{
    static uint8_t buf[8192];
    unsigned long long count, n;

    if (argc != 3) {
        fprintf(stderr, "usage: %s COUNT SEED\n", argv[0]);
        return 2;
    }
    count = strtoull(argv[1], NULL, 10);
    rng_state = strtoull(argv[2], NULL, 10);
    kh_fuzz_prepare();
    for (n = 0; n < count; n++) {
        size_t len = kh_fuzz_generate(buf, sizeof buf);
        kh_fuzz_run_exact(buf, len);
    }
    printf("%llu inputs, seed %s: all invariants held\n", count, argv[2]);
    return 0;
}
