/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* check.h - CHECK(cond), the fuzz targets' invariant check (both builds: libFuzzer, driver).
 *
 * A false condition prints it, its line and the input's size (a size_t `len` in scope) to
 * stderr and aborts: what libFuzzer reports as a crash, and what the test suite looks for
 * ("invariant failed") in the driver's runs.
 */
#ifndef KH_FUZZ_CHECK_H
#define KH_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "invariant failed: %s (line %d, input %zu bytes)\n", #cond, \
                    __LINE__, len);                                                  \
            abort();                                                                 \
        }                                                                            \
    } while (0)

#endif
