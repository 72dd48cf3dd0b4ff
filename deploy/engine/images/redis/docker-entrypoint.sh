#!/bin/sh
# As the official image: a first argument that is an option or a .conf runs
# redis-server with it; without a config file protected mode is off, so the other
# containers of the network connect.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
  case "${2:-}" in *.conf) ;; *) set -- "$@" --protected-mode no ;; esac
fi
exec "$@"
