#!/bin/sh
# Like the official image: a bare `redis-server ...` listens on every address,
# without protected mode, and runs as the redis user with /data owned by it.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
  shift
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups \
    redis-server --bind '* -::*' --protected-mode no --dir /data "$@"
fi
exec "$@"
