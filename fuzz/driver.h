/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* driver.h - the deterministic driver of the fuzz targets in fuzz/ (no libFuzzer needed).
 *
 * A target built with -DKH_FUZZ_DRIVER and linked with fuzz/driver.c instead of
 * -fsanitize=fuzzer:
 *   cc -fsanitize=address,undefined -DKH_FUZZ_DRIVER -Icsrc fuzz/TARGET.c fuzz/driver.c ...
 *   ./TARGET COUNT SEED
 * runs the target's kh_fuzz_prepare() (its fixed known answers), then COUNT inputs from its
 * kh_fuzz_generate(), each given to LLVMFuzzerTestOneInput() in a buffer of exactly its
 * size, and prints "COUNT inputs, seed SEED: all invariants held".  A broken invariant
 * aborts the run (the targets' CHECK).  What the test suite runs.
 */
#ifndef KH_FUZZ_DRIVER_H
#define KH_FUZZ_DRIVER_H

#include <stddef.h>
#include <stdint.h>

/* The driver's. */
uint64_t kh_fuzz_rng(void);                     /* splitmix64 from SEED: deterministic */
void kh_fuzz_run_exact(const void *bytes, size_t len);  /* an exact-size copy to the target */

/* The target's. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len);
void kh_fuzz_prepare(void);
size_t kh_fuzz_generate(uint8_t *buf, size_t cap);   /* one input into buf, its length */

#endif
