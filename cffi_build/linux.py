"""Build script for keyhandoff._bindings._linux: the few libc calls Python lacks.

inotify (the ask-password directory), prctl(PR_SET_DUMPABLE) and mlockall for the agent's
process hygiene (keyhandoff.process); kexec_file_load, which glibc does not wrap, for the
kexec channel (keyhandoff.kexec).  API mode; constants filled in by the compiler.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define IN_CLOEXEC ...
    #define IN_NONBLOCK ...
    #define IN_CLOSE_WRITE ...
    #define IN_MOVED_TO ...
    #define IN_MOVED_FROM ...
    #define IN_DELETE ...
    #define IN_ATTRIB ...
    #define IN_ONLYDIR ...
    #define IN_DONT_FOLLOW ...
    #define IN_Q_OVERFLOW ...
    #define IN_IGNORED ...
    #define IN_ISDIR ...
    int inotify_init1(int flags);
    int inotify_add_watch(int fd, const char *pathname, uint32_t mask);

    #define PR_SET_DUMPABLE ...
    #define PR_GET_DUMPABLE ...
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);

    #define MCL_CURRENT ...
    #define MCL_FUTURE ...
    #define MCL_ONFAULT ...
    int mlockall(int flags);

    #define KEXEC_FILE_UNLOAD ...
    #define KEXEC_FILE_NO_INITRAMFS ...
    long kh_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline,
                            unsigned long flags);
    """
)

ffibuilder.set_source(
    "keyhandoff._bindings._linux",
    """
    #include <sys/inotify.h>
    #include <sys/prctl.h>
    #include <sys/mman.h>
    #ifndef MCL_ONFAULT
    #define MCL_ONFAULT 4
    #endif
    #include <errno.h>
    #include <string.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/kexec.h>

    /* kexec_file_load(2) has no glibc wrapper.  The length counts the command line's NUL
       (the kernel refuses one whose last byte is not NUL); cmdline NULL passes none, as
       an unload does.  Without the system call number (none on this architecture): ENOSYS. */
    static long kh_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline,
                                   unsigned long flags)
    {
    #ifdef SYS_kexec_file_load
        unsigned long len = cmdline ? strlen(cmdline) + 1 : 0;
        return syscall(SYS_kexec_file_load, kernel_fd, initrd_fd, len, cmdline, flags);
    #else
        (void)kernel_fd; (void)initrd_fd; (void)cmdline; (void)flags;
        errno = ENOSYS;
        return -1;
    #endif
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
