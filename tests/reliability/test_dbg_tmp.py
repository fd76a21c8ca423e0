from __future__ import annotations
import asyncio, logging
import pytest
from core.db.database import Database
from core.intake import Accepted, Intake, sequence_of
from tests.reliability.conftest import RecordingSender, RedisNames, jittery_model, make_engine, make_worker, message

CHATS = [f"c{i}" for i in range(10)]

@pytest.mark.redis
async def test_dbg(database: Database, names: RedisNames) -> None:
    sender = RecordingSender()
    gs, gi = names.store(), names.inbox()
    intake = Intake(store=gs, inbox=gi)
    for n in range(10):
        for chat in CHATS:
            await intake.accept(message(chat, n))
    stores = [names.store(), names.store()]
    inboxes = [names.inbox(), names.inbox()]
    workers = [make_worker(inbox=inboxes[i], store=stores[i], engine=make_engine(database, stores[i], jittery_model()), sender=sender, consumer=f"p{i}", concurrency=4, reclaim_idle=3.0) for i in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = -1; stuck_since = loop.time()
    while len(sender.sent) < 100:
        await asyncio.sleep(0.5)
        if len(sender.sent) != last:
            last = len(sender.sent); stuck_since = loop.time()
        elif loop.time() - stuck_since > 5:
            print("STUCK at", len(sender.sent), "t=", loop.time()-start)
            for w in workers:
                print(w.consumer, "in_flight", sorted(w._in_flight))
                for k, lane in w._lanes.items():
                    print("  lane", k, [(s, e.entry_id, e.deliveries) for s, _, e in lane.entries])
            for t in asyncio.all_tasks():
                if t.get_name().startswith("lane"):
                    t.print_stack()
            for chat in CHATS:
                print(chat, sender.texts(chat))
            raise AssertionError("stuck")
    for w in workers: await w.stop()
    await asyncio.gather(*tasks)
