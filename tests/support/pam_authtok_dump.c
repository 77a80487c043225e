/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* pam_authtok_dump.so: a test-only PAM module, stacked after pam_keyhandoff.so by
 * tests/integration/test_pam.py (the authtok_dump_module fixture builds it).
 *
 * auth: writes PAM_AUTHTOK to the new 0600 file named by its one argument (O_EXCL,
 * O_NOFOLLOW), or fails with PAM_AUTH_ERR when there is no token. pam_exec passes at most
 * 511 bytes of PAM_AUTHTOK on and libpam gives it to modules only, so this is how the test
 * reads the exact token our module set. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <security/pam_modules.h>
int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    const void *tok = NULL;
    int fd;
    (void)flags;
    if (argc != 1 || pam_get_item(pamh, PAM_AUTHTOK, &tok) != PAM_SUCCESS || tok == NULL)
        return PAM_AUTH_ERR;
    fd = open(argv[0], O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (fd < 0)
        return PAM_SYSTEM_ERR;
    if (write(fd, tok, strlen(tok)) != (ssize_t)strlen(tok)) {
        close(fd);
        return PAM_SYSTEM_ERR;
    }
    return close(fd) == 0 ? PAM_SUCCESS : PAM_SYSTEM_ERR;
}
int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
