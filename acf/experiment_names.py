"""The names of the experiments and of their scales, for the command line (``acf experiment --help``)
without importing the experiments themselves (matplotlib, every model). ``acf.experiments`` builds its
registry from ``EXPERIMENT_NAMES``, in this order (the order ``all`` runs them), and its scales must
carry the names of ``SCALES`` (a test holds both)."""

EXPERIMENT_NAMES = ("convergence", "heads", "awgn", "dot", "classification", "interpolation", "tight", "long",
                    "attention")

# Scale name: what it is for.
SCALES = {"micro": "seconds (tests)", "reduced": "a 2-core CPU within a session", "full": "hours"}
