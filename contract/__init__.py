"""What the producer and the worker must agree on.

Settings, queue and table names, the task message schema and the results
table with its queries. Light on purpose: importing this package never pulls
torch or transformers, so a web app can install the client alone.
"""
