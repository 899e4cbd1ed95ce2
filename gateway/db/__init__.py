"""Database: models, engine and sessions (SQLAlchemy 2.0). Migrations live in gateway/migrations."""
