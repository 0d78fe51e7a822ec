"""What the benchmarks run against: a git repository, a vault, notes and instant agents.

Everything lives in a temporary folder. Git runs with an empty global config and a fixed
identity (set in this process's environment, so opus, the baselines and child processes
all see the same git), which keeps a person's hooks, signing or fsmonitor out of the figures.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from opus.orchestrator import Agent, ScriptedAgent, load_config
from opus.orchestrator.agents.fake import writes
from opus.orchestrator.config import Config

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Bench Person",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench Person",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
PLANNED = "10_features/03_planned"


def isolate_git(tmp: Path) -> None:
    """Point git at an empty global config and a fixed identity, for this process and its
    children (opus's own git calls included)."""
    empty = tmp / "gitconfig"
    empty.write_text("")
    os.environ.update(GIT_IDENTITY)
    os.environ["GIT_CONFIG_GLOBAL"] = str(empty)


def git(cwd: Path, *args: str) -> str:
    """Run git (raising on failure) and return its stripped standard output."""
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def make_repo(path: Path, files: int = 20) -> Path:
    """A small repository on ``main``: a package of ``files`` modules and a README."""
    (path / "app").mkdir(parents=True)
    (path / "README.md").write_text("# app\n\nA benchmark target.\n")
    for i in range(files):
        body = "".join(f"def f{i}_{k}(x: int) -> int:\n    return x + {k}\n\n\n" for k in range(8))
        (path / "app" / f"mod{i:02d}.py").write_text(body)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@dataclass(frozen=True)
class World:
    """A vault (``root``) with its ``opus.toml`` and a target repository."""

    root: Path
    repo: Path

    @property
    def config_file(self) -> Path:
        return self.root / "opus.toml"

    @property
    def planned(self) -> Path:
        return self.root / PLANNED

    @property
    def inbox(self) -> Path:
        return self.root / "10_features" / "01_inbox"

    def config(self) -> Config:
        return load_config(self.config_file)

    def put(self, name: str, text: str) -> Path:
        """Write a note straight into the planned folder."""
        path = self.planned / name
        path.write_text(text)
        return path

    def move_in(self, name: str, text: str) -> tuple[Path, Path]:
        """Write a note into the inbox; return (source, destination) for a later rename."""
        src = self.inbox / name
        src.write_text(text)
        return src, self.planned / name


def make_world(base: Path, *, concurrency: int = 3, watch: bool = True) -> World:
    """A vault and a repository under ``base``, with a service-like ``opus.toml``.

    The agents in the file are command agents that are never run: the benchmarks pass
    in-process agents, or serve notes that are all resting.
    """
    repo = make_repo(base / "app")
    root = base / "vault"
    (root / PLANNED).mkdir(parents=True)
    (root / "10_features" / "01_inbox").mkdir(parents=True)
    agent = json.dumps([sys.executable, "-c", "pass"])
    agents = "".join(
        f'[agents.{stage}]\nkind = "command"\ncommand = {agent}\n\n'
        for stage in ("planner", "coder", "tester", "reviewer")
    )
    (root / "opus.toml").write_text(
        f'[vault]\nplanned = "{PLANNED}"\n\n'
        f'[repos.app]\npath = {json.dumps(str(repo))}\nbase = "main"\n\n'
        f"[polling]\nwatch = {'true' if watch else 'false'}\n\n"
        f"[pipeline]\nconcurrency = {concurrency}\n\n" + agents
    )
    return World(root, repo)


def instant_agents() -> dict[str, Agent]:
    """In-process agents that answer at once; the coder writes one file."""
    return {
        "planner": ScriptedAgent(),
        "coder": ScriptedAgent(writes({"bench_change.txt": "one line of change\n"})),
        "tester": ScriptedAgent(),
        "reviewer": ScriptedAgent(),
    }


def simple_note(fr_id: str, priority: str = "medium") -> str:
    """A small planned FR as a person writes it."""
    return (
        f"---\nid: {fr_id}\ntitle: Thing {fr_id}\npriority: {priority}\n"
        f"tags:\n  - bench\n---\n# Thing {fr_id}\n\nPlease add the thing {fr_id}.\n"
    )


# --- a realistic 10k-note vault ---------------------------------------------------------------

_VOCABULARY = (
    "invoice export customer report billing account session token cache latency "
    "dashboard filter search index payment refund webhook queue retry schema migration "
    "upload download preview thumbnail audit permission role tenant locale currency"
)
_WORDS = tuple(_VOCABULARY.split())
_PEOPLE = ("Ana Silva", "Bo Chen", "Carla Diaz", "Dev Patel", "Eli Novak")
_PRIORITIES = ("critical", "high", "medium", "low", "P2", "1")


def realistic_note(i: int, rng: random.Random, status: str = "done") -> str:
    """An FR note as a vault collects them: 6–10 frontmatter keys (a list, a wiki-link,
    comments, dates), a heading and a 1–3 KB body. ``status`` is the opus-written status."""
    words = rng.sample(_WORDS, 4)
    title = f"{words[0].capitalize()} {words[1]} for the {words[2]} {words[3]}"
    created = date(2026, 1, 1) + timedelta(days=rng.randrange(300))
    lines = [
        f"id: FR-{i:05d}",
        f'title: "{title}"',
        f"priority: {rng.choice(_PRIORITIES)}   # agreed in planning",
        "tags:",
        *(f"  - {t}" for t in rng.sample(_WORDS, rng.randint(1, 3))),
    ]
    optional = [
        [f"created: {created.isoformat()}"],
        [f'owner: "[[{rng.choice(_PEOPLE)}]]"'],
        ["repo: app"],
        [f"depends_on: [FR-{rng.randrange(max(i, 1)):05d}]"] if i else ["approval: manual"],
        [f"estimate: {rng.randint(1, 8)}", "# estimate in ideal days"],
        [f"job_id: 20260101-000000-fr-{i:05d}-{i % 65536:04x}"],
    ]
    for extra in rng.sample(optional, rng.randint(0, 4)):
        lines += extra
    lines += [f"status: {status}", f"updated_at: {created.isoformat()}T10:30:00"]
    paragraphs = [f"# {title}", ""]
    size = rng.randint(1000, 3000)
    text = 0
    while text < size:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16)))
        para = f"The {sentence}. See [[FR-{rng.randrange(10000):05d}]] for context."
        if rng.random() < 0.2:
            para = f"- [ ] {sentence}"
        paragraphs += [para, ""]
        text += len(para) + 1
    return "---\n" + "\n".join(lines) + "\n---\n" + "\n".join(paragraphs)


def fill_vault(world: World, count: int, *, seed: int = 12) -> int:
    """Write ``count`` resting realistic notes into the planned folder; return total bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(count):
        data = realistic_note(i, rng).encode()
        (world.planned / f"FR-{i:05d}.md").write_bytes(data)
        total += len(data)
    return total
