"""``python -m toy_mdp.train ...`` (the same as ``python -m toy_mdp train ...``)."""
from toy_mdp.train.cli import main

raise SystemExit(main())
