"""A request's one deadline: absolute on this host's clock, and carried to another host as the time left."""

from __future__ import annotations

import pickle
import time

from uniadapter_serve.service.tasks import Deadline, EmbedJob


def test_a_deadline_is_absolute_and_passes():
    d = Deadline.after(60)
    first = d.remaining()
    assert 59 < first <= 60 and not d.passed
    assert d.remaining() <= first  # it counts down: every step spends from the same deadline
    gone = Deadline(time.monotonic() - 1)
    assert gone.passed and gone.remaining() == 0.0


def test_a_pickled_deadline_arrives_as_the_seconds_left(monkeypatch):
    """Ray pickles a job to a replica on another host, whose monotonic clock has another origin: the deadline
    travels as the time left and is fixed again against the receiving clock."""
    job = EmbedJob(query="a red circle", ref="demo@1", deadline=Deadline.after(30))
    wire = pickle.dumps(job)
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + 1.0e6)  # the other host: its clock began elsewhere
    back = pickle.loads(wire)
    assert back.query == "a red circle" and back.ref == "demo@1"
    assert abs(back.deadline.at - (job.deadline.at + 1.0e6)) < 1.0  # the same instant, on the other clock
    assert 29 < back.deadline.remaining() <= 30
