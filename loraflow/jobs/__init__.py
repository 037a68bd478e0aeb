"""Jobs on Redis: the queue and its workers (queue), JobService (job_service), the process shape of
the queue-backed services (queue_service), the adapter/artifact registry and its rebuild from the
store, and the embedded redis-server for laptops and tests."""
