"""Build script for keyhandoff._bindings._keyutils (libkeyutils, cffi API mode).

Declares only what keyhandoff.keyring calls.  Constants are ``...`` so the C compiler
fills in their values from <keyutils.h>.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    typedef int32_t key_serial_t;
    typedef uint32_t key_perm_t;

    #define KEY_SPEC_THREAD_KEYRING ...
    #define KEY_SPEC_PROCESS_KEYRING ...
    #define KEY_SPEC_SESSION_KEYRING ...
    #define KEY_SPEC_USER_KEYRING ...
    #define KEY_SPEC_USER_SESSION_KEYRING ...

    key_serial_t add_key(const char *type, const char *description,
                         const void *payload, size_t plen, key_serial_t ringid);
    key_serial_t request_key(const char *type, const char *description,
                             const char *callout_info, key_serial_t destringid);
    key_serial_t keyctl_get_keyring_ID(key_serial_t id, int create);
    key_serial_t keyctl_join_session_keyring(const char *name);
    long keyctl_update(key_serial_t id, const void *payload, size_t plen);
    long keyctl_revoke(key_serial_t id);
    long keyctl_setperm(key_serial_t id, key_perm_t perm);
    long keyctl_describe(key_serial_t id, char *buffer, size_t buflen);
    long keyctl_clear(key_serial_t ringid);
    long keyctl_link(key_serial_t id, key_serial_t ringid);
    long keyctl_unlink(key_serial_t id, key_serial_t ringid);
    long keyctl_search(key_serial_t ringid, const char *type,
                       const char *description, key_serial_t destringid);
    long keyctl_read(key_serial_t id, char *buffer, size_t buflen);
    long keyctl_set_timeout(key_serial_t key, unsigned timeout);
    long keyctl_invalidate(key_serial_t id);
    """
)

ffibuilder.set_source(
    "keyhandoff._bindings._keyutils",
    "#include <keyutils.h>",
    libraries=["keyutils"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
