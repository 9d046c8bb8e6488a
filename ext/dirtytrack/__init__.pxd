# Marks ext/dirtytrack as the Cython package "dirtytrack" so that
# `from dirtytrack.kernel cimport *` finds kernel.pxd.
