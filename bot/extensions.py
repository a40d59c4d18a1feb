"""Flask extensions, created unbound here and bound in create_app (no circular imports)."""
from __future__ import annotations

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Declarative base for every model (plain typed mappings, no MappedAsDataclass: see README)."""


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
