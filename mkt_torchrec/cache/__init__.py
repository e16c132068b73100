"""The knowledge cache (KEEP's General Knowledge Center; issue 26): versioned key-value stores of knowledge vectors.

:func:`open_store` opens an embedded SQLite file (no server) or Redis behind one interface,
:class:`KnowledgeStore`; see :mod:`mkt_torchrec.cache.store`. The names below are imported on first use, so that
``mkt --help`` (whose parser imports :mod:`mkt_torchrec.cache.cli`) does not import numpy.
"""

from typing import Any

__all__ = ["DEFAULT_KEEP", "KnowledgeStore", "Lookup", "StoreUnreachable", "VersionInfo", "VersionNotPublished",
           "VersionWriter", "open_store"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mkt_torchrec.cache import store

        return getattr(store, name)
    raise AttributeError(f"module 'mkt_torchrec.cache' has no attribute {name!r}")
