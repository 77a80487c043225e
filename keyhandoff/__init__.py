"""keyhandoff: type the disk passphrase once.

Public modules: :mod:`keyhandoff.cache` (the passphrase cache), :mod:`keyhandoff.update`
(the offline-update runner API), :mod:`keyhandoff.askpass` (systemd's password-agent
protocol).  Importing the package itself loads nothing compiled.
"""

__version__ = "0.1.0"
