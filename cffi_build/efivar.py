"""Build script for keyhandoff._bindings._efivar (libefivar, cffi API mode).

Declares only what keyhandoff.efi calls.  ``efi_guid_t`` is declared with its fields and a
trailing ``...`` so cffi takes size and alignment from the compiler: efivar 37 (Debian 12)
aligns it to 4 bytes, efivar 39 (Debian 13) packs it (alignment 1).  Constants are ``...``
so the C compiler fills in their values from <efivar/efivar.h>.

Deliberately not declared: ``efi_get_variable_attributes``.  Its efivarfs backend (v37)
reads the whole variable into a heap buffer and frees it without wiping, so it would leave
a copy of the handoff record in freed memory; keyhandoff takes the attributes from
``efi_get_variable`` instead and wipes that buffer itself.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    typedef int... mode_t;

    typedef struct {
        uint32_t a;
        uint16_t b;
        uint16_t c;
        uint16_t d;
        uint8_t e[6];
        ...;
    } efi_guid_t;

    #define EFI_VARIABLE_NON_VOLATILE ...
    #define EFI_VARIABLE_BOOTSERVICE_ACCESS ...
    #define EFI_VARIABLE_RUNTIME_ACCESS ...
    #define EFI_VARIABLE_APPEND_WRITE ...

    int efi_variables_supported(void);
    int efi_get_variable_size(efi_guid_t guid, const char *name, size_t *size);
    int efi_get_variable(efi_guid_t guid, const char *name, uint8_t **data,
                         size_t *data_size, uint32_t *attributes);
    int efi_set_variable(efi_guid_t guid, const char *name, uint8_t *data,
                         size_t data_size, uint32_t attributes, mode_t mode);
    int efi_del_variable(efi_guid_t guid, const char *name);
    int efi_get_next_variable_name(efi_guid_t **guid, char **name);
    int efi_str_to_guid(const char *s, efi_guid_t *guid);
    int efi_guid_to_str(const efi_guid_t *guid, char **sp);

    void efi_error_clear(void);

    void free(void *ptr);
    """
)

ffibuilder.set_source(
    "keyhandoff._bindings._efivar",
    "#include <stdlib.h>\n#include <efivar/efivar.h>",
    libraries=["efivar"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
