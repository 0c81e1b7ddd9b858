"""cetopt's built-in solver backends, one module per solver.

Each module defines one :class:`cetopt.Solver` subclass and is registered through the
``cetopt.solvers`` entry-point group, exactly like a third-party plugin. Importing this package
imports no solver library; a backend whose dependency is missing reports ``available() == False``.

- :mod:`solvers.highs` — HiGHS via highspy (default).
- :mod:`solvers.cbc` — CBC as bundled with PuLP.
- :mod:`solvers.cvxpy` — cvxpy with an installed MIP-capable solver.
"""
