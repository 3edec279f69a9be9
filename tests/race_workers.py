"""Code that runs in real child processes for the race tests (``test_races.py``).

The attacker swaps directories of a store for symbolic links to an outside twin and back, as a
hostile user sharing the file system would. It never touches anything outside the store
itself: it only renames store directories aside, creates and removes links inside the store,
and renames the real directories back. It stops when the stop file appears, when its log
vanishes (the test's temp directory was removed), or after ``max_attempts`` attempts; it never
decides by time.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import time

from proc_workers import log_line


def _hold(rng: random.Random) -> None:
    """Keep the current state (swapped or restored) for a short, varied while: races need both
    quick flips (a check and a use straddling one) and states that last through whole calls."""
    choice = rng.randrange(4)
    if choice == 1:
        os.sched_yield()
    elif choice == 2:
        time.sleep(0.00002)
    elif choice == 3:
        time.sleep(0.0002)


def _swap_once(store_root: str, outside_root: str, rel: str, n: int, rng: random.Random) -> bool:
    """Replace ``store_root/rel`` by a link to ``outside_root/rel`` for a moment, then put it back.

    Returns whether the link was in place (a swap happened). Every error of its own is
    ignored: the store may be creating, replacing or deleting the same directory meanwhile.
    """
    real = os.path.join(store_root, rel)
    parent, name = os.path.split(real)
    aside = os.path.join(parent, f".swap-{n}-{name}")
    twin = os.path.join(outside_root, rel)
    try:
        os.rename(real, aside)
    except OSError:
        return False  # not there right now (deleted, or not yet written)
    linked = False
    try:
        os.symlink(twin, real)
        linked = True
    except OSError:
        pass  # the store made a new directory there in the meantime
    _hold(rng)
    if linked:
        try:
            if stat.S_ISLNK(os.lstat(real).st_mode):
                os.unlink(real)  # only links are ours: the store never makes one
        except OSError:
            pass
    try:
        os.replace(aside, real)
    except OSError:
        # The store put a new directory there (or removed the parent): the old one is garbage.
        # shutil.rmtree does not follow links, and none of ours is left inside ``aside``.
        shutil.rmtree(aside, ignore_errors=True)
    return linked


def symlink_attacker(
    store_root: str,
    outside_root: str,
    targets: list[str],
    log: str,
    stop_file: str,
    max_attempts: int,
    seed: int,
) -> None:
    """Swap random ``targets`` (relative to ``store_root``) for links into ``outside_root``.

    Logs ``start``, then ``swaps N`` after each of the first 20 swaps and every 200th, and
    finally ``done SWAPS ATTEMPTS``.
    """
    rng = random.Random(seed)
    log_line(log, "start")
    swaps = attempts = 0
    while attempts < max_attempts and not os.path.exists(stop_file) and os.path.exists(log):
        attempts += 1
        rel = targets[rng.randrange(len(targets))]
        if _swap_once(store_root, outside_root, rel, attempts, rng):
            swaps += 1
            if swaps <= 20 or swaps % 200 == 0:
                log_line(log, f"swaps {swaps}")
        else:
            _hold(rng)
        _hold(rng)
    log_line(log, f"done {swaps} {attempts}")
