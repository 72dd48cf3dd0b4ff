# Redis' metrics for Prometheus: Debian's prometheus-redis-exporter on the base image
# the services already share (bookworm), run as nobody.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus-redis-exporter \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
USER nobody
EXPOSE 9121
ENTRYPOINT ["/usr/bin/prometheus-redis-exporter"]
CMD ["--redis.addr=redis://redis:6379"]
