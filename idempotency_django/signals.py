"""Signals sent for every idempotent request, for metrics and audit.

Every signal is sent with ``sender=IdempotencyRecord`` and the keyword arguments
``request`` (the DRF or Django request), ``scope`` and ``key``; the ones below add more.
Receivers run synchronously in the request: keep them cheap, and never let them raise.

==================  ===============================================  ====================
signal              sent when                                        extra arguments
==================  ===============================================  ====================
``executed``        the handler ran and its response was stored      ``status``
``replayed``        a retry was answered with the stored response    ``status``
``conflict``        a request was answered 409 (key in flight)       ``retry_after`` (s)
``mismatch``        a request was answered 422 (other body)
``taken_over``      a retry took over a key whose lease ran out
``released``        the handler failed (5xx or exception): the key   ``status`` (None for
                    was released and nothing was stored              an exception)
==================  ===============================================  ====================
"""

from __future__ import annotations

from django.dispatch import Signal

executed = Signal()
replayed = Signal()
conflict = Signal()
mismatch = Signal()
taken_over = Signal()
released = Signal()
