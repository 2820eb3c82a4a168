"""Far Mesh database: SQL migrations (``database/migrations``) and the helpers that apply them.

``from database import migrate`` is the function ``database.migrate.migrate`` (the eager import below
rebinds the name after the submodule of the same name is loaded).
"""

from database.migrate import MIGRATIONS_DIR, libpq_url, migrate, status, yoyo_url

__all__ = ["MIGRATIONS_DIR", "libpq_url", "migrate", "status", "yoyo_url"]
