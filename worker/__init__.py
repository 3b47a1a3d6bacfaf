"""The Celery side of qfedit: the app, thin tasks over `qfedit.pipeline`, and the client that enqueues."""
