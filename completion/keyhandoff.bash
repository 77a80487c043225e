# bash completion for keyhandoff(8)                  -*- shell-script -*-
# SPDX-License-Identifier: LGPL-2.1-or-later
# Static: the subcommands and options of `keyhandoff --help` and of each subcommand's
# --help.  tests/integration/test_install.py fails when the parser has one this file lacks.
# Self-contained (COMP_WORDS, compgen): works with or without the bash-completion package.

_keyhandoff()
{
    local cur prev cmd sub i
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    COMPREPLY=()

    local commands="status cache arm rearm disarm schedule restore finish capture-initrd login-handoff agent config"
    local cache_commands="put list forget"

    # the first word that is not an option is the command; for cache, the next one too
    cmd="" sub=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            -*) ;;
            *)
                if [[ -z $cmd ]]; then
                    cmd=${COMP_WORDS[i]}
                elif [[ $cmd == cache && -z $sub ]]; then
                    sub=${COMP_WORDS[i]}
                fi
                ;;
        esac
    done

    # option values
    case $prev in
        --reboot)
            COMPREPLY=($(compgen -W "soft full kexec" -- "$cur"))
            return 0
            ;;
        --config)
            COMPREPLY=($(compgen -f -- "$cur"))
            return 0
            ;;
        --root)
            COMPREPLY=($(compgen -d -- "$cur"))
            return 0
            ;;
        --volume)
            # every command: a crypttab name, a LUKS UUID or a source path
            local names=""
            [[ -r /etc/crypttab ]] && names=$(awk '$1 !~ /^#/ && NF >= 2 {print $1}' /etc/crypttab 2>/dev/null)
            if [[ $cur == /* || $cur == .* ]]; then
                COMPREPLY=($(compgen -f -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$names" -- "$cur"))
            fi
            return 0
            ;;
        --boots | --ttl | --ask-timeout | --timeout | --wait)
            return 0
            ;;
    esac

    local opts
    case $cmd in
        "")
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "--help --version" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$commands" -- "$cur"))
            fi
            return 0
            ;;
        cache)
            case $sub in
                "") opts="--help"
                    [[ $cur != -* ]] && { COMPREPLY=($(compgen -W "$cache_commands" -- "$cur")); return 0; } ;;
                put) opts="--help --volume --timeout" ;;
                list) opts="--help --json" ;;
                forget) opts="--help --volume --all" ;;
                *) return 0 ;;
            esac
            ;;
        status) opts="--help --json" ;;
        arm) opts="--help --reboot --kernel --initrd --boots --ttl --login --volume --no-ask --ask-timeout --json" ;;
        rearm) opts="--help --if-armed --json" ;;
        disarm) opts="--help --volume --json" ;;
        schedule) opts="--help --json" ;;
        restore) opts="--help --volume --wait --json" ;;
        finish) opts="--help --json" ;;
        capture-initrd) opts="--help --volume" ;;
        login-handoff) opts="--help --volume" ;;
        agent) opts="--help --config" ;;
        config) opts="--help --config --root --json" ;;
        *) return 0 ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    return 0
}
complete -F _keyhandoff keyhandoff
