"""The watcher against real inotify events on tmp_path, and the adaptive poll."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from watchdog.utils import BaseThread

from opus.orchestrator import watcher
from opus.orchestrator.watcher import AdaptivePoll, Batch, Watcher

IGNORED_SUFFIXES = (".tmp", ".swp", ".part", "~")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def is_candidate(path: Path) -> bool:
    name = path.name
    return (
        name.endswith(".md")
        and not name.startswith((".", "~"))
        and not name.endswith(IGNORED_SUFFIXES)
    )


def watchdog_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if isinstance(t, BaseThread) and t.is_alive()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    planned = tmp_path / "planned"
    planned.mkdir()
    return planned


async def collect_until(w: Watcher, wanted: Path, limit: float = 3.0) -> set[Path]:
    """Every path reported until ``wanted`` shows up (bounded by ``limit`` seconds)."""
    seen: set[Path] = set()
    with anyio.fail_after(limit):
        while wanted not in seen:
            seen |= (await w.next_batch(timeout=limit)).paths
    return seen


def test_public_names() -> None:
    assert set(watcher.__all__) == {"AdaptivePoll", "Batch", "Watcher"}
    for name in watcher.__all__:
        assert getattr(watcher, name) is not None


def test_batch_truthiness() -> None:
    assert not Batch()
    assert Batch(paths={Path("a.md")})
    assert Batch(rescan=True)


@pytest.mark.anyio
async def test_rename_into_folder_is_reported_without_debounce(
    tmp_path: Path, folder: Path
) -> None:
    side = tmp_path / "inbox"
    side.mkdir()
    (side / "FR-1.md").write_text("---\nid: FR-1\n---\n# One\n")
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        assert w.watching
        started = time.monotonic()
        (side / "FR-1.md").rename(folder / "FR-1.md")
        batch = await w.next_batch(timeout=4.0)
        elapsed = time.monotonic() - started
    assert batch == Batch(paths={folder / "FR-1.md"}, rescan=False)
    assert elapsed < 2.5  # far below the 5 s debounce


@pytest.mark.anyio
async def test_atomic_save_reports_the_note_never_the_temp_file(folder: Path) -> None:
    note = folder / "note.md"
    note.write_text("old\n")
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        tmp = folder / "note.md.tmp"
        with open(tmp, "w") as f:  # noqa: ASYNC230 - the write order is the test
            f.write("new\n")
            f.flush()
            os.fsync(f.fileno())
        started = time.monotonic()
        os.replace(tmp, note)
        first = await w.next_batch(timeout=4.0)
        elapsed = time.monotonic() - started
        # long enough for an unpaired move-away of the temp name (watchdog holds it 0.5 s)
        after = await w.next_batch(timeout=0.8)
    assert first.paths == {note}
    assert elapsed < 2.5  # not held for the 5 s debounce
    assert after == Batch()


@pytest.mark.anyio
async def test_in_place_writes_end_at_close_and_come_once(folder: Path) -> None:
    note = folder / "note.md"
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        started = time.monotonic()
        with open(note, "w") as f:  # noqa: ASYNC230 - the write order is the test
            for i in range(5):
                f.write(f"line {i}\n")
                f.flush()
        batch = await w.next_batch(timeout=4.0)
        elapsed = time.monotonic() - started
        again = await w.next_batch(timeout=0.3)
    assert batch == Batch(paths={note}, rescan=False)
    assert elapsed < 2.5  # the close ended the 5 s debounce
    assert again == Batch()


@pytest.mark.anyio
async def test_debounce_lasts_while_writes_continue(folder: Path) -> None:
    note = folder / "note.md"
    note.write_text("")
    debounce = 0.5
    async with Watcher(folder, is_candidate=is_candidate, debounce=debounce) as w:
        # kept open across awaits: no close event, only modifications
        f = open(note, "a")  # noqa: ASYNC230, SIM115
        try:
            for i in range(6):  # ~0.6 s of writes 0.1 s apart: longer than the debounce
                f.write(f"{i}\n")
                f.flush()
                last_write = time.monotonic()
                assert await w.next_batch(timeout=0.1) == Batch()
            batch = await w.next_batch(timeout=3.0)
            quiet_for = time.monotonic() - last_write
        finally:
            f.close()
    assert batch.paths == {note}
    assert quiet_for >= debounce


@pytest.mark.anyio
async def test_debounce_follows_the_injected_clock(folder: Path) -> None:
    note = folder / "note.md"
    note.write_text("")
    now = [100.0]
    async with Watcher(folder, is_candidate=is_candidate, debounce=0.1, clock=lambda: now[0]) as w:
        with open(note, "a") as f:  # noqa: ASYNC230 - the write order is the test
            f.write("x\n")
            f.flush()
            # real time passes well beyond 0.1 s, the injected clock does not
            assert await w.next_batch(timeout=0.5) == Batch()
            now[0] += 1.0
            started = time.monotonic()
            batch = await w.next_batch(timeout=3.0)
            elapsed = time.monotonic() - started
    assert batch.paths == {note}
    assert elapsed < 2.0  # at once, not after the 3 s timeout


@pytest.mark.anyio
async def test_temp_and_hidden_names_are_ignored(folder: Path) -> None:
    ignored = [".hidden.md", "note.md.swp", "note.md~", "~lock.md", "x.md.part", "n.md.tmp"]
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        for name in ignored:
            (folder / name).write_text("junk\n")
        (folder / ".hidden.md").unlink()
        os.replace(folder / "note.md.swp", folder / "n.md~")
        (folder / "real.md").write_text("real\n")  # last: its close comes after the others
        seen = await collect_until(w, folder / "real.md")
        rest = await w.next_batch(timeout=0.3)
    assert seen == {folder / "real.md"}
    assert rest == Batch()


@pytest.mark.anyio
async def test_deletion_and_move_away_are_reported(tmp_path: Path, folder: Path) -> None:
    gone, moved = folder / "gone.md", folder / "moved.md"
    gone.write_text("a\n")
    moved.write_text("b\n")
    (tmp_path / "done").mkdir()
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        started = time.monotonic()
        gone.unlink()
        deleted = await w.next_batch(timeout=4.0)
        deleted_after = time.monotonic() - started
        moved.rename(tmp_path / "done" / "moved.md")
        moved_away = await w.next_batch(timeout=4.0)
    assert deleted.paths == {gone}
    assert deleted_after < 1.0
    assert moved_away.paths == {moved}


@pytest.mark.anyio
async def test_queue_overflow_asks_for_a_rescan(folder: Path) -> None:
    def make_notes() -> None:
        for i in range(100):
            (folder / f"FR-{i}.md").write_text(f"{i}\n")

    async with Watcher(folder, is_candidate=is_candidate, max_queue=4) as w:
        await anyio.to_thread.run_sync(make_notes)
        with anyio.fail_after(5):  # bounded wait for inotify to deliver the events
            while not w.rescan_pending:  # noqa: ASYNC110 - a flag, not an event
                await anyio.sleep(0.01)
        batch = await w.next_batch(timeout=0)
        assert not w.rescan_pending
    assert batch.rescan
    assert batch.paths <= {folder / f"FR-{i}.md" for i in range(100)}


@pytest.mark.anyio
async def test_disabled_watcher_only_times_out(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "there"
    before = watchdog_threads()
    async with Watcher(folder, is_candidate=is_candidate, enabled=False) as w:
        assert folder.is_dir()  # created on enter
        assert not w.watching
        assert watchdog_threads() == before
        (folder / "FR-1.md").write_text("x\n")
        started = time.monotonic()
        batch = await w.next_batch(timeout=0.2)
        elapsed = time.monotonic() - started
    assert batch == Batch(paths=set(), rescan=False)
    assert elapsed >= 0.2


@pytest.mark.anyio
async def test_missing_folder_is_created_and_watched(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    async with Watcher(folder, is_candidate=is_candidate, debounce=5.0) as w:
        assert folder.is_dir()
        (folder / "FR-2.md").write_text("x\n")
        batch = await w.next_batch(timeout=4.0)
    assert batch.paths == {folder / "FR-2.md"}


@pytest.mark.anyio
async def test_exit_stops_every_watchdog_thread(folder: Path) -> None:
    before = watchdog_threads()
    async with Watcher(folder, is_candidate=is_candidate) as w:
        assert watchdog_threads() - before  # the observer and its emitter are running
        (folder / "FR-3.md").write_text("x\n")
        assert (await w.next_batch(timeout=4.0)).paths == {folder / "FR-3.md"}
        started = time.monotonic()
    stop_took = time.monotonic() - started
    assert watchdog_threads() <= before
    assert not w.watching
    assert stop_took < 3.0


@pytest.mark.anyio
async def test_exit_under_a_stream_of_events_does_not_hang(folder: Path) -> None:
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            (folder / f"FR-{i % 20}.md").write_text(f"{i}\n")
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        # observer.stop() called on the loop thread deadlocks here (watchdog's dispatcher holds
        # the observer lock while our handler waits for the loop): seen in 6 of 6 runs.
        with anyio.fail_after(10):
            for _ in range(20):
                async with Watcher(folder, is_candidate=is_candidate, max_queue=8) as w:
                    await w.next_batch(timeout=0.05)
    finally:
        stop.set()
        writer.join()
    assert not w.watching


@pytest.mark.anyio
async def test_next_batch_needs_the_context(folder: Path) -> None:
    w = Watcher(folder, is_candidate=is_candidate)
    with pytest.raises(RuntimeError):
        await w.next_batch(timeout=0)


def test_bad_arguments_are_refused(folder: Path) -> None:
    with pytest.raises(ValueError):
        Watcher(folder, is_candidate=is_candidate, debounce=-1)
    with pytest.raises(ValueError):
        Watcher(folder, is_candidate=is_candidate, max_queue=0)


def test_adaptive_poll_sequence() -> None:
    poll = AdaptivePoll()
    got = [poll.interval(busy) for busy in (True, False, False, False, False, False, True)]
    assert got == [30, 60, 120, 240, 300, 300, 30]
    assert [poll.interval(False), poll.interval(False)] == [60, 120]  # reset by the busy call


def test_adaptive_poll_custom_and_bounds() -> None:
    poll = AdaptivePoll(active=1, idle_max=5, backoff=3)
    assert [poll.interval(False) for _ in range(3)] == [3, 5, 5]
    assert poll.interval(True) == 1
    flat = AdaptivePoll(active=10, idle_max=10, backoff=1)
    assert [flat.interval(b) for b in (False, True, False)] == [10, 10, 10]
    for bad in ({"active": 0}, {"active": 10, "idle_max": 5}, {"backoff": 0.5}):
        with pytest.raises(ValueError):
            AdaptivePoll(**bad)
