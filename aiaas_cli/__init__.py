"""The ``aiaas`` command: a thin click layer over plain functions."""
