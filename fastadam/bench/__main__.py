"""Design: ``python -m fastadam.bench`` runs ``cli.main`` (see ``cli``)."""
import sys

from .cli import main

sys.exit(main())
