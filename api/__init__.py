"""The HTTP API (``bertstream serve``): web apps submit texts and read results over HTTP.

A FastAPI app on uvicorn, in the ``api`` extra. It publishes through the
producer client and reads through the results store; it never imports torch.
Modules: :mod:`.app` (routes), :mod:`.submit` (idempotent, coalesced
publishing), :mod:`.waiter` (long polls), :mod:`.security` (tokens, body
limit), :mod:`.errors` (JSON errors), :mod:`.metrics` (Prometheus),
:mod:`.dashboard` (the page at ``/`` and the routes it polls),
:mod:`.cli` (the command).
"""
