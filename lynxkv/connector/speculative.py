"""Speculation on the Anchor, verification on the Residual: the pure parts.

:func:`accept_drafts` is the greedy acceptance rule; :class:`Recorder` collects a
request's timeline while the engine runs, and :class:`Timeline` is what it returns. Times
are seconds since the request started (``time.perf_counter``), fetch included. A token
has two times: when it was *generated* (a draft: on the anchor cache) and when it was
*verified* (a draft: when the verification pass accepted it; any other token: when it was
generated, since it came from the full-precision cache).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lynxkv.connector.base import LoadHandle

__all__ = ["DraftPolicy", "Recorder", "Timeline", "accept_drafts"]

DraftPolicy = Literal["overlap", "fixed"]


def accept_drafts(
    drafts: Sequence[int], targets: Sequence[int], max_new: int, eos: Collection[int]
) -> tuple[list[int], int]:
    """The tokens a verification pass emits, and how many of them are accepted drafts.

    ``targets[i]`` is the model's greedy token where ``drafts[i]`` was drafted (one more
    than the drafts: the token after the last draft). The longest prefix of drafts equal
    to their targets is kept, then the model's token at the first mismatch (or after the
    last draft); an accepted end-of-turn token, or ``max_new`` tokens, end it early.
    """
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"expected {len(drafts) + 1} targets, got {len(targets)}")
    out: list[int] = []
    for draft, target in zip(drafts, targets, strict=False):
        if draft != target:
            break
        out.append(draft)
        if draft in eos or len(out) == max_new:
            return out, len(out)
    accepted = len(out)
    out.append(targets[accepted])
    return out[:max_new], accepted


@dataclass(frozen=True)
class Timeline:
    """What happened during one request (times in seconds since its start)."""

    prefix_tokens: int
    suffix_tokens: int
    #: the whole prefix was (re)computed by the model instead of loaded
    recomputed: bool
    anchor_ready: float | None
    residual_ready: float | None
    generated: tuple[float, ...]
    verified: tuple[float, ...]
    drafted: int
    accepted: int

    @property
    def ttft_draft(self) -> float:
        """Time to the first token, drafted or not."""
        return self.generated[0]

    @property
    def ttft_verified(self) -> float:
        """Time to the first token known to be the full-precision output."""
        return self.verified[0]

    def time_to(self, n: int) -> float | None:
        """Time until the ``n``-th token (1-based) was verified; None if fewer came."""
        return self.verified[n - 1] if len(self.verified) >= n else None

    def summary(self, n: int = 32) -> dict[str, Any]:
        """The figures reports print (demo, bench/ttft.py), JSON-ready. ``tt32_s`` is the
        time to the ``n``-th verified token, or to the last when fewer came
        (``tt32_tokens`` says which)."""
        last = min(n, len(self.verified))
        return {
            "ttft_draft_s": self.ttft_draft,
            "ttft_verified_s": self.ttft_verified,
            "tt32_s": self.verified[last - 1],
            "tt32_tokens": last,
            "anchor_ready_s": self.anchor_ready,
            "residual_ready_s": self.residual_ready,
            "prefix_tokens": self.prefix_tokens,
            "suffix_tokens": self.suffix_tokens,
            "recomputed": self.recomputed,
            "drafted": self.drafted,
            "accepted": self.accepted,
        }


@dataclass
class Recorder:
    """Mutable timeline of a running request (engine-internal)."""

    start: float
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    recomputed: bool = False
    anchor_ready: float | None = None
    residual_ready: float | None = None
    drafted: int = 0
    accepted: int = 0
    generated: list[float] = field(default_factory=list)
    verified: list[float] = field(default_factory=list)
    _drafts: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def emit(self, token: int) -> None:
        """A token from the full-precision (or recomputed) cache."""
        t = self.now()
        self.generated.append(t)
        self.verified.append(t)

    def draft(self) -> None:
        self._drafts.append(self.now())

    def verify(self, drafted: int, emitted: Sequence[int], accepted: int) -> None:
        """A verification pass over ``drafted`` drafts emitted ``emitted``, the first
        ``accepted`` of them drafts."""
        t = self.now()
        self.drafted += drafted
        self.accepted += accepted
        for i in range(len(emitted)):
            self.generated.append(self._drafts[i] if i < accepted else t)
            self.verified.append(t)
        self._drafts.clear()

    def mark_loaded(self, handle: LoadHandle, *, residual: bool = True) -> None:
        """Take the instants the load's stages completed (now, if not stamped yet)."""
        now = self.now()
        if self.anchor_ready is None:
            at = handle.anchor_at
            self.anchor_ready = now if at is None else min(now, at - self.start)
        if residual and self.residual_ready is None:
            at = handle.residual_at
            self.residual_ready = now if at is None else min(now, at - self.start)

    def timeline(self) -> Timeline:
        return Timeline(
            prefix_tokens=self.prefix_tokens,
            suffix_tokens=self.suffix_tokens,
            recomputed=self.recomputed,
            anchor_ready=self.anchor_ready,
            residual_ready=self.residual_ready,
            generated=tuple(self.generated),
            verified=tuple(self.verified),
            drafted=self.drafted,
            accepted=self.accepted,
        )
