"""Build script for keyhandoff._bindings._cryptsetup (libcryptsetup, cffi API mode).

Declares only what keyhandoff.luks calls.  Constants are ``...`` so the C compiler fills
in their values from <libcryptsetup.h>.  The KDF names (``CRYPT_KDF_PBKDF2``...) are string
macros in C; declared as ``static const char *const``, cffi reads each through the macro
(an expression, so a string literal works).  ``CRYPT_LUKS`` (any LUKS version) is
``NULL`` and is not declared: callers pass ``ffi.NULL``.

libcryptsetup prints its messages to stdout/stderr unless a log callback is installed.
The callback is an ``extern "Python"`` function (not ``ffi.callback``: that needs
writable+executable memory, which ``MemoryDenyWriteExecute=`` forbids in our units).
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    struct crypt_device;

    struct crypt_pbkdf_type {
        const char *type;
        const char *hash;
        uint32_t time_ms;
        uint32_t iterations;
        uint32_t max_memory_kb;
        uint32_t parallel_threads;
        uint32_t flags;
    };

    typedef enum {
        CRYPT_SLOT_ACTIVE,
        CRYPT_SLOT_ACTIVE_LAST,
        CRYPT_SLOT_UNBOUND,
        ...
    } crypt_keyslot_info;

    #define CRYPT_ANY_SLOT ...
    #define CRYPT_ANY_TOKEN ...
    #define CRYPT_PBKDF_NO_BENCHMARK ...
    #define CRYPT_LOG_ERROR ...
    #define CRYPT_LOG_DEBUG ...

    static const char *const CRYPT_KDF_PBKDF2;
    static const char *const CRYPT_KDF_ARGON2I;
    static const char *const CRYPT_KDF_ARGON2ID;

    int crypt_init(struct crypt_device **cd, const char *device);
    void crypt_free(struct crypt_device *cd);
    int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);

    const char *crypt_get_uuid(struct crypt_device *cd);
    const char *crypt_get_type(struct crypt_device *cd);
    const char *crypt_get_device_name(struct crypt_device *cd);
    int crypt_get_volume_key_size(struct crypt_device *cd);

    int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name, int keyslot,
                                     const char *passphrase, size_t passphrase_size,
                                     uint32_t flags);
    int crypt_volume_key_get(struct crypt_device *cd, int keyslot,
                             char *volume_key, size_t *volume_key_size,
                             const char *passphrase, size_t passphrase_size);

    int crypt_set_pbkdf_type(struct crypt_device *cd, const struct crypt_pbkdf_type *pbkdf);
    int crypt_keyslot_add_by_volume_key(struct crypt_device *cd, int keyslot,
                                        const char *volume_key, size_t volume_key_size,
                                        const char *passphrase, size_t passphrase_size);
    int crypt_keyslot_destroy(struct crypt_device *cd, int keyslot);
    crypt_keyslot_info crypt_keyslot_status(struct crypt_device *cd, int keyslot);
    int crypt_keyslot_max(const char *type);
    int crypt_keyslot_get_pbkdf(struct crypt_device *cd, int keyslot,
                                struct crypt_pbkdf_type *pbkdf);

    int crypt_dump_json(struct crypt_device *cd, const char **json, uint32_t flags);

    int crypt_token_max(const char *type);
    int crypt_token_json_get(struct crypt_device *cd, int token, const char **json);
    int crypt_token_json_set(struct crypt_device *cd, int token, const char *json);
    int crypt_token_assign_keyslot(struct crypt_device *cd, int token, int keyslot);
    int crypt_token_is_assigned(struct crypt_device *cd, int token, int keyslot);

    void crypt_set_log_callback(struct crypt_device *cd,
                                void (*log)(int level, const char *msg, void *usrptr),
                                void *usrptr);
    void crypt_set_debug_level(int level);

    extern "Python" void _keyhandoff_crypt_log(int level, const char *msg, void *usrptr);
    """
)

ffibuilder.set_source(
    "keyhandoff._bindings._cryptsetup",
    "#include <libcryptsetup.h>",
    libraries=["cryptsetup"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
