"""`python -m pensieve.router`: see ``pensieve.router.main``."""
from .main import main

raise SystemExit(main())
