"""A started process keeps its start-up heap out of the garbage collector's full collections.

Run in a fresh interpreter: freezing is once per process, and the test process has long been started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, gc, json, sys
from bots import platforms
from core.heap import settle
from core.llm.testing import FunctionModel, echo
from core.runtime import Runtime
from core.settings import load_settings

async def main() -> None:
    settings = load_settings(
        _env_file=None, database_url=sys.argv[1], redis_url=None, faq_embeddings=False,
        scheduler_enabled=False,
    )
    async with (
        Runtime.open(settings, model=FunctionModel(echo)) as runtime,
        platforms.running(settings, runtime, worker=False, receivers=False),
    ):
        heap = {"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}
    full = []
    gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
    settle()
    print(json.dumps({**heap, "frozen_again": gc.get_freeze_count(), "full_collections": len(full)}))

asyncio.run(main())
"""


def test_full_collections_no_longer_walk_what_start_up_built(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    heap = json.loads(result.stdout.strip().splitlines()[-1])
    # Imports and start-up leave well over 100,000 long-lived objects; a full collection walked them all.
    assert heap["frozen"] > 100_000
    assert heap["walked"] < heap["frozen"] / 10
    # Settling again (a second runtime in one process) neither collects nor freezes a second time.
    assert heap["full_collections"] == 0
    assert heap["frozen_again"] <= heap["frozen"]
