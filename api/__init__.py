"""The HTTP service (FastAPI): thin routes over `qfedit.registry`, `qfedit.importing` and `qfedit.pipeline`.

`create_app(settings)` in `api.app` builds it; nothing is created at import.
"""
