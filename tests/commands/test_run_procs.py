"""sage_cli.run.procs: the processes below `sage run` (what it signals and waits for) and a
stage's siblings in its pipeline (sage_cli.run.registry), from /proc's children lists, checked
against every process's parent link."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sage_cli.run import procs, registry


def test_descendants_are_every_live_process_below_and_not_the_excluded() -> None:
    """What `sage run` signals and waits for: from the children lists in /proc, the same set
    the parent links give; no zombie; an excluded subtree (a private Ray) left out. (Only the
    processes this test starts are looked at: others may run below the test process.)"""
    tree = subprocess.Popen(["bash", "-c", "sleep 30 | sleep 30 & (sleep 30; true) & wait"])
    # a process whose child has exited and is never reaped: a zombie below us
    keeps_zombie = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nif os.fork() == 0: os._exit(0)\ntime.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 10
        below: list[int] = []
        while time.monotonic() < deadline:
            below = procs.descendants(tree.pid)
            # the pipeline's two sleeps, the subshell and its sleep; the zombie
            if len(below) >= 4 and len(procs.children(keeps_zombie.pid)) == 1:
                break
            time.sleep(0.05)
        assert len(below) == 4, below
        assert sorted(below) == sorted(procs.descendants_by_parent_links(tree.pid, frozenset()))
        [zombie] = procs.children(keeps_zombie.pid)
        assert procs.state(zombie) == b"Z" and procs.descendants(keeps_zombie.pid) == []
        everything = procs.descendants(os.getpid())
        assert {tree.pid, keeps_zombie.pid, *below} <= set(everything)
        assert zombie not in everything
        rest = procs.descendants(os.getpid(), frozenset({tree.pid}))
        assert keeps_zombie.pid in rest and not {tree.pid, *below} & set(rest)
    finally:
        _kill_trees(tree, keeps_zombie)


def test_a_stage_finds_its_siblings_as_the_parent_links_give_them() -> None:
    """registry's sibling lookup (a stage under bash finding the command that writes its
    stdin) reads the shell's children lists; the scan of every process agrees."""
    shell = subprocess.Popen(["bash", "-c", "sleep 30 | sleep 30 | sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(procs.children(shell.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        kids = sorted(procs.children(shell.pid))
        assert len(kids) == 3
        by_links = sorted(
            int(e) for e in os.listdir("/proc") if e.isdigit() and procs.parent_of(e) == shell.pid
        )
        assert kids == by_links
        assert sorted(registry._siblings(shell.pid, kids[0])) == kids[1:]
    finally:
        _kill_trees(shell)


def _kill_trees(*roots: subprocess.Popen) -> None:
    """SIGKILL what this test started (each root and everything below it), nothing else."""
    for root in roots:
        for pid in [*procs.descendants(root.pid), root.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        root.wait()
