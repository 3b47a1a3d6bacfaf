"""The HTTP service (FastAPI): thin routes over `qfedit.repository`, `qfedit.importing` and `qfedit.jobs`.

`create_app(settings)` in `api.app` builds it; nothing is created at import.
"""
