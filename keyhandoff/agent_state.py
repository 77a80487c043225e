"""What the agent keeps between events: its prompts, the queriers it answered, its checks.

Plain data and the rules that only read or update it: no file, socket or keyring is touched
here (:mod:`keyhandoff.agent` is the event loop, :mod:`keyhandoff.responder` what it does
with a prompt).  Nothing here holds a secret except a :class:`Check`, queued or running, and
its owner wipes it when the check ends.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyhandoff.askpass import AskRequest
    from keyhandoff.secret import Secret
    from keyhandoff.verifier import Verification

__all__ = ["Answer", "Check", "Counts", "Prompt", "Querier", "Stage", "State"]

#: (volume, querier PID): one querier asking for one volume.
Querier = tuple[str, int]


class Stage(enum.Enum):
    """Where one prompt stands for the agent."""

    #: a disk prompt of a known volume not answered yet: waiting for a key in the cache
    PENDING = "pending"
    #: answered by us; its querier's outcome (the volume opens, or it asks again) is awaited
    ANSWERED = "answered"
    #: never answered by us (AcceptCached=0, a retry): what the person types may be captured
    LEFT = "left to the person"
    #: never answered nor captured (not a disk prompt, no header, refused, reply failed)
    IGNORED = "ignored"


@dataclass
class Prompt:
    """What the agent knows of one ask file."""

    name: str
    request: AskRequest
    source: str | None = None
    volume: str | None = None
    stage: Stage = Stage.PENDING
    #: how many entries systemd's cache had when the prompt appeared (for capture)
    systemd_entries: int = 0
    #: when the querier wrote the ask file (its mtime, CLOCK_REALTIME ns)
    seen_ns: int = 0

    @property
    def waiting_for_key(self) -> bool:
        """Identified and not answered yet: a new cache entry may answer it."""
        return self.stage is Stage.PENDING and self.volume is not None

    @property
    def capturable(self) -> bool:
        """When it goes away, what the person typed for it may be captured."""
        return (self.stage in (Stage.PENDING, Stage.LEFT)
                and self.volume is not None and self.source is not None)


@dataclass
class Answer:
    """Our answer to one querier: which entry it came from, and whether the querier retried.

    Kept while the querier lives: a second prompt of it is a retry, never answered again.
    """

    #: the serial of the cache entry we answered from
    serial: int
    #: whether that entry was the volume's one-time key (else its passphrase)
    onetime: bool
    #: the querier asked again after our answer, and the entry was checked (once)
    retried: bool = False


@dataclass
class Check:
    """One key to check against a header, queued or running in a verifier child."""

    #: "capture": what the person typed, kept if it opens; "retry": our answer's entry,
    #: dropped if it does not
    kind: Literal["capture", "retry"]
    source: str
    volume: str
    secret: Secret
    #: for a retry check: the serial of the cache entry under test, and whether it is the
    #: volume's one-time key
    serial: int = 0
    onetime: bool = False
    #: the verifier child, once started
    child: Verification | None = None


@dataclass
class Counts:
    """What the agent did, for its status line and its stopping log line."""

    answered: int = 0
    captured: int = 0
    refused: int = 0
    dropped: int = 0


@dataclass
class State:
    """Everything the agent holds between events."""

    #: every ask file read and not gone yet, by name, whatever its stage
    prompts: dict[str, Prompt] = field(default_factory=dict)
    #: the queriers we answered, with our answer, until they exit
    answered: dict[Querier, Answer] = field(default_factory=dict)
    #: volumes whose entry a retry check is judging: not answered meanwhile
    checking: set[str] = field(default_factory=set)
    #: checks waiting for the verifier (one runs at a time)
    queued: collections.deque[Check] = field(default_factory=collections.deque)
    #: the check whose verifier child runs now
    running: Check | None = None
    counts: Counts = field(default_factory=Counts)

    def pending(self) -> list[Prompt]:
        """The prompts waiting for a key (:attr:`Prompt.waiting_for_key`)."""
        return [p for p in self.prompts.values() if p.waiting_for_key]

    def first_retry(self, querier: Querier) -> Answer | None:
        """Our answer to ``querier``, the first time it asks again after it.

        Its entry is checked once: ``None`` when we did not answer it or it retried before.
        """
        answer = self.answered.get(querier)
        if answer is None or answer.retried:
            return None
        answer.retried = True
        return answer

    def forget_queriers(self, alive: Callable[[int], bool]) -> None:
        """Drop our answers to queriers that are gone: they cannot retry any more."""
        for querier in [q for q in self.answered if not alive(q[1])]:
            del self.answered[querier]

    def next_check(self) -> Check | None:
        """The check to start now: the next queued one, unless one runs."""
        if self.running is not None or not self.queued:
            return None
        return self.queued.popleft()

    def drain_checks(self) -> list[Check]:
        """Every check, queued and running, taken out of the state (to wipe at the end)."""
        checks = [*self.queued, *([self.running] if self.running else [])]
        self.queued.clear()
        self.running = None
        return checks

    def status_line(self) -> str:
        """The agent's ``STATUS=`` line ("waiting": the ask files it holds)."""
        c = self.counts
        return (f"answered {c.answered}, captured {c.captured}, refused {c.refused}, "
                f"dropped {c.dropped}, waiting {len(self.prompts)}")
