"""ReferenceAhead (services/compiler/fused/reference_ahead.py): the reference pass started before the graph
exists hands verification its result for the rows it was started on and no others, raises what the pass
raised, and stops at the next layer when cancelled."""

from __future__ import annotations

import threading

import pytest

from services.compiler.fused.reference_ahead import ReferenceAhead, ReferenceCancelled
from services.compiler.modeling.layerwise import ReferenceRow
from services.compiler.verify import Reference

ROWS = [ReferenceRow((1, 2, 3), 0), ReferenceRow((4, 5), 1)]


def test_the_pass_started_ahead_is_the_one_verification_gets():
    asked = []

    def make(hook):
        def run(rows):
            hook({})
            asked.append(list(rows))
            return Reference(logits=[], error=0.5)

        return run

    ahead = ReferenceAhead(make, ROWS)
    assert ahead(list(ROWS)).error == 0.5 and ahead(ROWS).error == 0.5
    assert asked == [ROWS]  # one pass, however often asked
    with pytest.raises(RuntimeError, match="other than the 2 the reference was started on"):
        ahead(ROWS[:1])
    ahead.cancel()  # finished: nothing to stop


def test_the_pass_raises_on_the_callers_thread():
    def make(hook):
        def run(rows):
            raise ValueError("layer 3 is not the block quantisation of the checkpoint's")

        return run

    ahead = ReferenceAhead(make, ROWS)
    with pytest.raises(ValueError, match="layer 3"):
        ahead(ROWS)


def test_cancel_stops_the_pass_at_its_next_layer():
    started, layers = threading.Event(), []
    release = threading.Event()

    def make(hook):
        def run(rows):
            for i in range(1000):
                hook({})
                layers.append(i)
                started.set()
                release.wait()  # the first layer waits until cancel() was asked
            return Reference(logits=[], error=0.0)

        return run

    ahead = ReferenceAhead(make, ROWS)
    started.wait()
    threading.Timer(0.05, release.set).start()
    ahead.cancel()
    assert layers == [0]  # the hook before the second layer stopped it
    with pytest.raises(ReferenceCancelled):
        ahead(ROWS)
