"""Feature job (Polars): read, validate, row policies, encode ids, build sequences, split.

Entry point: :func:`features.build.build_features`; the table contracts live in :mod:`features.schema`.
"""
