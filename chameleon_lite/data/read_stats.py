"""Read statistics of the shard readers: good samples, skips and repairs by reason, summed over processes.

Counts live in a small shared-memory array created with the dataset, so increments made in DataLoader worker
processes (fork or spawn) are visible in the main process. The array is created with the "spawn" context so
spawn-started workers accept its lock; pickling it outside process spawning gives an independent snapshot.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.context
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chameleon_lite.data.decoding import REPAIR_REASONS, SKIP_REASONS

COUNTER_NAMES: tuple[str, ...] = (
    ("good",) + tuple(f"skip/{r}" for r in SKIP_REASONS) + tuple(f"repair/{r}" for r in REPAIR_REASONS)
)


@dataclass
class ReadStats:
    """What a reader did: ``good`` samples yielded, ``skipped`` and ``repaired`` counts by reason.

    ``repaired`` counts repairs, not samples (an interleaved document with three RGBA images adds 3 to
    ``alpha_on_white``); repaired samples are also in ``good``. Only non-zero reasons are listed.
    """

    good: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> ReadStats:
        """Build from flat counter names: ``good``, ``skip/<reason>``, ``repair/<reason>``."""
        stats = cls(good=int(counts.get("good", 0)))
        for name, value in counts.items():
            if value and name.startswith("skip/"):
                stats.skipped[name[5:]] = int(value)
            elif value and name.startswith("repair/"):
                stats.repaired[name[7:]] = int(value)
        return stats

    def as_dict(self) -> dict[str, int]:
        """Flat counts (``good``, ``skip/<reason>``, ``repair/<reason>``), e.g. for logging or all_reduce."""
        out = {"good": self.good}
        out.update({f"skip/{k}": v for k, v in self.skipped.items()})
        out.update({f"repair/{k}": v for k, v in self.repaired.items()})
        return out

    def __add__(self, other: ReadStats) -> ReadStats:
        total = dict(self.as_dict())
        for name, value in other.as_dict().items():
            total[name] = total.get(name, 0) + value
        return ReadStats.from_counts(total)

    def summary(self) -> str:
        """One line, e.g. ``'98 good, 2 skipped (corrupt_image=1, missing_text=1), 3 repairs (grey_to_rgb=3)'``."""

        def listing(counts: dict[str, int]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))

        text = f"{self.good} good, {self.n_skipped} skipped"
        if self.skipped:
            text += f" ({listing(self.skipped)})"
        if self.repaired:
            text += f", {sum(self.repaired.values())} repairs ({listing(self.repaired)})"
        return text


def _shared_int64_array(size: int):
    """A zeroed, locked int64 array in shared memory. Its lock comes from the "spawn" context: such a lock
    works in forked children too, while a fork-context lock refuses to be sent to spawn-started workers."""
    return multiprocessing.get_context("spawn").Array(ctypes.c_int64, size)


class SharedCounts:
    """Named int64 counters in shared memory, so DataLoader workers' increments reach the main process.

    Travels to worker processes by fork inheritance or by pickling while a process is being spawned. Any
    other copy (``copy.deepcopy``, pickling to disk) gets fresh shared memory holding a snapshot and counts
    independently from then on: shared memory cannot travel any other way.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._array = _shared_int64_array(len(self.names))

    def add(self, name: str, n: int = 1) -> None:
        with self._array.get_lock():
            self._array[self._index[name]] += n

    def values(self) -> dict[str, int]:
        with self._array.get_lock():
            return dict(zip(self.names, self._array[:]))

    def reset(self) -> None:
        with self._array.get_lock():
            self._array[:] = [0] * len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_array"] = list(self._array[:])  # not starting a process: carry a snapshot
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self._array, list):
            snapshot = self._array
            self._array = _shared_int64_array(len(self.names))
            self._array[:] = snapshot
