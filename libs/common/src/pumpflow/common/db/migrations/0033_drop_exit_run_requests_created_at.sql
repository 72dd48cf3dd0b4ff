-- Migration 0032's index served trading's look for shutdown requests its replicas
-- missed, in the exit service's table. Trading takes system.shutdown on queues its
-- replicas share now, where a stop published while none runs waits for the next, and
-- looks no more; nothing else reads the table by when a request was made.
DROP INDEX IF EXISTS exit_run_requests_created_at;
