"""aiaas: the library shared by the cluster launcher, the jobs and the Serve apps.

Importing it has no side effects: no ``ray.init``, no directories created, no logging set up.
"""

__version__ = "0.1.0"
