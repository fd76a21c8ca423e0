"""Keep the cyclic garbage collector off the heap a kefu process builds while it starts.

After its imports and start-up a gateway or worker holds about 300,000 Python objects that live as long
as the process: tokenizers, guard lexicons, pydantic and aiogram schemas, SQLAlchemy metadata. CPython
walks every one of them in each full (generation 2) collection, and the steady churn of a webhook or a
turn sets one off more than once a second under load: each took about 150 ms, during which no
request was answered. :func:`settle` collects once and then moves everything alive into the permanent
generation (:func:`gc.freeze`), so later collections only walk what was created since. Reference
counting still frees those objects when they go; only cycles among them are no longer collected.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

_settled = False


def settle() -> None:
    """Freeze the start-up heap, once per process (later calls do nothing)."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
    log.debug("%d start-up objects moved out of the collector's reach", gc.get_freeze_count())
