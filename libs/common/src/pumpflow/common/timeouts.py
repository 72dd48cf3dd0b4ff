"""Default bounds on a dependency's answer: how long a call waits before the dependency
counts as away and the work waits for it (:mod:`pumpflow.common.dependencies`).

The runtime's settings argue them (``postgres_command_timeout_s``,
``redis_socket_timeout_s``). Free of imports: every ``pumpflow`` command reads the
settings, and none of them may pull in a client library or the metrics to do so.
"""

#: a Postgres command, or the opening of a connection (``PUMPFLOW_POSTGRES_COMMAND_TIMEOUT_S``)
POSTGRES_COMMAND_TIMEOUT_S = 30.0
#: a Redis socket operation, connecting included (``PUMPFLOW_REDIS_SOCKET_TIMEOUT_S``)
REDIS_SOCKET_TIMEOUT_S = 5.0
