"""The Celery side of qfedit: the app, thin tasks over `qfedit.jobs`, and the client that enqueues."""
