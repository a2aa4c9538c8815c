"""The ``aiaas`` command: every command group, thin click commands over plain functions of
``aiaas``, ``cluster``, ``jobs`` and ``serve_apps`` (the only package that imports them all)."""
