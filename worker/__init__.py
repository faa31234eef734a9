"""The worker side of bertstream: Celery app, micro-batcher, model runner, launcher.

Imports torch; the producer never imports this package.
"""
